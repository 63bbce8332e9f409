import numpy as np
import pytest
import torch
from corpus import write_good

from transfigure.pipeline.data.datasets import LabeledDataset, PairedDataset, UnpairedDataset, batches
from transfigure.pipeline.data.prepare import prepare_dataset, prepare_folder
from transfigure.pipeline.schema import AugmentParams, DatasetParams


def digits(tmp_path, layout="unaligned"):
    prepare_dataset("digits", DatasetParams(source="builtin", layout=layout, size=32), tmp_path, 0, lambda _: None)
    return tmp_path / "digits"


def test_unpaired_items_are_images_in_minus_one_to_one(tmp_path):
    dataset = UnpairedDataset(digits(tmp_path), "train")
    item = dataset[0]
    assert item["A"].shape == item["B"].shape == (3, 32, 32)
    assert item["A"].min() >= -1 and item["A"].max() <= 1
    assert item["A"].mean() > 0.3 > -0.3 > item["B"].mean()  # paper is light, neon night is dark


def test_paired_augmentation_moves_both_images_together(tmp_path):
    root = tmp_path / "src"
    write_good(root / "A" / "train", 4, size=(40, 40))
    write_good(root / "B" / "train", 4, size=(40, 40))
    spec = DatasetParams(source="folder", path=str(root), layout="aligned", size=40)
    prepare_folder(root, tmp_path / "out", spec, 0, lambda _: None)
    plain = PairedDataset(tmp_path / "out", "train")
    augmented = PairedDataset(tmp_path / "out", "train", AugmentParams(crop=24, flip=True), seed=1)
    for index in range(len(plain)):
        item = augmented[index]
        assert item["A"].shape == (3, 24, 24)
        # Same files in A and B, so the same crop and flip must give identical tensors.
        assert torch.equal(item["A"], item["B"])
        assert torch.equal(plain[index]["A"], plain[index]["B"])


def test_labeled_dataset_and_seeded_batches_are_reproducible(tmp_path):
    dataset = LabeledDataset(digits(tmp_path), "train", "AB", AugmentParams(shift=0.1, rotate=10))
    assert dataset.n_classes == 10
    first = next(iter(batches(dataset, 16, seed=5, skip=3)))
    again = next(iter(batches(dataset, 16, seed=5, skip=3)))
    other = next(iter(batches(dataset, 16, seed=5, skip=4)))
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])
    assert not torch.equal(first["image"], other["image"])
    assert set(first["label"].tolist()) <= set(range(10))


def test_worker_processes_deliver_the_same_kind_of_batches(tmp_path):
    dataset = UnpairedDataset(digits(tmp_path), "train", AugmentParams(shift=0.05))
    stream = batches(dataset, 8, seed=0, num_workers=2)
    batch = next(stream)
    assert batch["A"].shape == (8, 3, 32, 32)
    assert np.isfinite(batch["B"].numpy()).all()


def test_builtin_photos_split_by_photograph_and_pair_each_test_crop_with_its_painting(digits_root):
    import json

    from PIL import Image

    from transfigure.pipeline.data import builtin
    from transfigure.pipeline.evaluate.metrics import psnr

    manifest = json.loads((digits_root / "photos" / "manifest.json").read_text())
    photo_of = lambda entry: entry["source"].split(" at ")[0]  # noqa: E731
    by_split = {split: {photo_of(e) for e in manifest["images"] if e["split"] == split} for split in ("train", "test")}
    assert by_split["train"] and by_split["test"] and not by_split["train"] & by_split["test"]
    assert by_split["test"] == {key for key, split in builtin.PHOTOS.items() if split == "test"}

    read = lambda domain: np.stack(  # noqa: E731
        [np.asarray(Image.open(p)) for p in sorted((digits_root / "photos" / f"test{domain}").glob("*.png"))]
    )
    a, b = read("A"), read("B")
    assert a.shape == b.shape == (2 * builtin.CROPS["test"], 64, 64, 3)
    copying = psnr(b, a)
    # The painting is a function of the pixels (up to the crop's border), so a good translation exists far above
    # copying A: the same rendering applied to each crop alone.
    rendered = psnr(b, np.stack([builtin.painterly(crop) for crop in a]))
    assert copying < 22 and rendered > copying + 6, (copying, rendered)


