"""models/: shapes (odd included), conditioning, sizes, meta-device 1b, dtype, checkpointing, configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch

from launch.cli import load_config
from models.backbone import token_count
from models.conditioning import FIELDS, vocabulary_index
from models.sizes import SIZES, ModelConfig, build_model, parameter_count, resolve_config, tokens_per_sample

META = {"modality": "Cine", "view": "lax_4ch", "pattern": "ktRadial", "R": 16, "vendor": "Siemens", "field_T": 3.0}


def _batch(b: int = 1, t: int = 3, c: int = 3, y: int = 21, x: int = 33, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kspace = torch.randn(b, t, c, y, x, dtype=torch.complex64, generator=g)
    mask = (torch.rand(b, t, y, x, generator=g) < 0.35).float()
    mask[:, :, y // 2 - 3: y // 2 + 3] = 1  # an ACS band
    return kspace * mask.unsqueeze(2), mask


@pytest.mark.parametrize("shape", [(3, 21, 33), (1, 17, 9), (2, 16, 24)])
def test_outputs_keep_input_shapes_odd_included(shape: tuple[int, int, int]) -> None:
    t, y, x = shape
    torch.manual_seed(0)
    model = build_model("tiny")
    kspace, mask = _batch(2, t, 3, y, x)
    out = model(kspace, mask, [META, {}])
    assert out["image"].shape == (2, t, y, x) and out["image"].dtype == torch.complex64
    assert out["kspace"].shape == (2, t, 3, y, x) and out["kspace"].dtype == torch.complex64
    assert out["sens"].shape == (2, 1, 3, y, x) and out["sens"].dtype == torch.complex64
    assert torch.isfinite(torch.view_as_real(out["image"])).all()


def test_changing_the_conditioning_changes_the_output() -> None:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    kspace, mask = _batch()
    with torch.no_grad():
        a = model(kspace, mask, [META])["image"]
        b = model(kspace, mask, [{**META, "pattern": "Uniform", "R": 8}])["image"]
        a2 = model(kspace, mask, [dict(META)])["image"]
    assert torch.equal(a, a2)  # same inputs, bit-identical: any difference below is the conditioning's
    # (at init the metadata tokens are small, std 0.02, and reach the image through the convolutional head)
    assert (a - b).abs().max() > 1e-6 * a.abs().max()


def test_unknown_vendor_runs_and_uses_the_unknown_embedding() -> None:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    kspace, mask = _batch()
    unseen = {**META, "vendor": "Canon", "field_T": 9.4}
    with torch.no_grad():
        out_unseen = model(kspace, mask, [unseen])["image"]
        out_missing = model(kspace, mask, [{k: v for k, v in META.items() if k not in ("vendor", "field_T")}])["image"]
    assert torch.isfinite(torch.view_as_real(out_unseen)).all()
    assert torch.equal(out_unseen, out_missing)  # unseen and missing both map to "unknown"
    assert vocabulary_index("vendor", "Canon") == vocabulary_index("vendor", None) == 0
    assert vocabulary_index("vendor", "SIEMENS") == vocabulary_index("vendor", "siemens") > 0
    assert vocabulary_index("field_T", 3.0) == vocabulary_index("field_T", "3") > 0
    assert vocabulary_index("R", True) == 0 and vocabulary_index("view", "") == 0


def test_1b_builds_on_the_meta_device_with_its_parameter_count_in_range() -> None:
    model = build_model("1b", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert 0.95e9 <= parameter_count(model) <= 1.05e9


def test_size_ladder() -> None:
    counts = {name: parameter_count(build_model(name, device="meta")) for name in ("tiny", "small", "base")}
    assert counts["tiny"] < 1e6
    assert counts["tiny"] < counts["small"] < counts["base"]
    assert 80e6 <= counts["base"] <= 120e6
    assert tokens_per_sample("1b", 3, 162, 448) == 3 * 21 * 56 + len(FIELDS) == token_count(3, 162, 448, 8, 6)


def test_tiny_forward_backward_on_cpu_has_finite_gradients() -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    kspace, mask = _batch(2)
    target = torch.randn(2, 3, 21, 33, dtype=torch.complex64)
    out = model(kspace, mask, [META, {}])
    loss = (out["image"] - target).abs().mean() + out["kspace"].abs().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.cascades[-1].backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_activation_checkpointing_gives_the_same_output_and_gradients() -> None:
    kspace, mask = _batch()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(ModelConfig(size="tiny", activation_checkpointing=checkpointing))
        out = model(kspace, mask, [META])["image"]
        out.abs().sum().backward()
        grads.append((out.detach(), model.cascades[0].backbone.blocks[0].mlp.fc1.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_bf16_parameters_keep_the_physics_in_complex64() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    kspace, mask = _batch()
    out = model(kspace, mask, [META])
    assert out["image"].dtype == out["kspace"].dtype == out["sens"].dtype == torch.complex64
    assert torch.isfinite(torch.view_as_real(out["image"])).all()


def test_shared_weights_run_one_cascade_several_times() -> None:
    shared = build_model(ModelConfig(size="tiny", share_weights=True), device="meta")
    separate = build_model("tiny", device="meta")
    assert len(shared.cascades) == 1 and len(list(shared.unrolled())) == SIZES["tiny"].cascades
    assert parameter_count(shared) < parameter_count(separate)


def test_overrides_combine_with_the_named_size() -> None:
    cfg = resolve_config(ModelConfig(size="small", cascades=2, dc_mode="hard"))
    assert (cfg.cascades, cfg.dc_mode, cfg.dim, cfg.depth) == (2, "hard", SIZES["small"].dim, SIZES["small"].depth)
    assert all(v is not None for v in dataclasses.asdict(cfg).values())
    assert resolve_config("1b") == SIZES["1b"]
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        resolve_config("huge")
    with pytest.raises(ValueError, match="data consistency mode"):
        build_model(ModelConfig(dc_mode="sloppy"), device="meta")


@dataclass
class _Stage:
    model: ModelConfig = field(default_factory=ModelConfig)


def test_model_section_loads_from_toml(tmp_path) -> None:
    path = tmp_path / "stage.toml"
    path.write_text('[model]\nsize = "tiny"\ncascades = 2\n')
    cfg = load_config(_Stage, path, ["model.activation_checkpointing=true"])
    model = build_model(cfg.model, device="meta")
    assert len(model.cascades) == 2 and model.config.dim == SIZES["tiny"].dim
    assert model.cascades[0].backbone.checkpointing


def test_bad_shapes_are_reported() -> None:
    model = build_model("tiny")
    kspace, mask = _batch()
    with pytest.raises(ValueError, match="mask must be"):
        model(kspace, mask[:, :2], [META])
    with pytest.raises(ValueError, match="meta has 2 entries"):
        model(kspace, mask, [META, META])


def test_rezero_gain_makes_an_untrained_model_its_starting_image_plus_data_consistency() -> None:
    """refine_gain = 0: every backbone is the identity at initialisation, so with hard data consistency
    the output is the starting image's k-space with the measured samples put back, computed by hand."""
    from models.coils import sense_adjoint, sense_forward

    torch.manual_seed(0)
    kspace, mask = _batch(1, 2, 3, 20, 18)
    for init in (0, 6):
        model = build_model(ModelConfig(size="tiny", refine_gain=0.0, dc_mode="hard", sense_init=init, sense_mu=0.01))
        with torch.no_grad():
            out = model(kspace, mask, [META])
            sens = model.sensitivities(kspace, mask)
            image = sense_adjoint(kspace, sens)
            if init:
                image = model.sense_image(image, mask, sens)
            for _ in range(model.iterations):  # identity backbone, then hard DC, then coil combination
                k = torch.where(mask.unsqueeze(2) > 0, kspace, sense_forward(image, sens))
                image = sense_adjoint(k, sens)
        torch.testing.assert_close(out["image"], image, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out["kspace"], k, atol=1e-5, rtol=1e-4)


