"""ONNX export of trained generators, checked and parity-tested against PyTorch before anything is written.

Every model follows the model card of pipeline/export/model_card.py (names, kinds, metadata keys), with
metadata properties that say where the model came from.

Every export is checked with the ONNX checker and strict shape inference, then run in ONNX Runtime on the CPU
against PyTorch eager on several batch sizes and non-square sizes the export never saw. A model that fails
any of that is not written; a model that passes is written atomically, whole, in one file.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from transfigure.models.categorical import LabelMapOutput, OneHotInput
from transfigure.models.thumbnail_norm import StatisticsGraph, context_radius, instance_norms, statistics_width
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export import model_card as card
from transfigure.pipeline.export.tile_graphs import statistics_graph, tile_graph
from transfigure.pipeline.files import write_bytes_atomic
from transfigure.pipeline.pixels import palette, palette_text

IMAGE_CHANNELS = 3
FP16_ATOL = 5e-2


class ExportParityError(UserError):
    """ONNX Runtime's output differs from PyTorch's by more than the tolerance; nothing was written."""


def export_image_generator(
    net: nn.Module,
    out_path: Path,
    metadata: dict[str, str],
    opset: int = 18,
    fp16: bool = False,
    atol: float = 1e-4,
) -> dict:
    """Export an image-to-image generator to `out_path` (and `<stem>.fp16.onnx` with `fp16`), in eval mode.

    `net` must have `size_multiple`; `metadata` must hold recipe, direction, source_domain, target_domain,
    training_commit and params_hash as strings. `net` itself is not modified: a CPU float32 copy is exported.
    The fp16 model keeps float32 input and output and computes in float16 (the network is exported from
    PyTorch in half precision behind casts); its parity is measured against PyTorch in float32 and must be
    below FP16_ATOL. An instance-norm network also gets its tiling companions (`tile_graphs`). Raises
    ExportParityError when any model misses its tolerance, in which case no file is written. Returns {"path",
    "max_abs_error", "tolerance", "cases", "fp16": {same keys} | None, "tiles": {"context", ...} | None}.
    A generator fed label maps (models.categorical.OneHotInput) takes `image` as int64 N x H x W classes
    (`input_type` label_map in the card); it gets no fp16 or tiling companions, which need an RGB input.
    """
    multiple = int(net.size_multiple)
    classes = net.classes if isinstance(net, OneHotInput) else None
    layers = len(instance_norms(net)) if classes is None else 0
    label_input = {}
    if classes:
        label_input = {"input_type": card.LABEL_MAP, "classes": classes, "palette": palette_text(palette(classes))}
    model_card = _card(
        metadata,
        card.IMAGE_PROVENANCE,
        kind=card.IMAGE_TRANSLATION,
        multiple=multiple,
        normalization=card.NORMALIZATION,
        inputs=(card.IMAGE_INPUT,),
        output=card.IMAGE_OUTPUT,
        instance_norm_layers=layers,
        **label_input,
    )
    out_path = Path(out_path)
    model = _eval_copy(net)
    example, dims = _image_example(multiple, classes)
    cases = [_image_case(*size, classes=classes) for size in _image_sizes(multiple)]
    with torch.no_grad():
        expected = [model(*inputs) for inputs in cases]

    variants = [(out_path, model, atol, "float32")]
    fp16 = fp16 and classes is None
    if fp16:
        half = _Float16Compute(copy.deepcopy(model).half()).eval()
        variants.append((card.companion_path(out_path, "fp16"), half, FP16_ATOL, "float16"))
    protos, reports = [], []
    for path, variant, tolerance, precision in variants:
        proto = _export(variant, example, dims, [card.IMAGE_INPUT], [card.IMAGE_OUTPUT], opset)
        onnx.helper.set_model_props(proto, replace(model_card, precision=precision).to_metadata())
        reports.append(_check_parity(proto, path, [card.IMAGE_INPUT], cases, expected, tolerance))
        protos.append(proto)
    paths = [path for path, *_ in variants]
    tiles = None
    context = context_radius(model, multiple) if layers else None
    if context is not None:  # an unbounded field (U-Net) cannot tile exactly: it keeps blended tiles
        tile_paths, tile_protos, tiles = tile_graphs(
            model, protos[0], out_path, model_card, cases, expected, atol, context
        )
        paths, protos = paths + tile_paths, protos + tile_protos
    # Every model passed before any is written, so a failure never leaves a mismatched set behind.
    for path, proto in zip(paths, protos, strict=True):
        write_bytes_atomic(path, proto.SerializeToString())
    input_type = card.LABEL_MAP if classes else "image"
    return {**reports[0], "fp16": reports[1] if fp16 else None, "tiles": tiles, "input_type": input_type}


def export_label_map_generator(
    net: nn.Module, out_path: Path, metadata: dict[str, str], opset: int = 18, atol: float = 1e-4
) -> dict:
    """Export a generator of K logits per pixel as a label map model (kind label_map): input `image` as for any
    translator, output `labels`, the int64 N x H x W argmax, with `classes` and `palette` in the card. Parity: ONNX
    Runtime's classes equal PyTorch's at every pixel whose two best logits are more than `atol` apart (closer
    ones are rounding-level ties either may break). Returns {"path", "pixels", "differing_pixels", "tolerance",
    "cases"}; raises ExportParityError, writing nothing, on any other difference."""
    multiple = int(net.size_multiple)
    model = LabelMapOutput(_eval_copy(net)).eval()
    cases = [_image_case(*size) for size in _image_sizes(multiple)]
    with torch.no_grad():
        logits = [model.generator(*inputs) for inputs in cases]
    classes = logits[0].shape[1]
    model_card = _card(
        metadata,
        card.IMAGE_PROVENANCE,
        kind=card.LABEL_MAP,
        multiple=multiple,
        normalization=card.NORMALIZATION,
        inputs=(card.IMAGE_INPUT,),
        output=card.LABELS_OUTPUT,
        classes=classes,
        palette=palette_text(palette(classes)),
        precision="float32",
    )
    example, dims = _image_example(multiple, None)
    proto = _export(model, example, dims, [card.IMAGE_INPUT], [card.LABELS_OUTPUT], opset)
    onnx.helper.set_model_props(proto, model_card.to_metadata())
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = differing = 0
    for (image,), scores in zip(cases, logits, strict=True):
        (labels,) = session.run(None, {card.IMAGE_INPUT: image.numpy()})
        best_two = scores.topk(2, dim=1).values
        decisive = (best_two[:, 0] - best_two[:, 1] > atol).numpy()
        differs = labels != scores.argmax(1).numpy()
        wrong = int((differs & decisive).sum())
        if wrong:
            raise ExportParityError(
                f"ONNX model for {Path(out_path).name} gives other classes than PyTorch at {wrong} pixels of "
                f"{image.shape[2]}x{image.shape[3]} images; nothing written"
            )
        pixels, differing = pixels + labels.size, differing + int(differs.sum())
    write_bytes_atomic(Path(out_path), proto.SerializeToString())
    shapes = [{"batch": image.shape[0], "height": image.shape[2], "width": image.shape[3]} for (image,) in cases]
    return {"path": str(out_path), "pixels": pixels, "differing_pixels": differing, "tolerance": atol, "cases": shapes}


def tile_graphs(
    model: nn.Module,
    proto: onnx.ModelProto,
    out_path: Path,
    model_card: card.ModelCard,
    cases: list[tuple[torch.Tensor]],
    expected: list[torch.Tensor],
    atol: float,
    context: int,
) -> tuple[list[Path], list[onnx.ModelProto], dict]:
    """The statistics and tile graphs of an instance-norm translator (models/thumbnail_norm.py), checked twice:
    the statistics graph against PyTorch's, and the tile graph, given each image's own statistics, against the
    whole model."""
    statistics_net = StatisticsGraph(model).eval()
    channels = statistics_net.channels
    width = statistics_width(model)
    shared = replace(model_card, statistics_width=width, context=context)
    with torch.no_grad():
        statistics = [statistics_net(*inputs) for inputs in cases]
    stats_proto, tile_proto = statistics_graph(proto, channels), tile_graph(proto, channels)
    for made in (stats_proto, tile_proto):
        onnx.checker.check_model(made, full_check=True)
    paths = [card.companion_path(out_path, card.STATISTICS), card.companion_path(out_path, card.TILE)]
    kinds = {card.THUMBNAIL_STATISTICS: ((card.IMAGE_INPUT,), card.STATISTICS)}
    kinds[card.STATISTICS_TILE] = ((card.IMAGE_INPUT, card.STATISTICS), card.IMAGE_OUTPUT)
    for made, (kind, (inputs, output)) in zip((stats_proto, tile_proto), kinds.items(), strict=True):
        onnx.helper.set_model_props(made, replace(shared, kind=kind, inputs=inputs, output=output).to_metadata())
    _check_parity(stats_proto, paths[0], [card.IMAGE_INPUT], cases, statistics, atol)
    with_statistics = [(*inputs, stats) for inputs, stats in zip(cases, statistics, strict=True)]
    tile_names = [card.IMAGE_INPUT, card.STATISTICS]
    report = _check_parity(tile_proto, paths[1], tile_names, with_statistics, expected, atol)
    # The report keeps the card's text, as export.json always had it.
    described = {"statistics_width": str(width), "context": str(context), "max_abs_error": report["max_abs_error"]}
    return paths, [stats_proto, tile_proto], described


def export_sampler(
    net: nn.Module,
    out_path: Path,
    metadata: dict[str, str],
    kind: str,
    inputs: tuple[str, ...],
    card_attributes: tuple[str, ...],
    opset: int = 18,
    atol: float = 1e-4,
) -> dict:
    """Export a generator of samples with `inputs` in the order its forward takes them: `z` (float32, N x the
    card's latent shape) and, for a class-conditional one, `label` (int64, N, below the card's `n_classes`);
    output `image`, dynamic batch, in eval mode. The card records `kind` and the network's `card_attributes`
    (z_dim, n_classes and image_size, or latent_shape); `metadata` must hold recipe, training_commit and
    params_hash. Parity is checked on batches of 1 and 5. Returns {"path", "max_abs_error", "tolerance", "cases"}.
    """
    model_card = _card(
        metadata,
        card.PROVENANCE,
        kind=kind,
        **{name: getattr(net, name) for name in card_attributes},
        normalization=card.NORMALIZATION,
        inputs=tuple(inputs),
        output=card.SAMPLE_OUTPUT,
        precision="float32",
    )
    latent = model_card.latent_sample_shape
    if latent is None or (card.LABEL_INPUT in inputs and model_card.n_classes is None):
        raise ValueError(f"a sampler's card needs z_dim or latent_shape (and n_classes with a label): {inputs}")
    out_path = Path(out_path)
    model = _eval_copy(net)

    def batch(n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """The inputs of n samples: seeded ones for a parity case, zeros for the export example."""
        z = torch.randn(n, *latent, generator=generator) if generator else torch.zeros(n, *latent)
        made = {card.LATENT_INPUT: z}
        if card.LABEL_INPUT in inputs:
            labels = torch.arange(n - 1, -1, -1) % model_card.n_classes
            made[card.LABEL_INPUT] = labels if generator else torch.zeros(n, dtype=torch.int64)
        return tuple(made[name] for name in inputs)

    generator = torch.Generator().manual_seed(0)
    cases = [batch(n, generator) for n in (1, 5)]
    with torch.no_grad():
        expected = [model(*case) for case in cases]
    batch_dim = Dim("batch", min=1)
    dims = tuple({0: batch_dim} for _ in inputs)
    with warnings.catch_warnings():
        # Inputs that share the batch dimension make the exporter report an unused duplicate axis name.
        warnings.filterwarnings("ignore", message=".*The axis name: batch will not be used")
        proto = _export(model, batch(2), dims, list(inputs), [card.SAMPLE_OUTPUT], opset)
    onnx.helper.set_model_props(proto, model_card.to_metadata())
    report = _check_parity(proto, out_path, list(inputs), cases, expected, atol)
    write_bytes_atomic(out_path, proto.SerializeToString())
    return report


class _Float16Compute(nn.Module):
    """Runs a half-precision network behind float32 input and output, so the fp16 model keeps the contract."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image.half()).float()


