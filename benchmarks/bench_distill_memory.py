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


TRL_SETS = [("TRL GKDTrainer: fp32 AdamW", {}),
            ("TRL GKDTrainer: NF4 teacher + 8-bit AdamW + checkpointing", dict(teacher_quantize="nf4",
                                                                             optim="adamw_8bit",
                                                                             gradient_checkpointing=True))]
CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")


def trl_step(teacher, student, tok, device, batch: int, max_len: int, levers: dict, steps: int = 3):
    """TRL's GKDTrainer on the same job as pure supervised KD (lmbda=0: no student generations; beta=0: forward
    KL), its own levers: (measured bytes, seconds per step, input tokens per step). The peak is taken over its
    whole train() of `steps` steps (optimizer state allocated on the first), above the two models."""
    import tempfile

    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdfast.memory import peak_bytes, resident_bytes

    if tok.chat_template is None:
        tok.chat_template = CHAT
    rows = [{"messages": [{"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": _fit(tok, r["response"], max_len - 32)}]}
            for r in long_records(steps * batch, chars=8 * max_len)]
    with tempfile.TemporaryDirectory(prefix="kdfast-trl-") as tmp:
        args = GKDConfig(output_dir=tmp, per_device_train_batch_size=batch, max_length=max_len, lmbda=0.0, beta=0.0,
                         temperature=1.0, max_steps=steps, learning_rate=1e-5, report_to=[], save_strategy="no",
                         logging_strategy="no", use_cpu=device.type == "cpu", bf16=device.type == "cuda",
                         gradient_checkpointing=levers.get("gradient_checkpointing", False),
                         optim="adamw_bnb_8bit" if levers.get("optim") == "adamw_8bit" else "adamw_torch",
                         dataloader_num_workers=0, include_num_input_tokens_seen=True, disable_tqdm=True)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
        resident = resident_bytes(teacher, student)
        t0 = time.perf_counter()
        try:
            peak = peak_bytes(trainer.train, device)
        finally:
            _forget_embedding_overrides()
        seconds = (time.perf_counter() - t0) / steps
    return resident + peak, seconds, trainer.state.num_input_tokens_seen / steps


def _forget_embedding_overrides() -> None:
    """HF's Trainer registers 32-bit optimizer states for embeddings in bitsandbytes' process-wide manager, keyed by
    parameter id: a later kdfast student whose embedding reuses such an id got 32-bit states (+6 bytes a parameter,
    seen as +0.09 GiB on the LLaMA pair's 8-bit rows). Cleared after every TRL run."""
    import bitsandbytes as bnb

    bnb.optim.GlobalOptimManager.get_instance().initialize()


def _fit(tok, text: str, tokens: int) -> str:
    """The text cut to `tokens` tokens: TRL's collator refuses a completion that pushes the prompt out of the
    window, so the response is cut beforehand to fill it with the prompt kept."""
    return tok.decode(tok(text, add_special_tokens=False)["input_ids"][:tokens])


def run_trl(name, teacher, make, tok, shapes, device, rows: list, notes: list, cache: dict) -> None:
    if importlib.util.find_spec("trl") is None:
        notes.append("TRL GKDTrainer: trl is not installed (pip install --no-deps trl): no peer rows in this run")
        return
    for batch, max_len in shapes:
        for label, levers in TRL_SETS:
            frozen = quantized(teacher, device, cache) if levers.get("teacher_quantize") else teacher
            student = make()
            try:
                total, seconds, tokens = trl_step(frozen, student, tok, device, batch, max_len, levers)
            except torch.cuda.OutOfMemoryError:
                rows.append([f"{name}, {batch}x{max_len}", label, "OOM", "", "", "", ""])
                continue
            finally:
                del student
                gc.collect()
            rows.append([f"{name}, {batch}x{max_len}", label, total / 2**30, "", "", seconds, tokens / seconds])


def quantized(teacher, device, cache: dict):
    """One quantized copy of the teacher per job (quantize_model goes through a safetensors folder: slow on 7B)."""
    if "nf4" not in cache:
        cache["nf4"] = quantize_model(teacher, "nf4", device=device)
    return cache["nf4"]


def run_job(name, teacher, make, tok, shapes, device, rows: list, notes: list, deadline: float, cache: dict) -> None:
    skip_bf16 = not bf16_is_native(device)
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
                               device=device.type, target_fraction=measured.tokens / (batch * max_len),
                               **{k: v for k, v in levers.items() if k in PLANNED})
            gib = measured.total_bytes / 2**30
            rows.append([f"{name}, {batch}x{max_len}", label, gib, plan.total_bytes / 2**30,
                         plan.total_bytes / measured.total_bytes, measured.seconds, measured.tokens / measured.seconds])
            if reserved is not None:
                notes.append(f"{name} {batch}x{max_len} '{label}': max reserved {reserved / 2**30:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--vocab", type=int, default=32000, help="CUDA: the models' vocabulary")
    parser.add_argument("--no-trl", dest="trl", action="store_false", help="skip the TRL GKDTrainer rows")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop starting lever sets after this")
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    rows: list = []
    notes: list = []
    for name, teacher, make, tok, shapes in jobs(device, args.vocab):
        cache: dict = {}
        run_job(name, teacher, make, tok, shapes, device, rows, notes, started + args.max_seconds, cache)
        if args.trl:
            run_trl(name, teacher, make, tok, shapes, device, rows, notes, cache)
        del teacher, cache
        gc.collect()
    notes = [
        "measured = bytes resident after a warm-up step (teacher, student, optimizer state) + the next step's peak "
        "above them (CPU: the profiler's allocation stream; CUDA: max_memory_allocated); planned = "
        "kdfast.distill.plan.plan_memory on the same configs, batch and levers, given the step's share of "
        "response tokens (target_fraction)",
        "step s: one more step outside the profiler; tokens/s: response tokens of that step per second",
        "TRL GKDTrainer rows: lmbda=0, beta=0 (forward-KL supervised KD, as kdfast's kd), full logits of both "
        "models as TRL computes them; measured over its train() of 3 steps; tokens/s counts input tokens "
        "(prompt included), kdfast's counts response tokens",
        *notes, f"whole benchmark {time.perf_counter() - started:.0f} s"]
    write_table("distill-memory", device, "Whole training step memory: measured vs planned, per lever set", HEADER,
                rows, notes)


if __name__ == "__main__":
    main()