def test_sense_init_adds_no_parameters_and_gets_no_gradient() -> None:
    base = build_model(ModelConfig(size="tiny", sense_init=0))
    cg = build_model(ModelConfig(size="tiny", sense_init=5))
    assert parameter_count(base) == parameter_count(cg)
    kspace, mask = _batch(1, 2, 3, 20, 18)
    out = cg(kspace, mask, [META])
    out["image"].abs().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in cg.parameters() if p.grad is not None)
    assert cg.sensitivities.refiner.gain.grad is not None  # the sensitivities still learn through the cascades


def test_per_cascade_sensitivity_refinement_is_the_identity_at_init_and_learns() -> None:
    """With `sens_per_cascade` every cascade owns a refiner whose gain starts at 0: with the other
    weights copied over, the output equals the model without it; the refiners receive gradients."""
    torch.manual_seed(0)
    plain = build_model(ModelConfig(size="tiny"))
    refined = build_model(ModelConfig(size="tiny", sens_per_cascade=True))
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".sens_refiner." in k for k in missing)
    kspace, mask = _batch(1, 2, 3, 20, 18)
    a, b = plain(kspace, mask, [META]), refined(kspace, mask, [META])
    torch.testing.assert_close(b["image"], a["image"], atol=1e-5, rtol=1e-4)
    b["image"].abs().mean().backward()
    gains = [c.sens_refiner.gain.grad for c in refined.cascades]
    assert all(g is not None and g.abs() > 0 for g in gains[:-1])  # the last refiner feeds no later cascade


