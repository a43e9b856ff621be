"""Exact greedy extraction (Carlini et al. 2022): does greedy decoding from a prefix reproduce the next tokens?

Under greedy decoding that holds exactly when the true token is the argmax at every suffix position given the
true text before it, so one teacher-forced forward pass (token_stats(...).top1) answers it; method="generate"
really decodes, to verify. The two agree except where two logits tie (or nearly tie, within the numerical
difference between a full forward pass and KV-cached decoding: verify in fp32).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from kdfast.data import Encoded, pad_batch
from kdfast.generation import eval_mode, generate, pad_token_id
from kdfast.memorization.match import fit_prompts
from kdfast.models import ModelError, context_len, hidden_and_head, output_head
from kdfast.ops.token_stats import token_stats, token_stats_from_hidden

METHODS = ("forward", "generate")
ON_SHORT = ("error", "skip")
TokenSequences = Union[torch.Tensor, Sequence[Sequence[int]]]
PrefixLen = Union[int, Sequence[int], None]


@dataclass
class Extraction:
    """Per-record results of extraction(); tensors are [R] on the CPU.

    extractable: bool, greedy decoding from the prefix reproduces all suffix_len tokens that follow it.
    matched: int64, how many leading suffix tokens it reproduces (suffix_len exactly when extractable).
    checked: bool, the record was long enough to test; an unchecked record has extractable False, matched 0.
    """

    extractable: torch.Tensor
    matched: torch.Tensor
    checked: torch.Tensor
    prefix_len: PrefixLen
    suffix_len: int
    method: str

    def __len__(self) -> int:
        return len(self.extractable)

    @property
    def rate(self) -> float:
        """Fraction of the checked records that are extractable (NaN when none was checked)."""
        n = int(self.checked.sum())
        return float(self.extractable.sum()) / n if n else float("nan")

    def to_frame(self, prefix: str = ""):
        """A pandas DataFrame, one row per record; unchecked records hold missing values."""
        import pandas as pd

        checked = self.checked.numpy()
        cols = {"extractable": pd.array(self.extractable.numpy(), dtype="boolean"),
                "extract_matched": pd.array(self.matched.numpy(), dtype="Int64")}
        frame = pd.DataFrame({prefix + k: v for k, v in cols.items()})
        frame.loc[~checked, :] = pd.NA
        return frame


def extraction_pairs(tokenizer, records: list[dict], prefix_len: int | None = 32, suffix_len: int = 32,
                     max_len: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prefix, suffix) token ids of records, tokenized as kdfast.data.encode does (EOS after the text).

    Instruction records: the suffix is the first suffix_len response tokens and the prefix the last
    prefix_len prompt tokens (prefix_len=None: the whole prompt, i.e. the study's setting). {"text"} records:
    the first prefix_len tokens, then the next suffix_len. A suffix shorter than suffix_len marks a record
    too short to test. max_len: the model's context; a whole prompt that leaves no room for the suffix is cut
    from its start (fit_prompts), an integer prefix_len must fit with the suffix (check_fits).
    """
    check_fits(prefix_len, suffix_len, max_len)
    pairs = []
    # An integer prefix is the prompt's end, which fits as checked: only a whole prompt is cut.
    encoded = fit_prompts(tokenizer, records, max_len if prefix_len is None else None, suffix_len)
    for i, (record, e) in enumerate(zip(records, encoded)):
        if "text" in record:
            if prefix_len is None:
                raise ValueError(f"record {i} is a plain {{'text'}} record: it has no prompt, so give an integer "
                                 "prefix_len (the number of leading tokens that prompt the model)")
            pairs.append((e.input_ids[:prefix_len], e.input_ids[prefix_len:prefix_len + suffix_len]))
        else:
            prompt = e.input_ids[: e.prompt_len]
            prefix = prompt if prefix_len is None else prompt[-prefix_len:]
            pairs.append((prefix, e.input_ids[e.prompt_len:][:suffix_len]))
    return pairs


