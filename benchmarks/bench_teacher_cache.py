"""Distillation from cached top-k teacher logits (issue 15): capture throughput and bytes per token, a KD step from
the cache beside one with the live teacher, and the sparse fused loss beside the dense fused loss.

CPU:  SmolLM2-135M (fp32) -> 4 of its blocks, 8 x 256 tokens.
CUDA: LLaMA-2-7B-shaped (bf16) -> TinyLlama-1.1B-shaped (random init, no download), 4 x 2048 tokens, V 32000;
      --vocab 128256 for a LLaMA-3-sized head.

python benchmarks/bench_teacher_cache.py [--device cpu|cuda] [--vocab N] [--steps N]
  ->  benchmarks/results/teacher-cache-<device>.md
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.bench_distill_step import llama_config, long_records, random_model  # noqa: E402
from benchmarks.common import write_table  # noqa: E402
from kdfast import fused_linear_distill_loss, fused_linear_sparse_distill_loss  # noqa: E402
from kdfast.data import IGNORE_INDEX  # noqa: E402
from kdfast.distill import DistillConfig, Distiller, make_student  # noqa: E402
from kdfast.distill.data import collate, encode_training  # noqa: E402
from kdfast.distill.teacher_cache import cache_teacher, topk_logprobs  # noqa: E402
from kdfast.generation import pad_token_id  # noqa: E402
from kdfast.memory import peak_bytes, resident_bytes  # noqa: E402
from kdfast.models import hidden_and_head, load_model, tiny_tokenizer  # noqa: E402

HEADER = ["job", "figure", "cached / sparse", "live teacher / dense", "cached / live"]
KS = (8, 64, 256)
STEP_K = 64


def job(device: torch.device, vocab: int):
    """(name, teacher, student factory, tokenizer, batch, max_len)."""
    if device.type == "cpu":
        teacher, tok = load_model("smollm2", dtype=torch.float32)
        return ("SmolLM2-135M -> 4 blocks, fp32", teacher, lambda: make_student(teacher, num_layers=4).float(), tok,
                8, 256)
    teacher_cfg, student_cfg = llama_config(4096, 32, 11008, 32, 32), llama_config(2048, 22, 5632, 32, 4)
    teacher_cfg.vocab_size = student_cfg.vocab_size = vocab
    teacher = random_model(teacher_cfg, device, torch.bfloat16)
    return (f"LLaMA-2-7B-shaped (bf16) -> TinyLlama-1.1B-shaped, V {vocab}", teacher,
            lambda: random_model(student_cfg, device, torch.float32), tiny_tokenizer(), 4, 2048)


def capture_rows(name: str, teacher, tok, records: list[dict], few: int, max_len: int, folder: Path,
                 rows: list) -> Path:
    """Capture each k of KS (STEP_K on all `records`, the others on the first `few`: the throughput needs no more);
    a row of tokens/s and one of bytes/token (beside dense fp16 logits) each. Returns the STEP_K cache."""
    vocab = teacher.get_output_embeddings().weight.shape[0]
    for k in KS:
        summary = cache_teacher(teacher, tok, records if k == STEP_K else records[:few], k=k, out=folder / f"k{k}",
                                max_len=max_len, max_prompt_len=max_len // 2, progress=False)
        rows.append([name, f"capture k={k}: response tokens/s", summary.tokens / summary.seconds, "", ""])
        dense = 2 * vocab  # every logit of the token in fp16
        rows.append([name, f"capture k={k}: bytes/token (peer: all {vocab} logits, fp16)",
                     summary.bytes_per_token, dense, summary.bytes_per_token / dense])
    return folder / f"k{STEP_K}"


def started_peak(distiller: Distiller, records: list[dict]):
    """(run, whole-step peak bytes) as kdfast.distill.plan.measure_step takes the peak: bytes resident after a
    warm-up step (teacher, student, optimizer state) + the next step's peak above them."""
    run = distiller._start(records, None, None)
    distiller._step(run, 0)
    resident = resident_bytes(distiller.teacher, distiller.student, run.optimizer)
    return run, resident + peak_bytes(lambda: distiller._step(run, 1), distiller.device)


