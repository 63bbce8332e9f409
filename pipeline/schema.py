"""The pieces of the params schema that several sections share: datasets, augmentation, networks, the loop.

Each recipe defines its own section class on top of `RecipeParams` (pipeline/train/recipes/); pipeline/params.py
puts the sections together into the one schema that params.yaml is checked against.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from transfigure.pipeline import fidelity

OBJECTIVES = ("minimax", "nsgan", "lsgan", "wgan", "wgan-gp", "wgan-lp", "hinge")
GRADIENT_PENALTIES = ("wgan-gp", "wgan-lp")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelMapParams(Strict):
    """The side of an aligned dataset that holds label maps: single-channel or palette PNGs of class indices."""

    domain: Literal["A", "B"] = "B"
    classes: Annotated[int, Field(ge=2, le=256)]


class DatasetParams(Strict):
    source: Literal["builtin", "folder"] = "folder"
    # Which built-in domains, with source builtin; digits_labels: ink digits and their label maps (K = 11).
    builtin: Literal["digits", "photos", "digits_labels"] = "digits"
    path: str | None = None
    layout: Literal["unaligned", "aligned", "classes"] = "unaligned"
    size: PositiveInt = 256
    resize: Literal["resize_and_crop", "scale_width", "none"] = "resize_and_crop"
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    labels: LabelMapParams | None = None  # aligned only: which side is a label map, and of how many classes

    @field_validator("size")
    @classmethod
    def _multiple_of_4(cls, size: int) -> int:
        if size % 4:
            raise ValueError("must be a multiple of 4 (generators downsample twice)")
        return size

    @model_validator(mode="after")
    def _folder_needs_path(self) -> DatasetParams:
        if self.source == "folder" and not self.path:
            raise ValueError("path: a dataset with source 'folder' needs a path")
        return self

    @model_validator(mode="after")
    def _labels_are_aligned(self) -> DatasetParams:
        digits_labels = self.source == "builtin" and self.builtin == "digits_labels"
        if self.labels is not None and self.layout != "aligned":
            raise ValueError("labels: label maps come as one side of an aligned dataset (layout: aligned)")
        if digits_labels and (self.labels is None or self.labels.classes != 11):
            raise ValueError("labels: the built-in digits_labels needs labels: {domain: A or B, classes: 11}")
        return self


class DataParams(Strict):
    root: str = "data/prepared"
    datasets: dict[str, DatasetParams]


class AugmentParams(Strict):
    flip: bool = False
    crop: PositiveInt | None = None
    shift: Annotated[float, Field(ge=0, le=0.5)] = 0.0
    rotate: Annotated[float, Field(ge=0, le=180)] = 0.0
    color_jitter: Annotated[float, Field(ge=0, le=1)] = 0.0


class GeneratorParams(Strict):
    arch: str = "resnet_9blocks"
    ngf: PositiveInt = 64
    norm: Literal["instance", "batch", "none"] = "instance"
    dropout: bool = False
    upsample: Literal["transpose", "resize"] = "transpose"

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        import re

        if not re.fullmatch(r"resnet_\d+blocks|unet_256|unet_128|unet_\d+down", arch):
            raise ValueError("unknown generator arch; use resnet_<N>blocks, unet_256, unet_128 or unet_<N>down")
        return arch


class DiscriminatorParams(Strict):
    kind: Literal["basic", "n_layers", "pixel"] = "basic"
    ndf: PositiveInt = 64
    n_layers: PositiveInt = 3
    norm: Literal["instance", "batch", "none"] = "instance"
    spectral_norm: bool = False


class RecipeParams(Strict):
    """What every recipe shares: the loop, the objective, the optimizer, logging and checkpoints."""

    dataset: str = "digits"
    steps: PositiveInt = 1000
    batch_size: PositiveInt = 16
    objective: Literal[OBJECTIVES] = "lsgan"
    objective_params: dict[str, float] = {}
    n_critic: PositiveInt | None = None
    optimizer: Literal["adam", "rmsprop"] | None = None
    lr: Annotated[float, Field(gt=0)] | None = None
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] | None = None
    lr_decay: bool = True
    init_type: Literal["normal", "xavier", "kaiming", "orthogonal"] = "normal"
    init_gain: Annotated[float, Field(gt=0)] = 0.02
    ema_decay: Annotated[float, Field(ge=0, lt=1)] | None = None
    augment: AugmentParams = AugmentParams()
    # Fine-tuning: network name -> a reference .pth (latest_net_G_A.pth ...) or one of our checkpoints; a fresh
    # run starts from these weights, a resumed one from its own checkpoint.
    init_from: dict[str, str] = {}
    # Processes that decode and augment batches ahead of training; auto: on CUDA by the usable cores, 0 on the CPU.
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    channels_last: bool = True
    checkpoint_every: PositiveInt = 500
    keep_checkpoints: Annotated[int, Field(ge=0)] = 3  # step_NNNNNN.pt copies besides last.pt
    sample_every: PositiveInt = 500
    log_every: PositiveInt = 50

    @model_validator(mode="after")
    def _penalty_needs_a_critic_without_batch_norm(self) -> RecipeParams:
        for name, value in self:
            if isinstance(value, DiscriminatorParams) and value.norm == "batch":
                refuse_batch_norm_with_penalty(self.objective, f"{name}.norm", "instance or none")
        return self


def refuse_batch_norm_with_penalty(objective: str, key: str, fixes: str) -> None:
    """A gradient penalty assumes a critic without batch norm (a per-sample gradient norm means nothing when
    each score depends on the whole batch), and its pass would also move the critic's running statistics."""
    if objective in GRADIENT_PENALTIES:
        raise ValueError(
            f"{key}: a batch-norm critic cannot take {objective}'s gradient penalty (it assumes per-sample scores, "
            f"and its pass would move the running statistics); set {key} to {fixes}"
        )