def check_fits(prefix_len: PrefixLen, suffix_len: int, max_len: int | None) -> None:
    """Raise unless every integer prefix length plus the suffix fits in max_len tokens (None: no limit)."""
    lens = [] if prefix_len is None else [prefix_len] if isinstance(prefix_len, numbers.Integral) else prefix_len
    longest = max(lens, default=0)
    if max_len is not None and longest + suffix_len > max_len:
        raise ValueError(f"a {longest}-token prefix and a {suffix_len}-token suffix exceed the model's {max_len} "
                         "positions; lower prefix_len / suffix_len (CLI --prefix-len, --suffix-len)")


def _sequences_to_pairs(sequences: TokenSequences, prefix_len: PrefixLen,
                        suffix_len: int) -> list[tuple[list[int], list[int]]]:
    if isinstance(sequences, torch.Tensor):
        if sequences.dim() != 2 or sequences.dtype.is_floating_point or sequences.dtype == torch.bool:
            raise ValueError(f"token_ids must be an integer tensor [R, L], got {sequences.dtype} of shape "
                             f"{tuple(sequences.shape)}")
        sequences = sequences.tolist()
    if prefix_len is None:
        raise ValueError("token-id sequences need an integer prefix_len (prefix_len=None means the whole prompt of "
                         "instruction records: pass records and tokenizer= for that)")
    lens = [prefix_len] * len(sequences) if isinstance(prefix_len, numbers.Integral) else [int(p) for p in prefix_len]
    if len(lens) != len(sequences):
        raise ValueError(f"prefix_len gives {len(lens)} lengths for {len(sequences)} sequences; give one per sequence "
                         "or one int")
    return [(list(r[:p]), list(r[p:p + suffix_len])) for r, p in zip(sequences, lens)]


