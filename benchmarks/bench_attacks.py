"""Bulk membership-inference scoring (issue 5): kdfast's logit attacks from one forward pass per batch vs a
mimir-style baseline (one record at a time, full log_softmax on the CPU, one pass per attack) vs a bare forward.

python benchmarks/bench_attacks.py [--device cpu|cuda]  ->  benchmarks/results/attacks-<device>.md
python benchmarks/bench_attacks.py --calibrated  ->  benchmarks/results/attacks-calibrated-<device>.md (issue 14:
records/s of attacks.score with con_recall, dc_pdd, rmia, lira beside the logit attacks alone)
CPU: SmolLM2-135M (the carried GGUF). CUDA: a random-init LlamaForCausalLM of SmolLM2's shape in bf16 (the GGUF
cannot travel), fed by the tiny tokenizer; the timings depend on shapes, not on the weights.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import median_ms, mib, peak_bytes, write_table  # noqa: E402
from kdfast.attacks.bulk import (  # noqa: E402
    encode_scored,
    forward_stats,
    logit_scores,
    lowercased,
    mean_log_likelihoods,
    scored_text,
    shared_prefix_length,
    zlib_length,
)
from kdfast.data import IGNORE_INDEX, bundled_records, next_token_targets, pad_batch, token_budget_batches  # noqa: E402
from kdfast.models import (  # noqa: E402
    inference_context,  # noqa: E402
    load_model,
    tiny_tokenizer,
)

KS = (0.1, 0.2)
PLANS = {  # records scored, baseline subset (extrapolated per record), padded tokens per batch, timing reps per batch
    "cpu": dict(records=256, baseline=32, batch_tokens=4096, reps=3, warmup=0),
    "cuda": dict(records=2048, baseline=32, batch_tokens=16384, reps=3, warmup=1),
}
SMOLLM2_SHAPE = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                     intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
                     rms_norm_eps=1e-5, rope_theta=100000.0)


def load(device: torch.device):
    """(model, tokenizer, description) on the device."""
    if device.type == "cpu":
        model, tok = load_model("smollm2")
        return model.eval(), tok, "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized), fp32"
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE)).to(device, torch.bfloat16)
    return model.eval(), tiny_tokenizer(), "random-init Llama of SmolLM2-135M's shape, bf16 (tiny tokenizer)"


def kdfast_batch(model, batch, zlib_lengths, autocast, share_prefix=None):
    """Every logit attack of one batch: loss, zlib, min_k@ks, min_k_pp@ks from one forward pass."""
    with inference_context(batch["input_ids"].device, autocast):
        scores = logit_scores(forward_stats(model, batch, share_prefix=share_prefix), KS)
    scores["zlib"] = scores["loss"] / zlib_lengths
    return scores


def bare_batch(model, batch, autocast):
    """The model's own forward pass of the batch (logits of every position), nothing else."""
    with inference_context(batch["input_ids"].device, autocast):
        return model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}, use_cache=False).logits


def mimir_record(model, item, text, autocast):
    """mimir's way: for each attack its own forward pass of the one record, full log_softmax moved to the CPU."""
    device = next(model.parameters()).device
    ids = torch.tensor([item.input_ids], device=device)
    labels = torch.tensor(item.labels[1:])
    keep = labels != IGNORE_INDEX
    targets = labels[keep]

    def log_probs():
        with inference_context(device, autocast):
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
        return torch.log_softmax(logits.float(), -1).cpu()[keep]

    def token_lp(lp):
        return lp.gather(-1, targets[:, None]).squeeze(-1)

    def lowest(v, k):
        return v.sort().values[: max(1, int(np.ceil(k * v.numel() - 1e-9)))].mean().item()

    out = {"loss": token_lp(log_probs()).mean().item()}
    out["zlib"] = token_lp(log_probs()).mean().item() / zlib_length(text)
    lp = token_lp(log_probs())
    out.update({f"min_k@{k:g}": lowest(lp, k) for k in KS})
    full = log_probs()
    p = full.exp()
    mu = (p * full).sum(-1)
    sigma = ((p * full.square()).sum(-1) - mu.square()).clamp_min(0).sqrt()
    z = (token_lp(full) - mu) / sigma.clamp_min(1e-6)
    out.update({f"min_k_pp@{k:g}": lowest(z, k) for k in KS})
    return out


