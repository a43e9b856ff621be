"""run_study() and run_report(): the whole `kdfast audit` and `kdfast report` jobs, one call each (the settings
resolved and checked, the study run or its report rewritten / exported)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kdfast.audit.config import load_config
from kdfast.audit.pipeline import prepare, run_audit
from kdfast.audit.report import auc_table, export_run, read_results, redacted, text_table, write_report


@dataclass
class AuditRun:
    """One `kdfast audit` run: the settings are the preset (`preset`, else the YAML file's `preset:` key, else
    default) with the YAML file `config` and `overrides` (nested keys) laid over it; out: the run folder (None:
    runs/<name>). check: run every check the audit runs before its long work, print the resolved settings and the
    data's counts, and stop."""

    config: str | None = None
    preset: str | None = None
    overrides: dict = field(default_factory=dict)
    out: str | None = None
    check: bool = False
    progress: bool = True


def run_study(run: AuditRun) -> dict:
    """Run (or resume) the study: its results (also in <out>/results.json); with run.check the data's counts."""
    cfg = load_config(run.config, run.preset, run.overrides)
    if not run.check:
        return run_audit(cfg, run.out, progress=run.progress)
    import yaml

    counts = prepare(cfg)
    fit = counts["long_prompts"]
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")
    print(f"\ndata: {counts['private']} members, {counts['public']} public, {counts['nonmembers']} non-members; "
          f"{fit['truncated']} prompt(s) truncated, {fit['dropped']} record(s) dropped over "
          f"data.max_prompt_len={cfg.data.max_prompt_len} (data.long_prompts={fit['policy']})")
    print(f"configuration '{cfg.name}' is valid")
    return counts


@dataclass
class ReportRun:
    """One `kdfast report` run: the audit run folder `run` (holding results.json); redact: drop every record text
    from its report; export: instead, write a new shareable folder with no record text (the run is left as it is)."""

    run: str
    redact: bool = False
    export: str | None = None


def run_report(run: ReportRun) -> dict[str, Path]:
    """Rewrite (or export) the report; prints the AUC table and where the report went; returns the written paths."""
    results = read_results(run.run)
    if run.export:
        paths = export_run(run.run, run.export)
    else:
        paths = write_report(redacted(results) if run.redact else results, run.run)
    print(text_table(*auc_table(results)))
    print(f"\nReport: {paths['report']}" + (f"\nExported to {run.export}: no record text" if run.export else ""))
    return paths
