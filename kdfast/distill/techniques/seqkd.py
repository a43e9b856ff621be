"""SeqKD: the teacher samples a response to every training prompt once (cached on disk); the student trains on them."""
from __future__ import annotations

import json
from pathlib import Path

from accelerate.utils import gather_object
from tqdm.auto import tqdm

from kdfast.distill.data import prompt_of, with_response
from kdfast.distill.techniques.base import DivergenceTechnique
from kdfast.generation import generate
from kdfast.io import atomic_write_text
from kdfast.store import digest, model_fingerprint, tokenizer_fingerprint


class SeqKD(DivergenceTechnique):
    """Teacher responses sampled at gen_temperature = 1, top-k 0, top-p 1 replace the records' responses.

    The loss on them is the KD loss (kd_ratio = 1, as the study's code did); kd_ratio = 0 gives classic SeqKD
    (cross-entropy on the teacher's outputs, no teacher forward during training). The samples are cached in
    `seqkd_cache` (default <out>/seqkd-cache) under a hash of the teacher's weights, the prompts and the sampling
    settings, so a rerun or a resumed run reuses them.
    """

    name = "seqkd"

    def prepare(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        prompts = [prompt_of(e) for e in ctx.train]
        settings = {"max_len": cfg.max_len, "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.gen_temperature,
                    "top_k": cfg.gen_top_k, "top_p": cfg.gen_top_p, "seed": cfg.seed, "eos": ctx.eos_id}
        if ctx.cross is not None:  # responses re-tokenized for the student: another cache entry
            settings["teacher_tokenizer"] = tokenizer_fingerprint(ctx.cross.teacher_tok)
        key = digest([model_fingerprint(ctx.teacher), digest(prompts), settings], 20)
        folder = cfg.seqkd_cache or (Path(ctx.out) / "seqkd-cache" if ctx.out else None)
        path = Path(folder) / f"teacher-{key}.json" if folder else None
        if path is not None and path.exists():
            responses = json.loads(path.read_text())["responses"]
        else:
            responses = self._sample(prompts)
            if path is not None and ctx.accelerator.is_main_process:
                atomic_write_text(path, json.dumps({"key": key, "settings": settings, "responses": responses}))
            ctx.accelerator.wait_for_everyone()
        ctx.train = [with_response(e, r, cfg.max_len) for e, r in zip(ctx.train, responses)]

    def _sample(self, prompts: list[list[int]]) -> list[list[int]]:
        """Teacher samples for all prompts; each process takes every world-th prompt, then all share the results."""
        ctx, cfg, cross = self.ctx, self.cfg, self.ctx.cross
        mine = list(range(ctx.rank, len(prompts), ctx.world))
        step = 4 * (cfg.gen_batch_size or cfg.batch_size)
        done: list[tuple[int, list[int]]] = []
        show = cfg.progress and ctx.accelerator.is_main_process
        bar = tqdm(total=len(mine), desc="seqkd: teacher samples", disable=not show)
        for start in range(0, len(mine), step):
            idx = mine[start: start + step]
            chunk = [prompts[i] for i in idx]
            pad, eos = ctx.pad_id, ctx.eos_id
            if cross is not None:
                chunk, pad, eos = [cross.teacher_prompt(p) for p in chunk], cross.teacher_pad, cross.teacher_eos
            with ctx.autocast():
                new = generate(ctx.teacher, chunk, ctx.max_new_tokens(chunk), pad_id=pad, eos_id=eos,
                               do_sample=True, temperature=cfg.gen_temperature, top_k=cfg.gen_top_k,
                               top_p=cfg.gen_top_p, batch_size=cfg.gen_batch_size or cfg.batch_size,
                               seed=ctx.seed("seqkd", start))
            if cross is not None:
                new = [cross.student_response(r) for r in new]
            done.extend(zip(idx, new))
            bar.update(len(idx))
        bar.close()
        if ctx.world > 1:
            done = gather_object(done)
        return [r for _, r in sorted(done)]

