"""`evaluate`: the digit classifier stage, metrics and sample sheets per recipe, and comparison of two folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.classifier import DigitClassifier
from pipeline.data.datasets import LabeledDataset, entries, load_manifest, read_rgb, to_tensor, to_uint8
from pipeline.errors import UserError
from pipeline.evaluate import metrics
from pipeline.images import write_image_atomic, write_json_atomic
from pipeline.params import Params
from pipeline.train.checkpoint import LAST, checkpoint_dir, load_checkpoint, save_checkpoint

CLASSIFIER = Path("runs/classifier/classifier.pt")
TRANSLATION_RECIPES = ("cyclegan", "pix2pix", "alignflow")


def fit_classifier(params: Params, console, path: Path = CLASSIFIER, metrics_root: Path = Path("metrics")) -> dict:
    """Trains the small digit CNN on both domains' train split; its test accuracy is recorded next to it."""
    cp = params.evaluate.classifier
    data_dir = Path(params.data.root) / cp.dataset
    torch.manual_seed(params.seed)
    train = LabeledDataset(data_dir, "train", domains="AB", augment=cp.augment, seed=params.seed)
    net = DigitClassifier(n_classes=train.n_classes)
    optimizer = torch.optim.Adam(net.parameters(), lr=cp.lr)
    loader = torch.utils.data.DataLoader(
        train,
        batch_size=cp.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(params.seed),
    )
    step = 0
    while step < cp.steps:
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(net(batch["image"]), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step == cp.steps:
                break
    net.eval()
    accuracy = {domain: _accuracy(net, LabeledDataset(data_dir, "test", domains=domain)) for domain in "AB"}
    save_checkpoint(
        {
            "recipe": "classifier",
            "step": step,
            "params": cp.model_dump(mode="json"),
            "n_classes": train.n_classes,
            "networks": {"classifier": net.state_dict()},
        },
        path,
    )
    result = {"test_accuracy": accuracy, "steps": step}
    write_json_atomic(metrics_root / "classifier.json", result)
    console.print(f"digit classifier: test accuracy A {accuracy['A']:.4f}, B {accuracy['B']:.4f}; saved {path}")
    return result


@torch.no_grad()
def _accuracy(net: DigitClassifier, dataset: LabeledDataset) -> float:
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    labels = torch.stack([dataset[i]["label"] for i in range(len(dataset))])
    return float((_predict(net, images) == labels).float().mean())


@torch.no_grad()
def _predict(net: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([net(chunk).argmax(1) for chunk in images.split(256)])


def load_classifier(path: Path = CLASSIFIER) -> DigitClassifier | None:
    if not path.exists():
        return None
    state = load_checkpoint(path)
    net = DigitClassifier(n_classes=state["n_classes"])
    net.load_state_dict(state["networks"]["classifier"])
    return net.eval()


def _extractor(classifier: DigitClassifier | None):
    return metrics.ClassifierFeatures(classifier) if classifier is not None else metrics.PixelFeatures()


@torch.no_grad()
def _run(net: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([net(chunk) for chunk in images.split(batch_size)])


def _load_split(data_dir: Path, manifest: dict, domain: str) -> tuple[list[str], torch.Tensor, list[int | None]]:
    items = sorted(entries(manifest, "test", domain), key=lambda e: e["path"])
    if not items:
        raise UserError(f"{data_dir}: no test{domain} images to evaluate on")
    images = torch.stack([to_tensor(read_rgb(data_dir / e["path"])) for e in items])
    names = [Path(e["path"]).relative_to(f"test{domain}").with_suffix("").as_posix() for e in items]
    return names, images, [e["label"] for e in items]


def _direction_metrics(
    source: torch.Tensor,
    fake: torch.Tensor,
    truth: torch.Tensor | None,
    labels: list[int | None],
    target_real: torch.Tensor,
    classifier,
    extractor,
) -> dict:
    fake_u8, target_u8 = to_uint8(fake), to_uint8(target_real)
    out: dict[str, float] = {}
    if truth is not None:
        truth_u8 = to_uint8(truth)
        out["psnr"] = metrics.psnr(truth_u8, fake_u8)
        out["ssim"] = metrics.ssim(truth_u8, fake_u8)
        out["psnr_identity"] = metrics.psnr(truth_u8, to_uint8(source))
    if classifier is not None and all(label is not None for label in labels):
        out["content_accuracy"] = float((_predict(classifier, fake) == torch.tensor(labels)).float().mean())
    real_features, fake_features = extractor(target_u8), extractor(fake_u8)
    out["kid"], out["kid_std"] = metrics.kid_from_features(real_features, fake_features)
    out["fid"] = metrics.fid_from_features(real_features, fake_features)
    return out


def _sheet(rows: list[torch.Tensor], n: int) -> np.ndarray:
    from pipeline.train.loop import grid_image

    return grid_image([row[:n] for row in rows])


def evaluate_recipe(
    recipe: str,
    params: Params,
    console,
    runs_root: Path = Path("runs"),
    metrics_root: Path = Path("metrics"),
    reports_root: Path = Path("reports"),
) -> dict:
    from pipeline.train.recipes import generators_from_checkpoint

    state = load_checkpoint(checkpoint_dir(recipe, runs_root) / LAST)
    generators = generators_from_checkpoint(state)
    p = params.recipe(recipe)
    data_dir = Path(params.data.root) / p.dataset
    manifest = load_manifest(data_dir)
    classifier = load_classifier(runs_root / "classifier" / CLASSIFIER.name)
    extractor = _extractor(classifier)
    reports = reports_root / recipe
    reports.mkdir(parents=True, exist_ok=True)
    batch_size, rows = params.evaluate.batch_size, params.evaluate.sheet_rows

    if recipe in TRANSLATION_RECIPES:
        result = _evaluate_translation(generators, data_dir, manifest, classifier, extractor, batch_size, rows, reports)
        if recipe == "alignflow":
            from pipeline.train.recipes import alignflow

            images = {domain: _load_split(data_dir, manifest, domain)[1] for domain in "AB"}
            result["bits_per_dim"] = alignflow.bits_per_dim(generators, images)
    elif recipe == "flowgan":
        result = _evaluate_flow_generator(generators["generator"], params, manifest, data_dir, extractor, reports)
    else:
        result = _evaluate_conditional(
            generators["generator"], params, manifest, data_dir, classifier, extractor, reports
        )
    result["features"] = extractor.name
    write_json_atomic(metrics_root / f"{recipe}.json", result)
    if state.get("mlflow_run_id"):
        from pipeline import tracking
        from pipeline.params import flatten

        numbers = {f"eval.{k}": float(v) for k, v in flatten(result).items() if isinstance(v, int | float)}
        tracking.log_to_run(state["mlflow_run_id"], numbers, sorted(reports.glob("*.png")), "reports")
    console.print(f"{recipe}: " + ", ".join(f"{k}={v:.4g}" for k, v in flatten(result).items() if isinstance(v, float)))
    return result


def _evaluate_translation(generators, data_dir, manifest, classifier, extractor, batch_size, rows, reports) -> dict:
    names_a, real_a, labels_a = _load_split(data_dir, manifest, "A")
    names_b, real_b, labels_b = _load_split(data_dir, manifest, "B")
    paired = names_a == names_b
    result: dict = {}
    fake_b = _run(generators["AtoB"], real_a, batch_size)
    result["AtoB"] = _direction_metrics(
        real_a, fake_b, real_b if paired else None, labels_a, real_b, classifier, extractor
    )
    if "BtoA" in generators:
        fake_a = _run(generators["BtoA"], real_b, batch_size)
        result["BtoA"] = _direction_metrics(
            real_b, fake_a, real_a if paired else None, labels_b, real_a, classifier, extractor
        )
        rec_a = _run(generators["BtoA"], fake_b, batch_size)
        rec_b = _run(generators["AtoB"], fake_a, batch_size)
        # Mean absolute error with images in [0, 1]: half the error in [-1, 1].
        result["cycle"] = {
            "l1_A": float((rec_a - real_a).abs().mean() / 2),
            "l1_B": float((rec_b - real_b).abs().mean() / 2),
        }
        write_image_atomic(reports / "BtoA.png", _sheet([real_b, fake_a, rec_b] + ([real_a] if paired else []), rows))
        write_image_atomic(reports / "AtoB.png", _sheet([real_a, fake_b, rec_a] + ([real_b] if paired else []), rows))
    else:
        write_image_atomic(reports / "AtoB.png", _sheet([real_a, fake_b] + ([real_b] if paired else []), rows))
    if classifier is not None and all(label is not None for label in labels_b):
        result["real_content_accuracy"] = float((_predict(classifier, real_b) == torch.tensor(labels_b)).float().mean())
    return result


@torch.no_grad()
def _evaluate_conditional(generator, params: Params, manifest, data_dir, classifier, extractor, reports) -> dict:
    p = params.cdcgan
    n_classes, per_class = len(manifest["classes"]), params.evaluate.n_samples_per_class
    generator_rng = torch.Generator().manual_seed(params.seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    z = torch.randn(len(labels), p.z_dim, generator=generator_rng)
    fake = torch.cat([generator(zc, lc) for zc, lc in zip(z.split(256), labels.split(256), strict=True)])
    _, real, real_labels = _load_split(data_dir, manifest, p.domain)
    fake_u8, real_u8 = to_uint8(fake), to_uint8(real)
    result: dict = {}
    if classifier is not None:
        result["class_accuracy"] = float((_predict(classifier, fake) == labels).float().mean())
    real_features, fake_features = extractor(real_u8), extractor(fake_u8)
    result["kid"], result["kid_std"] = metrics.kid_from_features(real_features, fake_features)
    result["fid"] = metrics.fid_from_features(real_features, fake_features)
    real_labels_t = torch.tensor(real_labels)
    result["diversity"] = {
        "fake": float(
            np.mean([metrics.mean_pairwise_distance(fake_u8[labels.numpy() == k]) for k in range(n_classes)])
        ),
        "real": float(
            np.mean(
                [
                    metrics.mean_pairwise_distance(real_u8[real_labels_t.numpy() == k])
                    for k in range(n_classes)
                    if (real_labels_t == k).sum() > 1
                ]
            )
        ),
    }
    columns = min(per_class, 10)
    grid = [fake.view(n_classes, per_class, *fake.shape[1:])[:, i] for i in range(columns)]
    write_image_atomic(reports / "classes.png", _sheet(grid, n_classes))
    write_image_atomic(
        reports / "walk.png", _sheet(_latent_walk(generator, p.z_dim, n_classes, generator_rng), n_classes)
    )
    return result


@torch.no_grad()
def _evaluate_flow_generator(generator, params: Params, manifest, data_dir, extractor, reports) -> dict:
    """KID/FID of samples against the domain's test images, bits/dim of those images, and samples at several
    temperatures (the same latent draws scaled down: lower temperature, smoother and less varied)."""
    from pipeline.train.recipes import flowgan

    p = params.flowgan
    n = params.evaluate.n_samples_per_class * max(1, len(manifest["classes"]))
    z = torch.randn(n, *generator.latent_shape, generator=torch.Generator().manual_seed(params.seed))
    fake = torch.cat([generator(chunk) for chunk in z.split(256)])
    _, real, _ = _load_split(data_dir, manifest, p.domain)
    real_features, fake_features = extractor(to_uint8(real)), extractor(to_uint8(fake))
    result: dict = {}
    result["kid"], result["kid_std"] = metrics.kid_from_features(real_features, fake_features)
    result["fid"] = metrics.fid_from_features(real_features, fake_features)
    result["bits_per_dim"] = {p.domain: flowgan.bits_per_dim({"generator": generator}, real)}
    columns = [generator(z[:10] * t) for t in (1.0, 0.85, 0.7, 0.5)]
    write_image_atomic(reports / "samples.png", _sheet(columns, 10))
    return result


def _latent_walk(generator, z_dim: int, n_classes: int, rng: torch.Generator, steps: int = 10) -> list[torch.Tensor]:
    """Each row a class; columns move in a straight line between two latent points, shared by all classes."""
    start, end = torch.randn(2, z_dim, generator=rng)
    labels = torch.arange(n_classes)
    columns = []
    for t in torch.linspace(0, 1, steps):
        z = ((1 - t) * start + t * end).expand(n_classes, z_dim)
        columns.append(generator(z, labels))
    return columns


def compare(real: Path, fake: Path, features: str, weights: Path | None, sha256: str | None = None) -> dict:
    if features == "inception":
        if weights is None:
            raise UserError("--features inception needs --weights FILE (a local Inception-v3 state dict)")
        extractor = metrics.InceptionFeatures(weights, expected_sha256=sha256)
    elif features == "builtin":
        extractor = _extractor(load_classifier())
    else:
        raise UserError(f"--features: {features!r} is not builtin or inception")
    for folder in (real, fake):
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder")
    return metrics.compare_folders(real, fake, extractor)