def _card(metadata: Mapping[str, str], required: tuple[str, ...], **derived) -> card.ModelCard:
    """The caller's provenance (checked: complete, text, none of the keys the exporter derives) with `derived`."""
    missing = [key for key in required if key not in metadata]
    if missing:
        raise ValueError(f"export metadata lacks {', '.join(missing)}")
    not_text = [key for key, value in metadata.items() if not isinstance(value, str)]
    if not_text:
        raise ValueError(f"export metadata values must be strings: {', '.join(not_text)}")
    clashing = [key for key in metadata if key in card.DERIVED]
    if clashing:
        raise ValueError(f"export metadata keys {', '.join(clashing)} are set by the exporter")
    return replace(card.ModelCard.from_metadata(metadata), **derived)


def _eval_copy(net: nn.Module) -> nn.Module:
    """A CPU float32 copy in eval mode: the caller's network keeps its device, dtype and training flag."""
    return copy.deepcopy(net).float().cpu().eval()


def _image_sizes(multiple: int) -> list[tuple[int, int, int]]:
    """(batch, height, width) parity cases: a square one and a taller-than-wide batch of 3, none of them the
    export example, e.g. 32x32 and 36x20 for multiple 4, 32x32 and 64x32 for multiple 32."""
    side = multiple * math.ceil(32 / multiple)
    return [(1, side, side), (3, side + multiple, max(side - 3 * multiple, multiple))]


