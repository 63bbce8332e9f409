"""Image-quality metrics for `evaluate`: paired PSNR/SSIM, distribution-level KID/FID, diversity.

PSNR and SSIM compare a translated image with its ground truth (paired datasets only); KID and FID
compare the distributions of features of two image sets, so they also work unpaired. Feature
extractors turn (N, H, W, 3) uint8 images into (N, D) arrays; KID/FID numbers are only comparable
between runs that used the same extractor (its `name` is recorded next to them).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.spatial.distance import pdist
from torch import nn

from transfigure.pipeline.errors import UserError
from transfigure.pipeline.files import sha256_of_file
from transfigure.pipeline.images import BadImage, decode_rgb, list_images
from transfigure.pipeline.pixels import to_model_range

DATA_RANGE = 255.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------
# Paired metrics: PSNR and SSIM
# ---------------------------------------------------------------------------------------------------


def psnr_per_image(real_uint8: np.ndarray, fake_uint8: np.ndarray) -> list[float]:
    """PSNR in dB of each image pair, data range 255; identical images give float("inf")."""
    return _per_image(_psnr_batch, real_uint8, fake_uint8)


def psnr(real_uint8: np.ndarray, fake_uint8: np.ndarray) -> float:
    """Mean over images of the per-image PSNR (dB) of 8-bit RGB arrays (N, H, W, 3) or (H, W, 3).

    PSNR is computed for each image, then averaged (not from the MSE pooled over all pixels). A single
    identical pair has infinite PSNR, so the mean is then inf too; use `psnr_per_image` to see which.
    """
    return float(np.mean(psnr_per_image(real_uint8, fake_uint8)))


def ssim(real_uint8: np.ndarray, fake_uint8: np.ndarray) -> float:
    """Mean SSIM over images of 8-bit RGB arrays (N, H, W, 3) or (H, W, 3), data range 255.

    Wang et al. (2004): 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, averaged over
    the valid window positions and the three channels. Images must be at least 11x11.
    """
    return float(np.mean(_per_image(_ssim_batch, real_uint8, fake_uint8)))


def _psnr_batch(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # torchmetrics and torchvision import in seconds; every `train` imports this module through the recipes.
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(fake, real, data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3))


def _ssim_batch(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    # float32: float64 convolutions ran 10x slower on the CPU for values that agree to 1e-7; identical images
    # still give exactly 1 (both sides of the ratio are the same operations on the same numbers).
    return structural_similarity_index_measure(
        fake.float(),
        real.float(),
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        data_range=DATA_RANGE,
        reduction="none",
    ).double()


def _per_image(
    metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    real_uint8: np.ndarray,
    fake_uint8: np.ndarray,
    batch_size: int = 64,
) -> list[float]:
    real, fake = _image_batch(real_uint8), _image_batch(fake_uint8)
    if real.shape != fake.shape:
        raise ValueError(f"real and fake images differ in shape: {real.shape} vs {fake.shape}")
    # Batches bound SSIM's memory on large sets.
    batches = zip(_tensor_batches(real, batch_size), _tensor_batches(fake, batch_size), strict=True)
    return torch.cat([metric(r, f) for r, f in batches]).tolist()


# ---------------------------------------------------------------------------------------------------
# Distribution metrics on feature arrays: FID and KID
# ---------------------------------------------------------------------------------------------------
# torchmetrics' FID/KID classes want images and their own extractor module (precomputed features
# only fit through an identity-module workaround, and KID samples subsets from torch's global RNG),
# so both are written here on arrays; tests cross-check them against torchmetrics.


def label_map_scores(truth: torch.Tensor, predicted: torch.Tensor, classes: int) -> dict:
    """Scores of (N, H, W) predicted class maps against the truth: pixel accuracy, IoU per class (None for a class
    in neither) and their mean over the classes present, and the accuracy of each image's majority class other
    than 0 (class 0 the background: on the digits, the digit read off its strokes)."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_jaccard_index

    accuracy = multiclass_accuracy(predicted, truth, classes, average="micro")
    iou = multiclass_jaccard_index(predicted, truth, classes, average="none", zero_division=float("nan"))
    majority = [_majority_foreground_class(maps, classes) for maps in (predicted, truth)]
    return {
        "pixel_accuracy": float(accuracy),
        "miou": float(iou.nanmean()),
        "per_class_iou": {str(k): None if v != v else float(v) for k, v in enumerate(iou.tolist())},
        "majority_class_accuracy": float((majority[0] == majority[1]).float().mean()),
    }


