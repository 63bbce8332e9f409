"""`prepare`: turns a source (the built-in digits or a folder of images) into a checked, resized dataset.

Every prepared dataset has the same shape, whatever its source:

    <out>/trainA/..., trainB/..., testA/..., testB/...   PNG files, 8-bit RGB
    <out>/manifest.json   every image: path, source, size, sha256, split, domain, label, pair
    <out>/report.json     {"prepared": N, "rejected": [{"path": ..., "reason": ...}]}

Paired (aligned) datasets use the same file name in A and B; one side may be label maps (`labels` in params),
written as palette PNGs whose pixel indices are the classes. Labeled (classes) datasets put every image in
domain A under a folder per class. The whole folder is built under a temporary name and renamed at the
end, so an interrupted run never leaves a half-prepared dataset behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transfigure.pipeline.data import builtin
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.files import json_hash, sha256_of_file, write_json_atomic
from transfigure.pipeline.images import (
    BadImage,
    decode_labels,
    decode_rgb,
    list_images,
    resize_image,
    write_image_atomic,
    write_labels_atomic,
)
from transfigure.pipeline.pixels import palette
from transfigure.pipeline.schema import DatasetParams

MANIFEST = "manifest.json"
REPORT = "report.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Item:
    """One image to prepare: where it comes from and where it goes."""

    source: str
    split: str
    domain: str
    name: str  # relative output path without suffix, e.g. "horse_001" or "7/img_12"
    label: int | None = None
    load: Callable[[], np.ndarray] | None = None  # how to get the RGB array; default: decode `source`


@dataclass
class Outcome:
    entries: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)


def prepare_dataset(name: str, spec: DatasetParams, root: Path, seed: int, log: Callable[[str], None] = print) -> dict:
    """Prepares one dataset named in params; returns its report. Reuses the result when nothing changed."""
    out = root / name
    if spec.source == "builtin":
        if spec.builtin == "photos" and spec.layout != "unaligned":
            raise UserError(f"data.datasets.{name}.layout: the built-in photos come as unaligned")
        if spec.builtin == "digits_labels" and spec.layout != "aligned":
            raise UserError(f"data.datasets.{name}.layout: the built-in digits_labels come as aligned")
        if spec.layout == "classes":
            raise UserError(f"data.datasets.{name}.layout: the built-in digits come as unaligned or aligned")
        fingerprint = _fingerprint({"builtin": spec.builtin, "seed": seed, "spec": spec.model_dump(mode="json")})
        items = _photo_items if spec.builtin == "photos" else _digits_items
        return _build(out, fingerprint, lambda: items(spec, seed), spec, log)
    return prepare_folder(Path(spec.path), out, spec, seed, log)


def prepare_folder(source: Path, out: Path, spec: DatasetParams, seed: int, log: Callable[[str], None] = print) -> dict:
    if not source.is_dir():
        raise UserError(f"{source}: no such folder")
    files = list_images(source)
    stat = [(str(p.relative_to(source)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    fingerprint = _fingerprint(
        {"source": str(source.resolve()), "seed": seed, "spec": spec.model_dump(mode="json"), "files": stat}
    )
    items = {"unaligned": _unaligned_items, "aligned": _aligned_items, "classes": _classes_items}[spec.layout]
    return _build(out, fingerprint, lambda: items(source, spec, seed), spec, log)


def _fingerprint(data: dict) -> str:
    return json_hash({"format": FORMAT_VERSION, **data})


def _build(
    out: Path, fingerprint: str, make_items: Callable[[], list[Item]], spec: DatasetParams, log: Callable[[str], None]
) -> dict:
    manifest_path = out / MANIFEST
    if manifest_path.exists() and (out / REPORT).exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint:
            log(f"{out}: up to date ({len(manifest['images'])} images), reusing it")
            return json.loads((out / REPORT).read_text())

    items = make_items()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        outcome = _write_items(items, staging, spec)
        _refuse_empty_domains(out, outcome, spec, log)
        outcome.entries.sort(key=lambda e: e["path"])
        classes = sorted({e["label"] for e in outcome.entries if e["label"] is not None})
        write_json_atomic(
            staging / MANIFEST,
            {
                "format": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "layout": spec.layout,
                "size": spec.size,
                "resize": spec.resize,
                "classes": classes,
                "labels": _label_side(spec),
                "images": outcome.entries,
            },
        )
        report = {"prepared": len(outcome.entries), "rejected": outcome.rejected}
        write_json_atomic(staging / REPORT, report)
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for rejection in outcome.rejected:
        log(f"skipped {rejection['path']}: {rejection['reason']}")
    log(f"{out}: prepared {report['prepared']} images, rejected {len(report['rejected'])}")
    return report


def _label_side(spec: DatasetParams) -> dict | None:
    """The manifest's record of the label-map side: its domain, its number of classes and their colours."""
    if spec.labels is None:
        return None
    return {"domain": spec.labels.domain, "classes": spec.labels.classes, "palette": palette(spec.labels.classes)}


