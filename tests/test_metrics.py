"""Tests for pipeline.evaluate.metrics: known answers for PSNR/SSIM/FID/KID, extractors, folder comparison."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from transfigure.pipeline.errors import UserError
from transfigure.pipeline.evaluate.metrics import (
    ClassifierFeatures,
    InceptionFeatures,
    PixelFeatures,
    _mmd2_unbiased,
    compare_folders,
    fid_from_features,
    frechet_distance,
    kid_from_features,
    mean_pairwise_distance,
    psnr,
    psnr_per_image,
    ssim,
)

# 8x8 pixels (192-d) keeps sqrtm in the folder tests fast on small CPUs.
PIXELS = PixelFeatures(size=8)


def gradient(n: int = 4, size: int = 32) -> np.ndarray:
    """A deterministic batch of structured RGB images, different per index."""
    y, x = np.mgrid[0:size, 0:size]
    images = [np.stack([x * 7 + i * 40, y * 5 + i * 30, (x + y) * 3], axis=2) % 256 for i in range(n)]
    return np.stack(images).astype(np.uint8)


def add_noise(images: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, images.shape)
    return np.clip(np.rint(images + noise), 0, 255).astype(np.uint8)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# ---------------------------------------------------------------------------------------------------
# PSNR and SSIM
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [5, 10, 20])
def test_psnr_of_gaussian_noise_matches_its_sigma(sigma):
    # Mid-gray keeps clipping negligible even at 20 sigma = 6.4 standard deviations from the edges.
    real = np.full((4, 32, 32, 3), 128, np.uint8)
    assert psnr(real, add_noise(real, sigma)) == pytest.approx(20 * math.log10(255 / sigma), abs=0.3)


def test_identical_images_give_ssim_one_and_infinite_psnr():
    images = gradient()
    assert ssim(images, images) == 1.0
    assert psnr(images, images) == math.inf
    assert psnr_per_image(images, images) == [math.inf] * 4


def test_psnr_is_averaged_per_image_and_one_identical_pair_makes_it_infinite():
    real = np.full((2, 32, 32, 3), 128, np.uint8)
    fake = real.copy()
    fake[1] = add_noise(real[1], 10)
    per_image = psnr_per_image(real, fake)
    assert per_image[0] == math.inf and per_image[1] == pytest.approx(28.13, abs=0.3)
    assert psnr(real, fake) == math.inf
    assert psnr(real[1], fake[1]) == per_image[1]  # a single (H, W, 3) image works too


def test_ssim_of_heavily_noised_image_is_low():
    real = gradient()
    assert ssim(real, add_noise(real, 80)) < 0.5
    assert 0.5 < ssim(real, add_noise(real, 3)) < 1.0


def test_paired_metrics_refuse_mismatched_or_non_uint8_input():
    images = gradient()
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(images, images[:2])
    with pytest.raises(ValueError, match="uint8"):
        ssim(images.astype(np.float32) / 255, images.astype(np.float32) / 255)


# ---------------------------------------------------------------------------------------------------
# FID and KID
# ---------------------------------------------------------------------------------------------------


def test_frechet_distance_with_equal_covariances_is_squared_mean_distance():
    m = np.array([1.0, -2.0, 0.5])
    assert frechet_distance(np.zeros(3), np.eye(3), m, np.eye(3)) == pytest.approx(m @ m)


def test_frechet_distance_of_diagonal_covariances():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([4.0, 1.0, 0.5, 2.0])
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b)) == pytest.approx(expected)


def test_fid_from_samples_approaches_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = np.zeros(4), np.array([1.0, 0.0, -1.0, 0.5])
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([4.0, 1.0, 0.5, 2.0])
    real = mu1 + rng.normal(size=(20000, 4)) * np.sqrt(a)
    fake = mu2 + rng.normal(size=(20000, 4)) * np.sqrt(b)
    expected = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=0.03)


def test_fid_survives_fewer_samples_than_dimensions():
    rng = np.random.default_rng(0)
    real, fake = rng.random((10, 50)), rng.random((10, 50))
    assert fid_from_features(real, real) == pytest.approx(0, abs=1e-6)
    assert math.isfinite(fid_from_features(real, fake)) and fid_from_features(real, fake) > 0


class _Features(nn.Identity):
    """Lets torchmetrics' FID/KID classes take precomputed features as their "images"."""

    num_features = 8


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_fid_and_kid_agree_with_torchmetrics():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 8)), rng.normal(0.3, 1.2, size=(40, 8))
    fid = FrechetInceptionDistance(feature=_Features())
    fid.set_dtype(torch.float64)
    # With subset_size equal to the set size every subset is the whole set, so both are deterministic.
    kid = KernelInceptionDistance(feature=_Features(), subsets=2, subset_size=40)
    for metric in (fid, kid):
        metric.update(torch.from_numpy(real), real=True)
        metric.update(torch.from_numpy(fake), real=False)
    assert fid_from_features(real, fake) == pytest.approx(fid.compute().item(), rel=1e-6)
    assert _mmd2_unbiased(real, fake) == pytest.approx(kid.compute()[0].item(), rel=1e-6)