def _majority_foreground_class(maps: torch.Tensor, classes: int) -> torch.Tensor:
    """(N, H, W) class maps -> (N,) the most frequent class above 0 in each, or -1 where there is none."""
    counts = F.one_hot(maps.flatten(1), classes).sum(1)[:, 1:]
    return torch.where(counts.sum(1) > 0, counts.argmax(1) + 1, -1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))  (Dowson & Landau 1982; Heusel et al. 2017)
    sqrtm is retried with 1e-6 * I added to both covariances if it fails, and imaginary round-off is
    dropped; equal Gaussians can give a tiny negative result from round-off.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(
            f"inconsistent shapes: mu {mu1.shape} and {mu2.shape}, sigma {sigma1.shape} and {sigma2.shape}"
        )
    with warnings.catch_warnings():
        # Fewer samples than dimensions makes the product singular; the result is checked below instead.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # sqrtm failed on the singular product: nudge both covariances off singularity (as pytorch-fid).
        offset = np.eye(len(mu1)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off leaves tiny imaginary parts; large ones mean the covariances are not valid.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.abs(covmean.imag).max()
            raise ValueError(f"sqrtm(sigma1 sigma2) has imaginary parts up to {worst:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(real_feats: np.ndarray, fake_feats: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted (mean, sample covariance) to two (N, D) feature arrays."""
    real, fake = _feature_pair(real_feats, fake_feats, "FID")
    return frechet_distance(
        real.mean(axis=0), np.cov(real, rowvar=False), fake.mean(axis=0), np.cov(fake, rowvar=False)
    )


def kid_from_features(
    real_feats: np.ndarray, fake_feats: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018) of two (N, D) feature arrays: (mean, std).

    The unbiased MMD^2 estimate with the kernel k(x, y) = (x.y / D + 1)^3, on `subsets` random subsets
    drawn without replacement from each set; std is the population std of the subset estimates (as
    torchmetrics). Subsets hold min(subset_size, half of the smaller set) samples (at least 2): a subset
    as large as the whole set would be the same every time and its std would say nothing.
    """
    real, fake = _feature_pair(real_feats, fake_feats, "KID")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    size = max(2, min(subset_size, len(real) // 2, len(fake) // 2))
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), size, replace=False)]
        y = fake[rng.choice(len(fake), size, replace=False)]
        scores.append(_mmd2_unbiased(x, y))
    return float(np.mean(scores)), float(np.std(scores))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equally sized samples under the cubic polynomial kernel."""
    m, dim = x.shape
    k_xx = (x @ x.T / dim + 1) ** 3
    k_yy = (y @ y.T / dim + 1) ** 3
    k_xy = (x @ y.T / dim + 1) ** 3
    # Dropping the diagonals (each sample against itself) is what makes the estimate unbiased.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def _feature_pair(real_feats: np.ndarray, fake_feats: np.ndarray, metric: str) -> tuple[np.ndarray, ...]:
    real, fake = np.asarray(real_feats, np.float64), np.asarray(fake_feats, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"{metric} needs two (N, D) arrays of equal D, got {real.shape} and {fake.shape}")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"{metric} needs at least 2 samples per set, got {len(real)} real, {len(fake)} fake")
    return real, fake


# ---------------------------------------------------------------------------------------------------
# Feature extractors
# ---------------------------------------------------------------------------------------------------


class FeatureExtractor(Protocol):
    """Maps (N, H, W, 3) uint8 RGB images to an (N, D) feature array; `name` labels the numbers."""

    name: str

    def __call__(self, images_uint8: np.ndarray) -> np.ndarray: ...


class ClassifierFeatures:
    """Penultimate features of a trained classifier with `.features(x)` on float NCHW input in [-1, 1].

    Each feature vector is scaled to unit length: raw ReLU features have norms in the tens, which puts KID's
    cubic kernel (x.y / D + 1)^3 in the thousands and its small-sample noise far above any real difference.
    """

    def __init__(self, classifier: nn.Module, name: str = "digits-classifier", batch_size: int = 256):
        self.classifier = classifier
        self.name = name
        self.batch_size = batch_size

    def __call__(self, images_uint8: np.ndarray) -> np.ndarray:
        device = next(self.classifier.parameters()).device
        was_training = self.classifier.training
        self.classifier.eval()  # BatchNorm must use its running statistics, not the batch's
        try:
            with torch.no_grad():
                batches = _tensor_batches(_image_batch(images_uint8), self.batch_size, device, torch.float32)
                feats = [self.classifier.features(to_model_range(x)) for x in batches]
        finally:
            self.classifier.train(was_training)
        return torch.nn.functional.normalize(torch.cat(feats).double(), dim=1).cpu().numpy()


class InceptionFeatures:
    """2048-d pool features of torchvision's Inception-v3 from a local state-dict file (never downloaded).

    Images are resized to 299x299 (bilinear) and ImageNet-normalised. These are not the TF-ported
    weights of pytorch-fid, so the numbers match published FIDs only if that file holds those weights;
    pin `expected_sha256` so every run is known to use the same file.
    """

    name = "inception-v3"

    def __init__(
        self,
        weights_path: str | os.PathLike[str],
        expected_sha256: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
    ):
        path = Path(weights_path)
        if not path.is_file():
            raise UserError(f"{path}: no such weights file (Inception-v3 weights are never downloaded)")
        # Hashed before torch.load, so a wrong or tampered file is never unpickled; the name carries the hash
        # so numbers from different weight files are never mixed up.
        actual = sha256_of_file(path)
        if expected_sha256 is not None and actual != expected_sha256.lower():
            raise UserError(f"{path}: sha256 is {actual}, expected {expected_sha256}")
        self.name = f"inception-v3 (weights sha256 {actual[:16]})"
        import torchvision

        model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.fc = nn.Identity()  # forward then returns the pooled 2048-d vector instead of logits
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.batch_size = batch_size
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def __call__(self, images_uint8: np.ndarray) -> np.ndarray:
        feats = []
        with torch.no_grad():
            for x in _tensor_batches(_image_batch(images_uint8), self.batch_size, self.device, torch.float32):
                x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
                feats.append(self.model((x - self.mean) / self.std))
        return torch.cat(feats).double().cpu().numpy()


class PixelFeatures:
    """Raw pixels downsampled to size x size and flattened: the fallback that needs no download or training.

    Pixel KID/FID tracks colour and layout statistics, not perceptual quality; numbers from different
    extractors (pixels-16, digits-classifier, inception-v3) are not comparable with each other.
    """

    def __init__(self, size: int = 16, batch_size: int = 256):
        self.size = size
        self.name = f"pixels-{size}"
        self.batch_size = batch_size

    def __call__(self, images_uint8: np.ndarray) -> np.ndarray:
        feats = [
            # antialias averages over the source pixels instead of sampling a few of them
            F.interpolate(x / 255, size=(self.size, self.size), mode="bilinear", antialias=True).flatten(1)
            for x in _tensor_batches(_image_batch(images_uint8), self.batch_size)
        ]
        return torch.cat(feats).numpy()


# ---------------------------------------------------------------------------------------------------
# Folders and diversity
# ---------------------------------------------------------------------------------------------------


def compare_folders(
    real_dir: str | os.PathLike[str], fake_dir: str | os.PathLike[str], extractor: FeatureExtractor
) -> dict:
    """KID/FID between the images of two folders, plus mean PSNR/SSIM when the folders pair up.

    Images are resized to the size of the first real image for feature extraction. The folders pair up
    when every fake has a real image with the same relative path without suffix and the same size;
    PSNR and SSIM are then averaged over those pairs at full resolution. Undecodable files are skipped
    and listed under "rejected".
    """
    real, rejected = _load_folder(real_dir)
    fake, rejected_fake = _load_folder(fake_dir)
    rejected += rejected_fake
    for folder, images in ((real_dir, real), (fake_dir, fake)):
        if len(images) < 2:
            raise UserError(f"{folder}: KID/FID need at least 2 readable images, found {len(images)}")

    height, width = next(iter(real.values())).shape[:2]
    real_feats = extractor(np.stack([_resized(a, height, width) for a in real.values()]))
    fake_feats = extractor(np.stack([_resized(a, height, width) for a in fake.values()]))
    kid, kid_std = kid_from_features(real_feats, fake_feats)
    report = {
        "kid": kid,
        "kid_std": kid_std,
        "fid": fid_from_features(real_feats, fake_feats),
        "features": extractor.name,
        "n_real": len(real),
        "n_fake": len(fake),
    }
    if all(key in real and real[key].shape == image.shape for key, image in fake.items()):
        pairs = [(real[key], image) for key, image in fake.items()]
        report["psnr"] = float(np.mean([psnr(r, f) for r, f in pairs]))
        report["ssim"] = float(np.mean([ssim(r, f) for r, f in pairs]))
    report["rejected"] = rejected
    return report


def mean_pairwise_distance(images_uint8: np.ndarray) -> float:
    """Mean L1 distance (per value, images in [0, 1]) over all pairs of images: 0 = all identical."""
    images = _image_batch(images_uint8)
    if len(images) < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 images, got {len(images)}")
    flat = images.reshape(len(images), -1).astype(np.float64) / 255
    return float(pdist(flat, "cityblock").mean() / flat.shape[1])


def _load_folder(folder: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], list[dict[str, str]]]:
    """Decode every image under `folder`, keyed by relative path without suffix; bad files are listed."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"not a directory: {root}")
    images, rejected = {}, []
    for path in list_images(root):
        key = path.relative_to(root).with_suffix("").as_posix()
        try:
            image = decode_rgb(path)
        except BadImage as exc:
            rejected.append({"path": str(path), "reason": str(exc)})
            continue
        if key in images:
            rejected.append({"path": str(path), "reason": f"another image is also named {key!r}"})
            continue
        images[key] = image
    return images, rejected


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def _image_batch(images_uint8: np.ndarray) -> np.ndarray:
    """Check for 8-bit RGB and add the batch axis to a single (H, W, 3) image."""
    images = np.asarray(images_uint8)
    if images.ndim == 3:
        images = images[None]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"expected uint8 RGB images (N, H, W, 3), got {images.shape} {images.dtype}")
    return images


def _tensor_batches(
    images: np.ndarray,
    batch_size: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> Iterator[torch.Tensor]:
    """Float NCHW tensors with values 0..255, `batch_size` images at a time."""
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
        yield batch.to(device).permute(0, 3, 1, 2).to(dtype)
