"""A chest-like numerical phantom with a beating heart, rendered per CMRxRecon file type.

The synthetic corpus (shards/synthetic.py) needs images a reconstruction model can learn from: body
outline, lungs, spine, a left ventricle (blood pool + myocardium) and a right ventricle that move over
cine frames, tissue contrast that follows T1/T2/T2*/T1rho relaxation over mapping frames, contrast
arrival over perfusion frames, a scar for LGE, a velocity phase for flow. Everything is built from
smooth-edged ellipses (no hard edges: less Gibbs ringing than a real image would have is fine here).

Coordinates: y (phase encode) spans [-1, 1) over ny; x (readout) spans [-os, os) over nx, so the
object (|x| <= 1) occupies the central 1/os of the oversampled readout field of view, as vendors store it.

`detail=True` (the real-size benchmark profile of shards/synthetic.py) adds what a learned model cannot
win on by smoothing, so that a score there means something: edges about 1.5 pixels wide (partial
volume rather than blur), papillary muscles and endocardial trabeculae that move with the wall, a
liver, pulmonary and mediastinal vessels, pericardial fat, and a spatially correlated tissue texture
(a Gaussian-filtered random field, a few percent of the signal, fixed per patient and slice so frames
stay consistent). Without it the images are the smooth ones of the CI corpora, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["frames_for", "is_four_d", "view_of_stem", "render_images", "coil_maps", "PatientAnatomy", "random_anatomy"]

# Frames per file type (docs/cmrxrecon.md §3.1); T1map alternates 8/9 by the caller.
_FRAMES = {"cine": 12, "lge": 2, "T1map": 8, "T1mappost": 9, "T2map": 3, "T2smap": 8, "T1rho": 4, "flow2d": 2}
_FOUR_D = ("T1w", "T2w", "blackblood")

# Relaxation times in ms (order-of-magnitude values at 1.5-3 T; the point is a learnable contrast).
_T1 = {"blood": 1650.0, "myo": 1200.0, "scar": 1300.0, "fat": 350.0, "body": 1100.0, "lung": 1300.0, "spine": 700.0}
_T1_POST = {"blood": 420.0, "myo": 520.0, "scar": 300.0, "fat": 300.0, "body": 600.0, "lung": 900.0, "spine": 500.0}
_T2 = {"blood": 250.0, "myo": 48.0, "scar": 70.0, "fat": 70.0, "body": 45.0, "lung": 30.0, "spine": 60.0}
_T2S = {"blood": 200.0, "myo": 30.0, "scar": 35.0, "fat": 20.0, "body": 28.0, "lung": 5.0, "spine": 25.0}
_T1RHO = {"blood": 160.0, "myo": 52.0, "scar": 75.0, "fat": 60.0, "body": 45.0, "lung": 30.0, "spine": 55.0}
_PD = {"blood": 0.9, "myo": 0.75, "scar": 0.75, "fat": 0.95, "body": 0.7, "lung": 0.12, "spine": 0.6}
# the liver (detail only): between muscle and myocardium in every contrast
for _table, _value in ((_T1, 800.0), (_T1_POST, 420.0), (_T2, 40.0), (_T2S, 22.0), (_T1RHO, 42.0), (_PD, 0.72)):
    _table["liver"] = _value


def is_four_d(stem: str) -> bool:
    """T1w, T2w, blackblood files have no time axis (4-D k-space)."""
    return stem in _FOUR_D


def frames_for(stem: str, perfusion_frames: int = 50, t1map_frames: int = 8) -> int:
    """Number of frames (nt) of a file type; 1 for 4-D types."""
    if is_four_d(stem):
        return 1
    if stem.startswith(("cine", "aorta", "tagging")):  # 2024 aorta/tagging are cine acquisitions
        return _FRAMES["cine"]
    if stem.startswith("lge"):
        return _FRAMES["lge"]
    if stem == "perfusion":
        return perfusion_frames
    if stem == "T1map":
        return t1map_frames
    return _FRAMES[stem]


def view_of_stem(stem: str) -> str:
    """The view part of a stem: cine_lax_4ch -> lax_4ch, lge_sax -> sax, T1map -> ''."""
    for prefix in ("cine_", "lge_"):
        if stem.startswith(prefix):
            return stem[len(prefix):]
    return ""


@dataclass(frozen=True)
class PatientAnatomy:
    """Per-patient geometry jitter, so patients differ but each one is consistent across files."""

    body_ax: float
    body_ay: float
    heart_x: float
    heart_y: float
    heart_size: float
    heart_angle: float
    scar_angle: float
    hr_phase: float


def random_anatomy(rng: np.random.Generator) -> PatientAnatomy:
    return PatientAnatomy(
        body_ax=float(rng.uniform(0.86, 0.95)), body_ay=float(rng.uniform(0.72, 0.86)),
        heart_x=float(rng.uniform(0.05, 0.2)), heart_y=float(rng.uniform(-0.12, 0.02)),
        heart_size=float(rng.uniform(0.9, 1.12)), heart_angle=float(rng.uniform(-0.5, 0.5)),
        scar_angle=float(rng.uniform(0, 2 * math.pi)), hr_phase=float(rng.uniform(-0.3, 0.3)),
    )


def _grid(ny: int, nx: int, oversample: float) -> tuple[np.ndarray, np.ndarray]:
    y = (np.arange(ny) - ny // 2) / (ny / 2.0)
    x = (np.arange(nx) - nx // 2) / (nx / 2.0) * oversample
    return np.meshgrid(y, x, indexing="ij")


def _ellipse(Y: np.ndarray, X: np.ndarray, cy: float, cx: float, ay: float, ax: float,
             angle: float = 0.0, edge: float = 0.04) -> np.ndarray:
    """Soft ellipse indicator in [0, 1] with an edge width of about `edge` (normalised units)."""
    c, s = math.cos(angle), math.sin(angle)
    dy, dx = Y - cy, X - cx
    u = (c * dx + s * dy) / ax
    v = (-s * dx + c * dy) / ay
    r = np.sqrt(u * u + v * v)
    return 0.5 * (1.0 + np.tanh((1.0 - r) * min(ax, ay) / edge))


def _tissues(Y, X, anat: PatientAnatomy, view: str, z: int, nz: int, contraction: float,
             edge: float = 0.04, detail: bool = False) -> dict[str, np.ndarray]:
    """Fuzzy tissue fractions for one (frame, slice); `edge` is the edge width in normalised units."""
    ell = lambda *a, **k: _ellipse(Y, X, *a, edge=edge if detail else k.pop("edge", 0.04), **k)  # noqa: E731
    body = _ellipse(Y, X, 0.0, 0.0, anat.body_ay, anat.body_ax, edge=edge if detail else 0.03)
    lungs = (ell(-0.12, -0.5, 0.42, 0.3, 0.15) + ell(-0.12, 0.52, 0.45, 0.28, -0.15)) * body
    spine = ell(0.62 * anat.body_ay, 0.0, 0.11, 0.1)
    hs = anat.heart_size
    lax = view not in ("", "sax")
    if nz > 1 and not lax:  # base -> apex: smaller short-axis sections
        hs *= 1.0 - 0.3 * z / (nz - 1)
    if lax:  # long-axis: elongated LV; the packed 3-view cine_lax uses a different angle per slice
        angle = anat.heart_angle + 0.6 * (z - (nz - 1) / 2) + {"lax_2ch": 0.4, "lax_3ch": -0.3, "lvot": -0.5,
                                                                 "rvot": 0.7, "ot": 0.2, "lax_r2ch": 0.9}.get(view, 0.0)
        ay_epi, ax_epi = 0.42 * hs * (1 - 0.12 * contraction), 0.26 * hs
        ay_endo, ax_endo = 0.33 * hs * (1 - 0.2 * contraction), 0.17 * hs * (1 - 0.3 * contraction)
    else:
        angle = anat.heart_angle
        ay_epi = ax_epi = 0.27 * hs * (1 - 0.1 * contraction)
        ay_endo = ax_endo = 0.185 * hs * (1 - 0.38 * contraction)
    hy, hx = anat.heart_y, anat.heart_x
    epi = ell(hy, hx, ay_epi, ax_epi, angle)
    lv = ell(hy, hx, ay_endo, ax_endo, angle)
    myo = np.clip(epi - lv, 0, 1)
    rv = np.clip(ell(hy - 0.06, hx - 0.27 * hs, 0.3 * hs * (1 - 0.2 * contraction),
                          0.2 * hs * (1 - 0.25 * contraction), angle + 0.3) - epi, 0, 1)
    # a transmural scar wedge (used by LGE; small elsewhere)
    ang = np.arctan2(Y - hy, X - hx)
    wedge = 0.5 * (1 + np.cos(ang - anat.scar_angle)) ** 6
    scar = myo * wedge
    myo = myo - scar
    aorta = ell(hy + 0.05, hx + 0.05 + 0.3 * hs, 0.08, 0.08)
    heart_all = np.clip(epi + rv, 0, 1)
    blood = np.clip(lv + rv + aorta * (1 - heart_all), 0, 1)
    fat = np.clip(ell(hy, hx, ay_epi + 0.05, ax_epi + 0.05, angle) - epi - rv, 0, 1) * 0.6
    outer = np.clip(body - ell(0.0, 0.0, anat.body_ay - 0.06, anat.body_ax - 0.06), 0, 1)
    fat = np.clip(fat + outer, 0, 1)
    soft = np.clip(body - lungs - spine - heart_all - aorta - fat, 0, 1)
    lung = np.clip(lungs - heart_all, 0, 1)
    out = {"blood": blood, "myo": myo, "scar": scar, "fat": fat, "body": soft, "lung": lung, "spine": spine,
           "aorta": aorta, "lv": lv, "rv": rv}
    if detail:
        _add_detail(out, Y, X, anat, ell, (hy, hx), (ay_endo, ax_endo), (ay_epi, ax_epi), angle, lax, body, contraction)
    return out


def _move(out: dict[str, np.ndarray], src: str, dst: str, amount: np.ndarray) -> np.ndarray:
    """Reassign a tissue fraction (clipped to what `src` has), so fractions still sum to the body;
    returns what was moved."""
    amount = np.minimum(np.clip(amount, 0, 1), out[src])
    out[src] = out[src] - amount
    out[dst] = out.get(dst, 0.0) + amount
    return amount


def _add_detail(out: dict[str, np.ndarray], Y: np.ndarray, X: np.ndarray, anat: PatientAnatomy, ell,
                centre: tuple[float, float], endo: tuple[float, float], epi: tuple[float, float], angle: float,
                lax: bool, body: np.ndarray, contraction: float) -> None:
    """Fine anatomy of the benchmark profile (in place): trabeculae, papillary muscles, liver, vessels, fat."""
    hy, hx = centre
    out["liver"] = np.zeros_like(Y)
    rng = np.random.default_rng(int(anat.scar_angle * 1e6) % (2**32))  # per patient, same for every frame
    c, s = math.cos(angle), math.sin(angle)
    dy, dx = Y - hy, X - hx
    u, v = (c * dx + s * dy) / endo[1], (-s * dx + c * dy) / endo[0]
    r, theta = np.sqrt(u * u + v * v), np.arctan2(v, u)
    # endocardial trabeculae: finger-like myocardium reaching ~15% into the blood pool, a comb in angle
    teeth = int(rng.integers(14, 22))
    comb = (0.5 * (1 + np.cos(teeth * theta + rng.uniform(0, 2 * math.pi)
                              + 0.8 * np.sin(3 * theta + rng.uniform(0, 2 * math.pi))))) ** 3
    band = np.clip((r - 0.8) / 0.2, 0, 1) * (r < 1.0)
    _move(out, "blood", "myo", out["lv"] * band * comb)
    if not lax:  # two papillary muscles, closer to the wall when the ventricle contracts
        for phi, size in ((-0.7, 0.16), (2.3, 0.13)):
            u0, v0 = 0.62 * endo[1] * math.cos(phi), 0.62 * endo[0] * math.sin(phi)  # in the heart's frame
            py, px = hy + s * u0 + c * v0, hx + c * u0 - s * v0
            pm = ell(py, px, size * endo[0] * (1 + 0.3 * contraction), size * endo[1] * (1 + 0.3 * contraction))
            _move(out, "blood", "myo", pm * out["lv"])
    # pericardial fat over the right ventricle
    rv_fat = ell(hy - 0.08, hx - 0.2, epi[0] + 0.12, epi[1] + 0.2, angle + 0.3) - ell(hy - 0.08, hx - 0.2, epi[0] + 0.09,
                                                                                   epi[1] + 0.16, angle + 0.3)
    _move(out, "body", "fat", np.clip(rv_fat, 0, 1) * 0.7)
    # the liver dome below the heart (patient's right = image left)
    _move(out, "body", "liver", ell(0.55 * anat.body_ay, -0.45 * anat.body_ax, 0.38, 0.42, 0.35) * body)
    # vessels: descending aorta by the spine, internal mammaries behind the sternum, pulmonary vessels
    vessels = ell(0.45 * anat.body_ay, 0.18, 0.055, 0.055)
    vessels = vessels + ell(-0.62 * anat.body_ay, -0.1, 0.018, 0.018) + ell(-0.62 * anat.body_ay, 0.12, 0.018, 0.018)
    lung = out["lung"] > 0.5
    for _ in range(10):
        cy, cx = rng.uniform(-0.6, 0.4), rng.choice([-1, 1]) * rng.uniform(0.35, 0.7)
        rad = rng.uniform(0.012, 0.03)
        vessels = vessels + ell(cy, cx, rad, rad * rng.uniform(0.7, 1.4), rng.uniform(0, math.pi))
    remaining = np.clip(vessels, 0, 1)
    for tissue in ("lung", "body", "fat"):
        remaining = remaining - _move(out, tissue, "blood", remaining * (lung if tissue == "lung" else 1.0))


def texture_field(ny: int, nx: int, rng: np.random.Generator, sigma_px: float = 2.5) -> np.ndarray:
    """A spatially correlated random field (ny, nx), zero mean, unit std: Gaussian-filtered white noise."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal((ny, nx)), sigma_px, mode="wrap")
    return (field - field.mean()) / max(float(field.std()), 1e-12)


