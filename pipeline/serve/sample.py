"""`sample`: images drawn from an exported generator, read from its card: a class-conditional one (inputs `z`,
`label`) or an unconditional one (input `z`), as independent samples or as a walk on a line between two latent
points."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transfigure.pipeline.errors import UserError
from transfigure.pipeline.export import model_card as card
from transfigure.pipeline.images import write_image_atomic
from transfigure.pipeline.pixels import to_pixels


def sample(
    model: Path, label: int | None, n: int, out: Path, walk: bool = False, seed: int = 0, temperature: float = 1.0
) -> list[Path]:
    """Writes `n` samples (of class `label` for a conditional model) and returns their paths."""
    import onnxruntime as ort

    model_card = card.ModelCard.read(model)
    latent_shape, conditional = model_card.latent_sample_shape, card.LABEL_INPUT in model_card.inputs
    if latent_shape is None:
        kind = model_card.kind or "unknown"
        raise UserError(f"{model}: not a sampling model (kind {kind!r}); use `translate` for image-to-image models")
    if conditional and (label is None or not 0 <= label < model_card.n_classes):
        raise UserError(f"--label {label}: the model knows classes 0..{model_card.n_classes - 1}")
    if not conditional and label is not None:
        raise UserError(f"--label {label}: {model.name} is unconditional; leave --label out")
    if n < 1:
        raise UserError("--n must be at least 1")
    if temperature <= 0:
        raise UserError(f"--temperature {temperature}: must be above 0")
    rng = np.random.default_rng(seed)
    if walk:
        start, end = rng.standard_normal((2, *latent_shape), dtype=np.float32)
        weights = np.linspace(0, 1, n, dtype=np.float32).reshape(n, *([1] * len(latent_shape)))
        z = (1 - weights) * start + weights * end
    else:
        z = rng.standard_normal((n, *latent_shape), dtype=np.float32)
    feed = {card.LATENT_INPUT: z * np.float32(temperature)}
    if conditional:
        feed[card.LABEL_INPUT] = np.full(n, label, dtype=np.int64)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    images = session.run([card.SAMPLE_OUTPUT], feed)[0]
    stem = ("walk" if walk else "sample") + (f"_{label}" if label is not None else "")
    paths = [out / f"{stem}_{i:04d}.png" for i in range(n)]
    for path, image in zip(paths, to_pixels(images.transpose(0, 2, 3, 1)), strict=True):
        write_image_atomic(path, image)
    return paths
