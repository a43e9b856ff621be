"""run_attacks(): the whole `kdfast attack` job from files to scores.parquet, metrics.json and roc.png, one call
(sharded over the processes torchrun / accelerate launch start; a rerun with the same out resumes)."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from kdfast.attacks.bulk import records_cut
from kdfast.attacks.metrics import evaluate, format_results, plot_roc
from kdfast.attacks.registry import INPUTS, REGISTRY, missing_inputs
from kdfast.attacks.scoring import AttackConfig, score
from kdfast.data import load_labeled, load_membership, load_records
from kdfast.io import atomic_write_json, claim_folder
from kdfast.models import cut_warning, default_dtype, load_model, max_len_for, resolve_device
from kdfast.runtime import init_distributed, launch_rank
from kdfast.store import digest


@dataclass
class AttackRun:
    """What one `kdfast attack` run scores, on what, and where it writes.

    Records: members + nonmembers files, or one labelled `data` file (text_column, label_column), `fields` mapping
    their columns; at most `limit` of each label. ref_models: {column: model spec} of the ref attack;
    references: {name: model spec} of rmia/lira; population: a non-member file (rmia, dc_pdd). attacks: the
    AttackConfig (its max_len None: the model's positions); all_attacks: every registry attack these inputs allow.
    bootstrap, calibration: evaluate()'s (calibration None: no thresholds). device, dtype, trust_remote_code: how
    the models load.
    """

    model: str
    out: str
    members: str | None = None
    nonmembers: str | None = None
    data: str | None = None
    text_column: str = "input"
    label_column: str = "label"
    fields: dict | None = None
    ref_models: dict[str, str] = field(default_factory=dict)
    references: dict[str, str] = field(default_factory=dict)
    population: str | None = None
    limit: int | None = None
    attacks: AttackConfig = field(default_factory=AttackConfig)
    all_attacks: bool = False
    bootstrap: int = 1000
    calibration: float | None = 0.5
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False

    def given(self) -> set[str]:
        """The registry INPUTS this run provides."""
        given = {"membership"}
        given |= {"ref_models"} if self.ref_models else set()
        given |= {"references"} if self.references else set()
        return given | ({"population", "frequency_corpus"} if self.population else set())


def run_attacks(run: AttackRun) -> dict:
    """Score, evaluate and write the run under run.out; the evaluate() results (on rank 0; {} elsewhere)."""
    start = time.perf_counter()
    run = _with_attacks(run)
    records, labels = _labeled_records(run)
    population = load_records(run.population, run.fields) if run.population else None
    # One writer per out, holding one model's results on one record set (every rank writes under rank 0's lock).
    claim = claim_folder(run.out, "--out", _identity(run, records, labels)) if launch_rank() == 0 else None
    with claim or contextlib.nullcontext():
        return _score_and_write(run, start, population, *_subset(records, labels, run.limit))


def _with_attacks(run: AttackRun) -> AttackRun:
    """The run with `all` expanded to what its inputs allow; an asked-for attack whose inputs are missing raises."""
    given = run.given()
    if run.all_attacks:
        names = tuple(a for a in REGISTRY if not missing_inputs(a, given))
        return dataclasses.replace(run, attacks=dataclasses.replace(run.attacks, attacks=names))
    for name in run.attacks.attacks:
        if missing := missing_inputs(name, given):
            flags = " and ".join(INPUTS[n][1] for n in missing)  # the CLI's terms: its flags
            raise ValueError(f"attack {name!r} needs {flags}"
                             " (ref models and references: models scored with their own tokenizer, references OUT "
                               "models that never saw the members; population: non-members disjoint from the "
                               "scored records)")
    return run


def _labeled_records(run: AttackRun) -> tuple[list[dict], list[int]]:
    if (run.members or run.nonmembers) if run.data else not (run.members and run.nonmembers):
        raise ValueError("give either --data FILE (a text and a 0/1 label column) or both --members and --nonmembers")
    if run.data:
        return load_labeled(run.data, run.text_column, run.label_column)
    return load_membership(run.members, run.nonmembers, run.fields)


def _subset(records: list[dict], labels: list[int], limit: int | None) -> tuple[list[dict], list[int]]:
    if limit is None:
        return records, labels
    keep = [i for c in (1, 0) for i in [j for j, m in enumerate(labels) if m == c][:limit]]
    return [records[i] for i in keep], [labels[i] for i in keep]


def _identity(run: AttackRun, records: list[dict], labels: list[int]) -> dict:
    """What an out folder's results are of: the model and each record file (name and content hash)."""
    model = str(Path(run.model).resolve()) if Path(run.model).exists() else run.model
    of = lambda m: digest([r for r, y in zip(records, labels) if y == m], 12)  # noqa: E731
    return {"model": model, "data": run.data, "members": f"{run.members} (records {of(1)})",
            "nonmembers": f"{run.nonmembers} (records {of(0)})"}


def _score_and_write(run: AttackRun, start: float, population, records: list[dict], labels: list[int]) -> dict:
    device = init_distributed(resolve_device(run.device))
    rank = dist.get_rank() if dist.is_initialized() else 0
    dtype = getattr(torch, run.dtype) if run.dtype else default_dtype(device)
    load = lambda spec: load_model(spec, dtype=dtype, device=device, trust_remote_code=run.trust_remote_code)  # noqa: E731
    model, tokenizer = load(run.model)
    config = dataclasses.replace(run.attacks, max_len=max_len_for(model, run.attacks.max_len, run.model))
    n_cut = records_cut(tokenizer, records, config.max_len, config.add_eos)
    warning = cut_warning(n_cut, len(records), config.max_len, run.attacks.max_len is not None)
    if warning and rank == 0:
        print(warning, file=sys.stderr, flush=True)
    refs = {name: load(spec) for name, spec in run.ref_models.items()}
    references = {name: load(spec) for name, spec in run.references.items()}
    try:
        table = score(model, tokenizer, records, ref_models=refs, membership=labels, out=run.out, config=config,
                      references=references, population=population)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return {}
    results = evaluate(table, n_bootstrap=run.bootstrap, seed=config.seed, calibration=run.calibration or None)
    out = Path(run.out)
    atomic_write_json(out / "metrics.json", {
        "model": run.model, "members": run.members, "nonmembers": run.nonmembers, "data": run.data,
        "ref_models": run.ref_models, "references": run.references, "population": run.population,
        "n_members": sum(labels), "n_nonmembers": len(labels) - sum(labels), "records_cut_to_max_len": n_cut,
        "config": dataclasses.asdict(config), "results": results})
    plot_roc(results, out / "roc.png", title=f"Membership inference on {run.model}")
    elapsed = time.perf_counter() - start
    print(format_results(results))
    cut = f"{n_cut} cut to {config.max_len} tokens; " if n_cut else ""
    print(f"\n{len(records)} records ({sum(labels)} members) scored in {elapsed:.1f}s; {cut}"
          f"wrote {out / 'scores.parquet'}, {out / 'metrics.json'}, {out / 'roc.png'}")
    return results
