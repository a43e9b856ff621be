"""Capture a teacher's top-k log-probs on training records once, for distillation with no teacher loaded.

  kdfast cache-teacher --teacher MODEL --data train.jsonl --k 64 --temperature 1.0 --out cache/ [--bf16]
  kdfast distill --teacher-cache cache/ --student-layers ... --teacher MODEL --data train.jsonl --out runs/kd
  kdfast cache-teacher --seqkd ... --out seqkd-cache/    then    kdfast distill --technique seqkd --teacher-cache ...

Per response token: the top-k ids (int32) and their log-probs under the teacher's full softmax at the temperature
(float16, or float32 with --logprob-dtype float32). A rerun with the same settings resumes after the last finished
shard. Use the --max-len / --max-prompt-len / --long-prompts the training run will use. With --seqkd the teacher
first samples each record's response as `kdfast distill --technique seqkd` does (give the run's --max-new-tokens,
--gen-temperature, --gen-top-k, --gen-top-p, --seed and --gen-batch-size or --batch-size), and the log-probs are
captured on those samples.
"""
from __future__ import annotations

import argparse

from kdfast.commands._common import add_fields_argument, add_model_argument, ranged
from kdfast.data.encode import LONG_PROMPTS
from kdfast.distill.run import CacheTeacherRun, run_cache_teacher
from kdfast.distill.teacher_cache import LOGPROB_DTYPES
from kdfast.distill.techniques.seqkd import Sampling
from kdfast.validation import PositiveInt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_argument(parser, "--teacher", help_text="teacher: hub id, local folder, .gguf file or 'smollm2'")
    parser.add_argument("--data", required=True, help="training records (.jsonl/.json/.csv/.parquet), or 'bundled'")
    parser.add_argument("--limit", type=ranged(PositiveInt), help="use at most this many records")
    add_fields_argument(parser)
    parser.add_argument("--out", required=True, help="cache folder (manifest.json + shard-*.safetensors)")
    parser.add_argument("--k", type=int, default=64, help="top-k ids kept per token (default 64)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the log-probs")
    parser.add_argument("--max-len", type=int, default=512, help="as the training run's max_len (default 512)")
    parser.add_argument("--max-prompt-len", type=int, help="as the training run's (default max_len // 2)")
    parser.add_argument("--long-prompts", choices=LONG_PROMPTS, default="truncate",
                        help="a prompt over --max-prompt-len, as the training run's --long-prompts (default truncate)")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per teacher forward pass")
    parser.add_argument("--shard-records", type=int, default=1024, help="records per shard file")
    parser.add_argument("--logprob-dtype", choices=tuple(LOGPROB_DTYPES), default="float16")
    parser.add_argument("--bf16", action="store_true", help="run the teacher in bfloat16")
    _add_sampling_arguments(parser.add_argument_group("seqkd (the training run's values; defaults as distill's)"))
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _add_sampling_arguments(group) -> None:
    group.add_argument("--seqkd", action="store_true",
                       help="capture on the teacher's own samples (one per record), for --technique seqkd")
    group.add_argument("--max-new-tokens", type=int, default=Sampling.max_new_tokens,
                       help="longest sampled response (default: up to --max-len)")
    group.add_argument("--gen-temperature", type=float, default=Sampling.gen_temperature)
    group.add_argument("--gen-top-k", type=int, default=Sampling.gen_top_k, help="0: off")
    group.add_argument("--gen-top-p", type=float, default=Sampling.gen_top_p, help="1: off")
    group.add_argument("--seed", type=int, default=Sampling.seed)
    group.add_argument("--gen-batch-size", type=int, default=Sampling.gen_batch_size,
                       help="the run's --gen-batch-size, else its --batch-size (default 8): the seeded draws depend "
                            "on the batches")


def main(args: argparse.Namespace) -> int:
    run_cache_teacher(CacheTeacherRun(
        teacher=args.teacher, data=args.data, out=args.out, limit=args.limit, fields=args.fields, k=args.k,
        temperature=args.temperature, max_len=args.max_len, max_prompt_len=args.max_prompt_len,
        long_prompts=args.long_prompts, batch_tokens=args.batch_tokens, shard_records=args.shard_records,
        logprob_dtype=args.logprob_dtype, sampling=_sampling(args), bf16=args.bf16, device=args.device,
        trust_remote_code=args.trust_remote_code, progress=args.progress))
    return 0


def _sampling(args: argparse.Namespace) -> Sampling | None:
    if not args.seqkd:
        return None
    return Sampling(args.max_new_tokens, args.gen_temperature, args.gen_top_k, args.gen_top_p, args.seed,
                    args.gen_batch_size)
