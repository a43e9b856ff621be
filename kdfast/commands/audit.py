"""Run (or resume) the whole distillation privacy study and write its report.

Stages are cached under the run folder by a hash of their inputs: a killed run resumes where it stopped,
and a changed setting reruns only what depends on it.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of settings laid over the preset (see kdfast/audit/config.py)")
    parser.add_argument("--preset", help="default (bundled WordNet + SmolLM2, CPU), tiny (random-init tiny:llama "
                                         "teacher, tiny:gpt2 reference: a 1-minute check, no download), paper-gpt2, "
                                         "paper-opt, paper-llama (default: the config's `preset:` key, else default)")
    parser.add_argument("--out", help="run folder (default: runs/<name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set students.epochs=2 --set attacks.mope_n=3")
    parser.add_argument("--redact", action="store_true", help="show no record text in the report")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--check", action="store_true", help="run every check the audit runs before its long work "
                        "(settings, files, models' folders, device, reading and tokenizing the records), print the "
                        "resolved configuration and stop")
    parser.add_argument("--quiet", action="store_true", help="no progress output (transformers' bars included)")


def parse_overrides(items: list[str]) -> dict:
    """--set a.b=value pairs as a nested dict; values are read as YAML (numbers, lists, true/false)."""
    from kdfast.audit import ConfigError
    from kdfast.audit.config import read_yaml

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set students.epochs=2")
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = read_yaml(value)
    return out


def main(args: argparse.Namespace) -> int:
    from kdfast.audit.run import AuditRun, run_study

    overrides = parse_overrides(args.set)
    if args.redact:
        overrides["redact"] = True
    if args.device:
        overrides["device"] = args.device
    run_study(AuditRun(config=args.config, preset=args.preset, overrides=overrides, out=args.out, check=args.check,
                       progress=not args.quiet))
    return 0
