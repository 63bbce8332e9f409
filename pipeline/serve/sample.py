"""`sample`: class-conditional samples and latent walks from an exported generator (inputs `z`, `label`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.images import write_image_atomic


def _session(model: Path):
    import onnxruntime as ort

    from pipeline.export.to_onnx import read_metadata

    metadata = read_metadata(model)
    if metadata.get("kind") != "conditional_generation":
        raise UserError(
            f"{model}: not a sampling model (kind {metadata.get('kind', 'unknown')!r}); "
            "use `translate` for image-to-image models"
        )
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session, int(metadata["z_dim"]), int(metadata["n_classes"])


def sample(model: Path, label: int, n: int, out: Path, walk: bool = False, seed: int = 0) -> list[Path]:
    """Writes `n` samples of class `label` (or, with walk, `n` steps on a line between two latent points)."""
    session, z_dim, n_classes = _session(model)
    if not 0 <= label < n_classes:
        raise UserError(f"--label {label}: the model knows classes 0..{n_classes - 1}")
    if n < 1:
        raise UserError("--n must be at least 1")
    rng = np.random.default_rng(seed)
    if walk:
        start, end = rng.standard_normal((2, z_dim), dtype=np.float32)
        weights = np.linspace(0, 1, n, dtype=np.float32)[:, None]
        z = (1 - weights) * start + weights * end
    else:
        z = rng.standard_normal((n, z_dim), dtype=np.float32)
    labels = np.full(n, label, dtype=np.int64)
    output_name = session.get_outputs()[0].name
    images = session.run([output_name], {"z": z, "label": labels})[0]
    pixels = np.clip(np.rint((images.transpose(0, 2, 3, 1) + 1) * 127.5), 0, 255).astype(np.uint8)
    stem = "walk" if walk else "sample"
    paths = [out / f"{stem}_{label}_{i:04d}.png" for i in range(n)]
    for path, image in zip(paths, pixels, strict=True):
        write_image_atomic(path, image)
    return paths
