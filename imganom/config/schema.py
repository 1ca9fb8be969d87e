"""Validated configuration: one pydantic tree, loaded from YAML presets, stored inside every model file.

Unknown keys, wrong types and impossible values are errors that name the key path (``ConfigError``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A configuration file or dict does not validate; the message names each bad key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class IntensityConfig(_Strict):
    """How raw pixel values map to [0, 1]: dtype range, per-image percentile window, fixed window, or
    "foreground": per channel, a window [low, high] in robust standard deviations around the median of the
    image's foreground (tissue) pixels, so that a bright lesion does not set the window (MRI)."""

    mode: Literal["dtype", "percentile", "fixed", "foreground"] = "dtype"
    low: float = 0.5
    high: float = 99.5

    @model_validator(mode="after")
    def _order(self) -> IntensityConfig:
        if self.high <= self.low:
            raise ValueError(f"intensity.high ({self.high}) must be greater than intensity.low ({self.low})")
        if self.mode == "percentile" and not (0 <= self.low < self.high <= 100):
            raise ValueError("percentile window must satisfy 0 <= low < high <= 100")
        return self


class PreprocessConfig(_Strict):
    """Model input geometry and intensity handling; inspection applies exactly the same steps."""

    size: tuple[int, int] = (128, 128)  # (height, width) the model sees
    channels: int = Field(1, ge=1, le=64)
    intensity: IntensityConfig = IntensityConfig()
    resize: Literal["stretch", "letterbox", "tile"] = "stretch"
    tile_overlap: float = Field(0.25, ge=0.0, lt=1.0)
    max_pixels: int = Field(200_000_000, ge=1)  # refuse larger images (decompression bombs)
    max_bytes: int = Field(128 * 2**20, ge=1)  # refuse larger decoded images: H*W*channels*bytes/sample
    channel_policy: Literal["strict", "convert"] = "convert"  # convert: gray<->RGB, drop alpha

    @field_validator("size")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 8:
            raise ValueError(f"size {v} too small (each side must be >= 8)")
        return v


class ModelConfig(_Strict):
    """ConvVAE architecture. Input sides must be multiples of 2**depth."""

    depth: int = Field(4, ge=1, le=8)
    base_channels: int = Field(32, ge=4, le=512)
    max_channels: int = Field(256, ge=4, le=2048)
    latent: Literal["dense", "spatial"] = "dense"
    latent_dim: int = Field(128, ge=1, le=4096)  # dense: vector length; spatial: latent channels
    norm: Literal["batch", "group", "none"] = "batch"
    activation: Literal["leaky_relu", "relu", "silu"] = "leaky_relu"


class LossConfig(_Strict):
    """Reconstruction mix + beta * KL, with a linear KL warm-up."""

    l1: float = Field(1.0, ge=0)
    l2: float = Field(0.0, ge=0)
    ssim: float = Field(1.0, ge=0)
    ssim_window: int = Field(11, ge=3)
    beta: float = Field(1.0, ge=0)
    kl_warmup_epochs: int = Field(5, ge=0)

    @model_validator(mode="after")
    def _some_recon(self) -> LossConfig:
        if self.l1 + self.l2 + self.ssim <= 0:
            raise ValueError("at least one of l1, l2, ssim must be > 0")
        return self


class AugmentConfig(_Strict):
    """Train-time only augmentations (albumentations); probabilities in [0, 1]."""

    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.0, ge=0, le=1)
    shift: float = Field(0.02, ge=0, le=0.5)  # max fraction of the side
    rotate: float = Field(3.0, ge=0, le=180)  # max degrees
    affine_p: float = Field(0.3, ge=0, le=1)
    brightness: float = Field(0.1, ge=0, le=1)
    contrast: float = Field(0.1, ge=0, le=1)
    brightness_contrast_p: float = Field(0.3, ge=0, le=1)
    noise_std: float = Field(0.0, ge=0, le=0.5)
    noise_p: float = Field(0.0, ge=0, le=1)


