"""The ONNX model card: the input and output names and the metadata keys of every model this pipeline writes,
defined once here and read by export, the inference engine, `sample`, the benchmarks and the tests.

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
INPUT_TYPE = "input_type"  # "image" (RGB) or "label_map"
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
# Keys the exporter computes from the network itself; a caller passing one would silently contradict the model.
DERIVED = (
    "kind",
    "multiple",
    "normalization",
    "input",
    "output",
    "precision",
    "z_dim",
    "n_classes",
    "image_size",
    "latent_shape",
    "instance_norm_layers",
    "statistics_width",
    "context",
    "classes",
    "palette",
    INPUT_TYPE,
)


def companion_path(model_path: Path, precision: str) -> Path:
    """Where a companion of `model_path` lives: AtoB.onnx -> AtoB.int8.onnx (or .fp16, .statistics, .tile)."""
    return Path(model_path).with_suffix(f".{precision}.onnx")


def provenance(state, direction: str, source: str, target: str) -> dict[str, str]:
    """The caller's half of the card, from a checkpoint: recipe, direction, domains, commit, params hash, step."""
    dataset = state["params"][state["recipe"]]["dataset"]
    return {
        "recipe": state["recipe"],
        "direction": direction,
        "source_domain": f"{dataset}:{source}",
        "target_domain": f"{dataset}:{target}",
        "training_commit": state.get("git_commit", "unknown"),
        "params_hash": state["params_hash"],
        "training_step": str(state["step"]),
    }


def read_metadata(onnx_path: Path) -> dict[str, str]:
    """The metadata properties of an ONNX file; UserError if it is missing or not an ONNX model."""
    import onnx

    try:
        model = onnx.load_model(str(onnx_path), load_external_data=False)
    except OSError as exc:
        raise UserError(f"cannot read ONNX model {onnx_path}: {exc.strerror or exc}") from exc
    except Exception as exc:
        # A protobuf parse failure (DecodeError and friends) means the file is not an ONNX model.
        raise UserError(f"{onnx_path} is not an ONNX model ({type(exc).__name__})") from exc
    return {prop.key: prop.value for prop in model.metadata_props}