def _weights(stem: str, t: int, nt: int) -> dict[str, float]:
    """Signal per tissue for frame t of a file type (magnitude contrast)."""
    tis = ("blood", "myo", "scar", "fat", "body", "lung", "spine", "liver")
    if stem.startswith(("cine", "aorta", "tagging")) or stem == "flow2d":  # bSSFP: ~ PD * sqrt(T2/T1)
        return {k: _PD[k] * min(1.0, 3.0 * math.sqrt(_T2[k] / _T1[k])) for k in tis}
    if stem.startswith("lge"):  # inversion-recovery with the myocardium nulled; frame 2 PSIR-like
        ti = 300.0 if t == 0 else 450.0
        post = _T1_POST
        return {k: _PD[k] * abs(1 - 2 * math.exp(-ti / post[k]) + (0.1 if t else 0.0)) for k in tis} | {"scar": 1.0}
    if stem in ("T1map", "T1mappost"):  # MOLLI-like: increasing inversion times
        t1 = _T1 if stem == "T1map" else _T1_POST
        ti = 100.0 + 3000.0 * t / max(nt - 1, 1)
        return {k: _PD[k] * abs(1 - 2 * math.exp(-ti / t1[k])) for k in tis}
    if stem == "T2map":
        te = (0.0, 35.0, 55.0)[t % 3] + 10.0 * (t // 3)
        return {k: _PD[k] * math.exp(-te / _T2[k]) for k in tis}
    if stem == "T2smap":
        te = 2.0 + 2.0 * t
        return {k: _PD[k] * math.exp(-te / _T2S[k]) for k in tis}
    if stem == "T1rho":
        tsl = (0.0, 10.0, 30.0, 50.0)[t % 4] + 10.0 * (t // 4)
        return {k: _PD[k] * math.exp(-tsl / _T1RHO[k]) for k in tis}
    if stem == "T1w":
        return {k: _PD[k] * (1 - math.exp(-600.0 / _T1[k])) for k in tis}
    if stem == "T2w":
        return {k: _PD[k] * math.exp(-80.0 / _T2[k]) for k in tis}
    if stem == "blackblood":
        return {k: (0.0 if k == "blood" else _PD[k] * math.exp(-40.0 / _T2[k])) for k in tis}
    if stem == "perfusion":  # saturation recovery baseline; enhancement added separately
        return {k: 0.25 * _PD[k] for k in tis}
    raise ValueError(f"no contrast model for file type {stem!r}")


def _gamma_variate(t: float, t0: float, peak: float) -> float:
    """Contrast-agent first pass (gamma variate, alpha = 3) peaking at t0 + peak."""
    if t <= t0:
        return 0.0
    u = (t - t0) / peak
    return (u ** 3) * math.exp(3 * (1 - u))


def render_images(stem: str, nt: int, nz: int, ny: int, nx: int, oversample: float,
                  anat: PatientAnatomy, rng: np.random.Generator, detail: bool = False) -> np.ndarray:
    """Complex images (nt, nz, ny, nx) of one file: magnitude contrast x smooth phase.

    The readout axis is oversampled by `oversample` (the object fills the central 1/oversample).
    detail: the benchmark profile's fine anatomy and texture (module docstring).
    """
    Y, X = _grid(ny, nx, oversample)
    edge = 1.5 * 2.0 / ny  # about 1.5 pixels: partial volume at the tissue borders
    view = view_of_stem(stem)
    out = np.zeros((nt, nz, ny, nx), dtype=np.complex128)
    # smooth background phase per slice (B0 / receive phase): low-order polynomial
    coef = rng.uniform(-1.0, 1.0, size=(nz, 5)) * np.array([math.pi, 0.8, 0.8, 0.4, 0.4])
    textures = [texture_field(ny, nx, rng) for _ in range(nz)] if detail else None
    for z in range(nz):
        phase = coef[z, 0] + coef[z, 1] * X + coef[z, 2] * Y + coef[z, 3] * X * Y + coef[z, 4] * (X * X + Y * Y)
        for t in range(nt):
            if stem.startswith(("cine", "aorta", "tagging")):
                contraction = 0.5 * (1 - math.cos(2 * math.pi * (t / nt + anat.hr_phase * 0.1)))
            elif stem == "perfusion":
                contraction = 0.1 * math.sin(2 * math.pi * t / 7.0)  # residual motion / breathing
            else:
                contraction = 0.0
            tis = _tissues(Y, X, anat, view, z, nz, contraction, edge, detail)
            w = _weights(stem, t, nt)
            if not detail:
                w.pop("liver")
            mag = sum(w[k] * tis[k] for k in w)
            if detail:  # tissue texture: a few percent, stronger in muscle and liver than in blood
                mag = mag * (1 + textures[z] * (0.03 + 0.05 * (tis["body"] + tis["liver"]) + 0.02 * tis["myo"]))
            if stem == "perfusion":
                rv_e = _gamma_variate(t, 3.0, 5.0)
                lv_e = _gamma_variate(t, 7.0, 6.0)
                myo_e = 0.25 * _gamma_variate(t, 10.0, 9.0)
                mag = mag + 0.9 * rv_e * tis["rv"] + 0.9 * lv_e * (tis["lv"] + tis["aorta"]) + myo_e * tis["myo"]
            if stem == "tagging":  # SPAMM grid, fading over the cycle as tags do
                fade = math.exp(-t / 8.0)
                mag = mag * (1 - 0.7 * fade * (np.cos(9 * math.pi * X) * np.cos(9 * math.pi * Y)) ** 2)
            ph = phase
            if stem == "flow2d" and t == 1:  # velocity encoding: through-plane flow in aorta and LV
                ph = phase + 1.5 * tis["aorta"] - 0.6 * tis["lv"]
            out[t, z] = mag * np.exp(1j * ph)
    return out


def coil_maps(ncoils: int, ny: int, nx: int, oversample: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth complex coil sensitivities (ncoils, ny, nx): Gaussian blobs on a ring around the body.

    Each coil has its own phase offset and a gentle linear phase; the ring is slightly elliptical.
    """
    Y, X = _grid(ny, nx, oversample)
    maps = np.empty((ncoils, ny, nx), dtype=np.complex128)
    offset = rng.uniform(0, 2 * math.pi)
    for c in range(ncoils):
        th = offset + 2 * math.pi * c / ncoils + rng.uniform(-0.15, 0.15)
        cy, cx = 1.05 * math.sin(th), 1.15 * math.cos(th)
        sigma = rng.uniform(0.55, 0.75)
        amp = np.exp(-((Y - cy) ** 2 + (X - cx) ** 2) / (2 * sigma ** 2))
        ph = rng.uniform(-math.pi, math.pi) + rng.uniform(-0.5, 0.5) * X + rng.uniform(-0.5, 0.5) * Y
        maps[c] = amp * np.exp(1j * ph)
    return maps
