"""Cached teacher logits: capture a teacher's top-k log-probs once (sharded safetensors + manifest), read them back
memory-mapped, and train from them with no teacher loaded (kdfast cache-teacher, DistillConfig.teacher_cache).

Per response token the cache holds the top-k ids (int32) and their log-probs under the teacher's full softmax at
the temperature (float16 by default, or float32): k·6 (k·8) bytes a token. A `--seqkd` capture first has the
teacher sample each record's response as SeqKD does (kept in seqkd.json) and holds the top-k on those.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from kdfast.data import IGNORE_INDEX, Encoded, next_token_targets, pad_batch, token_budget_batches
from kdfast.data import template as template_module
from kdfast.distill.config import DistillError
from kdfast.distill.data import encode_training, prompt_of, with_response
from kdfast.distill.techniques.seqkd import Sampling, sample_responses
from kdfast.generation import eval_mode, pad_token_id
from kdfast.io import atomic_path, atomic_write_json, atomic_write_text
from kdfast.models import ModelError, hidden_and_head, inference_context, model_device, output_head
from kdfast.store import digest, digest_bytes, model_fingerprint, tokenizer_fingerprint

FORMAT = "kdfast-teacher-cache/1"
MANIFEST = "manifest.json"
SEQKD = "seqkd.json"  # a --seqkd capture's sampled responses (token ids), in record order
# Sampling settings a seqkd run must share with its cache, and the flag of each (gen_batch_size only reorders draws).
SAMPLING_FLAGS = {"max_new_tokens": "--max-new-tokens", "gen_temperature": "--gen-temperature",
                  "gen_top_k": "--gen-top-k", "gen_top_p": "--gen-top-p", "seed": "--seed"}
LOGPROB_DTYPES = {"float16": torch.float16, "float32": torch.float32}
# Logit elements of one top-k chunk: the [chunk, V] fp32 logits are the only vocabulary-wide temporary.
TOPK_CHUNK_ELEMENTS = 1 << 25


def template_hash() -> str:
    """sha256 of the prompt templates records are encoded with (kdfast.data.template)."""
    return digest_bytes((template_module.PROMPT + template_module.PROMPT_WITH_INPUT).encode(), 64)


def sequence_key(item: Encoded) -> str:
    """Identity of one encoded training sequence (its tokens and which of them are labels)."""
    blob = np.asarray(item.input_ids, dtype=np.int64).tobytes() + np.asarray(item.labels, dtype=np.int64).tobytes()
    return digest_bytes(blob, 32)


def n_targets(item: Encoded) -> int:
    """Cached rows of a sequence: its valid next-token targets (every label but the first position's)."""
    return sum(1 for y in item.labels[1:] if y != IGNORE_INDEX)


@dataclass
class CacheSummary:
    """What a capture produced: records, response tokens, bytes of top-k data, time (this run's share)."""

    out: str
    records: int
    tokens: int
    k: int
    bytes: int
    seconds: float
    shards_written: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)

    def __str__(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else 0.0
        return (f"teacher cache {self.out}: {self.records} records, {self.tokens:,} tokens, k={self.k}\n"
                f"  size    {self.bytes / 2**20:,.1f} MiB ({self.bytes_per_token:.0f} bytes/token)\n"
                f"  time    {self.seconds:.1f} s for {self.shards_written} new shard(s) ({rate:,.0f} tokens/s)")


def topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids [N, k] int32 and log-probs [N, k] fp32 under softmax(logits / T), from hidden [N, H] and the
    head (weight [V, H], bias [V]); logits exist one token chunk at a time."""
    rows = max(1, TOPK_CHUNK_ELEMENTS // weight.shape[0])
    ids, lps = [], []
    for h in hidden.split(rows):
        logits = (F.linear(h, weight, bias)).float()
        ids_k, lp_k = _topk_of_logits(logits, k, temperature)
        ids.append(ids_k)
        lps.append(lp_k)
    if not ids:
        return hidden.new_zeros(0, k, dtype=torch.int32), hidden.new_zeros(0, k, dtype=torch.float32)
    return torch.cat(ids), torch.cat(lps)


def _topk_of_logits(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.float() / temperature
    values, ids = z.topk(k, dim=-1)
    return ids.to(torch.int32), values - torch.logsumexp(z, dim=-1, keepdim=True)


def _settings(teacher, tokenizer, k, temperature, max_len, max_prompt_len, logprob_dtype, shard_records,
              seqkd: dict | None) -> dict:
    return {"format": FORMAT, "teacher": model_fingerprint(teacher), "tokenizer": tokenizer_fingerprint(tokenizer),
            "template": template_hash(), "k": k, "temperature": temperature, "max_len": max_len,
            "max_prompt_len": max_prompt_len, "logprob_dtype": logprob_dtype, "shard_records": shard_records,
            "seqkd": seqkd}


def cache_teacher(teacher: nn.Module, tokenizer, records: list[dict], k: int = 64, out: str | Path = "cache/",
                  temperature: float = 1.0, *, max_len: int = 512, max_prompt_len: int | None = None,
                  long_prompts: str = "truncate", batch_tokens: int = 8192, shard_records: int = 1024,
                  logprob_dtype: str = "float16", seqkd: bool = False, sampling: Sampling | None = None,
                  progress: bool = True) -> CacheSummary:
    """Run the teacher once over the records' responses and store each token's top-k ids and log-probs.

    records: instruction records (encoded as the trainer encodes them: template, EOS, max_len, max_prompt_len,
    long_prompts — give the values the training run will use; max_prompt_len None means max_len // 2). One forward
    pass per token-budget batch (batch_tokens padded tokens); top-k from the hidden states, chunked over tokens.
    Shards of shard_records records are written atomically and listed in <out>/manifest.json as they finish: a
    rerun with the same settings resumes, one with other settings raises naming what differs.

    seqkd=True: the teacher first samples one response per record exactly as SeqKD does (`sampling`, default
    DistillConfig's settings; give the training run's), the samples replace the records' responses and are kept in
    <out>/seqkd.json, and the top-k is captured on them; the manifest's "seqkd" entry records the settings.
    """
    if not (isinstance(k, int) and k >= 1):
        raise DistillError(f"k must be a positive int, got {k!r}")
    if not temperature > 0:
        raise DistillError(f"temperature must be positive, got {temperature}")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise DistillError(f"logprob_dtype must be one of {tuple(LOGPROB_DTYPES)}, got {logprob_dtype!r}")
    vocab = len(tokenizer)
    if k > vocab:
        raise DistillError(f"k={k} exceeds the vocabulary ({vocab} tokens)")
    if sampling is not None and not seqkd:
        raise DistillError("sampling settings apply to a seqkd capture only: pass seqkd=True (--seqkd)")
    sampling = sampling or Sampling()
    max_prompt_len = max_len // 2 if max_prompt_len is None else max_prompt_len
    items = encode_training(tokenizer, records, max_len, max_prompt_len, long_prompts, "cache")
    out = Path(out)
    pad_id = pad_token_id(tokenizer)
    prompts = [prompt_of(it) for it in items]
    sampled = {**asdict(sampling), "prompts": digest(prompts)} if seqkd else None
    settings = _settings(teacher, tokenizer, k, temperature, max_len, max_prompt_len, logprob_dtype, shard_records,
                         sampled)
    if seqkd:
        _old_manifest(out, settings)  # another capture's folder is refused before sampling over its seqkd.json
        responses = _teacher_samples(teacher, prompts, sampling, max_len, pad_id, tokenizer.eos_token_id,
                                     out / SEQKD, progress)
        items = [with_response(it, r, max_len) for it, r in zip(items, responses)]
    manifest = _start_manifest(out, settings, [sequence_key(it) for it in items], [n_targets(it) for it in items])
    started, written = time.perf_counter(), 0
    total_tokens = sum(manifest["tokens"])
    bar = tqdm(total=total_tokens, desc=f"cache-teacher k={k}", unit="tok", disable=not progress, dynamic_ncols=True)
    bar.update(sum(s["tokens"] for s in manifest["shards"]))
    done = {s["index"] for s in manifest["shards"] if (out / s["file"]).exists()}
    for index, start in enumerate(range(0, len(items), shard_records)):
        if index in done:
            continue
        chunk = items[start: start + shard_records]
        ids, lps = _capture(teacher, chunk, pad_id, k, temperature, batch_tokens, bar)
        name = f"shard-{index:05d}.safetensors"
        offsets = torch.tensor([0] + np.cumsum([n_targets(it) for it in chunk]).tolist(), dtype=torch.int64)
        with atomic_path(out / name) as tmp:
            save_file({"ids": ids.contiguous(), "logprobs": lps.to(LOGPROB_DTYPES[logprob_dtype]).contiguous(),
                       "offsets": offsets}, str(tmp), metadata={"format": FORMAT, "first_record": str(start)})
        manifest["shards"] = [s for s in manifest["shards"] if s["index"] != index]
        manifest["shards"].append({"index": index, "file": name, "start": start, "end": start + len(chunk),
                                   "tokens": int(offsets[-1])})
        manifest["shards"].sort(key=lambda s: s["index"])
        manifest["complete"] = len(manifest["shards"]) == -(-len(items) // shard_records)
        atomic_write_json(out / MANIFEST, manifest)
        written += 1
    bar.close()
    item_bytes = 4 + LOGPROB_DTYPES[logprob_dtype].itemsize
    return CacheSummary(str(out), len(items), total_tokens, k, total_tokens * k * item_bytes,
                        time.perf_counter() - started, written)


def _teacher_samples(teacher, prompts: list[list[int]], sampling: Sampling, max_len: int, pad_id: int,
                     eos_id: int | None, path: Path, progress: bool) -> list[list[int]]:
    """SeqKD's teacher samples of the prompts, drawn once: a rerun of the capture reads them from `path`."""
    drawn = {"teacher": model_fingerprint(teacher), "prompts": digest(prompts), "sampling": asdict(sampling),
             "max_len": max_len, "eos": eos_id}
    if path.exists():
        old = json.loads(path.read_text())
        if all(old.get(name) == value for name, value in drawn.items()):
            return old["responses"]
    with eval_mode(teacher):  # as the trainer's teacher: no dropout
        responses = sample_responses(teacher, prompts, sampling, max_len, pad_id=pad_id, eos_id=eos_id,
                                     autocast=lambda: inference_context(model_device(teacher)), progress=progress)
    atomic_write_text(path, json.dumps({**drawn, "responses": responses}))
    return responses


def _old_manifest(out: Path, settings: dict) -> dict | None:
    """The manifest of the cache already in `out` (None: none), raising when it was made with other settings."""
    path = out / MANIFEST
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    # .get: a cache from before --seqkd existed has no "seqkd" entry, which means None (the records' responses)
    differ = [f"{name}: cached {old.get(name)!r}, now {value!r}" for name, value in settings.items()
              if old.get(name) != value]
    if differ:
        raise DistillError(f"{out} holds a teacher cache made with other settings ({'; '.join(differ)}); "
                           f"choose another --out or delete that folder")
    return old


def _start_manifest(out: Path, settings: dict, keys: list[str], tokens: list[int]) -> dict:
    """The manifest of a fresh cache, or of the partial/finished one in `out` when its settings match."""
    old = _old_manifest(out, settings)
    if old is not None:
        if old.get("keys") != keys:
            raise DistillError(f"{out} holds a teacher cache made with other settings (records: "
                               f"{len(old.get('keys', []))} cached, {len(keys)} now, or their text differs); "
                               f"choose another --out or delete that folder")
        return old
    manifest = {**settings, "keys": keys, "tokens": tokens, "shards": [], "complete": False}
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def _capture(teacher, items: list[Encoded], pad_id: int, k: int, temperature: float, batch_tokens: int,
             bar) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids and log-probs of every valid target of `items`, concatenated in item order."""
    device = model_device(teacher)
    parts: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(items)
    with inference_context(device):
        for idx in token_budget_batches([len(it) for it in items], batch_tokens):
            batch = pad_batch([items[i] for i in idx], pad_id, "right")
            keep = next_token_targets(batch["labels"]) != IGNORE_INDEX
            inputs = {name: batch[name].to(device) for name in ("input_ids", "attention_mask", "position_ids")}
            ids, lps = _teacher_topk(teacher, inputs, keep.to(device), k, temperature)
            counts = keep.sum(1).tolist()
            for i, a, b in zip(idx, ids.cpu().split(counts), lps.cpu().split(counts)):
                parts[i] = (a, b)
            bar.update(sum(counts))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _teacher_topk(teacher, inputs: dict, keep: torch.Tensor, k: int, temperature: float):
    try:
        output_head(teacher)
    except ModelError:  # logits that are not a plain linear map (soft-capping): take the model's own logits
        logits = teacher(**inputs, use_cache=False).logits[keep]
        return _topk_of_logits(logits, k, temperature)
    hidden, (weight, bias) = hidden_and_head(teacher, inputs.pop("input_ids"), inputs.pop("attention_mask"),
                                             **inputs)
    return topk_logprobs(hidden[keep], weight, bias, k, temperature)


class TeacherCache:
    """A finished cache opened for reading: each sequence's rows come memory-mapped from its shard, on demand.

    rows(items) -> (ids [N, k] int64, logprobs [N, k] fp32) for the valid targets of `items` in row-major order
    (the order of a right-padded batch's valid positions).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / MANIFEST).exists():
            raise DistillError(f"{self.path} holds no teacher cache ({MANIFEST} missing); make one with "
                               f"`kdfast cache-teacher --out {self.path}`")
        self.manifest = json.loads((self.path / MANIFEST).read_text())
        if self.manifest.get("format") != FORMAT:
            raise DistillError(f"{self.path}: unknown cache format {self.manifest.get('format')!r}")
        if not self.manifest["complete"]:
            raise DistillError(f"the teacher cache {self.path} is unfinished ({len(self.manifest['shards'])} shards "
                               f"written); rerun the same `kdfast cache-teacher` command to finish it")
        self.k, self.temperature = self.manifest["k"], self.manifest["temperature"]
        size = self.manifest["shard_records"]
        self.index = {}
        for i, key in enumerate(self.manifest["keys"]):
            self.index.setdefault(key, (i // size, i % size))
        self._files: dict[int, tuple] = {}

    def _shard(self, number: int):
        if number not in self._files:
            handle = safe_open(str(self.path / f"shard-{number:05d}.safetensors"), framework="pt")
            self._files[number] = (handle, handle.get_tensor("offsets").tolist())
        return self._files[number]

    def lookup(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [n, k], logprobs [n, k]) of one sequence by its sequence_key; only its rows are read."""
        shard, local = self.index[key]
        handle, offsets = self._shard(shard)
        a, b = offsets[local], offsets[local + 1]
        return handle.get_slice("ids")[a:b], handle.get_slice("logprobs")[a:b]

    def rows(self, items: list[Encoded], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        parts = [self.lookup(sequence_key(it)) for it in items]
        ids = torch.cat([p[0] for p in parts]).to(device=device, dtype=torch.int64)
        return ids, torch.cat([p[1] for p in parts]).to(device=device, dtype=torch.float32)

    def check(self, tokenizer, items: list[Encoded], *, temperature: float, max_len: int,
              max_prompt_len: int | None, where: str = "teacher_cache") -> None:
        """Raise naming every difference between the cache and a training run: tokenizer, template, temperature,
        max_len / max_prompt_len and the records (each training sequence must be in the cache)."""
        m = self.manifest
        differ = []
        if m["tokenizer"] != tokenizer_fingerprint(tokenizer):
            differ.append("the tokenizer differs from the one the cache was made with")
        if m["template"] != template_hash():
            differ.append("the prompt template differs (kdfast.data.template changed since the capture)")
        if m["temperature"] != temperature:
            differ.append(f"temperature: cached at {m['temperature']}, the run uses {temperature}")
        for name, value in (("max_len", max_len), ("max_prompt_len", max_prompt_len)):
            if m[name] != value:
                differ.append(f"{name}: cached with {m[name]}, the run uses {value}")
        missing = [i for i, it in enumerate(items) if sequence_key(it) not in self.index]
        if missing:
            differ.append(f"{len(missing)} of {len(items)} training records are not in the cache (first: record "
                          f"{missing[0]}): capture it on the training records")
        if differ:
            raise DistillError(f"{where}={str(self.path)!r} does not match this run: " + "; ".join(differ))

    def summary(self) -> dict:
        tokens = sum(self.manifest["tokens"])
        item_bytes = 4 + LOGPROB_DTYPES[self.manifest["logprob_dtype"]].itemsize
        return {"records": len(self.manifest["keys"]), "tokens": tokens, "k": self.k,
                "bytes": tokens * self.k * item_bytes, "temperature": self.temperature}


def open_for_training(ctx) -> TeacherCache:
    """The run's teacher cache (DistillConfig.teacher_cache), checked against its tokenizer, settings and records."""
    cfg = ctx.cfg
    cache = TeacherCache(cfg.teacher_cache)
    _check_responses(cache, cfg.technique)
    cache.check(ctx.tokenizer, ctx.train, temperature=cfg.temperature, max_len=cfg.max_len,
                max_prompt_len=cfg.max_prompt_len)
    vocab = _vocab_rows(ctx.student)
    if cache.k > vocab:
        raise DistillError(f"teacher_cache has k={cache.k} but the student's vocabulary only {vocab} entries")
    return cache


def _check_responses(cache: TeacherCache, technique: str) -> None:
    """seqkd trains on the teacher's samples, every other technique on the records' responses: the cache must hold
    the teacher on the same ones."""
    sampled = cache.manifest.get("seqkd") is not None
    if technique == "seqkd" and not sampled:
        raise DistillError(f"teacher_cache={str(cache.path)!r} holds the teacher on the records' own responses, but "
                           "seqkd trains on the teacher's samples: capture them with `kdfast cache-teacher --seqkd` "
                           "(cache_teacher(..., seqkd=True))")
    if sampled and technique != "seqkd":
        raise DistillError(f"teacher_cache={str(cache.path)!r} holds the teacher on its own samples (captured with "
                           f"--seqkd), not on the records' responses: train it with --technique seqkd, or capture "
                           f"without --seqkd for {technique}")


def seqkd_responses(path: str | Path, sampling: Sampling, prompts: list[list[int]]) -> list[list[int]]:
    """The teacher samples of a `--seqkd` cache, one per prompt, once its sampling settings and prompts are
    checked against the seqkd run's (a difference raises naming it and the capture flag that fixes it)."""
    cache = TeacherCache(path)
    _check_responses(cache, "seqkd")
    cached, run = cache.manifest["seqkd"], asdict(sampling)
    differ = [f"{name}: sampled with {cached[name]!r}, the run uses {run[name]!r}" for name in SAMPLING_FLAGS
              if cached[name] != run[name]]
    flags = [SAMPLING_FLAGS[name] for name in SAMPLING_FLAGS if cached[name] != run[name]]
    if cached["prompts"] != digest(prompts):
        differ.append(f"prompts: the cache's samples answer {len(cache.manifest['keys'])} prompts, the run has "
                      f"{len(prompts)} or their text differs")
        flags.append("records, --max-prompt-len and --long-prompts")
    if differ:
        raise DistillError(f"teacher_cache={str(path)!r} holds teacher samples that do not match this seqkd run ("
                           + "; ".join(differ) + "): capture with `kdfast cache-teacher --seqkd` and the same "
                           + ", ".join(flags) + " as the run, or train with the cached values")
    if not (cache.path / SEQKD).exists():
        raise DistillError(f"{cache.path / SEQKD} is missing: rerun the same `kdfast cache-teacher --seqkd` command")
    return json.loads((cache.path / SEQKD).read_text())["responses"]


def _vocab_rows(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def cached_divergence_sum(cache: TeacherCache, items: list[Encoded], student, targets: torch.Tensor, *, kind: str,
                          tail: str, soft_weight: float, hard_weight: float, beta: float, alpha: float,
                          temperature: float, chunk_size: int | None = None) -> torch.Tensor:
    """Σ over the N valid targets of soft_weight·sparse divergence(cached teacher ‖ student) +
    hard_weight·CE(targets).

    items: the micro-batch's sequences in batch order; student: objective.Rows at the valid positions (hidden
    states + head, or logits); targets [N] long.
    """
    from kdfast.distill.objective import _compute_dtype, _same_dtype
    from kdfast.ops.fused_linear_sparse import fused_linear_sparse_distill_loss
    from kdfast.ops.sparse_divergence import sparse_distill_loss

    if targets.numel() == 0:
        return student.values.sum() * 0.0
    ids, lps = cache.rows(items, targets.device)
    if ids.shape[0] != targets.numel():
        raise DistillError(f"the teacher cache gives {ids.shape[0]} rows for a batch of {targets.numel()} targets; "
                           "the cache does not match these sequences (recapture it)")
    if student.head is not None:
        hs, ws, bs = _same_dtype(student.values, *student.head, _compute_dtype(student.values, student.head[0]))
        return fused_linear_sparse_distill_loss(hs, ws, ids, lps, targets, kind, tail=tail, beta=beta, alpha=alpha,
                                                temperature=temperature, hard_weight=hard_weight,
                                                soft_weight=soft_weight, student_bias=bs, chunk_size=chunk_size,
                                                reduction="sum")
    total = soft_weight * sparse_distill_loss(student.values, ids, lps, kind, tail=tail, labels=targets,
                                              temperature=temperature, beta=beta, alpha=alpha, reduction="sum")
    if hard_weight:
        total = total + hard_weight * F.cross_entropy(student.values.float(), targets, reduction="sum")
    return total
