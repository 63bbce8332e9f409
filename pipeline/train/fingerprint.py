"""The fingerprint of the code that shapes a recipe's training, by content (not the git commit), so that
`train --fresh-if-changed` (what `dvc repro` runs) starts over after a fix to a loss, a network or the data,
and a plain `train` can say which files changed since its checkpoint."""

from __future__ import annotations

import inspect
from pathlib import Path

from transfigure.pipeline.files import source_digests

ROOT = Path(__file__).resolve().parents[2]  # the folder that holds models/ and pipeline/
_SHARED = (
    ROOT / "models",
    ROOT / "pipeline" / "data",
    ROOT / "pipeline" / "schema.py",
    *sorted((ROOT / "pipeline" / "train").glob("*.py")),
    ROOT / "pipeline" / "train" / "recipes" / "base.py",
)


def code_fingerprint(recipe: type) -> dict[str, str]:
    """{file: sha256} of models/, the data package, the training package's own modules and the recipe's module
    (and the module of each recipe it builds on: a preset's training is its parent's)."""
    digests = source_digests(_SHARED, ROOT)
    for cls in (c for c in recipe.__mro__ if "name" in vars(c)):
        own = Path(inspect.getsourcefile(cls)).resolve()
        digests |= source_digests([own], ROOT if own.is_relative_to(ROOT) else own.parent)
    return digests


def changed_files(old: dict[str, str], new: dict[str, str]) -> list[str]:
    return sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
