"""measure(): one model's per-record memorization table (match accuracy, extraction, prompts cut), kept in the
result store under out/ like attacks.score's (docs/design.md §6, §10)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from kdfast.memorization.extraction import Extraction, check_fits, extraction
from kdfast.memorization.match import MatchResult, fit_prompts, match_accuracy
from kdfast.store import Store, digest, model_fingerprint, tokenizer_fingerprint

TABLE = "table.parquet"


def measure(model: nn.Module, tokenizer, records: list[dict], settings: dict, *, max_len: int | None,
            out: str | Path | None = None, batch_size: int = 32, progress: bool = True,
            log: Callable[[str], None] = print):
    """The per-record table of `model` on `records`: prompt_cut, then match_accuracy's columns when
    settings["match"], then extraction's when settings["extraction"].

    settings: n_tokens, approx_threshold, match, extraction, prefix_len, suffix_len (and whatever else keys the
    results, e.g. dtype). With out=DIR the table is kept under DIR/stages/, keyed by the model's weights, the
    tokenizer, the records, settings and max_len: a rerun (or another role with the same model) reuses it.
    """
    def run(work: Path) -> dict:
        table = _table(model, tokenizer, records, settings, max_len, batch_size, progress)
        table.to_parquet(work / TABLE, index=False)
        return {"records": len(table)}

    if out is None:
        return _table(model, tokenizer, records, settings, max_len, batch_size, progress)
    import pandas as pd

    store = Store(out, log=None)
    inputs = {"model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer),
              "records": digest(records), "settings": settings, "max_len": max_len}
    if store.has("memorization", inputs):
        log(f"reusing {store.folder('memorization', inputs)}")
    return pd.read_parquet(store.run("memorization", inputs, run)[1] / TABLE)


def _table(model, tokenizer, records, settings, max_len, batch_size, progress):
    import pandas as pd

    frames = [pd.DataFrame({"prompt_cut": prompts_cut(tokenizer, records, settings, max_len)})]
    if settings["match"]:
        frames.append(match_accuracy(model, tokenizer, records, settings["n_tokens"], batch_size,
                                     settings["approx_threshold"], max_len=max_len, progress=progress).to_frame())
    if settings["extraction"]:
        frames.append(extraction(model, records, settings["prefix_len"], settings["suffix_len"], tokenizer=tokenizer,
                                 batch_size=batch_size, on_short="skip", max_len=max_len,
                                 progress=progress).to_frame())
    return pd.concat(frames, axis=1)


def prompts_cut(tokenizer, records: list[dict], settings: dict, max_len: int | None) -> list[bool]:
    """Which records' prompts match and extraction cut to fit max_len; a setting that cannot fit raises now,
    before the long work."""
    rooms = [settings["n_tokens"]] if settings["match"] else []
    if settings["extraction"]:
        check_fits(settings["prefix_len"], settings["suffix_len"], max_len)
        if settings["prefix_len"] is None:  # the whole prompt: only it can be cut
            rooms.append(settings["suffix_len"])
    if not rooms:
        return [False] * len(records)
    return [e.truncated for e in fit_prompts(tokenizer, records, max_len, max(rooms))]


def results(table, settings: dict, prefix: str = "") -> tuple[MatchResult | None, Extraction | None]:
    """The MatchResult and Extraction a table's columns (named with `prefix`) hold, for group_summary."""
    match = found = None
    if prefix + "accuracy" in table:
        match = MatchResult(accuracy=table[prefix + "accuracy"].to_numpy(dtype=np.float64),
                            n_compared=table[prefix + "n_compared"].to_numpy(),
                            edit_distance=table[prefix + "edit_distance"].to_numpy(dtype=np.float64),
                            approx=table[prefix + "approx"].to_numpy(dtype=bool), generated_ids=[],
                            generated=list(table[prefix + "generated"]), n_tokens=settings["n_tokens"],
                            approx_threshold=settings["approx_threshold"])
    if prefix + "extractable" in table:
        found = Extraction(
            extractable=torch.tensor(table[prefix + "extractable"].fillna(False).to_numpy(dtype=bool)),
            matched=torch.tensor(table[prefix + "extract_matched"].fillna(0).to_numpy(dtype=np.int64)),
            checked=torch.tensor(table[prefix + "extractable"].notna().to_numpy()),
            prefix_len=settings["prefix_len"], suffix_len=settings["suffix_len"], method="forward")
    return match, found
