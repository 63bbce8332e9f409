"""Training data: unpaired, paired and labeled datasets over a prepared folder, with seeded augmentation."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from transfigure.pipeline import machine, threads
from transfigure.pipeline.errors import UserError
from transfigure.pipeline.pixels import to_model_range, to_pixels
from transfigure.pipeline.schema import AugmentParams

if TYPE_CHECKING:
    import albumentations as A

MANIFEST = "manifest.json"


def load_manifest(dataset_dir: Path) -> dict:
    path = Path(dataset_dir) / MANIFEST
    if not path.exists():
        raise UserError(f"{path}: not found; run `transfigure prepare` first")
    return json.loads(path.read_text())


def entries(manifest: dict, split: str, domain: str) -> list[dict]:
    return [e for e in manifest["images"] if e["split"] == split and e["domain"] == domain]


def pixels_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> uint8 CHW: what the training stream carries (a quarter of float32's bytes to copy)."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float32 CHW in [-1, 1], the contract of every network here."""
    return to_model_range(pixels_tensor(rgb))


def as_model_input(item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """uint8 images (any layout, batched or not) -> float32 in [-1, 1]; class indices (int64) pass unchanged."""
    return {key: to_model_range(value) if value.dtype == torch.uint8 else value for key, value in item.items()}


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


def build_augment(params: AugmentParams, paired: bool, b_is_label_map: bool = False) -> A.Compose | None:
    """The augmentation pipeline; None when there is nothing to augment (then albumentations, about a second of
    every stage's start-up, is not imported at all)."""
    if not (params.crop or params.shift or params.rotate or params.flip or params.color_jitter):
        return None
    import albumentations as A

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


# Decoded images a dataset keeps in memory: the built-in digits (5 MB) are decoded once instead of every epoch
# (the decode was 70% of loading a 32x32 item); a larger dataset fills this and reads the rest from disk.
DECODED_CACHE_BYTES = 512 * 2**20


class PreparedImages(Dataset):
    """Shared behaviour: a manifest, seeded random draws, and augmentation applied the same to paired images.
    Subclasses say in `load` how item `index` is made from a random generator, as uint8 pixels."""

    def __init__(self, dataset_dir: Path, augment: AugmentParams, paired: bool, seed: int, labels_in: str = ""):
        self.root = Path(dataset_dir)
        self.manifest = load_manifest(self.root)
        self.augment = build_augment(augment, paired, b_is_label_map=bool(labels_in))
        self.decoded: dict[str, np.ndarray] = {}
        self.decoded_bytes = 0
        self.rng = np.random.default_rng(seed)
        if self.augment is not None:
            self.augment.set_random_seed(seed)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Item `index` as model input, drawn from the dataset's running random state (sample grids, the classifier)."""
        return as_model_input(self.load(index, self.rng))

    def seeded(self, index: int, seed: int) -> dict[str, torch.Tensor]:
        """Item `index` as uint8 pixels with every random draw from `seed` alone: the same in any worker process."""
        if self.augment is not None:
            self.augment.set_random_seed(seed)
        return self.load(index, np.random.default_rng([seed, 1]))  # a stream apart from the augmentation's

    def load(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def read(self, entry: dict, labels: bool = False) -> np.ndarray:
        """A manifest entry's pixels (a label map's class indices with `labels`), from memory after the first read.
        Callers never write into the array: augmentations and the tensors made from it copy."""
        pixels = self.decoded.get(entry["path"])
        if pixels is None:
            pixels = (read_labels if labels else read_rgb)(self.root / entry["path"])
            if self.decoded_bytes + pixels.nbytes <= DECODED_CACHE_BYTES:
                self.decoded[entry["path"]], self.decoded_bytes = pixels, self.decoded_bytes + pixels.nbytes
        return pixels

    def _apply(self, image: np.ndarray, image_b: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        if self.augment is None:
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

    def load(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        a = self.read(self.a[index % len(self.a)])
        b = self.read(self.b[int(rng.integers(len(self.b)))])
        return {"A": pixels_tensor(self._apply(a)[0]), "B": pixels_tensor(self._apply(b)[0])}


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

    def load(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        pair = dict(zip("AB", self.pairs[index], strict=True))
        arrays = {d: self.read(pair[d], labels=d == self.labels_in) for d in "AB"}
        # The label map, if any, goes second (albumentations' mask target); its image first.
        first, second = ("B", "A") if self.labels_in == "A" else ("A", "B")
        arrays[first], arrays[second] = self._apply(arrays[first], arrays[second])
        return {d: _as_tensor(arrays[d], d == self.labels_in) for d in "AB"}


def _as_tensor(array: np.ndarray, is_label_map: bool) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.int64)) if is_label_map else pixels_tensor(array)


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

    def load(self, index: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        entry = self.items[index]
        image = self._apply(self.read(entry))[0]
        return {"image": pixels_tensor(image), "label": torch.tensor(entry["label"], dtype=torch.long)}


def first_items(dataset: Dataset, n: int, keys: tuple[str, ...] = ("A", "B")) -> dict[str, torch.Tensor]:
    """The first n items of `dataset`, stacked per key: a recipe's fixed inputs for sample grids and export."""
    items = [dataset[i] for i in range(n)]
    return {key: torch.stack([item[key] for item in items]) for key in keys}


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """An endless stream of batches of (index, item seed) keys in which batch k depends on (seed, rank, world size,
    k) alone: a resumed run that skips the batches it drew, and any number of worker processes, load the same
    images with the same random draws. Each epoch is one shuffle that the ranks share, each rank taking its own
    slice (DistributedSampler's drop_last share); whole batches only, unless a share is smaller than one."""

    def __init__(self, size: int, batch_size: int, seed: int, skip: int = 0, rank: int = 0, world_size: int = 1):
        self.share = size // world_size
        if self.share == 0:
            raise UserError(f"{size} training images cannot be shared among {world_size} processes")
        self.size, self.batch_size, self.seed, self.skip = size, batch_size, seed % 2**62, skip
        self.rank, self.world_size = rank, world_size
        self.per_epoch = max(1, self.share // batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, first = divmod(self.skip, self.per_epoch)
        while True:
            shuffle = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.size, generator=shuffle)[: self.share * self.world_size]
            mine = order[self.rank :: self.world_size].tolist()
            for batch in range(first, self.per_epoch):
                positions = range(batch * self.batch_size, min((batch + 1) * self.batch_size, self.share))
                yield [(mine[i], self._item_seed(epoch, i)) for i in positions]
            epoch, first = epoch + 1, 0

    def _item_seed(self, epoch: int, position: int) -> int:
        return int(np.random.SeedSequence([self.seed, self.rank, epoch, position]).generate_state(1)[0])


class _SeededItems(Dataset):
    """A training dataset keyed by SeededBatches' (index, item seed)."""

    def __init__(self, dataset: PreparedImages):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        return self.dataset.seeded(*key)


def loader_workers(setting: int | str, on_cuda: bool) -> int:
    """`num_workers: auto`. On a CUDA device: the cores this process may use (its affinity, the cgroup's CPU quota,
    shared among torchrun's processes on the machine) less one for the training process, at least 1 and at most
    8, since decoding in workers overlaps the device's work. On the CPU: none, since the step's own threads use
    every core and a loader process only takes one from them (1 worker on 2 cores: 5% slower on the digits, 13% at
    256x256; docs/BENCHMARKS.md, #34).
    A number is used as given."""
    if setting != "auto":
        return int(setting)
    if not on_cuda:
        return 0
    cores = len(threads.available_cpus())
    quota = machine.cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    cores //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return min(8, max(1, cores - 1))


def batches(
    dataset: PreparedImages,
    batch_size: int,
    seed: int,
    skip: int = 0,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """The endless stream of seeded training batches (uint8 images, int64 labels), `skip` batches in; under data
    parallelism this rank's share of every epoch. `num_workers` processes decode and augment ahead of the training
    process (two batches each); `pin_memory` stages batches for asynchronous copies to a CUDA device."""
    sampler = SeededBatches(len(dataset), batch_size, seed, skip, rank, world_size)
    # One iterator for the whole run, so its workers are started once and live as long as it. Its own generator:
    # the workers' base seed must not be drawn from the global one, which a resumed run restores from its checkpoint.
    loader = DataLoader(
        _SeededItems(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)
