"""The trainer's whole memory stack (issue 11): each lever set's measured whole-step peak beside plan_memory's
prediction for the same job, with step time; TRL's GKDTrainer on the same job where trl is installed.

CPU:  SmolLM2-135M (fp32) -> 4 of its blocks, 8 x 256 tokens; and a LLaMA-shaped random pair (H 512, 8 -> 4 blocks,
      V 32000), 4 x 256 tokens.
CUDA: LLaMA-2-7B-shaped (bf16) -> TinyLlama-1.1B-shaped (random init, no download), 1 x 2048 and 4 x 2048 tokens,
      V 32000; --vocab 128256 for a LLaMA-3-sized head.

python benchmarks/bench_distill_memory.py [--device cpu|cuda] [--vocab N]
  ->  benchmarks/results/distill-memory-<device>.md
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.bench_distill_step import llama_config, long_records, random_model  # noqa: E402
from benchmarks.common import write_table  # noqa: E402
from kdfast.distill import DistillConfig, Distiller, make_student  # noqa: E402
from kdfast.distill.plan import measure_step, plan_memory  # noqa: E402
from kdfast.models import load_model, quantize_model, tiny_tokenizer  # noqa: E402
from kdfast.runtime import bf16_is_native  # noqa: E402

HEADER = ["job", "lever set", "measured GiB", "planned GiB", "planned / measured", "step s", "tokens/s"]
PLANNED = ("optim", "gradient_checkpointing", "teacher_quantize", "master_weights", "fused")
ALL = dict(teacher_quantize="nf4", optim="adamw_8bit", gradient_checkpointing=True)
LEVER_SETS = [
    ("plain: materialized logits, fp32 AdamW", dict(fused=False)),
    ("fused-linear loss (default)", {}),
    ("+ gradient checkpointing", dict(gradient_checkpointing=True)),
    ("+ 8-bit AdamW", dict(optim="adamw_8bit")),
    ("+ NF4 teacher", dict(teacher_quantize="nf4")),
    ("NF4 teacher + 8-bit AdamW + checkpointing", ALL),
    ("... + bf16 master weights", dict(ALL, master_weights="bf16")),
]


def jobs(device: torch.device, vocab: int):
    """(name, teacher, student factory, tokenizer, [(batch, max_len)])."""
    if device.type == "cpu":
        teacher, tok = load_model("smollm2", dtype=torch.float32)
        yield ("SmolLM2-135M -> 4 blocks, fp32", teacher, lambda: make_student(teacher, num_layers=4).float(), tok,
               [(8, 256)])
        cfg = llama_config(512, 8, 1376, 8, 8)
        pair = random_model(cfg, device, torch.float32)
        yield ("LLaMA-shaped H 512, 8 -> 4 blocks, V 32000", pair, lambda: make_student(pair, num_layers=4).float(),
               tiny_tokenizer(), [(4, 256)])
        return
    teacher_cfg, student_cfg = llama_config(4096, 32, 11008, 32, 32), llama_config(2048, 22, 5632, 32, 4)
    teacher_cfg.vocab_size = student_cfg.vocab_size = vocab
    teacher = random_model(teacher_cfg, device, torch.bfloat16)
    yield (f"LLaMA-2-7B-shaped (bf16) -> TinyLlama-1.1B-shaped, V {vocab}", teacher,
           lambda: random_model(student_cfg, device, torch.float32), tiny_tokenizer(), [(1, 2048), (4, 2048)])


def measure(teacher, student, tok, device, batch: int, max_len: int, levers: dict):
    cfg = DistillConfig(technique="kd", batch_size=batch, max_len=max_len, max_prompt_len=max_len // 2,
                        max_steps=10**6, lr=1e-5, warmup_steps=0, progress=False, device=str(device),
                        teacher_dtype=None, **levers)
    distiller = Distiller(teacher, student, tok, cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    measured = measure_step(distiller, long_records(6 * batch, chars=8 * max_len))
    reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    return measured, reserved


def quantized(teacher, device, cache: dict):
    """One quantized copy of the teacher per job (quantize_model goes through a safetensors folder: slow on 7B)."""
    if "nf4" not in cache:
        cache["nf4"] = quantize_model(teacher, "nf4", device=device)
    return cache["nf4"]


def run_job(name, teacher, make, tok, shapes, device, rows: list, notes: list, deadline: float) -> None:
    skip_bf16 = not bf16_is_native(device)
    cache: dict = {}
    for batch, max_len in shapes:
        for label, levers in LEVER_SETS:
            if skip_bf16 and levers.get("master_weights") == "bf16":
                notes.append(f"{name}: '{label}' skipped: bf16 is emulated on this {device.type} (bf16_is_native)")
                continue
            if time.perf_counter() > deadline:
                notes.append(f"{name} {batch}x{max_len}: '{label}' not run: the benchmark's time limit was reached")
                continue
            quantize = levers.get("teacher_quantize")
            frozen = quantized(teacher, device, cache) if quantize else teacher
            run_levers = {k: v for k, v in levers.items() if k != "teacher_quantize"}
            student = make()
            student_config = student.config
            try:
                measured, reserved = measure(frozen, student, tok, device, batch, max_len, run_levers)
            except torch.cuda.OutOfMemoryError:
                rows.append([name + f", {batch}x{max_len}", label, "OOM", "", "", "", ""])
                continue
            finally:
                del student
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            plan = plan_memory(teacher.config, student_config, batch_size=batch, seq_len=max_len,
                               device=device.type, **{k: v for k, v in levers.items() if k in PLANNED})
            gib = measured.total_bytes / 2**30
            rows.append([f"{name}, {batch}x{max_len}", label, gib, plan.total_bytes / 2**30,
                         plan.total_bytes / measured.total_bytes, measured.seconds, measured.tokens / measured.seconds])
            if reserved is not None:
                notes.append(f"{name} {batch}x{max_len} '{label}': max reserved {reserved / 2**30:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vocab", type=int, default=32000, help="CUDA: the models' vocabulary")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop starting lever sets after this")
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    rows: list = []
    notes: list = []
    for name, teacher, make, tok, shapes in jobs(device, args.vocab):
        run_job(name, teacher, make, tok, shapes, device, rows, notes, started + args.max_seconds)
        del teacher
        gc.collect()
    trl = importlib.util.find_spec("trl") is not None
    notes = [
        "measured = bytes resident after a warm-up step (teacher, student, optimizer state) + the next step's peak "
        "above them (CPU: the profiler's allocation stream; CUDA: max_memory_allocated); planned = "
        "kdfast.distill.plan.plan_memory on the same configs, batch and levers (every token counted a target, so "
        "an upper bound on the loss part)",
        "step s: one more step outside the profiler; tokens/s: response tokens of that step per second",
        "TRL GKDTrainer: " + ("installed, not yet wired into this table" if trl else
                              "trl is not installed here (not a kdfast dependency): no peer row in this run"),
        *notes, f"whole benchmark {time.perf_counter() - started:.0f} s"]
    write_table("distill-memory", device, "Whole training step memory: measured vs planned, per lever set", HEADER,
                rows, notes)


if __name__ == "__main__":
    main()