def test_kid_of_two_halves_of_one_set_is_near_zero_and_far_below_a_shifted_set():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(400, 64))
    shifted = rng.normal(0.5, 1.0, size=(200, 64))
    kid, kid_std = kid_from_features(samples[:200], samples[200:], subset_size=100)
    kid_shifted, _ = kid_from_features(samples[:200], shifted, subset_size=100)
    assert abs(kid) < 3 * kid_std or abs(kid) < 0.01
    assert kid_shifted > 10 * max(abs(kid), kid_std)


def test_kid_subset_size_adapts_to_small_sets_and_needs_two_samples():
    rng = np.random.default_rng(0)
    ten, thirty = rng.normal(size=(10, 16)), rng.normal(size=(30, 16))
    kid, kid_std = kid_from_features(ten, ten[::-1])
    # Subsets of 5 (half the smaller set) differ from draw to draw, so the std measures something.
    assert kid_std > 0 and math.isfinite(kid)
    assert kid_from_features(ten, thirty, subset_size=3)[1] > 0
    with pytest.raises(ValueError, match="1 real, 10 fake"):
        kid_from_features(ten[:1], ten)


# ---------------------------------------------------------------------------------------------------
# Feature extractors
# ---------------------------------------------------------------------------------------------------


class _RecordingClassifier(nn.Module):
    """Per-channel means as features; records batch sizes, input range and mode of each call."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((len(x), x.min().item(), x.max().item(), self.training, torch.is_grad_enabled()))
        return x.mean(dim=(2, 3)) * self.scale


def test_classifier_features_batches_scales_to_unit_range_and_restores_mode():
    classifier = _RecordingClassifier().train()
    images = np.zeros((300, 4, 4, 3), np.uint8)
    images[:, :, :, 1] = 255
    feats = ClassifierFeatures(classifier)(images)
    assert feats.shape == (300, 3)
    # The classifier sees [-1, 1] input; its features come back scaled to unit length.
    np.testing.assert_allclose(feats, np.tile([-1.0, 1.0, -1.0], (300, 1)) / np.sqrt(3))
    assert classifier.calls == [(256, -1.0, 1.0, False, False), (44, -1.0, 1.0, False, False)]
    assert classifier.training


def test_pixel_features_downsample_and_flatten():
    extractor = PixelFeatures()
    images = np.full((3, 40, 24, 3), 51, np.uint8)
    feats = extractor(images)
    assert extractor.name == "pixels-16"
    assert feats.shape == (3, 16 * 16 * 3)
    np.testing.assert_allclose(feats, 0.2)


def test_inception_features_refuse_a_wrong_hash(tmp_path):
    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"not really weights")
    actual = hashlib.sha256(b"not really weights").hexdigest()
    with pytest.raises(UserError, match="inception.pt") as excinfo:
        InceptionFeatures(weights, expected_sha256="0" * 64)
    assert actual in str(excinfo.value) and "0" * 64 in str(excinfo.value)


def test_inception_features_load_a_local_state_dict(tmp_path):
    weights = tmp_path / "inception.pt"
    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(model.state_dict(), weights)
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    extractor = InceptionFeatures(weights, expected_sha256=sha256, device="cpu")
    feats = extractor(gradient(n=2, size=8))
    assert extractor.name == f"inception-v3 (weights sha256 {sha256[:16]})"
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()


# ---------------------------------------------------------------------------------------------------
# Folders and diversity
# ---------------------------------------------------------------------------------------------------


def test_compare_folders_pairs_images_by_relative_stem(tmp_path):
    real = gradient(n=4)
    for i, image in enumerate(real):
        write_png(tmp_path / "real" / "sub" / f"img{i}.png", image)
        write_png(tmp_path / "fake" / "sub" / f"img{i}.png", add_noise(image, 10, seed=i))
    report = compare_folders(tmp_path / "real", tmp_path / "fake", PIXELS)
    assert report["features"] == "pixels-8"
    assert (report["n_real"], report["n_fake"], report["rejected"]) == (4, 4, [])
    assert report["psnr"] == pytest.approx(20 * math.log10(255 / 10), abs=0.3)
    assert 0 < report["ssim"] < 1
    assert math.isfinite(report["kid"]) and report["kid_std"] >= 0 and report["fid"] >= 0


def test_compare_folders_without_matching_names_or_sizes_omits_paired_metrics(tmp_path):
    real = gradient(n=3)
    for i, image in enumerate(real):
        write_png(tmp_path / "real" / f"img{i}.png", image)
        write_png(tmp_path / "renamed" / f"out{i}.png", image)
        # Same names but a different size: usable for KID/FID after resizing, not as pairs.
        write_png(tmp_path / "bigger" / f"img{i}.png", np.asarray(Image.fromarray(image).resize((48, 48))))
    for fake in ("renamed", "bigger"):
        report = compare_folders(tmp_path / "real", tmp_path / fake, PIXELS)
        assert "psnr" not in report and "ssim" not in report
        assert report["n_fake"] == 3 and math.isfinite(report["fid"])


def test_compare_folders_lists_broken_files_as_rejected(tmp_path):
    for i, image in enumerate(gradient(n=3)):
        write_png(tmp_path / "real" / f"img{i}.png", image)
        write_png(tmp_path / "fake" / f"img{i}.png", image)
    broken = tmp_path / "fake" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    report = compare_folders(tmp_path / "real", tmp_path / "fake", PIXELS)
    assert report["n_fake"] == 3
    assert [r["path"] for r in report["rejected"]] == [str(broken)]
    assert report["rejected"][0]["reason"]
    assert report["psnr"] == math.inf and report["ssim"] == 1.0  # the three good files pair up


def test_compare_folders_needs_two_readable_images(tmp_path):
    write_png(tmp_path / "real" / "a.png", gradient(n=1)[0])
    write_png(tmp_path / "real" / "b.png", gradient(n=1)[0])
    write_png(tmp_path / "fake" / "a.png", gradient(n=1)[0])
    with pytest.raises(UserError, match="at least 2 readable images, found 1"):
        compare_folders(tmp_path / "real", tmp_path / "fake", PIXELS)


def test_mean_pairwise_distance():
    black, white = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)
    assert mean_pairwise_distance(np.stack([black, black, black])) == 0.0
    assert mean_pairwise_distance(np.stack([black, white])) == pytest.approx(1.0)
    assert mean_pairwise_distance(np.stack([black, white, black])) == pytest.approx(2 / 3)
