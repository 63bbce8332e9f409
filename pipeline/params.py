"""params.yaml through one schema: every knob of the pipeline, checked before anything runs.

An unknown key, a wrong type or an impossible value stops the run with one line that names the key.
`--set section.key=value` overrides go through the same checks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError

OBJECTIVES = ("minimax", "nsgan", "lsgan", "wgan", "wgan-gp", "wgan-lp", "hinge")
RECIPES = ("cyclegan", "pix2pix", "cdcgan", "alignflow", "flowgan")

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


class ParamsError(UserError):
    """A user's params are wrong; the message is one line naming the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetParams(Strict):
    source: Literal["builtin", "folder"] = "folder"
    path: str | None = None
    layout: Literal["unaligned", "aligned", "classes"] = "unaligned"
    size: PositiveInt = 256
    resize: Literal["resize_and_crop", "scale_width", "none"] = "resize_and_crop"
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1

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
    num_workers: Annotated[int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    channels_last: bool = True
    checkpoint_every: PositiveInt = 500
    sample_every: PositiveInt = 500
    log_every: PositiveInt = 50


class CycleGANParams(RecipeParams):
    generator: GeneratorParams = GeneratorParams()
    discriminator: DiscriminatorParams = DiscriminatorParams()
    lambda_A: NonNegativeFloat = 10.0
    lambda_B: NonNegativeFloat = 10.0
    lambda_identity: NonNegativeFloat = 0.5
    pool_size: Annotated[int, Field(ge=0)] = 50


class Pix2PixParams(RecipeParams):
    generator: GeneratorParams = GeneratorParams(arch="unet_256", norm="batch", dropout=True)
    discriminator: DiscriminatorParams = DiscriminatorParams(norm="batch")
    lambda_L1: NonNegativeFloat = 100.0


class CDCGANParams(RecipeParams):
    domain: Literal["A", "B"] = "B"
    z_dim: PositiveInt = 100
    ngf: PositiveInt = 64
    ndf: PositiveInt = 64
    conditioning: Literal["projection", "concat"] = "projection"
    d_norm: Literal["none", "batch", "spectral"] = "spectral"


class FlowParams(Strict):
    n_scales: PositiveInt = 2
    n_couplings: PositiveInt = 4
    hidden_channels: PositiveInt = 64
    n_res_blocks: PositiveInt = 2
    actnorm: bool = True
    invconv: bool = False


class AlignFlowParams(RecipeParams):
    flow: FlowParams = FlowParams()
    discriminator: DiscriminatorParams = DiscriminatorParams()
    nll_weight: NonNegativeFloat = 1.0
    pool_size: Annotated[int, Field(ge=0)] = 50


class FlowGANParams(RecipeParams):
    domain: Literal["A", "B"] = "B"
    flow: FlowParams = FlowParams()
    discriminator: DiscriminatorParams = DiscriminatorParams()
    nll_weight: NonNegativeFloat = 1.0
    mle_only: bool = False

    @model_validator(mode="before")
    @classmethod
    def _mle_objective(cls, data):
        """`objective: mle` is pure maximum likelihood: the same as mle_only, with no critic to train."""
        if isinstance(data, dict) and data.get("objective") == "mle":
            return {**data, "objective": "nsgan", "mle_only": True}
        return data


class ClassifierParams(Strict):
    dataset: str = "digits"
    steps: PositiveInt = 800
    batch_size: PositiveInt = 64
    lr: Annotated[float, Field(gt=0)] = 1e-3
    augment: AugmentParams = AugmentParams(shift=0.1, rotate=10)


class EvaluateParams(Strict):
    classifier: ClassifierParams = ClassifierParams()
    n_samples_per_class: PositiveInt = 50
    sheet_rows: PositiveInt = 8
    batch_size: PositiveInt = 64


class ExportParams(Strict):
    opset: Annotated[int, Field(ge=17)] = 18
    fp16: bool = False
    parity_atol: Annotated[float, Field(gt=0)] = 1e-4
    register_models: bool = True


class Params(Strict):
    seed: int = 0
    data: DataParams
    cyclegan: CycleGANParams = CycleGANParams()
    pix2pix: Pix2PixParams = Pix2PixParams(dataset="digits_paired")
    cdcgan: CDCGANParams = CDCGANParams()
    alignflow: AlignFlowParams = AlignFlowParams()
    flowgan: FlowGANParams = FlowGANParams()
    evaluate: EvaluateParams = EvaluateParams()
    export: ExportParams = ExportParams()

    @model_validator(mode="after")
    def _datasets_exist(self) -> Params:
        for recipe in RECIPES:
            name = getattr(self, recipe).dataset
            if name not in self.data.datasets:
                raise ValueError(f"{recipe}.dataset: no dataset {name!r} under data.datasets")
        return self

    def recipe(self, name: str) -> RecipeParams:
        if name not in RECIPES:
            raise ParamsError(f"unknown recipe {name!r} (choose from {', '.join(RECIPES)})")
        return getattr(self, name)


def describe(error: ValidationError, source: str) -> str:
    """One line naming the first wrong key and what is wrong with it."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        message += f" (got {first['input']!r})"
    extra = f" (and {len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    return f"{source}: {key}: {message}{extra}" if key else f"{source}: {message}{extra}"


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies `section.key=value` strings; values are parsed as YAML scalars (`3`, `1e-4`, `true`, `[1, 2]`)."""
    raw = json.loads(json.dumps(raw))
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ParamsError(f"--set {override!r}: expected section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ParamsError(f"--set {override!r}: {part} is not a section")
            node = child
        node[leaf] = yaml.safe_load(text)
    return raw


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Reads, overrides and validates params; raises ParamsError with a one-line message."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such file (run from the repository root or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(describe(exc, str(path))) from None


# Keys that change what is logged or how fast, not what is learned; they may differ on resume.
_RUNTIME_KEYS = {"checkpoint_every", "sample_every", "log_every", "num_workers", "compile"}


def training_params(params: Params, recipe: str) -> dict:
    """The params a training run depends on: the seed, the recipe's section and its dataset."""
    section = params.recipe(recipe).model_dump(mode="json")
    return {
        "seed": params.seed,
        "recipe": recipe,
        recipe: {k: v for k, v in section.items() if k not in _RUNTIME_KEYS},
        "dataset": params.data.datasets[section["dataset"]].model_dump(mode="json"),
    }


def params_hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    flat: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
