"""Score membership-inference attacks on a model: members vs non-members -> scores.parquet, metrics.json, roc.png.

Run it under `accelerate launch -m kdfast attack ...` or `torchrun --nproc_per_node N -m kdfast attack ...` to
shard the records over processes/GPUs; a rerun with the same --out resumes where the last one stopped.
"""
from __future__ import annotations

import argparse
import re
from typing import Annotated

from kdfast.attacks import AttackConfig
from kdfast.attacks.registry import attack_names, default_attacks
from kdfast.attacks.run import AttackRun, run_attacks
from kdfast.commands._common import add_common_model_options, add_fields_argument, add_model_argument, ranged
from kdfast.validation import Fraction, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser, help_text="target model: hub id, local folder, .gguf file, or 'smollm2'")
    parser.add_argument("--members", help="records in the model's training data (.jsonl/.json/.csv/.parquet)")
    parser.add_argument("--nonmembers", help="records not in the training data (same formats)")
    parser.add_argument("--data", help="instead of --members/--nonmembers: one benchmark file (WikiMIA, MIMIR) with a "
                                       "text column and a 0/1 label column")
    parser.add_argument("--text-column", default="input", help="--data's text column (default: input)")
    parser.add_argument("--label-column", default="label", help="--data's label column, 1 = member (default: label)")
    parser.add_argument("--add-eos", action="store_true",
                        help="score text records with an EOS appended (default: tokenizer(text) as it is)")
    parser.add_argument("--reference", action="append", default=[], metavar="NAME=MODEL",
                        help="OUT reference model of rmia and lira (never saw the members), with its own tokenizer; "
                             "repeat")
    parser.add_argument("--population", help="non-member records disjoint from the scored ones: rmia's population "
                                             "and dc_pdd's token frequencies")
    parser.add_argument("--rmia-a", type=ranged(Fraction), default=1.0,
                        help="RMIA's offline correction a (default 1: none)")
    parser.add_argument("--rmia-gamma", type=ranged(PositiveFloat), default=1.0, help="RMIA's threshold γ (default 1)")
    parser.add_argument("--calibration", type=ranged(Annotated[float, Range(ge=0, lt=1)]), default=0.5,
                        help="fraction of non-members on which TPR@FPR thresholds are chosen (default 0.5; 0: none)")
    parser.add_argument("--ref-model", action="append", default=[], metavar="[NAME=]MODEL",
                        help="reference model for the 'ref' attack, scored with its own tokenizer; repeat for several "
                             "(column ref_NAME; a single one without NAME= is column 'ref')")
    parser.add_argument("--attacks", nargs="+", default=list(default_attacks()), metavar="ATTACK",
                        help=f"any of {', '.join(attack_names())} (the attack registry) or 'all' "
                             f"(default: {' '.join(default_attacks())}; "
                             "ref is added when --ref-model is given)")
    parser.add_argument("--ks", nargs="+", type=ranged(Annotated[float, Range(gt=0, le=1)]), default=[0.1, 0.2],
                        help="Min-K%% fractions (default 0.1 0.2)")
    parser.add_argument("--mope-n", type=ranged(PositiveInt), default=10, help="MoPe perturbations (default 10)")
    parser.add_argument("--mope-sigma", type=ranged(NonNegativeFloat), default=0.01,
                        help="MoPe noise std (default 0.01; the paper used 0.005 for teachers)")
    parser.add_argument("--recall-shots", type=ranged(PositiveInt), default=3,
                        help="non-members held out as ReCaLL's prefix (default 3)")
    parser.add_argument("--batch-tokens", type=ranged(PositiveInt), default=8192,
                        help="padded tokens per forward pass (default 8192)")
    parser.add_argument("--max-len", type=ranged(PositiveInt), default=None,
                        help="cut each record to this many tokens (default: the model's positions)")
    parser.add_argument("--padding-side", choices=["right", "left"], default="right")
    parser.add_argument("--all-tokens", action="store_true",
                        help="score prompt tokens too (default: response tokens only)")
    parser.add_argument("--limit", type=ranged(PositiveInt), default=None,
                        help="use at most this many records of each file")
    add_fields_argument(parser)
    parser.add_argument("--bootstrap", type=ranged(NonNegativeInt), default=1000,
                        help="bootstrap resamples of the AUC CI (default 1000; 0: none)")
    parser.add_argument("--seed", type=ranged(NonNegativeInt), default=0,
                        help="MoPe noise, ReCaLL prefix choice, bootstrap")
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    add_common_model_options(parser)


def parse_ref_models(specs: list[str]) -> dict[str, str]:
    """'NAME=MODEL' or 'MODEL' specs -> {column: model spec}."""
    refs = {}
    for i, spec in enumerate(specs, 1):
        match = re.fullmatch(r"(\w+)=(.+)", spec)
        name = f"ref_{match[1]}" if match else ("ref" if len(specs) == 1 else f"ref_{i}")
        if name in refs:
            raise ValueError(f"two reference models are named {name!r}; give each a distinct NAME=")
        refs[name] = match[2] if match else spec
    return refs


def parse_references(specs: list[str]) -> dict[str, str]:
    """'NAME=MODEL' specs of --reference -> {NAME: model spec}."""
    refs = {}
    for spec in specs:
        match = re.fullmatch(r"(\w+)=(.+)", spec)
        if not match:
            raise ValueError(f"--reference {spec!r}: write NAME=MODEL "
                             "(e.g. --reference base=HuggingFaceTB/SmolLM2-135M)")
        if match[1] in refs:
            raise ValueError(f"two --reference models are named {match[1]!r}; give each a distinct NAME")
        refs[match[1]] = match[2]
    return refs


def main(args: argparse.Namespace) -> int:
    given = tuple(a for a in args.attacks if a != "all")
    config = AttackConfig(attacks=given or default_attacks(), response_only=not args.all_tokens, ks=tuple(args.ks),
                          mope_n=args.mope_n, mope_sigma=args.mope_sigma, recall_shots=args.recall_shots,
                          batch_tokens=args.batch_tokens, max_len=args.max_len, padding_side=args.padding_side,
                          seed=args.seed, add_eos=args.add_eos, rmia_a=args.rmia_a, rmia_gamma=args.rmia_gamma)
    run_attacks(AttackRun(
        model=args.model, out=args.out, members=args.members, nonmembers=args.nonmembers, data=args.data,
        text_column=args.text_column, label_column=args.label_column, fields=args.fields,
        ref_models=parse_ref_models(args.ref_model), references=parse_references(args.reference),
        population=args.population, limit=args.limit, attacks=config, all_attacks="all" in args.attacks,
        bootstrap=args.bootstrap, calibration=args.calibration, device=args.device, dtype=args.dtype,
        trust_remote_code=args.trust_remote_code))
    return 0
