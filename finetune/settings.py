"""Typed configs of the fine-tuning stage: one `@dataclass` per entry point, loaded with `launch.cli`.

- `EvalConfig`        -> `python -m finetune.evaluate`
- `ReconstructConfig` -> `python -m finetune.reconstruct` and `python -m finetune.classical`
  (the baselines write the same submission tree as the model, so they share its config)
- `FinetuneConfig`    -> `python -m finetune.train` (one adapter) and `python -m finetune.bank`
- `SubmissionConfig`  -> `python -m finetune.submission` (check and pack Submission.zip)

Every field has a default so `launch.cli.load_config(Cls)` works without a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.adapters import DEFAULT_TARGETS
from models.sizes import ModelConfig
from pretrain.objective import ObjectiveConfig
from shards.loader import LoaderConfig


@dataclass
class EvalConfig:
    """Score reconstruction trees against the hidden fully sampled tree, as the CMRxRecon2025 scorer does."""

    # Primary reconstruction tree in submission layout (<Task>/MultiCoil/<Modality>/ValidationSet/
    # UnderSample_<Task>/<Center>/<Vendor>/P###/<file>_kus_<Pattern><R>.mat holding `img4ranking`).
    recon: str = ""
    # Name the primary tree gets in tables and figures.
    recon_name: str = "cmrfm"
    # More trees to put side by side, each "name=DIR" (e.g. "zero_filled=runs/zf", "classical=runs/sense").
    methods: list[str] = field(default_factory=list)
    # Hidden ground truth: FullSample_<Task> tree of k-space .mat files (img4ranking is computed with
    # run4ranking) or of img4ranking .mat files (used as they are), detected per file.
    reference: str = ""
    # Output folder: CSV tables, results*.json, figures/, eval_config.toml.
    out: str = "runs/eval"
    # True: the official scorer's argument order (submission is the reference in the 4-D branch) and
    # its aggregation quirks; False: ground truth always the reference. Both variants go in per_file.csv.
    challenge_exact: bool = True
    # Official scorers to reproduce, the first is the primary one (results.json, tables, figures):
    # "val2025" (validation scorer), "test2025" (test-phase scorer: squeezes both arrays, 5-D branch).
    scorers: list[str] = field(default_factory=lambda: ["val2025", "test2025"])
    # The organisers' sheet mapping patients to centers, manufacturers and diseases (.xlsx or .csv,
    # challenge.grouping); "" groups by folder (Center, Vendor).
    mapping: str = ""
    # Only this task ("TaskR1", ...); "" scores every task found.
    task: str = ""
    # Number of cases drawn as image / error-map grids.
    n_cases: int = 3
    figures: bool = True
    progress: bool = True


@dataclass
class SubmissionConfig:
    """Check a reconstruction tree and pack it into the archive the organisers accept."""

    # Reconstruction tree (the `out` of finetune.reconstruct / finetune.classical).
    tree: str = ""
    # The validation input tree (UnderSample_<Task> kus files): every one must have its reconstruction,
    # and nothing else may be packed. "" checks the files' format only.
    input: str = ""
    # Archive to write; "" = Submission.zip beside the tree. An existing archive is never replaced.
    out: str = ""
    # Only check and print the counts; write nothing.
    check_only: bool = False


@dataclass
class ClassicalConfig:
    """The classical baseline used by `python -m finetune.classical`."""

    # "zero_filled", "sense" (ESPIRiT + CG-SENSE) or "l1_wavelet" (ESPIRiT + L1-wavelet CS).
    method: str = "sense"
    calib_width: int = 20  # 2025 ACS is 20 lines / 20x20
    lamda: float = 0.01  # relative to the k-space scale (data are normalised before the solve)
    max_iter: int = 30
    espirit_thresh: float = 0.02
    espirit_crop: float = 0.95


#: what a test-time LoRA can sit on (AdaptConfig.start)
ADAPT_STARTS = ("backbone", "adapter")


def check_adapt_config(cfg: "AdaptConfig") -> None:
    """Refuse settings that would adapt something else than asked (ValueError naming the setting);
    finetune.reconstruct checks them before any file is read, finetune.adapt before it adapts."""
    if cfg.start not in ADAPT_STARTS:
        raise ValueError(f"adapt.start = {cfg.start!r}: must be one of {', '.join(ADAPT_STARTS)}")
    if not (cfg.anchor >= 0 and cfg.anchor_backbone >= 0 and cfg.max_drift >= 0):
        raise ValueError(f"adapt.anchor = {cfg.anchor}, anchor_backbone = {cfg.anchor_backbone}, max_drift = "
                         f"{cfg.max_drift}: each must be >= 0 (0 = off)")


@dataclass
class AdaptConfig:
    """Test-time self-supervised adaptation (finetune.adapt): per (center, vendor) group of the input
    tree, a fresh LoRA on the model its files use (or on the bare backbone, `start`), trained with the
    SSDU split objective on the group's own undersampled k-space plus, on a supervised adapter, a
    consistency anchor to the unadapted output (no reference is read). Off unless steps > 0."""

    steps: int = 0
    """Optimizer steps per group (0 = no adaptation)."""
    start: str = "adapter"
    """What the test-time LoRA sits on: "adapter" (the model the bank gives each file: its supervised
    adapter merged in, or the bare backbone where the bank has none; one adaptation per (center, vendor,
    adapter)) or "backbone" (the pretrained backbone alone, for every file; the group is then
    reconstructed with the adapted backbone, without the bank's supervised adapters). `ADAPT_STARTS`."""
    anchor: float = 1.0
    """Weight of a consistency term added to the SSDU loss when the LoRA sits on a supervised adapter: the
    relative L2 distance between the adapted model's image and the unadapted model's on the training
    window's whole acquired set (no reference: the unadapted output is the anchor). Default 1 from the
    measurement (BENCHMARKS.md, issue 14, fourth pass): on a supervised adapter, plain SSDU adaptation
    lowered its held-out loss while PSNR fell (-0.13 dB held-out scanner, +0.01 dB GE vendor, 50 steps);
    with anchor 1, +0.14 and +0.60 dB. 0 = off."""
    anchor_backbone: float = 0.0
    """The same weight when the LoRA sits on the bare backbone (start = "backbone", or a file without a
    bank adapter). Default 0: there the anchor halved the gain (+0.88 instead of +1.77 dB, held-out
    scanner, 50 steps); the SSL backbone was trained with this very objective, so SSDU adaptation does not
    pull it away from what it was trained for."""
    max_drift: float = 0.0
    """Guard on the output itself: weights whose image on the held-out windows differs from the
    unadapted model's by more than this relative L2 distance are never kept. 0 = off (default): the drift
    is logged and reported either way, but its size did not tell gain from harm in the measurement
    (+1.77 dB at drift 0.14 from the backbone; -0.13 dB at 0.068 from a supervised adapter)."""
    rank: int = 16
    alpha: float = 32.0
    targets: str = DEFAULT_TARGETS
    """Regex of the nn.Linear / nn.Conv2d layers that get the test-time LoRA (used when `layers` is [])."""
    layers: list[str] = field(default_factory=lambda: ["conv"])
    """Named layer groups instead of `targets` (models.adapters.LAYER_GROUPS); [] = use `targets`.
    Default: the convolutional stem and head at rank 16, lr 1e-2. On the real-difficulty benchmark
    (BENCHMARKS.md, issue 14, third pass) the old default, rank 4 on attn+mlp at lr 1e-3, moved the
    held-out scanner by -0.03 dB in 50 steps (its held-out SSDU loss fell 0.4%); conv LoRA at lr 1e-2
    lowered that loss 4.9% and gained +0.94 dB. A backbone without a convolutional stem
    (model.conv_channels = 0) has no "conv" layers: set layers = ["attn", "mlp"]."""
    cascades: list[int] = field(default_factory=list)
    """Only these cascades' backbones (-1 = the last); [] = every cascade."""
    forms: list[str] = field(default_factory=lambda: ["lora"])
    """Adapter forms of the test-time adapter (models.adapters.FORMS)."""
    lr: float = 1e-2
    windows: int = 8
    """T-frame windows (file, slice, frames) drawn from the group to adapt on."""
    holdout: float = 0.25
    """Fraction of those windows never trained on: their SSDU loss (fixed splits) is the guard."""
    eval_every: int = 5
    """Held-out loss every this many steps (and at the end)."""
    patience: int = 2
    """Stop after this many evaluations in a row above the best held-out loss."""
    seed: int = 0
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The Θ/Λ split, as in pretraining."""


@dataclass
class ReconstructConfig:
    """Reconstruct a validation-style tree of `*_kus_<Pattern><R>.mat` files into a submission tree."""

    # Validation-style input: <Task>/MultiCoil/<Modality>/ValidationSet/UnderSample_<Task>/... with
    # Mask_<Task>/ beside UnderSample_<Task>/.
    input: str = ""
    # Output root: <out>/<Task>/MultiCoil/<Modality>/ValidationSet/UnderSample_<Task>/.../<same name>.
    out: str = "runs/recon"
    # Pretrained backbone (backbone.safetensors of a pretraining run) and the adapter bank folder.
    backbone: str = ""
    adapters: str = ""
    device: str = "cpu"
    batch_size: int = 1
    # Temporal window of adjacent frames the model sees (LoaderConfig.frames).
    frames: int = 3
    # Also write the full (uncropped, all slices and frames) magnitude volume next to img4ranking.
    full_volumes: bool = False
    # Only this task ("TaskR1", ...); "" reconstructs every task found.
    task: str = ""
    progress: bool = True
    # Methods written side by side: "cmrfm" (backbone + adapters) -> `out`; "zero_filled", "sense",
    # "l1_wavelet" -> `<out>_<method>` (python -m finetune.reconstruct).
    methods: list[str] = field(default_factory=lambda: ["cmrfm"])
    classical: ClassicalConfig = field(default_factory=ClassicalConfig)
    # Test-time self-supervised adaptation per (center, vendor); adapters go to `<out>_adapted/`.
    adapt: AdaptConfig = field(default_factory=AdaptConfig)


# ---- fine-tuning (adapters per contrast x pattern): `python -m finetune.train`, `python -m finetune.bank`


@dataclass
class AdapterSpec:
    """Which adapter to train, and its LoRA shape (docs/style.md §10 item 17)."""

    contrast: str = "cine"
    """Modality the adapter is for, matched case-insensitively against meta["modality"] ("cine" ~ "Cine")."""
    pattern: str = "ktRadial"
    """Sampling pattern (challenge.masks family) of the retrospective masks it trains on."""
    rank: int = 16
    """LoRA rank r."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / r (2 r, as in the benchmarks)."""
    dropout: float = 0.0
    targets: str = DEFAULT_TARGETS
    """Regex (re.fullmatch on the module name) of the nn.Linear / nn.Conv2d layers that get adapters
    (used when `layers` is [])."""
    layers: list[str] = field(default_factory=lambda: ["conv"])
    """Named layer groups instead of `targets` (models.adapters.LAYER_GROUPS): "attn" (qkv + proj), "mlp"
    (fc1 + fc2), "qkv", "proj", "fc1", "fc2", "embed" (linear patch embedding and head), "conv" (the
    convolutional stem and head); [] = use `targets`. Default "conv" at rank 16: on the real-difficulty
    benchmark it is 0.71% of the model's parameters and matched full fine-tuning, where rank-8 LoRA
    on attn+mlp (3.25%) reached a fraction of it (BENCHMARKS.md, issue 14). A backbone without a
    convolutional stem (model.conv_channels = 0) has no "conv" layers: set layers = ["attn", "mlp"]."""
    cascades: list[int] = field(default_factory=list)
    """Adapt only these cascades' backbones (0-based, -1 = the last); [] = every cascade. What was adapted
    is saved by name in adapter_config.json's target_modules, so the folder reloads exactly."""
    forms: list[str] = field(default_factory=lambda: ["lora"])
    """Adapter forms (models.adapters): "lora", "scale_shift" (per-channel, on the same layers), "prompt"
    (learned offsets of the metadata conditioning tokens), any combination."""


@dataclass
class FinetuneOptim:
    """AdamW over the trainable parameters only, linear warmup then cosine decay."""

    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 5
    weight_decay: float = 0.0
    clip: float = 1.0
    """Gradient-norm clipping (0 = off)."""


@dataclass
class FinetuneLoss:
    """Supervised loss on the coil-combined (RSS) image magnitude against the fully sampled reference."""

    ssim: float = 1.0
    """Weight of (1 - SSIM), SSIM with data_range = the reference image's max (models.losses.ssim)."""
    l1: float = 1.0
    """Weight of the L1 image error (data are normalised by shards.normalise.kspace_scale)."""
    region: str = "full"
    """Pixels the loss reads: "full" (the whole field of view) or "ranking" (the central ny/2 x nx/3 the
    challenge scores, finetune.train.ranking_window). On the real-size benchmark the full field of view
    let the model trade error in the scored heart region for the periphery (BENCHMARKS.md, issue 10)."""
    log: bool = False
    """Train on the mean of each sample's log loss (finetune.train.image_loss): every sample's relative
    improvement counts alike, as in the mean PSNR the challenge ranks by."""

    def __post_init__(self) -> None:
        if self.region not in ("full", "ranking"):
            raise ValueError(f"loss.region must be 'full' or 'ranking', got {self.region!r}")


@dataclass
class FinetuneRun:
    """Where the backbone comes from, where outputs go, how long and how."""

    backbone: str = "out/pretrain"
    """Pretraining run folder (or its backbone.safetensors) exported by pretrain.checkpoint.export_backbone."""
    adapters: str = "out/adapters"
    """Adapter bank folder: the result is written to <adapters>/<contrast>_<pattern>/."""
    dir: str = ""
    """Run folder (config, TensorBoard, resumable state); "" = out/finetune/<contrast>_<pattern>."""
    steps: int = 40
    seed: int = 0
    device: str = "cpu"
    """"cpu" (gloo ranks under accelerate) or "cuda"."""
    full_finetune: bool = False
    """Train every parameter of the pretrained model (benchmark arm (c)); saves a full model, not an adapter."""
    from_scratch: bool = False
    """Random initialisation, every parameter trained (benchmark arm (b)); saves a full model."""
    bank_contrasts: list[str] = field(default_factory=list)
    """finetune.bank trains only these contrasts ([] = every contrast present in the shards)."""
    exclude_centers: list[str] = field(default_factory=list)
    """Samples of these centers are never trained on (held-out evaluation)."""
    exclude_scanners: list[str] = field(default_factory=list)
    """Samples of these scanner folders ("Siemens_30T_Vida") are never trained on."""
    checkpoint_every: int = 20
    """Save the resumable state every this many steps (and at the end); 0 = only at the end."""
    resume: bool = True
    """Continue from <dir>/state/latest when it exists."""
    log_every: int = 5
    tensorboard: bool = True
    progress: bool = True


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning of one adapter (or, for the benchmark, the full model) per contrast x pattern."""

    data: LoaderConfig = field(default_factory=LoaderConfig)
    """Training shards; `patterns` is replaced by [adapter.pattern] (R from `accelerations`)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Only used by run.from_scratch without a backbone to copy the architecture from."""
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    loss: FinetuneLoss = field(default_factory=FinetuneLoss)
    run: FinetuneRun = field(default_factory=FinetuneRun)
