"""Reference models of the calibrated attacks (rmia, lira): loaded once, each scored once per record set and cached."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn


def resolve_references(references: dict | None, tokenizer) -> dict[str, tuple]:
    """{name: (model, tokenizer)}; a model object shares the target's tokenizer, a path or hub id brings its own."""
    out = {}
    for name, ref in (references or {}).items():
        if isinstance(ref, tuple) and len(ref) == 2:
            out[name] = ref
        elif isinstance(ref, nn.Module):
            out[name] = (ref, tokenizer)
        elif isinstance(ref, (str, Path)):
            from kdfast.models import load_model

            out[name] = load_model(str(ref))
        else:
            raise ValueError(f"references[{name!r}] must be a model, a (model, tokenizer) pair or a model path, "
                             f"got {type(ref).__name__}")
    return out


def cached_mean_ll(model: nn.Module, tokenizer, records: list[dict], folder: str | Path | None,
                   **options) -> np.ndarray:
    """Mean ℓ_t of every record under a model (float64 [n]), by score(..., ["loss"]).

    With a folder, the rows are kept there keyed by the model's weights, the records and the settings, so a
    rerun reads them instead of scoring again.
    """
    from kdfast.attacks.scoring import score

    return score(model, tokenizer, records, ("loss",), out=folder, progress=False, **options)["loss"].to_numpy()
