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
import dataclasses
import json
import typing

from kdfast.commands._common import add_fields_argument, ranged
from kdfast.distill import DistillConfig, DistillError
from kdfast.distill import config as config_module
from kdfast.distill.run import DistillRun, run_distill
from kdfast.validation import PositiveInt, choices

# Options the command handles itself, not DistillConfig fields: DistillRun's (its `config` is built from --config).
_OWN = tuple(f.name for f in dataclasses.fields(DistillRun))


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


def _config(args: argparse.Namespace) -> DistillConfig:
    values = json.loads(open(args.config).read()) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k not in _OWN and k != "command"})
    return DistillConfig.from_dict(values)


def _layers(text: str | None) -> list[int] | None:
    """--student-layers '0,10,20,29' -> [0, 10, 20, 29]."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise DistillError(f"--student-layers {text!r}: give teacher block indices separated by commas, "
                           "e.g. 0,10,20,29") from None


def main(args: argparse.Namespace) -> int:
    run_distill(DistillRun(
        config=_config(args), data=args.data, teacher=args.teacher, student=args.student,
        student_layers=_layers(args.student_layers), student_num_layers=args.student_num_layers,
        teacher_tokenizer=args.teacher_tokenizer, eval_data=args.eval_data, lm_data=args.lm_data, limit=args.limit,
        fields=args.fields, trust_remote_code=args.trust_remote_code))
    return 0