def _image_example(multiple: int, classes: int | None) -> tuple[tuple[torch.Tensor], tuple[dict]]:
    """The export example and dynamic shapes of a translator's input: N x 3 x H x W, or N x H x W classes."""
    # Example sizes differ from each other so the exporter cannot tie height to width.
    h, w = Dim("h", min=1) * multiple, Dim("w", min=1) * multiple
    if classes:
        return (torch.zeros(2, 2 * multiple, 3 * multiple, dtype=torch.int64),), ({0: Dim("batch", min=1), 1: h, 2: w},)
    return (torch.zeros(2, IMAGE_CHANNELS, 2 * multiple, 3 * multiple),), ({0: Dim("batch", min=1), 2: h, 3: w},)


def _image_case(batch: int, height: int, width: int, classes: int | None = None) -> tuple[torch.Tensor]:
    """A photo-like input: random colours at a quarter of the resolution, bilinearly upsampled (a label map:
    random classes in blocks of 4x4). Per-pixel noise is far outside what any model was trained on; a flow's
    exponential scales then amplify float32 rounding past 1e-4 (AlignFlow B->A: 1.9e-4 on noise, 1.1e-5 on
    these and 8e-6 on real digits)."""
    generator = torch.Generator().manual_seed(batch * 100_003 + height * 101 + width)
    if classes:
        coarse = torch.randint(0, classes, (batch, 1, max(height // 4, 2), max(width // 4, 2)), generator=generator)
        return (F.interpolate(coarse.float(), size=(height, width), mode="nearest").long()[:, 0],)
    coarse = torch.rand(batch, IMAGE_CHANNELS, max(height // 4, 2), max(width // 4, 2), generator=generator)
    return (F.interpolate(coarse * 2 - 1, size=(height, width), mode="bilinear", align_corners=False),)


def _export(
    net: nn.Module,
    example: tuple[torch.Tensor, ...],
    dynamic_shapes: tuple[dict, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
) -> onnx.ModelProto:
    """torch.onnx's dynamo exporter, then the ONNX checker and strict shape inference on the result."""
    program = torch.onnx.export(
        net,
        example,
        dynamo=True,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        external_data=False,
        verbose=False,
    )
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True, check_type=True)
    return proto


def _check_parity(
    proto: onnx.ModelProto,
    path: Path,
    input_names: list[str],
    cases: list[tuple[torch.Tensor, ...]],
    expected: list[torch.Tensor],
    atol: float,
) -> dict:
    """Run `proto` in ONNX Runtime on the CPU for each case, compare with PyTorch, raise past `atol`."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    results = []
    for inputs, reference in zip(cases, expected, strict=True):
        feed = {name: tensor.numpy() for name, tensor in zip(input_names, inputs, strict=True)}
        (output,) = session.run(None, feed)
        error = float(np.max(np.abs(output.astype(np.float64) - reference.numpy())))
        # The statistics graph's output is (N, width); its input image says which case it was.
        batch, _, height, width = reference.shape if reference.dim() == 4 else inputs[0].shape
        results.append({"batch": batch, "height": height, "width": width, "max_abs_error": error})
    # A NaN error ranks worst and fails the `not <=` test, so broken outputs never pass.
    worst = max(results, key=lambda case: (math.isnan(case["max_abs_error"]), case["max_abs_error"]))
    if not worst["max_abs_error"] <= atol:
        raise ExportParityError(
            f"ONNX model for {path.name} does not match PyTorch: max abs error {worst['max_abs_error']:.3g} "
            f"exceeds {atol:g} at batch {worst['batch']}, {worst['height']}x{worst['width']}; nothing written"
        )
    return {"path": str(path), "max_abs_error": worst["max_abs_error"], "tolerance": atol, "cases": results}
