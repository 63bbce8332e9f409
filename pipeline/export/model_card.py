"""The ONNX model card: the input and output names and the metadata keys of every model this pipeline writes,
defined once here. `ModelCard` is a model's metadata, typed: export writes it (`to_metadata`), and the inference
engine, tiling, precision, `sample`, the benchmarks and the tests read it (`ModelCard.read`, `from_metadata`).

Kinds:
- image_translation: input `image`, output `translated`, float32 NCHW RGB in [-1, 1], dynamic batch, height and
  width (multiples of `multiple`). ONNX forbids a graph output named like an input, hence `translated`. With
  `input_type` label_map, `image` is a label map instead: int64 N x H x W class indices below `classes`.
- label_map: input `image` as above, output `labels`, int64 N x H x W, each pixel's class (the argmax of the
  generator's logits: deterministic); `classes` and `palette` (a colour per class, "#rrggbb,...") in the card.
- conditional_generation: inputs `z` (float32, N x z_dim) and `label` (int64, N), output `image`.
- flow_sampling: input `z` (float32, N x C x H x W, `latent_shape`), output `image`.

An instance-norm translator also gets two companions for tiled translation (models/thumbnail_norm.py):
- thumbnail_statistics `<stem>.statistics.onnx`: input `image`, output `statistics` (N x `statistics_width`);
- statistics_tile `<stem>.tile.onnx`: inputs `image` and `statistics`, output `translated`; a tile seen with
  `context` pixels around it (when the image has them) equals that region of the whole image's output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from transfigure.pipeline.errors import UserError
from transfigure.pipeline.pixels import MODEL_RANGE

IMAGE_TRANSLATION = "image_translation"
CONDITIONAL_GENERATION = "conditional_generation"
FLOW_SAMPLING = "flow_sampling"
THUMBNAIL_STATISTICS = "thumbnail_statistics"
STATISTICS_TILE = "statistics_tile"
LABEL_MAP = "label_map"
TRANSLATORS = (IMAGE_TRANSLATION, LABEL_MAP)  # the kinds the inference engine runs
STATISTICS = "statistics"  # the statistics companion's suffix and its tensor's name
TILE = "tile"

IMAGE_INPUT = "image"
IMAGE_OUTPUT = "translated"
LABELS_OUTPUT = "labels"
LATENT_INPUT = "z"
LABEL_INPUT = "label"
SAMPLE_OUTPUT = "image"
NORMALIZATION = MODEL_RANGE

# The int8 companion `<stem>.int8.onnx` of an image translator: its card repeats the float32 model's provenance
# (the engine uses it only when `params_hash` and `training_step` agree) and records the export's quality check.
INT8 = "int8"
INT8_CALIBRATION = "int8_calibration"
INT8_MEAN_LEVELS = "int8_mean_level_difference"
INT8_MAX_LEVELS = "int8_max_level_difference"
INT8_PSNR_DB = "int8_psnr_db"
INT8_QUALITY = "int8_quality"  # fidelity.PASSED, or "failed: " and why

# What the caller of an export must say about where the model came from.
PROVENANCE = ("recipe", "training_commit", "params_hash")
IMAGE_PROVENANCE = (*PROVENANCE, "direction", "source_domain", "target_domain")
# What a companion shares with its model when both come from one export (the engine refuses it otherwise).
SAME_EXPORT = ("params_hash", "training_step")


@dataclass(frozen=True)
class Int8Check:
    """The int8 companion's calibration and quality check, as the export wrote them (text, to keep its digits)."""

    calibration: str
    mean_levels: str
    max_levels: str
    psnr_db: str
    quality: str  # fidelity.PASSED, or "failed: " and why


_INT8_KEYS = {
    "calibration": INT8_CALIBRATION,
    "mean_levels": INT8_MEAN_LEVELS,
    "max_levels": INT8_MAX_LEVELS,
    "psnr_db": INT8_PSNR_DB,
    "quality": INT8_QUALITY,
}


