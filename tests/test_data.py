import numpy as np
import torch
from corpus import write_good

from pipeline.data.datasets import LabeledDataset, PairedDataset, UnpairedDataset, batches
from pipeline.data.prepare import prepare_dataset, prepare_folder
from pipeline.schema import AugmentParams, DatasetParams


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
    first = next(iter(batches(dataset, 16, seed=5, start_step=3)))
    again = next(iter(batches(dataset, 16, seed=5, start_step=3)))
    other = next(iter(batches(dataset, 16, seed=5, start_step=4)))
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

    from pipeline.data import builtin
    from pipeline.evaluate.metrics import psnr

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