def time_interleaved(batch_runs: list[dict], device: torch.device, warmup: int, reps: int) -> dict[str, float]:
    """Seconds per method summed over batches; a batch's methods run in rotating order, so that the drifting
    load of a shared machine falls on all of them alike."""
    times: dict[str, float] = {}
    for j, runs in enumerate(batch_runs):
        names = list(runs)[j % len(runs):] + list(runs)[: j % len(runs)]
        for name in names:
            times[name] = times.get(name, 0.0) + median_ms(runs[name], device, warmup=warmup, reps=reps) / 1e3
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--records", type=int, default=None, help="records scored (default: 256 CPU, 2048 GPU)")
    parser.add_argument("--calibrated", action="store_true", help="time the calibrated attacks instead (short run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.calibrated:
        return calibrated_main(device, args.records or (48 if device.type == "cpu" else 1024))
    plan = dict(PLANS[device.type])
    plan["records"] = args.records or plan["records"]
    start = time.perf_counter()
    model, tok, source = load(device)
    autocast = device.type == "cuda"
    records = bundled_records()[: plan["records"]]
    items = encode_scored(tok, records)
    texts = [scored_text(r) for r in records]
    groups = token_budget_batches([len(it) for it in items], plan["batch_tokens"])
    batches = [{k: v.to(device) for k, v in pad_batch([items[i] for i in g], tok.pad_token_id).items()} for g in groups]
    zlibs = [np.array([zlib_length(texts[i]) for i in g]) for g in groups]
    n_tokens = sum(len(it) for it in items)
    prefix_share = sum(shared_prefix_length(b["input_ids"], b["attention_mask"], _scored(b)) * b["input_ids"].shape[0]
                       for b in batches) / n_tokens
    n_scored = sum(sum(label != IGNORE_INDEX for label in it.labels[1:]) for it in items)
    print(f"{source}: {len(records)} records, {n_tokens} tokens ({n_scored} scored), {len(groups)} batches; "
          f"loaded in {time.perf_counter() - start:.0f}s", flush=True)

    stride = max(1, len(records) // plan["baseline"])
    subset = [i for i in range(0, len(records), stride)][: plan["baseline"]]
    lower = encode_scored(tok, [lowercased(r) for r in records])
    kdfast_batch(model, batches[0], zlibs[0], autocast)  # loads the token-statistics extension
    mimir_record(model, items[0], texts[0], autocast)
    kd_scores, base_scores = {}, {}

    def runs(g, batch, zl):
        """What each method does for one batch (the baseline: for the subset's records in it)."""
        sub = [i for i in g if i in subset]
        out = {
            "bare": lambda: bare_batch(model, batch, autocast),
            "kdfast": lambda: kd_scores.update(zip(g, _rows(kdfast_batch(model, batch, zl, autocast)))),
            "other": lambda: kdfast_batch(model, batch, zl, autocast, share_prefix=device.type != "cpu"),
            "lowercase": lambda: mean_log_likelihoods(model, [lower[i] for i in g], tok.pad_token_id,
                                                      plan["batch_tokens"], autocast=autocast),
            "baseline": lambda: base_scores.update({i: mimir_record(model, items[i], texts[i], autocast) for i in sub}),
        }
        return out if sub else {k: v for k, v in out.items() if k != "baseline"}

    times = time_interleaved([runs(*a) for a in zip(groups, batches, zlibs)], device, plan["warmup"], plan["reps"])
    largest = max(range(len(batches)), key=lambda j: batches[j]["input_ids"].numel())
    peak = {"bare": peak_bytes(lambda: bare_batch(model, batches[largest], autocast), device),
            "kdfast": peak_bytes(lambda: kdfast_batch(model, batches[largest], zlibs[largest], autocast), device)}
    t_base = times["baseline"] * len(records) / len(subset)
    t_lower = times["lowercase"]
    worst = max(abs(base_scores[i][c] - kd_scores[i][c]) for i in subset for c in base_scores[i])

    n = len(records)

    def row(label, passes, seconds, peak_mib="-"):
        return [label, passes, n, seconds, n / seconds, n_tokens / seconds, t_base / seconds, seconds / times["bare"],
                peak_mib]

    rows = [
        row("bare forward (model(...).logits, batched)", 1, times["bare"], mib(peak["bare"])),
        row("kdfast: loss, zlib, min_k, min_k_pp (2 ks each)", 1, times["kdfast"], mib(peak["kdfast"])),
        row("kdfast, the same with the prompt prefix's KV cache " + ("shared" if device.type != "cpu" else "not shared")
            + " (the other setting)", 1, times["other"]),
        row("kdfast + lowercase (its own 2nd pass)", 2, times["kdfast"] + t_lower),
        row(f"mimir-style baseline (batch 1, 4 passes/record; {len(subset)} records timed, extrapolated)", 4, t_base),
    ]
    speedup, overhead = t_base / times["kdfast"], times["kdfast"] / times["bare"] - 1
    target = 8.0 if device.type == "cpu" else 10.0
    notes = [
        f"Model: {source}. Records: the first {n} bundled WordNet records (Alpaca template, response tokens scored: "
        f"{n_scored} of {n_tokens} tokens); batches of ≤ {plan['batch_tokens']} padded tokens sorted by length.",
        f"kdfast, the bare forward, the lowercase pass and the baseline run interleaved batch by batch in rotating "
        f"order on the same pre-tokenized batches (median of {plan['reps']} per batch, summed); tokenization is "
        "outside all timings.",
        f"Baseline: every {stride}th record ({len(subset)}), timed in its batch's turn (same reps) and extrapolated "
        f"per record to {n}; its scores match kdfast's to {worst:.1e} (max abs difference over all attacks).",
        f"Peak memory: one batch of {batches[largest]['input_ids'].shape[0]}x{batches[largest]['input_ids'].shape[1]} "
        "tokens, beyond the model.",
        "lowercase needs a second forward pass of the lower-cased records (different tokens): reported on its own row.",
        f"Target: ≥ {target:g}x the baseline's records/s: {speedup:.1f}x, {'met' if speedup >= target else 'NOT met'}."
        + (f" All attacks ≤ 15% over the bare forward: {100 * overhead:+.0f}%, "
           f"{'met' if overhead <= 0.15 else 'NOT met'}." if device.type == "cpu" else
           f" Over the bare forward: {100 * overhead:+.0f}%."),
        f"kdfast sends only the scored (response) positions through the LM head, and runs the unscored prefix that "
        f"all rows of a batch share (the template's header: {prefix_share:.0%} of the tokens here) once, "
        "as a KV cache; "
        "hence it beats a bare forward that computes logits at every position of every row.",
    ]
    if device.type == "cpu":
        notes.append("CPU numbers measured on a 2-core machine shared with other jobs: noisy; "
                     "rerun on a quiet machine.")
    write_table("attacks", device, "Bulk membership-inference scoring: records/s", [
        "method", "passes/record", "records", "time (s)", "records/s", "record tokens/s", "vs baseline", "time vs bare",
        "peak MiB"], rows, notes)
    print(f"total {time.perf_counter() - start:.0f}s")


def _scored(batch) -> torch.Tensor:
    return next_token_targets(batch["labels"]) != IGNORE_INDEX


def _rows(scores: dict[str, np.ndarray]) -> list[dict[str, float]]:
    return [{k: float(v[b]) for k, v in scores.items()} for b in range(len(scores["loss"]))]



CALIBRATED_RUNS = {  # label -> (attacks, references used)
    "logit attacks alone (loss, zlib, min_k, min_k_pp)": (("loss", "zlib", "min_k", "min_k_pp"), 0),
    "+ dc_pdd (no extra pass)": (("loss", "zlib", "min_k", "min_k_pp", "dc_pdd"), 0),
    "+ lira (2 references: 1 pass each)": (("loss", "zlib", "min_k", "min_k_pp", "lira"), 2),
    "+ rmia (2 references; references and target also score the population)": (
        ("loss", "zlib", "min_k", "min_k_pp", "rmia"), 2),
    "+ rmia, lira (sharing the 2 references' passes)": (("loss", "zlib", "min_k", "min_k_pp", "rmia", "lira"), 2),
    "+ recall, con_recall (3 prefix passes: 1 shared)": (
        ("loss", "zlib", "min_k", "min_k_pp", "recall", "con_recall"), 0),
}


def calibrated_main(device: torch.device, n: int) -> None:
    """attacks.score end to end (tokenization included) on a random-init Llama of SmolLM2's width, fewer layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdfast import attacks

    shape = dict(SMOLLM2_SHAPE, num_hidden_layers=3 if device.type == "cpu" else 30, vocab_size=1024)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16

    def make(seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**shape)).to(device, dtype).eval()

    tok, target, refs = tiny_tokenizer(), make(0), {"a": make(1), "b": make(2)}
    records, population = bundled_records()[:n], bundled_records()[n: n + n // 2]
    membership = [1] * (n // 2) + [0] * (n - n // 2)
    batch_tokens = 4096 if device.type == "cpu" else 16384
    rows, base = [], None
    for label, (names, n_refs) in CALIBRATED_RUNS.items():
        def run(names=names, n_refs=n_refs):
            attacks.score(target, tok, records, names, membership=membership, progress=False,
                          references=dict(list(refs.items())[:n_refs]) or None, population=population,
                          batch_tokens=batch_tokens)
        seconds = median_ms(run, device, warmup=1 if base is None else 0, reps=3) / 1e3
        base = base or seconds
        rows.append([label, n, seconds, n / seconds, seconds / base])
    notes = [f"Target and references: random-init LlamaForCausalLM, SmolLM2-135M's width, {shape['num_hidden_layers']} "
             f"layers, vocab 1024 (the tiny tokenizer), {str(dtype).split('.')[-1]}; timings depend on shapes only.",
             f"{n} bundled WordNet records ({n // 2} members), population {len(population)} records; median of 3 "
             "whole score() calls, no out= (so nothing is reused between calls).",
             "rmia and lira need each reference's pass over the records (rmia: and the population), computed once "
             "per score() call and shared by both; dc_pdd reuses the target's pass; con_recall adds the member-prefix "
             "pass to recall's non-member-prefix pass."]
    if device.type == "cpu":
        notes.append("Measured on a 2-core CPU shared with other jobs: times are noisy; the ratios are the figure.")
    write_table("attacks-calibrated", device, "Calibrated attacks: records/s of attacks.score",
                ["attacks", "records", "time (s)", "records/s", "time vs logit attacks alone"], rows, notes)


if __name__ == "__main__":
    main()
