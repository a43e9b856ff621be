"""Cached, resumable stages: each one's folder is keyed by a hash of its inputs and appears only when finished."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from kdfast.io import atomic_write_json

RESULT = "result.json"


def stage_key(name: str, inputs: Any) -> str:
    """A short hash of a stage's name and inputs (config values, upstream keys, the kdfast version)."""
    from kdfast import __version__

    blob = json.dumps([name, inputs, __version__], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class Stages:
    """Runs named stages under root/stages/<name>-<key>/.

    Work happens in <folder>.partial, which survives a killed run (a stage may resume from what it left
    there, e.g. training checkpoints); the finished folder appears by one rename, with result.json inside.
    """

    def __init__(self, root: str | Path, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.log = log
        self.ran: list[str] = []
        self.reused: list[str] = []

    def folder(self, name: str, inputs: Any) -> Path:
        return self.root / "stages" / f"{name}-{stage_key(name, inputs)}"

    def run(self, name: str, inputs: Any, fn: Callable[[Path], dict]) -> tuple[dict, Path]:
        """(result, folder) of the stage; fn(work_folder) -> JSON-able result runs only when not cached."""
        done = self.folder(name, inputs)
        if (done / RESULT).exists():
            self.reused.append(name)
            return json.loads((done / RESULT).read_text()), done
        work = done.with_name(done.name + ".partial")
        work.mkdir(parents=True, exist_ok=True)
        start = time.time()
        result = fn(work)
        atomic_write_json(work / RESULT, {**result, "_seconds": round(time.time() - start, 1)})
        if done.exists():
            shutil.rmtree(done)
        os.replace(work, done)
        self.ran.append(name)
        self.log(f"  {name}: done in {time.time() - start:.0f}s")
        return json.loads((done / RESULT).read_text()), done
