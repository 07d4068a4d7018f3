"""Files that are written whole or not at all, and the content hashes that key every cache.

Every output and cache of a run (metrics, base perplexities, teacher cache, Fisher estimate,
checkpoint manifests) is written through :func:`atomic_path`, and every cache stores the
:func:`fingerprint` of what it was built from, so that a crash or a changed input never leaves a
half-written file or a stale cache in use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A fresh temporary name beside ``path`` to write to; renamed onto ``path`` when the block succeeds.

    A process killed while writing leaves ``path`` as it was (absent or the previous version), never
    half-written: ``os.replace`` within one folder is atomic. The name is unique per writer, so two
    processes writing the same file never mix their bytes; the data is fsynced before the rename so
    that a machine crash cannot leave a renamed but empty file. The temporary is removed on failure.

        with atomic_path(cache) as temporary:
            torch.save(tensors, temporary)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield temporary
        with temporary.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash never leaves a half-written file (:func:`atomic_path`)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


class RunFileError(ValueError):
    """A file that a run or a sweep wrote (``metrics.json``, ``config.yml``, ``trainer_state.json``,
    ``sweep.json``) is missing, unreadable or damaged: the message names the file and what is wrong."""


def read_run_file(path: Path, kind: Literal["json", "yaml"] = "json", expected: type = dict) -> Any:
    """``path`` parsed as ``kind``, which must give an ``expected`` (a JSON object by default).

    Such files are written atomically, so a damaged one was changed by hand or by another program; it
    is reported as :class:`RunFileError`, never as a parser's traceback, and nothing is written over it.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RunFileError(f"{path} cannot be read ({' '.join(str(error).split())})") from None
    try:
        parsed = json.loads(text) if kind == "json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        reason = " ".join(str(error).split())
        raise RunFileError(f"{path} is damaged (not valid {kind.upper()}: {reason}; truncated?)") from None
    if not isinstance(parsed, expected):
        raise RunFileError(f"{path} is damaged (it holds a {type(parsed).__name__}, not a {expected.__name__})")
    return parsed


FULL_HASH_BYTES = 64 << 20


def _file_digest(file: Path) -> str:
    """sha256 of the content; size and mtime for files over 64 MiB (hashing weights on every run costs minutes)."""
    stat = file.stat()
    if stat.st_size > FULL_HASH_BYTES:
        return f"size={stat.st_size},mtime_ns={stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(*sources: str, settings: Any = None) -> str:
    """Hash identifying what a cache was built from: local files and folders by content, other
    sources (hub names) by name, plus the JSON-able ``settings`` that shaped it.

    A cache (base perplexities, teacher logits, a Fisher estimate) stores this key and is rebuilt,
    never used, when the key it was written with differs from the current one.
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for source in sources:
        root = Path(source).expanduser()
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root] if root.is_file() else []
        digest.update(f"\0{source}".encode())
        for file in files:
            digest.update(f"\0{file.relative_to(root) if root.is_dir() else ''}={_file_digest(file)}".encode())
    return digest.hexdigest()