@dataclass(frozen=True)
class ModelCard:
    """The metadata of one ONNX model, typed. Every field is optional: a model from elsewhere may carry only some
    (the engine needs `multiple`); `extra` keeps keys this pipeline does not define, so nothing read is lost.
    The fields' order is the order of the keys on disk: `to_metadata` writes what the exports always wrote."""

    recipe: str | None = None
    direction: str | None = None
    source_domain: str | None = None
    target_domain: str | None = None
    training_commit: str | None = None
    params_hash: str | None = None
    training_step: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # a caller's own keys (a reference import's source_*)
    kind: str | None = None
    multiple: int | None = None
    z_dim: int | None = None
    n_classes: int | None = None
    image_size: int | None = None
    latent_shape: tuple[int, ...] | None = None
    normalization: str | None = None
    inputs: tuple[str, ...] = ()  # key `input`, comma-separated
    output: str | None = None
    instance_norm_layers: int | None = None
    input_type: str | None = None  # "image" (RGB) or "label_map"
    classes: int | None = None
    palette: str | None = None  # "#rrggbb,..." a colour per class
    precision: str | None = None
    statistics_width: int | None = None
    context: int | None = None
    int8: Int8Check | None = None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ModelCard:
        """The card of these metadata properties; UserError naming a key whose number does not parse."""
        values: dict = {}
        for name in _TEXT + _INTEGERS:
            if name in metadata:
                values[name] = _integer(metadata, name) if name in _INTEGERS else metadata[name]
        if "input" in metadata:
            values["inputs"] = tuple(metadata["input"].split(","))
        if "latent_shape" in metadata:
            parts = metadata["latent_shape"].split(",")
            values["latent_shape"] = tuple(_integer(metadata, "latent_shape", part) for part in parts)
        known = {*_TEXT, *_INTEGERS, "input", "latent_shape"}
        if all(key in metadata for key in _INT8_KEYS.values()):
            values["int8"] = Int8Check(**{name: metadata[key] for name, key in _INT8_KEYS.items()})
            known |= set(_INT8_KEYS.values())
        return cls(**values, extra={key: value for key, value in metadata.items() if key not in known})

    @classmethod
    def read(cls, onnx_path: Path) -> ModelCard:
        """The card of an ONNX file; UserError if it is missing or not an ONNX model."""
        import onnx

        try:
            model = onnx.load_model(str(onnx_path), load_external_data=False)
        except OSError as exc:
            raise UserError(f"cannot read ONNX model {onnx_path}: {exc.strerror or exc}") from exc
        except Exception as exc:
            # A protobuf parse failure (DecodeError and friends) means the file is not an ONNX model.
            raise UserError(f"{onnx_path} is not an ONNX model ({type(exc).__name__})") from exc
        return cls.of_proto(model)

    @classmethod
    def of_proto(cls, model) -> ModelCard:
        """The card of a loaded onnx.ModelProto."""
        return cls.from_metadata({prop.key: prop.value for prop in model.metadata_props})

    def to_metadata(self) -> dict[str, str]:
        """The metadata properties, in the order the exports write them; fields left None are left out."""
        out: dict[str, str] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "extra":
                out |= value
            elif item.name == "int8" and value is not None:
                out |= {key: getattr(value, name) for name, key in _INT8_KEYS.items()}
            elif item.name == "inputs" and value:
                out["input"] = ",".join(value)
            elif item.name == "latent_shape" and value is not None:
                out["latent_shape"] = ",".join(map(str, value))
            elif item.name not in ("int8", "inputs", "latent_shape") and value is not None:
                out[item.name] = str(value)
        return out

    def differing(self, companion: ModelCard, also: tuple[str, ...] = ()) -> list[str]:
        """The keys of SAME_EXPORT (and `also`) on which `companion` disagrees with this card."""
        return [name for name in (*SAME_EXPORT, *also) if getattr(companion, name) != getattr(self, name)]

    @property
    def latent_sample_shape(self) -> tuple[int, ...] | None:
        """One sample's `z` for a model that draws samples (`z` among its inputs): (z_dim,) or the latent shape;
        None for any other model."""
        if LATENT_INPUT not in self.inputs:
            return None
        return (self.z_dim,) if self.z_dim is not None else self.latent_shape

    @property
    def labels_in(self) -> bool:
        """Whether the model takes label maps (int64 N x H x W classes) instead of RGB images."""
        return self.input_type == LABEL_MAP

    @property
    def labels_out(self) -> bool:
        """Whether the model gives label maps (kind label_map) instead of RGB images."""
        return self.kind == LABEL_MAP


_TEXT = ("recipe", "direction", "source_domain", "target_domain", "training_commit", "params_hash", "training_step")
_TEXT += ("kind", "normalization", "output", "input_type", "palette", "precision")
_INTEGERS = ("multiple", "z_dim", "n_classes", "image_size", "instance_norm_layers", "classes")
_INTEGERS += ("statistics_width", "context")
# Keys the exporter computes from the network itself; a caller passing one would silently contradict the model.
DERIVED = (
    *(name for name in _TEXT + _INTEGERS if name not in IMAGE_PROVENANCE + ("training_step",)),
    "input",
    "latent_shape",
)


def _integer(metadata: Mapping[str, str], key: str, text: str | None = None) -> int:
    try:
        return int(metadata[key] if text is None else text)
    except ValueError:
        raise UserError(f"model card: {key} {metadata[key]!r} is not a whole number") from None


def companion_path(model_path: Path, precision: str) -> Path:
    """Where a companion of `model_path` lives: AtoB.onnx -> AtoB.int8.onnx (or .fp16, .statistics, .tile)."""
    return Path(model_path).with_suffix(f".{precision}.onnx")


def provenance(state, direction: str, source: str, target: str) -> dict[str, str]:
    """The caller's half of the card, from a checkpoint: recipe, direction, domains, commit, params hash, step."""
    dataset = state["params"][state["recipe"]]["dataset"]
    return ModelCard(
        recipe=state["recipe"],
        direction=direction,
        source_domain=f"{dataset}:{source}",
        target_domain=f"{dataset}:{target}",
        training_commit=state.get("git_commit", "unknown"),
        params_hash=state["params_hash"],
        training_step=str(state["step"]),
    ).to_metadata()
