"""SeqKD: the teacher samples a response to every training prompt once (cached on disk); the student trains on them."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from accelerate.utils import gather_object
from torch import nn
from tqdm.auto import tqdm

from kdfast.distill.config import DistillConfig
from kdfast.distill.context import new_token_limit, run_seed
from kdfast.distill.data import prompt_of, with_response
from kdfast.distill.techniques.base import DivergenceTechnique
from kdfast.generation import generate
from kdfast.io import atomic_write_text
from kdfast.store import digest, model_fingerprint, tokenizer_fingerprint


@dataclass(frozen=True)
class Sampling:
    """How SeqKD samples the teacher's responses: DistillConfig's fields of the same names and defaults.

    gen_batch_size is the run's `gen_batch_size or batch_size`: the draws of a seeded chunk depend on its batches.
    """

    max_new_tokens: int | None = DistillConfig.max_new_tokens
    gen_temperature: float = DistillConfig.gen_temperature
    gen_top_k: int = DistillConfig.gen_top_k
    gen_top_p: float = DistillConfig.gen_top_p
    seed: int = DistillConfig.seed
    gen_batch_size: int = DistillConfig.batch_size

    @classmethod
    def of(cls, cfg: DistillConfig) -> "Sampling":
        return cls(cfg.max_new_tokens, cfg.gen_temperature, cfg.gen_top_k, cfg.gen_top_p, cfg.seed,
                   cfg.gen_batch_size or cfg.batch_size)


def sample_responses(teacher: nn.Module, prompts: list[list[int]], sampling: Sampling, max_len: int, *, pad_id: int,
                     eos_id: int | None, rank: int = 0, world: int = 1,
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     cross=None, progress: bool = False) -> list[list[int]]:
    """One teacher sample per prompt, seeded per chunk as a SeqKD run on `world` processes draws them (the cache
    capture is rank 0 of 1); each process takes every world-th prompt, then all share the results.

    cross: a kdfast.distill.cross.CrossTokenizer (the teacher samples in its own tokens, returned as the student's).
    """
    mine = list(range(rank, len(prompts), world))
    step = 4 * sampling.gen_batch_size
    done: list[tuple[int, list[int]]] = []
    bar = tqdm(total=len(mine), desc="seqkd: teacher samples", disable=not progress)
    for start in range(0, len(mine), step):
        idx = mine[start: start + step]
        chunk = [prompts[i] for i in idx]
        pad, eos = pad_id, eos_id
        if cross is not None:
            chunk, pad, eos = [cross.teacher_prompt(p) for p in chunk], cross.teacher_pad, cross.teacher_eos
        with autocast():
            new = generate(teacher, chunk, new_token_limit(chunk, max_len, sampling.max_new_tokens), pad_id=pad,
                           eos_id=eos, do_sample=True, temperature=sampling.gen_temperature,
                           top_k=sampling.gen_top_k, top_p=sampling.gen_top_p, batch_size=sampling.gen_batch_size,
                           seed=run_seed(sampling.seed, rank, "seqkd", start))
        if cross is not None:
            new = [cross.student_response(r) for r in new]
        done.extend(zip(idx, new))
        bar.update(len(idx))
    bar.close()
    if world > 1:
        done = gather_object(done)
    return [r for _, r in sorted(done)]


class SeqKD(DivergenceTechnique):
    """Teacher responses sampled at gen_temperature = 1, top-k 0, top-p 1 replace the records' responses.

    The loss on them is the KD loss (kd_ratio = 1, as the study's code did); kd_ratio = 0 gives classic SeqKD
    (cross-entropy on the teacher's outputs, no teacher forward during training). The samples are cached in
    `seqkd_cache` (default <out>/seqkd-cache) under a hash of the teacher's weights, the prompts and the sampling
    settings, so a rerun or a resumed run reuses them. With `teacher_cache` (captured by `kdfast cache-teacher
    --seqkd`) the samples and the KD term's top-k come from that cache, and no teacher is loaded.
    """

    name = "seqkd"

    def prepare(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        prompts = [prompt_of(e) for e in ctx.train]
        if cfg.teacher_cache:
            from kdfast.distill.teacher_cache import seqkd_responses

            responses = seqkd_responses(cfg.teacher_cache, Sampling.of(cfg), prompts)
        else:
            responses = self._live_responses(prompts)
        ctx.train = [with_response(e, r, cfg.max_len) for e, r in zip(ctx.train, responses)]
        super().prepare()  # opens the teacher cache, checked against the sampled sequences

    def _live_responses(self, prompts: list[list[int]]) -> list[list[int]]:
        """The live teacher's samples, from `seqkd_cache` when an earlier run drew them."""
        ctx, cfg = self.ctx, self.cfg
        settings = {"max_len": cfg.max_len, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.gen_temperature,
                    "top_k": cfg.gen_top_k, "top_p": cfg.gen_top_p, "seed": cfg.seed, "eos": ctx.eos_id}
        if ctx.cross is not None:  # responses re-tokenized for the student: another cache entry
            settings["teacher_tokenizer"] = tokenizer_fingerprint(ctx.cross.teacher_tok)
        key = digest([model_fingerprint(ctx.teacher), digest(prompts), settings], 20)
        folder = cfg.seqkd_cache or (Path(ctx.out) / "seqkd-cache" if ctx.out else None)
        path = Path(folder) / f"teacher-{key}.json" if folder else None
        if path is not None and path.exists():
            return json.loads(path.read_text())["responses"]
        responses = sample_responses(ctx.teacher, prompts, Sampling.of(cfg), cfg.max_len, pad_id=ctx.pad_id,
                                     eos_id=ctx.eos_id, rank=ctx.rank, world=ctx.world, autocast=ctx.autocast,
                                     cross=ctx.cross, progress=cfg.progress and ctx.accelerator.is_main_process)
        if path is not None and ctx.accelerator.is_main_process:
            atomic_write_text(path, json.dumps({"key": key, "settings": settings, "responses": responses}))
        ctx.accelerator.wait_for_everyone()
        return responses
