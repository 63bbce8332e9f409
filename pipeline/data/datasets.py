"""Training data: unpaired, paired and labeled datasets over a prepared folder, with seeded augmentation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from pipeline.errors import UserError
from pipeline.pixels import to_model_range, to_pixels
from pipeline.schema import AugmentParams

MANIFEST = "manifest.json"


def load_manifest(dataset_dir: Path) -> dict:
    path = Path(dataset_dir) / MANIFEST
    if not path.exists():
        raise UserError(f"{path}: not found; run `transfigure prepare` first")
    return json.loads(path.read_text())


def entries(manifest: dict, split: str, domain: str) -> list[dict]:
    return [e for e in manifest["images"] if e["split"] == split and e["domain"] == domain]


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float32 CHW in [-1, 1], the contract of every network here."""
    return to_model_range(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC, rounding as an 8-bit PNG would store it."""
    return to_pixels(images).permute(0, 2, 3, 1).cpu().numpy()


def read_rgb(path: Path) -> np.ndarray:
    # Prepared files are already checked 8-bit RGB PNGs, so the careful decoder is not needed here.
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


def read_labels(path: Path) -> np.ndarray:
    """A prepared label map (a palette PNG of class indices) as an (H, W) uint8 array."""
    with Image.open(path) as image:
        return np.array(image)


def label_side(manifest: dict) -> dict | None:
    """{"domain", "classes", "palette"} of an aligned dataset whose one side is label maps, else None."""
    return manifest.get("labels")


def build_augment(params: AugmentParams, paired: bool, b_is_label_map: bool = False) -> A.Compose:
    transforms: list = []
    if params.crop:
        # Training on random crops: the generators are fully convolutional, so they still run on whole images.
        transforms.append(A.RandomCrop(height=params.crop, width=params.crop, pad_if_needed=True))
    if params.shift or params.rotate:
        transforms.append(
            A.Affine(
                translate_percent=(-params.shift, params.shift),
                rotate=(-params.rotate, params.rotate),
                border_mode=cv2.BORDER_REPLICATE,
                p=1.0,
            )
        )
    if params.flip:
        transforms.append(A.HorizontalFlip(p=0.5))
    if params.color_jitter:
        j = params.color_jitter
        transforms.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j, 0.5) / 4, p=1.0))
    # A label map moves with its image as a mask: nearest-neighbour geometry, and no colour changes.
    targets = {"image_b": "mask" if b_is_label_map else "image"} if paired else None
    return A.Compose(transforms, additional_targets=targets)


class PreparedImages(Dataset):
    """Shared behaviour: a manifest, a seeded random state, and augmentation applied the same to paired images."""

    def __init__(self, dataset_dir: Path, augment: AugmentParams, paired: bool, seed: int, labels_in: str = ""):
        self.root = Path(dataset_dir)
        self.manifest = load_manifest(self.root)
        self.augment = build_augment(augment, paired, b_is_label_map=bool(labels_in))
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.augment.set_random_seed(seed)

    def _apply(self, image: np.ndarray, image_b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.augment.transforms:
            return image, image_b
        if image_b is None:
            return self.augment(image=image)["image"], None
        out = self.augment(image=image, image_b=image_b)
        return out["image"], out["image_b"]

    def _require(self, items: list[dict], what: str) -> list[dict]:
        if not items:
            raise UserError(f"{self.root}: no {what} images in {MANIFEST}")
        return items


class UnpairedDataset(PreparedImages):
    """Two unaligned domains (CycleGAN): item i is A[i] with a random B, as in the reference."""

    def __init__(self, dataset_dir: Path, split: str, augment: AugmentParams = AugmentParams(), seed: int = 0):
        super().__init__(dataset_dir, augment, paired=False, seed=seed)
        self.a = self._require(entries(self.manifest, split, "A"), f"{split}A")
        self.b = self._require(entries(self.manifest, split, "B"), f"{split}B")

    def __len__(self) -> int:
        return max(len(self.a), len(self.b))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        a = read_rgb(self.root / self.a[index % len(self.a)]["path"])
        b = read_rgb(self.root / self.b[int(self.rng.integers(len(self.b)))]["path"])
        return {"A": to_tensor(self._apply(a)[0]), "B": to_tensor(self._apply(b)[0])}


class PairedDataset(PreparedImages):
    """Aligned pairs (pix2pix): the same augmentation is applied to both images of a pair. A label-map side comes
    as (H, W) int64 class indices instead of an image."""

    def __init__(self, dataset_dir: Path, split: str, augment: AugmentParams = AugmentParams(), seed: int = 0):
        labels = label_side(load_manifest(dataset_dir))
        self.labels_in = labels["domain"] if labels else ""
        super().__init__(dataset_dir, augment, paired=True, seed=seed, labels_in=self.labels_in)
        b_by_pair = {e["pair"]: e for e in entries(self.manifest, split, "B")}
        self.pairs = [(e, b_by_pair[e["pair"]]) for e in entries(self.manifest, split, "A") if e["pair"] in b_by_pair]
        self._require(self.pairs, f"paired {split}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pair = dict(zip("AB", self.pairs[index], strict=True))
        read = {d: read_labels if d == self.labels_in else read_rgb for d in "AB"}
        arrays = {d: read[d](self.root / pair[d]["path"]) for d in "AB"}
        # The label map, if any, goes second (albumentations' mask target); its image first.
        first, second = ("B", "A") if self.labels_in == "A" else ("A", "B")
        arrays[first], arrays[second] = self._apply(arrays[first], arrays[second])
        return {d: _as_tensor(arrays[d], d == self.labels_in) for d in "AB"}


def _as_tensor(array: np.ndarray, is_label_map: bool) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.int64)) if is_label_map else to_tensor(array)


class LabeledDataset(PreparedImages):
    """Images of one domain with their class labels (conditional GANs, the digit classifier)."""

    def __init__(
        self, dataset_dir: Path, split: str, domains: str = "B", augment: AugmentParams = AugmentParams(), seed: int = 0
    ):
        super().__init__(dataset_dir, augment, paired=False, seed=seed)
        items = [e for d in domains for e in entries(self.manifest, split, d) if e["label"] is not None]
        self.items = self._require(items, f"labeled {split}{domains}")
        self.n_classes = len(self.manifest["classes"])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        entry = self.items[index]
        image = self._apply(read_rgb(self.root / entry["path"]))[0]
        return {"image": to_tensor(image), "label": torch.tensor(entry["label"], dtype=torch.long)}


def first_items(dataset: Dataset, n: int, keys: tuple[str, ...] = ("A", "B")) -> dict[str, torch.Tensor]:
    """The first n items of `dataset`, stacked per key: a recipe's fixed inputs for sample grids and export."""
    items = [dataset[i] for i in range(n)]
    return {key: torch.stack([item[key] for item in items]) for key in keys}


def _reseed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(info.seed % 2**32)


def batches(
    dataset: PreparedImages,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of shuffled batches, determined by (seed, start_step) so a resumed run is reproducible.
    Under data parallelism each of `world_size` ranks gets its own share of every epoch's shuffle."""
    epoch = 0
    while True:
        stream_seed = seed * 1_000_003 + start_step * 1_009 + epoch
        # Ranks share the shuffle (the sampler) but not the augmentation's or the random B pick's draws.
        rank_seed = stream_seed + rank * 7_919
        generator = torch.Generator().manual_seed(rank_seed)
        dataset.reseed(rank_seed)
        sampler = None
        if world_size > 1:
            sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=stream_seed, drop_last=True)
        shard = len(sampler) if sampler is not None else len(dataset)
        if shard == 0:
            raise UserError(f"{len(dataset)} training images cannot be shared among {world_size} processes")
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=shard >= batch_size,
            num_workers=num_workers,
            generator=generator,
            worker_init_fn=_reseed_worker,
            persistent_workers=False,
        )
        yield from loader
        epoch += 1
