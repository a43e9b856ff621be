"""Capture a teacher's top-k log-probs on training records once, for distillation with no teacher loaded.

  kdfast cache-teacher --teacher MODEL --data train.jsonl --k 64 --temperature 1.0 --out cache/ [--bf16]
  kdfast distill --teacher-cache cache/ --student-layers ... --teacher MODEL --data train.jsonl --out runs/kd

Per response token: the top-k ids (int32) and their log-probs under the teacher's full softmax at the temperature
(float16, or float32 with --logprob-dtype float32). A rerun with the same settings resumes after the last finished
shard. Use the --max-len / --max-prompt-len / --long-prompts the training run will use.
"""
from __future__ import annotations

import argparse

import torch

from kdfast.commands._common import add_fields_argument, add_model_argument, ranged
from kdfast.data import bundled_records, load_records
from kdfast.distill.teacher_cache import LOGPROB_DTYPES, cache_teacher
from kdfast.models import load_model
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
    parser.add_argument("--long-prompts", choices=("truncate", "drop", "error"), default="truncate",
                        help="a prompt over --max-prompt-len, as the training run's --long-prompts (default truncate)")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per teacher forward pass")
    parser.add_argument("--shard-records", type=int, default=1024, help="records per shard file")
    parser.add_argument("--logprob-dtype", choices=tuple(LOGPROB_DTYPES), default="float16")
    parser.add_argument("--bf16", action="store_true", help="run the teacher in bfloat16")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    records = bundled_records() if args.data == "bundled" else load_records(args.data, args.fields)
    records = records[: args.limit] if args.limit else records
    teacher, tokenizer = load_model(args.teacher, dtype=torch.bfloat16 if args.bf16 else None, device=args.device,
                                    trust_remote_code=args.trust_remote_code)
    summary = cache_teacher(teacher, tokenizer, records, k=args.k, out=args.out, temperature=args.temperature,
                            max_len=args.max_len, max_prompt_len=args.max_prompt_len, long_prompts=args.long_prompts,
                            batch_tokens=args.batch_tokens, shard_records=args.shard_records,
                            logprob_dtype=args.logprob_dtype, progress=args.progress)
    print(summary)
    return 0