def extraction(model: nn.Module, data: TokenSequences | list[dict], prefix_len: PrefixLen = 32, suffix_len: int = 32, *,
               tokenizer=None, method: str = "forward", batch_size: int = 32, on_short: str = "error",
               pad_id: int | None = None, max_len: int | None = None, progress: bool = True) -> Extraction:
    """Exact greedy extraction of each record's suffix from its prefix (Carlini et al. 2022).

    data: token ids, an integer tensor [R, L] or R lists (the first prefix_len tokens prompt, the next
    suffix_len are the suffix; later tokens are ignored; prefix_len may be one length per sequence), or records
    with tokenizer= (see extraction_pairs; prefix_len=None there means the whole prompt).
    method: "forward" (default) runs one teacher-forced forward pass per batch and checks that the true token
    is the argmax at every suffix position (token_stats(...).top1; ties go to the lowest index, as in greedy
    decoding); "generate" decodes suffix_len tokens greedily with the KV cache (no stop at EOS) and compares.
    on_short: records shorter than prefix + suffix raise ValueError ("error") or are left unchecked ("skip").
    Batches are left-padded with position ids that skip the padding: a record's result does not depend on
    its batch. pad_id: the padding id (default: the tokenizer's, else 0; it is always masked out).
    max_len: the tokens the model may see (default and at most: its positions), see extraction_pairs.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if on_short not in ON_SHORT:
        raise ValueError(f"unknown on_short {on_short!r}; choose one of {ON_SHORT}")
    one = prefix_len is None or isinstance(prefix_len, numbers.Integral)
    lens = [] if prefix_len is None else [prefix_len] if one else [int(p) for p in prefix_len]
    if suffix_len < 1 or any(p < 1 for p in lens):
        raise ValueError(f"prefix_len and suffix_len must be at least 1, got {prefix_len} and {suffix_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(data) and isinstance(data[0], dict):
        if tokenizer is None:
            raise ValueError("extraction from records needs tokenizer= (or pass token ids)")
        if not one:
            raise ValueError("with records, prefix_len is one int (or None: the whole prompt)")
        pairs = extraction_pairs(tokenizer, data, prefix_len, suffix_len, context_len(model, max_len))
    else:
        check_fits(prefix_len, suffix_len, context_len(model, max_len))
        pairs = _sequences_to_pairs(data, prefix_len, suffix_len)
    if not pairs:
        raise ValueError("extraction: no records")
    if pad_id is None:
        pad_id = (pad_token_id(tokenizer) if tokenizer is not None else None) or 0  # token-id sequences: any id pads
    ok = [i for i, (p, s) in enumerate(pairs) if len(s) == suffix_len and p]
    if on_short == "error" and len(ok) < len(pairs):
        i = min(set(range(len(pairs))) - set(ok))
        have = sum(map(len, pairs[i]))
        raise ValueError(f"{len(pairs) - len(ok)} of {len(pairs)} records are too short for the prefix and a "
                         f"{suffix_len}-token suffix (record {i} has {have} usable tokens); shorten "
                         "suffix_len, or pass on_short='skip' to leave them unchecked")
    matched = torch.zeros(len(pairs), dtype=torch.long)
    run = _forward_matched if method == "forward" else _generate_matched
    with eval_mode(model):
        matched[ok] = run(model, [pairs[i] for i in ok], suffix_len, pad_id, batch_size, progress)
    checked = torch.zeros(len(pairs), dtype=torch.bool)
    checked[ok] = True
    return Extraction(extractable=checked & (matched == suffix_len), matched=matched, checked=checked,
                      prefix_len=prefix_len, suffix_len=suffix_len, method=method)


def extractable(model: nn.Module, data: TokenSequences | list[dict], prefix_len: PrefixLen = 32, suffix_len: int = 32,
                **kwargs) -> torch.Tensor:
    """[R] bool: greedy decoding from each prefix reproduces its suffix exactly; extraction(...).extractable.

    Takes extraction()'s arguments; with on_short="skip", short records are False (extraction() says which
    were checked, and how many leading tokens each reproduces).
    """
    return extraction(model, data, prefix_len, suffix_len, **kwargs).extractable


def _leading_matches(generated: list[int], suffix: list[int]) -> int:
    n = 0
    for g, s in zip(generated, suffix):
        if g != s:
            break
        n += 1
    return n


def _generate_matched(model, pairs, suffix_len, pad_id, batch_size, progress) -> torch.Tensor:
    # eos_id=None: extraction asks what greedy decoding produces for suffix_len steps, EOS or not
    generated = generate(model, [p for p, _ in pairs], suffix_len, pad_id=pad_id, eos_id=None,
                         batch_size=batch_size, progress=progress, desc="extraction (generate)")
    return torch.tensor([_leading_matches(g, s) for g, (_, s) in zip(generated, pairs)], dtype=torch.long)


@torch.no_grad()
def _forward_matched(model, pairs, suffix_len, pad_id, batch_size, progress) -> torch.Tensor:
    try:
        output_head(model)
        fused = True
    except ModelError:  # a head that is not a plain linear map: score its logits instead
        fused = False
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), i))
    matched = torch.zeros(len(pairs), dtype=torch.long)
    with tqdm(total=len(pairs), desc="extraction (one pass)", unit="rec", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            top1 = _suffix_top1(model, [pairs[i][0] + pairs[i][1] for i in idx], suffix_len, pad_id, fused)
            matched[idx] = top1.long().cumprod(1).sum(1)
            bar.update(len(idx))
    return matched


def _suffix_top1(model: nn.Module, sequences: list[list[int]], suffix_len: int, pad_id: int,
                 fused: bool) -> torch.Tensor:
    """[B, suffix_len] bool: the true suffix token is the argmax at each suffix position (sequences left-padded, so
    every suffix ends the sequence; the last token is only a target, never an input)."""
    device = next(model.parameters()).device
    batch = pad_batch([Encoded(r, r, 0) for r in sequences], pad_id, side="left")
    ids, mask, pos = (batch[k][:, :-1].to(device) for k in ("input_ids", "attention_mask", "position_ids"))
    targets = batch["input_ids"][:, -suffix_len:].to(device)
    if fused:
        hidden, (weight, bias) = hidden_and_head(model, ids, mask, position_ids=pos, use_cache=False)
        stats = token_stats_from_hidden(hidden[:, -suffix_len:], weight, targets, bias=bias)
    else:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        stats = token_stats(logits[:, -suffix_len:], targets)
    return stats.top1.cpu()