class FlowParams(Strict):
    n_scales: PositiveInt = 2
    n_couplings: PositiveInt = 4
    hidden_channels: PositiveInt = 64
    n_res_blocks: PositiveInt = 2
    actnorm: bool = True
    invconv: bool = False


class ClassifierParams(Strict):
    dataset: str = "digits"
    steps: PositiveInt = 500
    batch_size: PositiveInt = 64
    lr: Annotated[float, Field(gt=0)] = 1e-3
    augment: AugmentParams = AugmentParams(shift=0.1, rotate=10)


FEATURES = ("auto", "digits-classifier", "pixels-16", "inception-v3")


class EvaluateParams(Strict):
    classifier: ClassifierParams = ClassifierParams()
    # KID/FID features. auto: the digit classifier on the images it was trained on, pixels-16 on anything else.
    features: Literal[FEATURES] = "auto"
    inception_weights: str | None = None  # a local Inception-v3 state dict, for inception-v3
    inception_sha256: str | None = None
    n_samples_per_class: PositiveInt = 50
    sheet_rows: PositiveInt = 8
    batch_size: PositiveInt = 64

    @model_validator(mode="after")
    def _inception_needs_weights(self) -> EvaluateParams:
        if self.features == "inception-v3" and not self.inception_weights:
            raise ValueError("inception_weights: features inception-v3 needs a local weights file")
        return self


class Int8Params(Strict):
    """The int8 companion of each exported translator (CPU inference with `--precision auto|int8`): calibrated on
    the first `calibration_images` training images of its source domain, checked on `check_images` test images
    (else the training images after the calibration ones), usable by `auto` only within both limits."""

    enabled: bool = True
    calibration_images: PositiveInt = 32
    check_images: PositiveInt = 16
    max_mean_levels: Annotated[float, Field(gt=0)] = fidelity.MAX_MEAN_LEVELS
    min_psnr_db: Annotated[float, Field(gt=0)] = fidelity.MIN_PSNR_DB


class ExportParams(Strict):
    opset: Annotated[int, Field(ge=17)] = 18
    fp16: bool = False
    parity_atol: Annotated[float, Field(gt=0)] = 1e-4
    register_models: bool = True
    int8: Int8Params = Int8Params()