class TrainConfig(_Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    patience: int = Field(10, ge=0)  # epochs without val improvement before stopping; 0 = off
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    workers: int = Field(0, ge=0)
    checkpoint_every: int = Field(5, ge=1)
    max_images: int | None = Field(None, ge=1)  # cap the training set (quick experiments)
    # skip training images whose foreground (ops.foreground, as postprocess.roi auto) covers less than this
    # fraction of the model view: empty or near-empty slices of a volume teach nothing; 0 = keep all
    min_foreground: float = Field(0.0, ge=0, lt=1)
    # which epoch's weights are kept (and what early stopping watches), never an epoch inside the KL warm-up:
    # "recon": lowest validation reconstruction loss (the loss mix without KL, so the beta schedule cannot
    # move it); "pseudo": best mean of image AUROC, pixel AUROC and AUPRO on synthetic anomalies pasted into
    # the held-out normals (data/pseudo.py), checked every ``pseudo_every`` epochs
    select: Literal["recon", "pseudo"] = "recon"
    pseudo_every: int = Field(5, ge=1)
    # after training: score the kept model on synthetic anomalies (image/pixel AUROC, AUPRO; stored in the
    # model file and printed by ``imganom train``)
    self_check: bool = True
    # denoising training: this fraction of training images get a synthetic anomaly pasted in and the model
    # learns to reconstruct the clean image (defects get repaired, not copied); 0 = off
    denoise: float = Field(0.0, ge=0, le=1)


class MapConfig(_Strict):
    """Per-pixel anomaly map from input vs reconstruction."""

    l1: float = Field(0.5, ge=0)
    l2: float = Field(0.0, ge=0)
    ssim: float = Field(0.5, ge=0)
    ssim_window: int = Field(11, ge=3)
    channel_reduce: Literal["mean", "max"] = "mean"
    # per-channel weights of the map terms before the channel reduction (e.g. [0, 1, 0]: only the FLAIR of
    # T1/FLAIR/T1c slices); None = all channels alike. "positive" residual: L1/L2 only where the input is
    # brighter than its reconstruction (hyperintense lesions; dark reconstruction misses do not score)
    channel_weights: list[float] | None = None
    residual: Literal["abs", "positive"] = "abs"
    mc_samples: int = Field(0, ge=0)  # 0 = decode the mean only
    # z-score each pixel by the mean/spread of normal maps at that pixel (stats from calibration):
    # "map": the returned map (and so masks and score) is standardised; "score": only the image score is
    # taken from the standardised map, masks/regions come from the plain map (best of both on busy
    # textures: docs/BENCHMARKS.md); "off". true/false are accepted for "map"/"off".
    standardize: Literal["off", "map", "score"] = "off"

    # extra smoothing scales (model pixels): the map becomes the max over postprocess.sigma and these of
    # each smoothed map z-scored by its normal mean/std (calibration), so a faint large defect (visible at
    # a coarse scale) and a sharp small one (fine scale) both stand out. [] = one scale.
    scales: list[float] = Field(default_factory=list, max_length=4)

    # auto (YAML ``map: auto``): after training, choose the mix, channel reduction, standardisation, scales
    # and postprocess.sigma/score on synthetic anomalies in the held-out normals; the model file stores them
    auto: bool = False

    @field_validator("standardize", mode="before")
    @classmethod
    def _bool_standardize(cls, v: Any) -> Any:
        return {True: "map", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("scales")
    @classmethod
    def _positive_scales(cls, v: list[float]) -> list[float]:
        if any(not s > 0 for s in v):
            raise ValueError(f"scales must be > 0, got {v}")
        return v

    @model_validator(mode="after")
    def _some(self) -> MapConfig:
        if self.l1 + self.l2 + self.ssim <= 0:
            raise ValueError("at least one of l1, l2, ssim must be > 0")
        if self.ssim_window % 2 == 0:
            raise ValueError(f"ssim_window must be odd, got {self.ssim_window}")
        if self.channel_weights is not None and (
            any(w < 0 for w in self.channel_weights) or sum(self.channel_weights) <= 0
        ):
            raise ValueError(f"channel_weights must be >= 0 with a positive sum, got {self.channel_weights}")
        if self.scales and self.standardize == "map":
            raise ValueError('scales combine with standardize "off" or "score", not "map"')
        return self


class PostprocessConfig(_Strict):
    """Map -> mask, regions and image score."""

    sigma: float = Field(2.0, ge=0)  # Gaussian smoothing in model pixels (2 px at 128 ~ 4 px at 256)
    open_radius: int = Field(0, ge=0)
    close_radius: int = Field(1, ge=0)
    min_area: int = Field(10, ge=0)  # in original-image pixels
    score: Literal["max", "topk_mean", "elbo"] = "max"
    topk: float = Field(0.01, gt=0, le=1)  # fraction of pixels for topk_mean
    border: int = Field(0, ge=0)  # ignore this many model pixels along each border
    # region of interest: "none" (whole image, or a --roi file when given), "file" (a --roi file is required
    # at inspection), "auto" (per image, the foreground: body/brain tissue found in the model input by
    # ops.foreground; the map is 0 outside it, so background never scores or yields a region; calibration
    # and normal-map statistics use the same foreground)
    roi: Literal["none", "auto", "file"] = "none"
    roi_erode: int = Field(0, ge=0)  # roi auto: shrink the foreground by this many model pixels (outline)


class CalibrationConfig(_Strict):
    target_fpr: float = Field(0.01, gt=0, lt=0.5)
    confidence: float = Field(0.9, gt=0, lt=1)  # upper confidence bound on the quantile
    pixel_quantile: float = Field(0.999, gt=0.5, lt=1)
    # > 0: the image score is divided by the mean raw score of this many training normals nearest in latent
    # space (ops.neighbours): an easy-to-reconstruct normal and a hard one are judged against their peers;
    # the references are kept at calibration. 0 = the raw score. Needs one view per image (no tiles).
    neighbours: int = Field(0, ge=0, le=256)


class UncertaintyConfig(_Strict):
    """Monte-Carlo uncertainty (``ops.uncertainty``): ``samples`` latent draws per image give an uncertainty
    map, a confidence per region and per verdict; 1 = off (today's results, no extra work). The map and the
    score always come from the posterior mean: sampling only adds the uncertainty.
    ``review_below``: a verdict whose confidence is below this becomes ``review`` (opt-in; None = never)."""

    samples: int = Field(1, ge=1, le=256)
    review_below: float | None = Field(None, gt=0, lt=1)


class Config(_Strict):
    """The whole tree. ``name`` is free text carried into model files and reports."""

    name: str = "default"
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    map: MapConfig = MapConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    uncertainty: UncertaintyConfig = UncertaintyConfig()

    @field_validator("map", mode="before")
    @classmethod
    def _map_auto(cls, v: Any) -> Any:
        return {"auto": True} if v == "auto" else v

    @model_validator(mode="after")
    def _geometry(self) -> Config:
        m = 2**self.model.depth
        h, w = self.preprocess.size
        if h % m or w % m:
            raise ValueError(f"preprocess.size {h}x{w} must be multiples of 2**model.depth = {m}")
        cw = self.map.channel_weights
        if cw is not None and len(cw) != self.preprocess.channels:
            raise ValueError(f"map.channel_weights has {len(cw)} entries, preprocess.channels is "
                             f"{self.preprocess.channels}")  # fmt: skip
        if self.model.max_channels < self.model.base_channels:
            raise ValueError("model.max_channels must be >= model.base_channels")
        if self.calibration.neighbours and self.preprocess.resize == "tile":
            raise ValueError("calibration.neighbours needs one view per image: preprocess.resize stretch or "
                             "letterbox, not tile")  # fmt: skip
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {path}: {msg}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict[str, Any], source: str = "(dict)") -> Config:
    """Validate a plain dict; raises ``ConfigError`` naming every bad key path."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A preset name (``industrial-gray``) or a YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    preset = CONFIG_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        names = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown preset {name_or_path!r}; available: {', '.join(names)}")
    return preset


def load_config(name_or_path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a preset or YAML file (``None`` = defaults), then apply nested ``overrides``."""
    data: dict[str, Any] = {}
    source = "(defaults)"
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML in {path}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = _deep_merge(data, overrides)
    return config_from_dict(data, source)
