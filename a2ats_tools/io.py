"""Atomic writes: write to a temporary name in the same folder, fsync, then rename.

A directory artifact is complete only once its manifest exists, and the manifest is always written last,
so an interrupted run never leaves something that loads as valid. Whole directory artifacts (a converted
checkpoint, a calibration) are built in a partial directory of their own beside the output, under a lock that
keeps a second writer of the same output out, and swapped in only once complete (:func:`atomic_directory`).
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import A2atsError, ArtifactError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Atomically write ``data`` as pretty JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Atomically write a safetensors file (tensors made contiguous and moved to CPU)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata) if metadata else None)


@contextmanager
def open_safetensors(path: str | os.PathLike) -> Iterator[Any]:
    """``safe_open`` for reading, with a truncated or corrupt file (at open or at any tensor read inside the
    block) as a one-line :class:`ArtifactError` naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as exc:
        raise ArtifactError(f"{path} is truncated or corrupt ({first_line(exc)}); write it again") from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON file, turning a missing or corrupt file into a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise A2atsError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise A2atsError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def check_output_dir(path: str | os.PathLike, overwrite: bool, what: str = "output directory") -> bool:
    """Refuse an existing non-empty ``path`` unless ``overwrite``, and a ``path`` that cannot be created
    (touches nothing); True if it must be replaced. Called before any model loads, so a bad ``--out`` costs
    nothing."""
    path = Path(path)
    check_creatable(path, what)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise A2atsError(f"{what} {path} already exists; pass --overwrite to replace it")
        return True
    return False


def check_creatable(path: Path, what: str) -> None:
    """Raise a one-line :class:`A2atsError` unless ``path`` and its missing parents can be created beside it:
    the nearest existing ancestor must be a directory that takes a new entry (probed, then removed)."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(20, "not a directory", str(parent))
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.a2ats-probe-", dir=parent))
    except OSError as exc:
        raise A2atsError(f"cannot create {what} {path}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    """An ``OSError`` as "what, where" in one line."""
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or type(exc).__name__}{where}"


PARTIAL_MARK = "a2ats-partial"  # partial directories are ``.{name}.a2ats-partial-XXXX`` beside the output


@contextmanager
def atomic_directory(
    out: str | os.PathLike, overwrite: bool, what: str = "output directory", writer: str = "run"
) -> Iterator[Path]:
    """Yield a fresh, empty partial directory beside ``out`` to build an artifact in; swap it in at ``out``
    when the block succeeds, remove it when the block fails (any exception, KeyboardInterrupt included).

    Throughout, an exclusive lock on ``.{name}.a2ats-lock`` beside ``out`` is held: a second ``writer`` of the
    same ``out`` fails at once instead of both writing and one deleting the other's work. Partial directories
    of ``out`` left by killed runs are removed once the lock is held (no live writer can own them). An
    existing ``out`` is refused unless ``overwrite``, and stays whole until the new one is complete.
    """
    out = Path(out)
    check_output_dir(out, overwrite, what)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise A2atsError(f"cannot create {what} {out}: {_reason(exc)}") from None
    with _exclusive(out.parent / f".{out.name}.a2ats-lock", f"another {writer} is writing {out}; wait for it or "
                    "choose another output directory"):
        check_output_dir(out, overwrite, what)  # again: a writer that just finished may have created it
        _remove_partials(out)
        partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{PARTIAL_MARK}-"))
        try:
            yield partial
            swap_in(partial, out)
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # already gone once swapped in


@contextmanager
def _exclusive(lock: Path, busy: str) -> Iterator[None]:
    """Hold a non-blocking ``flock`` on ``lock`` (created as needed), or raise ``A2atsError(busy)`` at once.

    The file is removed on release; a writer that opened it just before then finds its inode gone from the
    path after locking and counts as busy, so two writers never hold locks on different files of one name."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise A2atsError(busy) from None
        if not _same_file(fd, lock):
            raise A2atsError(busy)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _remove_partials(out: Path) -> None:
    """Remove the partial directories of ``out`` (only ever called under its lock)."""
    for stale in out.parent.glob(f".{glob.escape(out.name)}.{PARTIAL_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)


def swap_in(new: Path, out: Path) -> None:
    """Move the complete directory ``new`` to ``out``: an existing ``out`` is renamed aside first and removed
    only after ``new`` is in place (and renamed back if that fails), so ``out`` is never half-written."""
    if not out.exists() and not out.is_symlink():
        os.rename(new, out)
        return
    aside = out.parent / f".{out.name}.a2ats-old-{uuid.uuid4().hex[:12]}"
    os.rename(out, aside)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(aside, out)
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside)
    else:
        aside.unlink()