def alternating_medians(fns: list, device: torch.device, reps: int) -> list[float]:
    """Median seconds of each fn(i) over `reps` rounds that call them in turn: load from other work on a shared
    machine falls on every side alike."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(reps):
        for fn, out in zip(fns, times):
            _sync(device)
            t0 = time.perf_counter()
            fn(i)
            _sync(device)
            out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rows(name: str, teacher, make, tok, records: list[dict], cache: Path, batch: int, max_len: int,
              device: torch.device, steps: int, rows: list) -> None:
    """A KD step from the cache (no teacher loaded) and one with the live teacher: peak, and the median time of
    `steps` steps taken in turn."""
    runs = []
    for kw in (dict(teacher_cache=str(cache)), {}):
        cfg = DistillConfig(technique="kd", batch_size=batch, max_len=max_len, max_prompt_len=max_len // 2,
                            max_steps=10**6, lr=1e-5, warmup_steps=0, progress=False, device=str(device),
                            teacher_dtype=None, **kw)
        distiller = Distiller(None if kw else teacher, make(), tok, cfg)
        runs.append((distiller, *started_peak(distiller, records)))
    (cached, run_c, peak_c), (live, run_l, peak_l) = runs
    s_c, s_l = alternating_medians([lambda i: cached._step(run_c, 2 + i), lambda i: live._step(run_l, 2 + i)],
                                   device, steps)
    shape = f"{name}, {batch}x{max_len}"
    rows.append([shape, f"KD step s (median of {steps}, taken in turn), k={STEP_K}", s_c, s_l, s_c / s_l])
    rows.append([shape, "KD step peak GiB (resident + step)", peak_c / 2**30, peak_l / 2**30, peak_c / peak_l])


def loss_rows(name: str, teacher, student, tok, records: list[dict], max_len: int, device: torch.device,
              rows: list) -> None:
    """fused_linear_sparse_distill_loss (top-STEP_K of the teacher) vs fused_linear_distill_loss (the teacher's
    hidden states and head), forward + backward, on the same student hidden states of one batch."""
    batch = collate(encode_training(tok, records, max_len, max_len // 2), pad_token_id(tok), device)
    keep = batch["targets"] != IGNORE_INDEX
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.no_grad():
        inputs = dict(attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])
        ht, (wt, bt) = hidden_and_head(teacher, batch["input_ids"], **inputs)
        hs, (ws, _) = hidden_and_head(student.to(dtype), batch["input_ids"], **inputs)
        ht, hs, targets = ht[keep], hs[keep].detach().requires_grad_(), batch["targets"][keep]
        ws = ws.detach().clone().requires_grad_()
        ids, lps = topk_logprobs(ht, wt, bt, STEP_K, 1.0)

    def sparse(_):
        fused_linear_sparse_distill_loss(hs, ws, ids, lps, targets, "fkl").backward()

    def dense(_):
        fused_linear_distill_loss(hs, ws, ht, wt, targets, kind="fkl", teacher_bias=bt).backward()

    alternating_medians([sparse, dense], device, 1)  # warm-up
    s_s, s_d = alternating_medians([sparse, dense], device, 5)
    rows.append([f"{name}, {hs.shape[0]} tokens", f"fkl loss fwd+bwd ms (median of 5, in turn), sparse k={STEP_K} "
                 "vs dense fused", 1e3 * s_s, 1e3 * s_d, s_s / s_d])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vocab", type=int, default=32000, help="CUDA: the models' vocabulary")
    parser.add_argument("--steps", type=int, default=3, help="timed KD steps per side (the median is reported)")
    args = parser.parse_args()
    device = torch.device(args.device)
    started, load = time.perf_counter(), os.getloadavg()[0]
    name, teacher, make, tok, batch, max_len = job(device, args.vocab)
    teacher.eval()
    records = long_records((2 + args.steps) * batch, chars=8 * max_len)  # one epoch covers every step
    rows: list = []
    with tempfile.TemporaryDirectory(prefix="kdfast-cache-bench-") as tmp:
        cache = capture_rows(name, teacher, tok, records, 2 * batch, max_len, Path(tmp), rows)
        step_rows(name, teacher, make, tok, records, cache, batch, max_len, device, args.steps, rows)
    gc.collect()  # the two runs' students and optimizers, before the loss's student
    if device.type == "cuda":
        torch.cuda.empty_cache()
    loss_rows(name, teacher, make(), tok, records[:batch], max_len, device, rows)
    notes = [
        f"capture: kdfast.distill.cache_teacher (k={STEP_K}: the step's {len(records)} records, the other k: the "
        f"first {2 * batch}; one teacher forward per 8192-token batch, "
        "top-k from the hidden states a token chunk at a time, fp16 log-probs + int32 ids: 6 bytes per id); "
        "tokens/s counts response tokens",
        f"KD step: kd, fkl, fused-linear loss, fp32 AdamW, the two runs' steps taken in turn; cached = teacher_cache "
        f"(top-{STEP_K}, bucket tail), no "
        "teacher loaded; live = the teacher's forward in every step; peak as kdfast.distill.plan.measure_step "
        "(resident after a warm-up step + the next step's peak: CPU the profiler's allocation stream, CUDA "
        "max_memory_allocated)",
        "loss: the student's final hidden states and head of one batch, forward + backward (d hidden, d weight); "
        "the dense loss gets the teacher's hidden states and head, the sparse one its top-k ids and log-probs",
        f"whole benchmark {time.perf_counter() - started:.0f} s; 1-minute load average {load:.1f} at its start, "
        f"{os.getloadavg()[0]:.1f} at its end, on {os.cpu_count()} cores (other work on the machine skews times)"]
    write_table("teacher-cache", device, "Distillation from cached top-k teacher logits vs the live teacher", HEADER,
                rows, notes)


if __name__ == "__main__":
    main()
