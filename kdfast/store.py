"""The one content-addressed result store (docs/design.md §10): digests of values, files, models and tokenizers,
seeds named by strings, and the folders and parts that hold finished work. kdfast hashes nowhere else.

The one exception is kdfast/_ext.py's hash of the kernel sources: setup.py loads that file by path, before the
kdfast package can be imported, so it cannot import this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULT = "result.json"
FILE_CHUNK = 1 << 24  # bytes of a file read at a time
PARAM_CHUNK = 1 << 24  # parameter elements copied to the host at a time


def digest_bytes(data: bytes, n: int = 16) -> str:
    """The first n hex digits of sha256(data)."""
    return hashlib.sha256(data).hexdigest()[:n]


def digest(obj: Any, n: int = 16) -> str:
    """A digest of obj's canonical JSON (sorted keys, other values by str()): equal content gives an equal digest."""
    return digest_bytes(json.dumps(obj, sort_keys=True, default=str).encode(), n)


def file_digest(path: str | Path, n: int = 16) -> str:
    """A digest of a file's bytes, read a chunk at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(FILE_CHUNK):
            h.update(chunk)
    return h.hexdigest()[:n]


def seed_from(*parts: Any, sep: str = ":", bits: int = 63) -> int:
    """An integer seed named by parts: the low `bits` bits of sha256(sep.join(parts)) read little-endian.

    The same name gives the same seed on every process and rerun. Callers keep the separator and width their
    seeds were first drawn with (the trainer 56 bits, MoPe "/"), so seeded results never change.
    """
    raw = hashlib.sha256(sep.join(map(str, parts)).encode()).digest()
    return int.from_bytes(raw[:8], "little") & ((1 << bits) - 1)


def model_fingerprint(model: torch.nn.Module, n: int = 16) -> str:
    """A digest of a model's class and of every parameter's name, shape, dtype and bytes.

    Every weight enters, so any change of one weight changes it; where the model lives (path, device, module
    object) does not. One pass over the weights (about 1 GB/s on a CPU core), next to the hours of work it keys.
    """
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        for chunk in p.detach().reshape(-1).split(PARAM_CHUNK):
            h.update(chunk.contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()[:n]


def tokenizer_fingerprint(tokenizer, n: int = 16) -> str:
    """A digest of a tokenizer's vocabulary, special-token ids and kind: equal fingerprints encode text to equal
    ids (a fast and a slow tokenizer of one vocabulary are one kind)."""
    specials = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return digest([sorted(tokenizer.get_vocab().items()), specials, type(tokenizer).__name__.removesuffix("Fast")], n)


class Store:
    """Finished work under root/stages/<name>-<key>/, the key a digest of the name, its inputs and kdfast's version.

    Work happens in <folder>.partial, which survives a killed run (a stage may resume from what it left
    there, e.g. training checkpoints); the finished folder appears by one rename, with result.json inside.
    """

    def __init__(self, root: str | Path, log: Callable[[str], None] | None = print):
        self.root = Path(root)
        self.log = log or (lambda _: None)
        self.ran: list[str] = []
        self.reused: list[str] = []

    def folder(self, name: str, inputs: Any) -> Path:
        from kdfast import __version__  # kdfast/__init__ imports the modules that import this one

        return self.root / "stages" / f"{name}-{digest([name, inputs, __version__], 12)}"

    def has(self, name: str, inputs: Any) -> bool:
        """Whether the stage is finished (run() would reuse it)."""
        return (self.folder(name, inputs) / RESULT).exists()

    def run(self, name: str, inputs: Any, fn: Callable[[Path], dict]) -> tuple[dict, Path]:
        """(result, folder) of the stage; fn(work_folder) -> JSON-able result runs only when not cached."""
        from kdfast.io import atomic_write_json  # io hashes its host name here

        done = self.folder(name, inputs)
        if self.has(name, inputs):
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


class Parts:
    """Finished groups of rows ({key: values}) as small JSON files under one folder, one per group, each written
    atomically: a rerun loads every finished group and computes only the rest."""

    def __init__(self, folder: str | Path, columns: list[str]):
        self.folder, self.columns = Path(folder), columns

    def load(self) -> dict[str, list[float]]:
        """Every finished row whose part has these columns."""
        rows = {}
        for path in sorted(self.folder.glob("*.json")):
            part = json.loads(path.read_text())
            if part["columns"] == self.columns:
                rows.update(part["rows"])
        return rows

    def write(self, rows: dict[str, list[float]]) -> None:
        from kdfast.io import atomic_write_json  # io hashes its host name here

        atomic_write_json(self.folder / f"{digest_bytes(''.join(rows).encode())}.json",
                          {"columns": self.columns, "rows": rows})