def _refuse_empty_domains(out: Path, outcome: Outcome, spec: DatasetParams, log: Callable[[str], None]) -> None:
    """A domain with no training image would only fail later, in `train`: refuse it now, saying why."""
    needed = "A" if spec.layout == "classes" else "AB"
    empty = [d for d in needed if not any(e["split"] == "train" and e["domain"] == d for e in outcome.entries)]
    if not empty:
        return
    for rejection in outcome.rejected:
        log(f"skipped {rejection['path']}: {rejection['reason']}")
    source = spec.path or "the built-in data"
    rejected = f"; {len(outcome.rejected)} files were rejected (listed above)" if outcome.rejected else ""
    folders = ", ".join(f"train{d}" for d in empty) if spec.layout != "classes" else "any class folder"
    raise UserError(f"{source}: no training images in {folders}{rejected}; nothing written to {out}")


def _replace_dir(new: Path, final: Path) -> None:
    """Swaps a finished folder into place; the old one is removed only after the new one is there."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_items(items: list[Item], staging: Path, spec: DatasetParams) -> Outcome:
    outcome = Outcome()
    seen: set[str] = set()

    labels = _label_side(spec)

    def work(item: Item) -> dict:
        rgb = item.load() if item.load else decode_rgb(item.source)
        is_label_map = labels is not None and item.domain == labels["domain"]
        # Label maps resize by nearest neighbour: interpolating would invent classes between classes.
        rgb = resize_image(rgb, spec.size, spec.resize, nearest=is_label_map)
        rel = f"{item.split}{item.domain}/{item.name}.png"
        if is_label_map:
            write_labels_atomic(staging / rel, rgb, labels["palette"])
        else:
            write_image_atomic(staging / rel, rgb)
        digest = sha256_of_file(staging / rel)
        return {
            "path": rel,
            "source": item.source,
            "width": int(rgb.shape[1]),
            "height": int(rgb.shape[0]),
            "sha256": digest,
            "split": item.split,
            "domain": item.domain,
            "label": item.label,
            "pair": item.name if spec.layout == "aligned" else None,
        }

    unique = []
    for item in items:
        key = f"{item.split}{item.domain}/{item.name}"
        if key in seen:
            outcome.rejected.append({"path": item.source, "reason": f"another file already prepared as {key}.png"})
            continue
        seen.add(key)
        unique.append(item)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for item, result in zip(unique, pool.map(_guarded(work), unique), strict=True):
            if isinstance(result, BadImage):
                outcome.rejected.append({"path": item.source, "reason": str(result)})
            else:
                outcome.entries.append(result)
    return outcome


def _guarded(work: Callable[[Item], dict]) -> Callable[[Item], dict | BadImage]:
    def run(item: Item) -> dict | BadImage:
        try:
            return work(item)
        except BadImage as exc:
            return exc
        except OSError as exc:
            return BadImage(f"cannot read or write: {exc.strerror or exc}")

    return run


def _digits_items(spec: DatasetParams, seed: int) -> list[Item]:
    pairs = list(builtin.digit_pairs(seed))
    splits = builtin.split_sources(len(pairs), seed, spec.test_fraction)
    test = set(splits["test"].tolist())
    items = []
    for pair in pairs:
        name = f"{pair.source:04d}"
        source = f"sklearn.datasets.load_digits()[{pair.source}]"
        if pair.source in test:
            use = {"A": "test", "B": "test"}
        elif spec.layout == "aligned":
            use = {"A": "train", "B": "train"}
        else:
            use = {
                "A": "train" if pair.source in set(splits["trainA"].tolist()) else None,
                "B": "train" if pair.source in set(splits["trainB"].tolist()) else None,
            }
        sides = {"A": pair.a, "B": pair.b}
        if spec.builtin == "digits_labels":  # the ink digit and its label map, on the sides params choose
            label_map = builtin.digit_label_map(pair.a, pair.label)
            sides = {"A": label_map, "B": pair.a} if spec.labels.domain == "A" else {"A": pair.a, "B": label_map}
        for domain, array in sides.items():
            if use[domain]:
                items.append(Item(source, use[domain], domain, name, pair.label, load=_constant(array)))
    return items


def _photo_items(spec: DatasetParams, seed: int) -> list[Item]:
    """Crops of the bundled photographs; a test crop and its painting share a name, so they pair up."""
    try:
        crops = list(builtin.photo_crops(seed, spec.size))
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None
    items, counts = [], {}
    for crop in crops:
        stem = crop.photo.split("/")[1].split(".")[0]
        number = counts[crop.photo] = counts.get(crop.photo, -1) + 1
        for domain, array in (("A", crop.a), ("B", crop.b)):
            source = f"{crop.photo} at {crop.window}" + (" (painted)" if domain == "B" else "")
            items.append(Item(source, crop.split, domain, f"{stem}_{number:04d}", None, load=_constant(array)))
    return items


def _constant(array: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: array


def _stem(path: Path, base: Path) -> str:
    return path.relative_to(base).with_suffix("").as_posix()


def _unaligned_items(source: Path, spec: DatasetParams, seed: int) -> list[Item]:
    """The reference CycleGAN layout: trainA/ trainB/ and optionally testA/ testB/."""
    _require(source, ["trainA", "trainB"], "unaligned")
    items = []
    for split in ("train", "test"):
        for domain in ("A", "B"):
            folder = source / f"{split}{domain}"
            if folder.is_dir():
                items += [Item(str(p), split, domain, _stem(p, folder)) for p in list_images(folder)]
    return items + _non_images(source)


def _aligned_items(source: Path, spec: DatasetParams, seed: int) -> list[Item]:
    """pix2pix's side-by-side A|B images in train/ (test/, val/), or A/<split>/ and B/<split>/ with matching names."""
    items: list[Item] = []
    label_domain = spec.labels.domain if spec.labels else None
    if (source / "A").is_dir() and (source / "B").is_dir():
        for split_dir in sorted(p for p in (source / "A").iterdir() if p.is_dir()):
            split = "test" if split_dir.name in ("test", "val") else "train"
            b_dir = source / "B" / split_dir.name
            b_files = {_stem(p, b_dir): p for p in list_images(b_dir)} if b_dir.is_dir() else {}
            for a_path in list_images(split_dir):
                stem = _stem(a_path, split_dir)
                if stem not in b_files:
                    items.append(Item(str(a_path), split, "A", stem, load=_missing_pair(a_path)))
                    continue
                for domain, path in (("A", a_path), ("B", b_files[stem])):
                    load = _label_map(path, spec.labels.classes) if domain == label_domain else None
                    items.append(Item(str(path), split, domain, stem, load=load))
        return items + _non_images(source)
    if label_domain:
        raise UserError(f"{source}: label maps come as their own files: A/<split>/ and B/<split>/ with matching names")
    _require(source, ["train"], "aligned")
    for split_name in ("train", "test", "val"):
        folder = source / split_name
        if not folder.is_dir():
            continue
        split = "train" if split_name == "train" else "test"
        for path in list_images(folder):
            stem = _stem(path, folder)
            items.append(Item(str(path), split, "A", stem, load=_half_of(path, 0)))
            items.append(Item(str(path), split, "B", stem, load=_half_of(path, 1)))
    return items + _non_images(source)


