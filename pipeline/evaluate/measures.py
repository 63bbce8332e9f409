"""What recipes measure in their `evaluate`: translations against the test split, class-conditional samples,
and samples of a flow, each with the sample sheets a person looks at. Every function takes the recipe's
`EvalInputs` and writes its sheets to `inputs.reports`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from transfigure.pipeline.data.datasets import entries, label_side, read_labels, read_rgb, to_tensor, to_uint8
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.evaluate import metrics
from transfigure.pipeline.images import write_image_atomic
from transfigure.pipeline.pixels import label_maps_in_model_range, sample_sheet


@dataclass(frozen=True)
class EvalInputs:
    """What evaluation hands a recipe: the prepared test data, the digit classifier (None unless these are its
    images) and the feature extractor for KID/FID, the evaluate section, the seed, the folder for the sample
    sheets, and where to report the smaller set's size of each KID/FID (the stage warns about small samples)."""

    data_dir: Path
    manifest: dict
    classifier: torch.nn.Module | None
    extractor: object
    settings: object
    seed: int
    reports: Path
    record_sample_size: Callable[[int], None] = lambda n: None


def load_split(inputs: EvalInputs, domain: str) -> tuple[list[str], torch.Tensor, list[int | None]]:
    """The test images of one domain, sorted by path: names (without testA/ and suffix), images ((N, H, W) int64
    for a label-map side), labels."""
    items = sorted(entries(inputs.manifest, "test", domain), key=lambda e: e["path"])
    if not items:
        raise UserError(f"{inputs.data_dir}: no test{domain} images to evaluate on")
    labels = label_side(inputs.manifest)
    if labels and labels["domain"] == domain:
        images = torch.stack(
            [torch.from_numpy(read_labels(inputs.data_dir / e["path"]).astype(np.int64)) for e in items]
        )
    else:
        images = torch.stack([to_tensor(read_rgb(inputs.data_dir / e["path"])) for e in items])
    names = [Path(e["path"]).relative_to(f"test{domain}").with_suffix("").as_posix() for e in items]
    return names, images, [e["label"] for e in items]


@torch.no_grad()
def translation(generators: dict[str, torch.nn.Module], inputs: EvalInputs) -> dict:
    """AtoB (and BtoA with cycle L1 when there is one) on the test split: PSNR/SSIM against the true pairs when
    the names pair up, content accuracy when labels exist, KID/FID against the target domain; AtoB.png/BtoA.png."""
    names_a, real_a, labels_a = load_split(inputs, "A")
    names_b, real_b, labels_b = load_split(inputs, "B")
    paired, batch_size, rows = names_a == names_b, inputs.settings.batch_size, inputs.settings.sheet_rows
    result: dict = {}
    fake_b = _run(generators["AtoB"], real_a, batch_size)
    # A label-map input (labels -> photo) is compared and shown in its palette's colours.
    result["AtoB"] = _direction(_shown(real_a, inputs), fake_b, real_b if paired else None, labels_a, real_b, inputs)
    if "BtoA" in generators:
        fake_a = _run(generators["BtoA"], real_b, batch_size)
        result["BtoA"] = _direction(real_b, fake_a, real_a if paired else None, labels_b, real_a, inputs)
        rec_a, rec_b = _run(generators["BtoA"], fake_b, batch_size), _run(generators["AtoB"], fake_a, batch_size)
        # Mean absolute error with images in [0, 1]: half the error in [-1, 1].
        result["cycle"] = {
            "l1_A": float((rec_a - real_a).abs().mean() / 2),
            "l1_B": float((rec_b - real_b).abs().mean() / 2),
        }
        truth_a, truth_b = ({"real A": real_a}, {"real B": real_b}) if paired else ({}, {})
        _sheet(inputs, "BtoA.png", {"real B": real_b, "fake A": fake_a, "rec B": rec_b} | truth_a, rows)
        _sheet(inputs, "AtoB.png", {"real A": real_a, "fake B": fake_b, "rec A": rec_a} | truth_b, rows)
    else:
        shown_a = _shown(real_a, inputs)
        _sheet(inputs, "AtoB.png", {"real A": shown_a, "fake B": fake_b} | ({"real B": real_b} if paired else {}), rows)
    if inputs.classifier is not None and all(label is not None for label in labels_b):
        result["real_content_accuracy"] = _accuracy(inputs.classifier, real_b, labels_b)
    return result


@torch.no_grad()
def label_maps(generator: torch.nn.Module, inputs: EvalInputs) -> dict:
    """A -> label maps (the argmax of G's logits) against the true maps of the test split: pixel accuracy, mIoU,
    IoU per class and the majority class's accuracy (metrics.label_map_scores); AtoB.png in the palette's colours."""
    _, real_a, _ = load_split(inputs, "A")
    _, truth, _ = load_split(inputs, "B")
    predicted = _run(generator, real_a, inputs.settings.batch_size).argmax(1)
    columns = {"real A": real_a, "fake B": predicted, "real B": truth}
    _sheet(
        inputs,
        "AtoB.png",
        {name: _shown(images, inputs) for name, images in columns.items()},
        inputs.settings.sheet_rows,
    )
    return {"AtoB": metrics.label_map_scores(truth, predicted, label_side(inputs.manifest)["classes"])}


