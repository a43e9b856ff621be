"""Predict the peak memory of a distillation step from the two models' configs (no weights loaded).

  kdfast plan --teacher meta-llama/Llama-2-7b-hf --student TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T \
      --batch-size 1 --seq-len 2048 --teacher-quantize nf4 --optim adamw_8bit --gradient-checkpointing --budget 24GB
"""
from __future__ import annotations

import argparse
import json
from typing import Annotated

from kdfast.commands._common import ranged
from kdfast.distill.config import STUDENT_QUANTIZATIONS
from kdfast.distill.optim import MASTER_WEIGHTS, OPTIMIZERS
from kdfast.distill.plan import plan_memory
from kdfast.models import QUANTIZATIONS
from kdfast.validation import NonNegativeInt, PositiveInt, Range


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--teacher", help="teacher config: local folder, config.json, tiny:<family> or hub id "
                        "(omit for sft)")
    parser.add_argument("--student", required=True, help="student config, as --teacher")
    parser.add_argument("--batch-size", type=ranged(PositiveInt), default=1)
    parser.add_argument("--seq-len", type=ranged(PositiveInt), default=2048)
    parser.add_argument("--teacher-quantize", choices=QUANTIZATIONS)
    parser.add_argument("--optim", choices=OPTIMIZERS, default="adamw")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--lora-rank", type=ranged(NonNegativeInt), default=0)
    parser.add_argument("--master-weights", choices=MASTER_WEIGHTS, default="fp32")
    parser.add_argument("--student-quantize", choices=STUDENT_QUANTIZATIONS,
                        help="QLoRA: the student's base in NF4 under its LoRA adapters (needs --lora-rank)")
    parser.add_argument("--no-fused", dest="fused", action="store_false", help="materialized logits")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--target-fraction", type=ranged(Annotated[float, Range(gt=0, le=1)]), default=1.0,
                        help="share of the tokens that are loss targets (response tokens); 1.0, the default, is an "
                             "upper bound on the loss's memory")
    parser.add_argument("--budget", help="memory budget, e.g. 24GB: says whether it fits, else the levers that would")
    parser.add_argument("--json", action="store_true", help="print one JSON object (total_bytes, parts, ...)")


def main(args: argparse.Namespace) -> int:
    plan = plan_memory(args.teacher or None, args.student, batch_size=args.batch_size, seq_len=args.seq_len,
                       teacher_quantize=args.teacher_quantize, optim=args.optim,
                       gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.lora_rank,
                       master_weights=args.master_weights, student_quantize=args.student_quantize, fused=args.fused,
                       device=args.device, target_fraction=args.target_fraction, budget=args.budget)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.table())
    return 0
