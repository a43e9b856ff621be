"""run_distill() and run_cache_teacher(): the whole `kdfast distill` and `kdfast cache-teacher` jobs from files and
model specs, one call each (the models loaded, the student built, the run written under its out folder)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from kdfast.data import bundled_records, load_records
from kdfast.distill.config import DistillConfig, DistillError
from kdfast.distill.loop import Distiller, DistillSummary
from kdfast.distill.student import make_student
from kdfast.distill.teacher_cache import CacheSummary, cache_teacher
from kdfast.distill.techniques.seqkd import Sampling
from kdfast.io import claim_folder
from kdfast.models import load_model, load_tokenizer, resolve_device
from kdfast.runtime import launch_device, launch_rank


@dataclass
class DistillRun:
    """One `kdfast distill` run: the models, the record files and the training config.

    The student is `student` (a model spec, trained with its own tokenizer) or built from the teacher's blocks:
    `student_layers` (block indices) or `student_num_layers` (k evenly spaced blocks). teacher: a model spec (not
    needed for sft, nor with a teacher cache, unless the student is built from it); teacher_tokenizer: the
    teacher's where it is not the teacher model's own. data, eval_data, lm_data: record files ('bundled': the
    WordNet set), at most `limit` records of each, `fields` mapping their columns. config: the DistillConfig
    (its `out` is required).
    """

    config: DistillConfig
    data: str
    teacher: str | None = None
    student: str | None = None
    student_layers: list[int] | None = None
    student_num_layers: int | None = None
    teacher_tokenizer: str | None = None
    eval_data: str | None = None
    lm_data: str | None = None
    limit: int | None = None
    fields: dict | None = None
    trust_remote_code: bool = False


def records_of(path: str | None, limit: int | None = None, fields: dict | None = None) -> list[dict] | None:
    """The records of a training file ('bundled': the WordNet set; None: None), the first `limit` of them."""
    if path is None:
        return None
    records = bundled_records() if path == "bundled" else load_records(path, fields)
    return records[:limit] if limit else records


def run_distill(run: DistillRun) -> DistillSummary:
    """Train the student as run.config says; the run (checkpoints, metrics, OUT/final) goes under config.out.
    Prints and returns the summary. Missing models and bad records raise before any model loads."""
    cfg = run.config
    if cfg.out is None:
        raise DistillError("--out is required: the folder for checkpoints, metrics and the final student")
    if (cfg.needs_teacher or run.student is None) and not run.teacher:
        raise DistillError(f"technique {cfg.technique!r} needs --teacher" if cfg.needs_teacher else
                           "--student-layers/--student-num-layers build the student from --teacher: give it")
    train = records_of(run.data, run.limit, run.fields)
    evals, lm = records_of(run.eval_data, run.limit, run.fields), records_of(run.lm_data, run.limit, run.fields)
    # One writer per out (rank 0 holds the lock for every process of a launch); it also clears killed runs'
    # temporaries.
    claim = claim_folder(cfg.out, "--out") if launch_rank() == 0 else contextlib.nullcontext()
    with claim:
        distiller = _distiller(run)
        sources = {"train": run.data, "eval": run.eval_data, "lm": run.lm_data}
        summary = distiller.train(train, evals, lm, sources={k: v for k, v in sources.items() if v})
        if distiller.accelerator.is_main_process:
            print(summary)
        return summary


def _distiller(run: DistillRun) -> Distiller:
    """The models loaded (or the student built from the teacher's blocks) into a Distiller of run.config."""
    cfg = run.config
    teacher = teacher_tok = None
    if cfg.needs_teacher or run.student is None:
        # A student built from the teacher's blocks needs them unquantized; the Distiller quantizes afterwards.
        quantize = cfg.teacher_quantize if run.student is not None and cfg.needs_teacher else None
        teacher, teacher_tok = load_model(run.teacher, trust_remote_code=run.trust_remote_code, quantize=quantize)
        if run.teacher_tokenizer:
            teacher_tok = load_tokenizer(run.teacher_tokenizer, trust_remote_code=run.trust_remote_code)
    if run.student is not None:  # a QLoRA base is quantized while it loads, never held in full precision
        device = _process_device(cfg.device) if cfg.student_quantize else None
        student, tokenizer = load_model(run.student, trust_remote_code=run.trust_remote_code, dtype=torch.float32,
                                        quantize=cfg.student_quantize, device=device)
    else:
        student = make_student(teacher, run.student_layers, num_layers=run.student_num_layers).float()
        tokenizer = teacher_tok
    teacher = teacher if cfg.needs_teacher else None  # one that only gave the student its blocks is let go
    return Distiller(teacher, student, tokenizer, cfg, teacher_tokenizer=teacher_tok if cfg.needs_teacher else None)


def _process_device(device: str | None) -> torch.device:
    """This process's student device before the Distiller's accelerator exists: the configured one, else under a
    launch cuda:LOCAL_RANK (accelerate's choice), else kdfast.models.resolve_device's."""
    if device is None and torch.cuda.is_available():
        return launch_device()
    return resolve_device(device)


@dataclass
class CacheTeacherRun:
    """One `kdfast cache-teacher` run: the teacher (a model spec, in bfloat16 with `bf16`) over the records of
    `data` (at most `limit`, `fields` mapping the columns) into the cache folder `out`; the other fields are
    cache_teacher()'s (sampling set: a SeqKD capture on the teacher's own samples, drawn with those settings)."""

    teacher: str
    data: str
    out: str
    limit: int | None = None
    fields: dict | None = None
    k: int = 64
    temperature: float = 1.0
    max_len: int = 512
    max_prompt_len: int | None = None
    long_prompts: str = "truncate"
    batch_tokens: int = 8192
    shard_records: int = 1024
    logprob_dtype: str = "float16"
    sampling: Sampling | None = None
    bf16: bool = False
    device: str | None = None
    trust_remote_code: bool = False
    progress: bool = True


def run_cache_teacher(run: CacheTeacherRun) -> CacheSummary:
    """Capture the teacher's top-k log-probs on the records under run.out; prints and returns the summary."""
    records = records_of(run.data, run.limit, run.fields)
    teacher, tokenizer = load_model(run.teacher, dtype=torch.bfloat16 if run.bf16 else None, device=run.device,
                                    trust_remote_code=run.trust_remote_code)
    summary = cache_teacher(teacher, tokenizer, records, k=run.k, out=run.out, temperature=run.temperature,
                            max_len=run.max_len, max_prompt_len=run.max_prompt_len, long_prompts=run.long_prompts,
                            batch_tokens=run.batch_tokens, shard_records=run.shard_records,
                            logprob_dtype=run.logprob_dtype, seqkd=run.sampling is not None, sampling=run.sampling,
                            progress=run.progress)
    print(summary)
    return summary
