"""Distill a teacher into a student with one technique (sft, kd, seqkd, imitkd, gkd, minillm, distillm).

  kdfast distill --teacher T --student S --technique kd --data train.jsonl --out runs/kd
  kdfast distill --teacher T --student-layers 0,10,20,29 --technique distillm --data train.jsonl \\
      --eval-data val.jsonl --out runs/distillm --bf16
  accelerate launch -m kdfast distill ...     (several processes/GPUs: DDP, or FSDP/DeepSpeed from its config)

Every DistillConfig field is an option (--batch-size, --grad-accum, --lr, --loss rkl, --student-gen-fraction ...);
unset ones take the technique's defaults. The run resumes from its last checkpoint with --resume; the student is
saved with its tokenizer under OUT/final (kdfast.models.load_model / from_pretrained load it).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import typing

import torch

from kdfast.commands._common import add_fields_argument, ranged
from kdfast.data import bundled_records, load_records
from kdfast.distill import DistillConfig, Distiller, DistillError, make_student
from kdfast.distill import config as config_module
from kdfast.io import claim_folder
from kdfast.models import load_model, load_tokenizer, resolve_device
from kdfast.runtime import launch_rank
from kdfast.validation import PositiveInt, choices

# Options the command handles itself (not DistillConfig fields).
_OWN = ("teacher", "student", "student_layers", "student_num_layers", "data", "eval_data", "lm_data", "limit",
        "fields", "config", "trust_remote_code", "teacher_tokenizer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    models = parser.add_argument_group("models")
    models.add_argument("--teacher", help="teacher: hub id, local folder, .gguf file or 'smollm2' (not for sft)")
    student = models.add_mutually_exclusive_group(required=True)
    student.add_argument("--student", help="student: hub id, local folder or .gguf file (teacher's tokenizer)")
    student.add_argument("--student-layers", help="build the student from these teacher blocks, e.g. 0,10,20,29")
    student.add_argument("--student-num-layers", type=ranged(PositiveInt),
                         help="build the student from k evenly spaced teacher blocks")
    models.add_argument("--teacher-tokenizer", help="the teacher's tokenizer where it is not the --teacher model's "
                                                    "own (hub id, folder, .gguf, 'smollm2'); with --loss uld it may "
                                                    "differ from the student's")
    models.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="training records (.jsonl/.json/.csv/.parquet with instruction, "
                                                    "input?, response), or 'bundled' (the WordNet set)")
    data.add_argument("--eval-data", help="validation records (DistiLLM's schedule needs them)")
    data.add_argument("--lm-data", help="pretraining text ({'text': ...} records) for the LM-loss term")
    data.add_argument("--limit", type=ranged(PositiveInt), help="use at most this many records of each file")
    add_fields_argument(data)
    data.add_argument("--config", help="JSON file of DistillConfig fields (options given here override it)")
    options = parser.add_argument_group("training (DistillConfig; unset: the technique's default)")
    hints = typing.get_type_hints(DistillConfig, vars(config_module))
    for f in dataclasses.fields(DistillConfig):
        _add_field(options, f, hints[f.name])


def _add_field(group, f: dataclasses.Field, hint) -> None:
    flag = "--" + f.name.replace("_", "-")
    kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata.get("help", "")}
    allowed = choices(hint)  # a Literal field: the config's own list of values
    kind = ([a for a in typing.get_args(hint) if a is not type(None)] or [hint])[0]
    if allowed:
        group.add_argument(flag, choices=[c for c in allowed if c is not None], **kw)
    elif kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif typing.get_origin(kind) is tuple:
        group.add_argument(flag, nargs=len(typing.get_args(kind)), type=float, metavar=("B1", "B2"), **kw)
    else:
        group.add_argument(flag, type=kind if kind in (int, float) else str, metavar=kind.__name__.upper(), **kw)


def _records(path: str | None, limit: int | None, fields: dict | None) -> list[dict] | None:
    if path is None:
        return None
    records = bundled_records() if path == "bundled" else load_records(path, fields)
    return records[:limit] if limit else records


def _config(args: argparse.Namespace) -> DistillConfig:
    values = json.loads(open(args.config).read()) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in _OWN and k != "command"})
    return DistillConfig.from_dict(values)


def main(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg.out is None:
        raise DistillError("--out is required: the folder for checkpoints, metrics and the final student")
    train = _records(args.data, args.limit, args.fields)
    evals, lm = _records(args.eval_data, args.limit, args.fields), _records(args.lm_data, args.limit, args.fields)
    # One writer per --out (rank 0 holds the lock for every process of a launch); it also clears killed runs'
    # temporaries.
    claim = claim_folder(cfg.out, "--out") if launch_rank() == 0 else contextlib.nullcontext()
    with claim:
        return _train(args, cfg, train, evals, lm)


def _train(args: argparse.Namespace, cfg: DistillConfig, train, evals, lm) -> int:
    teacher = teacher_tok = None
    if cfg.needs_teacher or args.student is None:
        if not args.teacher:
            raise DistillError(f"technique {cfg.technique!r} needs --teacher" if cfg.needs_teacher else
                               "--student-layers/--student-num-layers build the student from --teacher: give it")
        # A student built from the teacher's blocks needs them unquantized; the Distiller quantizes afterwards.
        quantize = cfg.teacher_quantize if args.student is not None and cfg.needs_teacher else None
        teacher, teacher_tok = load_model(args.teacher, trust_remote_code=args.trust_remote_code, quantize=quantize)
        if args.teacher_tokenizer:
            teacher_tok = load_tokenizer(args.teacher_tokenizer, trust_remote_code=args.trust_remote_code)
    if args.student is not None:  # a QLoRA base is quantized while it loads, never held in full precision
        device = _process_device(cfg.device) if cfg.student_quantize else None
        student, tokenizer = load_model(args.student, trust_remote_code=args.trust_remote_code, dtype=torch.float32,
                                        quantize=cfg.student_quantize, device=device)
    else:
        layers = [int(x) for x in args.student_layers.split(",")] if args.student_layers else None
        student = make_student(teacher, layers, num_layers=args.student_num_layers).float()
        tokenizer = teacher_tok
    teacher = teacher if cfg.needs_teacher else None  # one that only gave the student its blocks is let go
    distiller = Distiller(teacher, student, tokenizer, cfg,
                          teacher_tokenizer=teacher_tok if cfg.needs_teacher else None)
    sources = {"train": args.data, "eval": args.eval_data, "lm": args.lm_data}
    summary = distiller.train(train, evals, lm, sources={k: v for k, v in sources.items() if v})
    if distiller.accelerator.is_main_process:
        print(summary)
    return 0


def _process_device(device: str | None) -> torch.device:
    """This process's student device before the Distiller's accelerator exists: --device, else under a launch
    cuda:LOCAL_RANK (accelerate's choice), else kdfast.models.resolve_device's."""
    if device is None and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return resolve_device(device)