def _shown(images: torch.Tensor, inputs: EvalInputs) -> torch.Tensor:
    """Images as they are; (N, H, W) label maps in the dataset palette's colours, in the model range."""
    return images if images.dim() == 4 else label_maps_in_model_range(images, label_side(inputs.manifest)["palette"])


@torch.no_grad()
def conditional_samples(generator: torch.nn.Module, z_dim: int, domain: str, inputs: EvalInputs) -> dict:
    """n_samples_per_class samples of every class: class accuracy, KID/FID and within-class diversity against
    the domain's test images; classes.png (a row per class) and walk.png (a latent walk shared by all classes)."""
    n_classes, per_class = len(inputs.manifest["classes"]), inputs.settings.n_samples_per_class
    rng = torch.Generator().manual_seed(inputs.seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    z = torch.randn(len(labels), z_dim, generator=rng)
    fake = torch.cat([generator(zc, lc) for zc, lc in zip(z.split(256), labels.split(256), strict=True)])
    _, real, real_labels = load_split(inputs, domain)
    result: dict = {}
    if inputs.classifier is not None:
        result["class_accuracy"] = _accuracy(inputs.classifier, fake, labels.tolist())
    result |= _distances(real, fake, inputs)
    fake_u8, real_u8, real_labels = to_uint8(fake), to_uint8(real), np.array(real_labels)
    diversity = metrics.mean_pairwise_distance
    result["diversity"] = {
        "fake": float(np.mean([diversity(fake_u8[labels.numpy() == k]) for k in range(n_classes)])),
        "real": float(
            np.mean([diversity(real_u8[real_labels == k]) for k in range(n_classes) if (real_labels == k).sum() > 1])
        ),
    }
    by_class = fake.view(n_classes, per_class, *fake.shape[1:])
    _sheet(inputs, "classes.png", {f"z{i + 1}": by_class[:, i] for i in range(min(per_class, 10))}, n_classes)
    _sheet(inputs, "walk.png", _latent_walk(generator, z_dim, n_classes, rng), n_classes)
    return result


@torch.no_grad()
def flow_samples(generator: torch.nn.Module, real: torch.Tensor, inputs: EvalInputs) -> dict:
    """KID/FID of samples against `real`, and samples.png at temperatures 1, 0.85, 0.7 and 0.5 (the same latent
    draws scaled down: smoother and less varied)."""
    n = inputs.settings.n_samples_per_class * max(1, len(inputs.manifest["classes"]))
    z = torch.randn(n, *generator.latent_shape, generator=torch.Generator().manual_seed(inputs.seed))
    fake = torch.cat([generator(chunk) for chunk in z.split(256)])
    _sheet(inputs, "samples.png", {f"T={t}": generator(z[:10] * t) for t in (1.0, 0.85, 0.7, 0.5)}, 10)
    return _distances(real, fake, inputs)


def _direction(source, fake, truth, labels, target_real, inputs: EvalInputs) -> dict:
    out: dict[str, float] = {}
    if truth is not None:
        truth_u8, fake_u8 = to_uint8(truth), to_uint8(fake)
        out["psnr"] = metrics.psnr(truth_u8, fake_u8)
        out["ssim"] = metrics.ssim(truth_u8, fake_u8)
        out["psnr_identity"] = metrics.psnr(truth_u8, to_uint8(source))
    if inputs.classifier is not None and all(label is not None for label in labels):
        out["content_accuracy"] = _accuracy(inputs.classifier, fake, labels)
    return out | _distances(target_real, fake, inputs)


def _distances(real: torch.Tensor, fake: torch.Tensor, inputs: EvalInputs) -> dict:
    inputs.record_sample_size(min(len(real), len(fake)))
    real_features, fake_features = inputs.extractor(to_uint8(real)), inputs.extractor(to_uint8(fake))
    kid, kid_std = metrics.kid_from_features(real_features, fake_features)
    return {"kid": kid, "kid_std": kid_std, "fid": metrics.fid_from_features(real_features, fake_features)}


def _accuracy(classifier, images: torch.Tensor, labels: list[int]) -> float:
    return float((classifier.predict(images) == torch.tensor(labels)).float().mean())


@torch.no_grad()
def _run(net: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([net(chunk) for chunk in images.split(batch_size)])


def _sheet(inputs: EvalInputs, name: str, columns: dict[str, torch.Tensor], n: int) -> None:
    write_image_atomic(inputs.reports / name, sample_sheet({k: column[:n] for k, column in columns.items()}))


def _latent_walk(generator, z_dim: int, n_classes: int, rng: torch.Generator, steps: int = 10) -> dict:
    """Each row a class; columns move in a straight line between two latent points, shared by all classes."""
    start, end = torch.randn(2, z_dim, generator=rng)
    labels = torch.arange(n_classes)
    return {
        f"t={t:.2f}": generator(((1 - t) * start + t * end).expand(n_classes, z_dim), labels)
        for t in torch.linspace(0, 1, steps).tolist()
    }
