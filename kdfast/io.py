"""Atomic writes and claimed folders: a killed run never leaves half a file, so every stage can resume from what
exists; a folder has one writer at a time and holds one run's results."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from kdfast.store import digest_bytes

# Temporaries are `.NAME.tmp-PID-HOST-XXXXXXXX` folders: the writer's pid and host (a short hash of its name) tell a
# killed run's leftovers from a live writer's; kdfast before that wrote `.NAME.tmpXXXXXXXX`.
HOST = digest_bytes(socket.gethostname().encode(), 8)
_TEMPORARY = re.compile(r"\.tmp(?:-(\d+)-([0-9a-f]{8})-)?[a-z0-9_]{8}$")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write (a file or a folder); it replaces `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-{os.getpid()}-{HOST}-"
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix)) / path.name
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__float__"):
        return float(obj)
    raise TypeError(f"not JSON-serializable: {type(obj).__name__}")


LOCK_FILE = ".kdfast.lock"


class FolderBusy(ValueError):
    """Another live process writes to the folder, or it holds another run's results."""


@contextlib.contextmanager
def claim_folder(path: str | Path, flag: str = "--out", identity: dict | None = None) -> Iterator[Path]:
    """Hold `path` for this process: a lock file keeps out concurrent writers, `identity` (what the folder's
    results are of, e.g. the model and record files) must match the one saved there by an earlier run, and the
    temporaries killed runs left are removed (remove_stale_temporaries, with the lock's time)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_FILE
    _take_lock(lock, flag)
    try:
        if identity is not None:
            _check_identity(path / "owner.json", identity, flag)
        remove_stale_temporaries(path, lock.stat().st_mtime)
        yield path
    finally:
        lock.unlink(missing_ok=True)


def _take_lock(lock: Path, flag: str) -> None:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None:
                raise FolderBusy(f"{flag} {lock.parent}: another kdfast process (pid {holder}) is writing there; "
                                 f"wait for it to finish or give another {flag}") from None
            lock.unlink(missing_ok=True)  # left by a killed run
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        return
    raise FolderBusy(f"{flag} {lock.parent}: could not take the lock file {lock}; remove it if no run is writing there")


def _lock_holder(lock: Path) -> int | None:
    """The pid of a live process holding the lock (a lock from another host counts as live), else None."""
    try:
        pid_text, host = lock.read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return pid if host != socket.gethostname() or _alive(pid) else None


def _alive(pid: int) -> bool:
    """Whether a process of this host has the pid (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_identity(path: Path, identity: dict, flag: str) -> None:
    if path.exists():
        saved = json.loads(path.read_text())
        changed = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
        if changed:
            text = "; ".join(f"{k}: {a} there, {b} now" for k, (a, b) in changed.items())
            raise FolderBusy(f"{flag} {path.parent} holds the results of another run ({text}); give another {flag} "
                             "(or delete that folder to replace them)")
    else:
        atomic_write_json(path, identity)


def remove_stale_temporaries(root: str | Path, claimed_at: float | None = None) -> int:
    """Delete the temporaries atomic_path left under `root` when its process was killed mid-write; how many.

    One of this host is stale when its pid is no longer alive. One whose pid cannot be checked (another host's,
    or unnamed by an older kdfast) is stale only when it is older than `claimed_at`, the time this process took
    root's lock (claim_folder: no writer has held it since), and lies in no sub-folder another run claims.
    """
    root = Path(root)
    stale = [p for p in root.rglob(".*.tmp*") if p.is_dir() and _is_stale(p, root, claimed_at)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def _is_stale(tmp: Path, root: Path, claimed_at: float | None) -> bool:
    match = _TEMPORARY.search(tmp.name)
    if match is None:
        return False
    if match[2] == HOST:
        return not _alive(int(match[1]))
    if claimed_at is None or any((d / LOCK_FILE).exists() for d in tmp.parents if root in d.parents):
        return False
    try:
        return tmp.stat().st_mtime < claimed_at
    except FileNotFoundError:  # its writer finished (renamed it) meanwhile
        return False