def test_sense_scope_2d_starts_only_2d_undersampled_samples_from_cg_sense() -> None:
    """sense_scope = "2d": a sample whose mask is constant along the readout (Cartesian) keeps the
    zero-filled start, a sample whose mask varies along it (radial-like) gets CG-SENSE; checked against
    the two models with scope "all" and sense_init 0 on the same weights."""
    torch.manual_seed(0)
    kspace, mask = _batch(2, 2, 3, 20, 18)
    cart = mask.clone()
    cart[0] = (torch.rand(2, 20, 1, generator=torch.Generator().manual_seed(1)) < 0.4).float().expand(2, 20, 18)
    cart[0, :, 7:13] = 1.0
    kspace = kspace * cart.unsqueeze(2)
    scoped = build_model(ModelConfig(size="tiny", sense_init=6, sense_scope="2d"))
    everywhere = build_model(ModelConfig(size="tiny", sense_init=6, sense_scope="all"))
    zero = build_model(ModelConfig(size="tiny", sense_init=0))
    for other in (everywhere, zero):
        other.load_state_dict(scoped.state_dict())
    with torch.no_grad():
        out = scoped(kspace, cart, [META, META])["image"]
        torch.testing.assert_close(out[0], zero(kspace, cart, [META, META])["image"][0])
        torch.testing.assert_close(out[1], everywhere(kspace, cart, [META, META])["image"][1])
        assert not torch.allclose(out[1], zero(kspace, cart, [META, META])["image"][1])
    with pytest.raises(ValueError, match="sense_scope"):
        build_model(ModelConfig(size="tiny", sense_scope="radial"), device="meta")


def test_sense_scope_2d_spends_no_cg_iterations_on_a_cartesian_batch() -> None:
    """A batch whose masks are all constant along the readout never calls the CG solve."""
    kspace, _ = _batch(1, 2, 3, 20, 18)
    mask = torch.zeros(1, 2, 20, 18)
    mask[:, :, ::3] = 1.0
    mask[:, :, 7:13] = 1.0
    model = build_model(ModelConfig(size="tiny", sense_init=6, sense_scope="2d"))

    def refuse(*args, **kwargs):
        raise AssertionError("CG-SENSE was run on a Cartesian batch")

    model.sense_image = refuse
    with torch.no_grad():
        out = model(kspace * mask.unsqueeze(2), mask, [META])
    assert torch.isfinite(torch.view_as_real(out["image"])).all()


def test_calibration_input_sets_the_sensitivities_only() -> None:
    """`calibration=(k, M)` makes the model estimate its sensitivities from (k, M), exactly what
    `model.sensitivities` gives on them, while data consistency still uses the input mask."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny")).eval()
    k = torch.randn(1, 2, 3, 24, 20, dtype=torch.complex64)
    full = torch.zeros(1, 2, 24, 20)
    full[:, :, ::2] = 1.0
    full[:, :, 8:16] = 1.0
    theta = full.clone()
    theta[:, :, 9:15] = 0.0  # the input set lost most of the calibration rows
    with torch.no_grad():
        out = model(k * theta.unsqueeze(2), theta, [{}], calibration=(k, full))
        expected = model.sensitivities(k * full.unsqueeze(2), full)
        plain = model(k * theta.unsqueeze(2), theta, [{}])
    torch.testing.assert_close(out["sens"], expected)
    assert not torch.allclose(plain["sens"], expected)


def test_update_gate_is_one_at_init_scales_the_update_and_learns() -> None:
    """`update_gate`: with the other weights copied, the gated backbone equals the plain one at init
    (gate 1); with the gate saturated at 2 its update is exactly twice the plain update (the output is
    input + gate x update, checked on one backbone); the gate's weights receive gradients."""
    from models.backbone import Backbone

    torch.manual_seed(0)
    plain, gated = Backbone(32, 1, 2, patch=4, conv_channels=4), Backbone(32, 1, 2, patch=4, conv_channels=4, gated=True)
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["gate_bias", "gate_weight"]
    image = torch.randn(2, 3, 12, 10, dtype=torch.complex64)
    cond = torch.randn(2, 6, 32)
    with torch.no_grad():
        base = plain(image, cond)
        torch.testing.assert_close(gated(image, cond), base)
        gated.gate_bias.fill_(30.0)  # sigmoid -> 1: gate 2
        torch.testing.assert_close(gated(image, cond) - image, 2 * (base - image), atol=1e-5, rtol=1e-4)
        gated.gate_bias.zero_()
    gated(image, cond).abs().mean().backward()
    assert gated.gate_weight.grad.abs().sum() > 0 and gated.gate_bias.grad.abs() > 0
    model = build_model(ModelConfig(size="tiny", update_gate=True))
    assert all(c.backbone.gate_weight is not None for c in model.cascades)
    assert build_model("tiny").cascades[0].backbone.gate_weight is None


