"""Saving a model so that an interruption never leaves something that looks valid.

:func:`check_output` runs before any compression starts (a GPTQ run of hours must not end
in "cannot write there"): the output must not be a file, nor lie under one, and its folder
must be writable (probed by writing, which also catches read-only mounts and root-squashed
network shares). :func:`save_pretrained` then writes:

* normally into a hidden sibling folder, ``.<name>.partial-<pid>-<random>``, renamed onto the
  target once complete (the old target is moved aside first and removed after);
* when the target cannot be renamed (a mount point such as a Docker or Kubernetes volume:
  ``EBUSY``; or another filesystem), into a hidden staging folder inside the target, then
  file by file: the old ``config.json`` is removed first (the old model no longer looks
  loadable), every other file is renamed into place, and ``config.json`` comes last. A model
  folder without ``config.json`` is an interrupted save.

A later save to the same target removes partial folders that interrupted saves left (their
process is gone), and says so. The result has the permissions a plain ``save_pretrained``
gives (the umask's), not ``mkdtemp``'s 0700.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from hfcompress.errors import OutputPathError

__all__ = ["check_folder", "check_output", "remove_stale_partials", "save_atomically"]

logger = logging.getLogger(__name__)

_PARTIAL = ".partial-"
_STAGING = ".hfcompress-partial-"
_CONFIG = "config.json"
# Errors of a directory rename that a per-file protocol inside the target avoids.
_RENAME_ERRNOS = (errno.EBUSY, errno.EXDEV, errno.EPERM, errno.EACCES, errno.ENOTEMPTY, errno.EEXIST)


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        if path.parent == path:
            break
        path = path.parent
    return path


def _write_error(directory: Path) -> str | None:
    """Why a file cannot be created in ``directory`` (probed by creating one), or None."""
    try:
        fd, name = tempfile.mkstemp(prefix=".hfcompress-probe-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(name)
    return None


def _in_place(target: Path) -> bool:
    """Whether a save must write into ``target`` itself: it is a mount point, or its parent
    folder cannot take the sibling folder a rename needs."""
    return target.is_dir() and (os.path.ismount(target) or _write_error(target.parent) is not None)


def check_output(target: str | os.PathLike, *, overwrite: bool, flag: str = "--output") -> Path:
    """Raise :class:`OutputPathError` unless a model can be saved at ``target``; return it.

    Args:
        target: The folder to save into.
        overwrite: Whether an existing, non-empty folder may be replaced.
        flag: How the caller names the path in messages (a CLI option, or an argument).
    """
    target = check_folder(target, flag=flag)
    if target.is_dir() and any(p for p in target.iterdir() if not p.name.startswith(_STAGING)) and not overwrite:
        raise OutputPathError(f"{flag} {target} exists and is not empty; pass --overwrite to replace it")
    return target


def check_folder(target: str | os.PathLike, *, flag: str) -> Path:
    """Raise :class:`OutputPathError` unless ``target`` is, or can be created as, a folder
    that files can be written into (for a model save, also beside it); return it absolute."""
    target = Path(target).absolute()
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise OutputPathError(f"{flag} {target} is a file; give the path of a folder")
    existing = _nearest_existing(target)
    if not existing.is_dir():
        raise OutputPathError(f"{flag} {target} cannot be created: {existing} is a file, not a folder")
    # The files go into a sibling of the target, or into the target itself (see _in_place).
    probe = target if _in_place(target) else existing if existing != target else target.parent
    reason = _write_error(probe)
    if reason is not None:
        raise OutputPathError(f"{flag} {target} cannot be written: {probe} is not writable ({reason})")
    return target


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _partial_pid(name: str, marker: str) -> int | None:
    tail = name.split(marker, 1)[1]
    head = tail.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove what interrupted saves to ``target`` left behind (partial and set-aside folders
    beside it, staging folders inside it) whose process is gone; return what was removed."""
    candidates = []
    if target.parent.is_dir():
        for marker in (_PARTIAL, ".old-"):
            candidates += [(p, marker) for p in target.parent.glob(f".{target.name}{marker}*")]
    if target.is_dir():
        candidates += [(p, _STAGING) for p in target.glob(f"{_STAGING}*")]
    removed = []
    for path, marker in candidates:
        pid = _partial_pid(path.name, marker)
        if pid is not None and _pid_alive(pid):
            continue  # another save is in progress (or it is ours)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        logger.warning("removed %s, left by an interrupted save", path)
    return removed


def _new_dir(parent: Path, prefix: str) -> Path:
    path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()  # mode 0o777 & ~umask, as a plain save_pretrained's folder
    return path


def _move_files_in(staging: Path, target: Path) -> None:
    """The per-file protocol: invalidate the old model, move the new files in, config last."""
    new = {p.name for p in staging.iterdir()}
    (target / _CONFIG).unlink(missing_ok=True)
    for old in target.iterdir():
        if old == staging or old.name in new:
            continue
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    for name in sorted(new - {_CONFIG}):
        dest = target / name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(staging / name, dest)
    if _CONFIG in new:
        os.replace(staging / _CONFIG, target / _CONFIG)
    staging.rmdir()


def save_atomically(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run ``write(folder)`` so that ``target`` ends up holding exactly what it wrote, or, if
    interrupted, either its previous content or no ``config.json`` (see the module docstring)."""
    target = Path(target).absolute()
    check_output(target, overwrite=True, flag="the save folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    if _in_place(target):
        return _save_in_place(target, write)
    tmp = _new_dir(target.parent, f".{target.name}{_PARTIAL}")
    try:
        write(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                os.replace(target, old)
            except OSError as exc:
                if exc.errno not in _RENAME_ERRNOS:
                    raise
                logger.info("%s cannot be renamed (%s); writing the files into it one by one", target, exc.strerror)
                _move_files_in(_adopt(tmp, target), target)
                return target
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _adopt(tmp: Path, target: Path) -> Path:
    """Move a finished sibling folder's files into a staging folder inside ``target``."""
    staging = _new_dir(target, _STAGING)
    for p in tmp.iterdir():
        shutil.move(str(p), staging / p.name)
    tmp.rmdir()
    return staging


def _save_in_place(target: Path, write: Callable[[Path], None]) -> Path:
    staging = _new_dir(target, _STAGING)
    try:
        write(staging)
        _move_files_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