def _label_map(path: Path, classes: int) -> Callable[[], np.ndarray]:
    return lambda: decode_labels(path, classes)


def _missing_pair(path: Path) -> Callable[[], np.ndarray]:
    def fail() -> np.ndarray:
        raise BadImage("no image with the same name in the B folder")

    return fail


def _half_of(path: Path, half: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        rgb = decode_rgb(path)
        width = rgb.shape[1] // 2
        if width == 0 or rgb.shape[1] % 2:
            raise BadImage(f"an aligned image must be two halves side by side; width {rgb.shape[1]} is odd")
        return np.ascontiguousarray(rgb[:, half * width : (half + 1) * width])

    return load


def _classes_items(source: Path, spec: DatasetParams, seed: int) -> list[Item]:
    """One folder per class, either directly or under train/ and test/; without test/, a seeded test split."""
    has_splits = (source / "train").is_dir()
    split_roots = {"train": source / "train", "test": source / "test"} if has_splits else {"all": source}
    class_names = sorted(
        {
            p.name
            for root in split_roots.values()
            if root.is_dir()
            for p in root.iterdir()
            if p.is_dir() and not p.name.startswith(".")
        }
    )
    if not class_names:
        raise UserError(f"{source}: layout 'classes' needs one sub-folder per class")
    labels = {name: index for index, name in enumerate(class_names)}
    items = []
    for split, root in split_roots.items():
        for class_name in class_names:
            folder = root / class_name
            paths = list_images(folder) if folder.is_dir() else []
            if split == "all":
                rng = np.random.default_rng([seed, labels[class_name]])
                test = set(rng.permutation(len(paths))[: int(round(len(paths) * spec.test_fraction))].tolist())
                chosen = [("test" if i in test else "train", p) for i, p in enumerate(paths)]
            else:
                chosen = [(split, p) for p in paths]
            items += [Item(str(p), s, "A", f"{class_name}/{_stem(p, folder)}", labels[class_name]) for s, p in chosen]
    return items + _non_images(source)


def _require(source: Path, folders: Iterable[str], layout: str) -> None:
    missing = [f for f in folders if not (source / f).is_dir()]
    if missing:
        raise UserError(f"{source}: layout '{layout}' needs the folder(s) {', '.join(missing)}")


def _non_images(source: Path) -> list[Item]:
    """Files with other suffixes are listed as rejected, so the report accounts for everything in the folder."""
    known = {str(p) for p in list_images(source)}
    others = [
        p
        for p in sorted(source.rglob("*"))
        if p.is_file()
        and str(p) not in known
        and p.name not in (MANIFEST, REPORT)
        and not any(part.startswith(".") for part in p.relative_to(source).parts)
    ]
    return [Item(str(p), "skip", "", f"__other__/{i}", load=_not_an_image(p)) for i, p in enumerate(others)]


def _not_an_image(path: Path) -> Callable[[], np.ndarray]:
    def fail() -> np.ndarray:
        raise BadImage(f"not an image file (suffix {path.suffix or 'none'!r})")

    return fail