def test_final_solve_is_the_dense_modl_solution_keeps_the_image_under_a_large_mu_and_learns_mu() -> None:
    """`final_cg`: after the cascades, x = argmin ||M F S x - y||^2 + mu ||x - z||^2. Checked against
    numpy's dense solve of (A^H A + mu I) x = A^H y + mu z, with A built column by column from unit
    images (an independent construction of the operator); with a huge mu x stays z, so the output equals
    the model without the solve (weights copied); mu is per sample and both its parameters learn."""
    import numpy as np

    from models.coils import sense_adjoint, sense_forward

    torch.manual_seed(0)
    plain = build_model(ModelConfig(size="tiny"))
    solved = build_model(ModelConfig(size="tiny", final_cg=200, final_mu=0.05))
    missing, unexpected = solved.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and sorted(missing) == ["final_log_mu", "final_mu_weight"]
    kspace, mask = _batch(1, 1, 2, 6, 5, seed=3)
    sens = torch.randn(1, 1, 2, 6, 5, dtype=torch.complex64)
    z = torch.randn(1, 1, 6, 5, dtype=torch.complex64)
    cond = solved.conditioning([META])
    with torch.no_grad():
        x = solved.final_solve(z, kspace, mask, sens, cond)
        n = z.numel()
        basis = torch.eye(n, dtype=torch.complex64).reshape(n, 1, 1, 6, 5)
        a = torch.stack([sense_forward(e, sens, mask).reshape(-1) for e in basis], 1).numpy().astype(np.complex128)
        y = (kspace * mask.unsqueeze(2)).reshape(-1).numpy()
        expected = np.linalg.solve(a.conj().T @ a + 0.05 * np.eye(n), a.conj().T @ y + 0.05 * z.reshape(-1).numpy())
        np.testing.assert_allclose(x.reshape(-1).numpy(), expected, rtol=0, atol=1e-3 * np.abs(expected).max())
        # the solve's right-hand side is the model's own adjoint: same answer through sense_adjoint
        assert torch.allclose(sense_adjoint(kspace, sens, mask), sense_adjoint(kspace * mask.unsqueeze(2), sens))

        solved.final_log_mu.fill_(30.0)  # mu = e^30: the data no longer move the image
        k, m = _batch(2, 2, 3, 20, 18, seed=4)
        torch.testing.assert_close(solved(k, m, [META, META])["image"], plain(k, m, [META, META])["image"],
                                   atol=1e-4, rtol=1e-3)
        solved.final_log_mu.fill_(float(np.log(0.05)))
        solved.final_mu_weight.normal_()
        mus = solved.solve_mu(solved.conditioning([META, dict(META, pattern="Uniform", R=8)]))
        assert mus.shape == (2,) and not torch.isclose(mus[0], mus[1])
        solved.final_mu_weight.zero_()
    out = solved(k, m, [META, META])
    out["image"].abs().mean().backward()
    assert solved.final_log_mu.grad.abs() > 0 and solved.final_mu_weight.grad.abs().sum() > 0


def test_final_cascades_puts_the_solve_in_that_many_last_cascades() -> None:
    """`final_cascades` = n: the solve runs in the last n cascades (counted by wrapping it); 1 is the
    default's output exactly; out of range is refused."""
    torch.manual_seed(0)
    k, m = _batch(1, 2, 3, 20, 18, seed=5)
    outs = {}
    for n in (1, 2, 3):
        model = build_model(ModelConfig(size="tiny", final_cg=3, final_cascades=n))
        if n == 1:
            torch.manual_seed(0)
            default = build_model(ModelConfig(size="tiny", final_cg=3))
            model.load_state_dict(default.state_dict())
        calls = []
        solve = model.final_solve
        model.final_solve = lambda *a, **kw: calls.append(1) or solve(*a, **kw)
        with torch.no_grad():
            outs[n] = model(k, m, [META])["image"]
            if n == 1:
                torch.testing.assert_close(outs[n], default(k, m, [META])["image"])
        assert len(calls) == n
    with pytest.raises(ValueError, match="final_cascades"):
        resolve_config(ModelConfig(size="tiny", final_cg=3, final_cascades=4))
