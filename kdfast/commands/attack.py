"""Score membership-inference attacks on a model: members vs non-members -> scores.parquet, metrics.json, roc.png.

Run it under `accelerate launch -m kdfast attack ...` or `torchrun --nproc_per_node N -m kdfast attack ...` to
shard the records over processes/GPUs; a rerun with the same --out resumes where the last one stopped.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import torch.distributed as dist

from kdfast.attacks import (
    ATTACKS,
    DEFAULT_ATTACKS,
    AttackConfig,
    evaluate,
    format_results,
    plot_roc,
    records_cut,
    score,
)
from kdfast.commands._common import (
    add_common_model_options,
    add_fields_argument,
    add_model_argument,
    cut_warning,
    load_membership,
    max_len_for,
    ranged,
)
from kdfast.data import load_labeled, load_records
from kdfast.io import atomic_write_json, claim_folder
from kdfast.models import default_dtype, load_model, resolve_device
from kdfast.store import digest
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
    parser.add_argument("--attacks", nargs="+", default=list(DEFAULT_ATTACKS), metavar="ATTACK",
                        help=f"any of {', '.join(ATTACKS)} or 'all' (default: {' '.join(DEFAULT_ATTACKS)}; "
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


def _available(attack: str, args) -> bool:
    """Whether the arguments give what an attack needs (its reference models, its population)."""
    needs = {"ref": [args.ref_model], "rmia": [args.reference, args.population], "lira": [args.reference],
             "dc_pdd": [args.population]}
    return all(needs.get(attack, []))


def _labeled_records(args) -> tuple[list[dict], list[int]]:
    if (args.members or args.nonmembers) if args.data else not (args.members and args.nonmembers):
        raise ValueError("give either --data FILE (a text and a 0/1 label column) or both --members and --nonmembers")
    if args.data:
        return load_labeled(args.data, args.text_column, args.label_column)
    return load_membership(args.members, args.nonmembers, args.fields)


def _init_distributed(device_arg: str | None) -> torch.device:
    """Join the process group that torchrun / accelerate launch describe in the environment; the device of this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_arg)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _subset(records: list[dict], labels: list[int], limit: int | None) -> tuple[list[dict], list[int]]:
    if limit is None:
        return records, labels
    keep = [i for c in (1, 0) for i in [j for j, m in enumerate(labels) if m == c][:limit]]
    return [records[i] for i in keep], [labels[i] for i in keep]


def _identity(args: argparse.Namespace, records: list[dict], labels: list[int]) -> dict:
    """What an --out folder's results are of: the model and each record file (name and content hash)."""
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    of = lambda m: digest([r for r, y in zip(records, labels) if y == m], 12)  # noqa: E731
    return {"model": model, "data": args.data, "members": f"{args.members} (records {of(1)})",
            "nonmembers": f"{args.nonmembers} (records {of(0)})"}


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    attacks = tuple(a for a in ATTACKS if _available(a, args)) if "all" in args.attacks else tuple(args.attacks)
    config = AttackConfig(attacks=attacks, response_only=not args.all_tokens, ks=tuple(args.ks), mope_n=args.mope_n,
                          mope_sigma=args.mope_sigma, recall_shots=args.recall_shots, batch_tokens=args.batch_tokens,
                          max_len=args.max_len, padding_side=args.padding_side, seed=args.seed, add_eos=args.add_eos,
                          rmia_a=args.rmia_a, rmia_gamma=args.rmia_gamma)
    if "ref" in attacks and not args.ref_model:
        raise ValueError("attack 'ref' needs --ref-model MODEL (a reference model scored with its own tokenizer)")
    needs = {"rmia": "--reference NAME=MODEL and --population FILE", "lira": "--reference NAME=MODEL",
             "dc_pdd": "--population FILE"}
    for name in attacks:
        if name in needs and not _available(name, args):
            raise ValueError(f"attack {name!r} needs {needs[name]} (references: OUT models that never saw the members; "
                             "population: non-members disjoint from the scored records)")
    ref_specs = parse_ref_models(args.ref_model)
    reference_specs = parse_references(args.reference)
    records, labels = _labeled_records(args)
    population = load_records(args.population, args.fields) if args.population else None
    # One writer per --out, holding one model's results on one record set (every rank writes under rank 0's lock).
    claim = (claim_folder(args.out, "--out", _identity(args, records, labels))
             if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext())
    with claim:
        return _run(args, start, attacks, config, ref_specs, reference_specs, population,
                    *_subset(records, labels, args.limit))


def _run(args, start, attacks, config, ref_specs, reference_specs, population, records, labels) -> int:
    device = _init_distributed(args.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    load = lambda spec: load_model(spec, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code)  # noqa: E731
    model, tokenizer = load(args.model)
    config = dataclasses.replace(config, max_len=max_len_for(model, args.max_len, args.model))
    n_cut = records_cut(tokenizer, records, config.max_len, config.add_eos)
    warning = cut_warning(n_cut, len(records), config.max_len, args.max_len is not None)
    if warning and rank == 0:
        print(warning, file=sys.stderr, flush=True)
    refs = {name: load(spec) for name, spec in ref_specs.items()}
    references = {name: load(spec) for name, spec in reference_specs.items()}
    try:
        table = score(model, tokenizer, records, ref_models=refs, membership=labels, out=args.out, config=config,
                      references=references, population=population)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return 0
    results = evaluate(table, n_bootstrap=args.bootstrap, seed=args.seed, calibration=args.calibration or None)
    out = Path(args.out)
    atomic_write_json(out / "metrics.json", {
        "model": args.model, "members": args.members, "nonmembers": args.nonmembers, "data": args.data,
        "ref_models": ref_specs, "references": reference_specs, "population": args.population,
        "n_members": sum(labels), "n_nonmembers": len(labels) - sum(labels), "records_cut_to_max_len": n_cut,
        "config": dataclasses.asdict(config), "results": results})
    plot_roc(results, out / "roc.png", title=f"Membership inference on {args.model}")
    elapsed = time.perf_counter() - start
    print(format_results(results))
    cut = f"{n_cut} cut to {config.max_len} tokens; " if n_cut else ""
    print(f"\n{len(records)} records ({sum(labels)} members) scored in {elapsed:.1f}s; {cut}"
          f"wrote {out / 'scores.parquet'}, {out / 'metrics.json'}, {out / 'roc.png'}")
    return 0