def _digests(stream, n: int) -> list[str]:
    import hashlib

    return [hashlib.sha256(b"".join(v.numpy().tobytes() for v in next(stream).values())).hexdigest() for _ in range(n)]


def test_the_stream_is_the_same_for_any_number_of_workers_and_after_a_skip(digits_root):
    """Batch k is a function of (seed, rank, k): with random draws in every item (the random B, a flip, a shift)
    and across an epoch's end (rank 3 of 8 gets 3 batches of 32 per epoch), 0, 1 and 2 workers give the same
    images, and a stream resumed 4 batches in goes on with batch 4."""
    dataset = UnpairedDataset(digits_root / "digits", "train", AugmentParams(flip=True, shift=0.1))
    share = dict(batch_size=32, seed=7, rank=3, world_size=8)
    assert len(dataset) // 8 // 32 == 3
    reference = _digests(batches(dataset, **share), 6)
    assert len(set(reference)) == 6
    for workers in (1, 2):
        assert _digests(batches(dataset, **share, num_workers=workers), 6) == reference, workers
    assert _digests(batches(dataset, **share, skip=4, num_workers=2), 2) == reference[4:]
    assert _digests(batches(dataset, **{**share, "seed": 8}), 1) != reference[:1]


def test_training_batches_carry_uint8_pixels_that_the_device_makes_model_input(digits_root):
    from transfigure.pipeline.data.datasets import as_model_input

    dataset = PairedDataset(digits_root / "digits_labels", "train")
    batch = next(batches(dataset, 4, seed=0))
    assert batch["A"].dtype == torch.uint8 and batch["B"].dtype == torch.int64  # B: the label maps
    model_input = as_model_input(batch)
    assert torch.equal(model_input["A"], batch["A"].float() / 127.5 - 1)
    assert model_input["A"].dtype == torch.float32 and -1 <= model_input["A"].min() <= model_input["A"].max() <= 1
    assert torch.equal(model_input["B"], batch["B"])


def test_auto_loader_workers_follow_the_cores_this_process_may_use(monkeypatch):
    from transfigure.pipeline import machine, threads
    from transfigure.pipeline.data.datasets import loader_workers

    monkeypatch.setattr(threads, "available_cpus", lambda: list(range(16)))
    monkeypatch.setattr(machine, "cpu_quota", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers("auto", on_cuda=False) == 0  # the CPU step's threads use every core
    assert loader_workers(3, on_cuda=False) == 3 and loader_workers(0, on_cuda=True) == 0  # a number as given
    assert loader_workers("auto", on_cuda=True) == 8  # 15 cores free, at most 8
    monkeypatch.setattr(machine, "cpu_quota", lambda: 2.5)  # a pod limited to 2.5 CPUs: 3 cores, one trains
    assert loader_workers("auto", on_cuda=True) == 2
    monkeypatch.setattr(machine, "cpu_quota", lambda: None)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's 4 processes share the 16 cores
    assert loader_workers("auto", on_cuda=True) == 3
    monkeypatch.setattr(threads, "available_cpus", lambda: [0])
    assert loader_workers("auto", on_cuda=True) == 1  # on a GPU, at least one


def test_small_datasets_are_decoded_once_and_large_ones_read_from_disk(tmp_path, monkeypatch):
    from transfigure.pipeline.data import datasets

    root = digits(tmp_path, layout="aligned")
    dataset = PairedDataset(root, "train")
    first = dataset.seeded(0, seed=1)
    for png in root.rglob("*.png"):  # from memory now: the files are no longer needed, nor read
        png.write_bytes(b"")
    again = dataset.seeded(0, seed=1)
    assert all(torch.equal(first[key], again[key]) for key in "AB")
    assert dataset.decoded_bytes == 2 * first["A"].numel()
    monkeypatch.setattr(datasets, "DECODED_CACHE_BYTES", 0)  # nothing fits: every item is read from disk
    with pytest.raises(OSError):
        PairedDataset(root, "train").seeded(0, seed=1)
