"""Files: the one atomic writer every output goes through, and content hashes (of files, JSON and source trees).

A reader sees either the old file or the whole new one: each write goes to a hidden temporary name in the same
folder, is fsynced, and is renamed over the target, so a killed run never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Call `write` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # os.open with mode 0o666 lets the umask decide permissions (tempfile.mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fp:
            write(fp)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    write_atomic(path, lambda fp: fp.write(data))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def sha256_of_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_hash(data: Any) -> str:
    """sha256 of the canonical JSON of `data` (sorted keys), as hex."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def source_digests(paths: Iterable[Path], root: Path) -> dict[str, str]:
    """{path relative to root: sha256} of every .py file under the given files and folders, by content."""
    files: set[Path] = set()
    for path in paths:
        files |= set(path.rglob("*.py")) if path.is_dir() else {path}
    return {file.relative_to(root).as_posix(): sha256_of_file(file) for file in sorted(files)}


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself across a power loss (POSIX only; Windows cannot open directories)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
