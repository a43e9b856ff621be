"""score(): every membership-inference attack of docs/design.md §5 over a record set, as one table (higher = member).

Records are grouped by length under a token budget; each finished group is written atomically when an
output folder is given, so a rerun resumes; under torch.distributed the records are sharded over the
processes and the table is gathered on every rank.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from kdfast.attacks.bulk import encode_scored, forward_stats, logit_scores
from kdfast.attacks.dc_pdd import token_frequencies
from kdfast.attacks.metrics import META_COLUMNS, with_percentiles
from kdfast.attacks.recall import choose_prefix, prefix_ids
from kdfast.attacks.ref import pad_id
from kdfast.attacks.references import cached_mean_ll, resolve_references
from kdfast.attacks.registry import REGISTRY, Group, attack_names, default_attacks, selected
from kdfast.data import pad_batch, record_key, token_budget_batches
from kdfast.generation import eval_mode
from kdfast.io import atomic_path
from kdfast.models import context_len, inference_context, model_device, transformer_blocks
from kdfast.runtime import rank_and_world
from kdfast.store import Parts, digest, digest_bytes, model_fingerprint, tokenizer_fingerprint

# The registry's names at import (kdfast.attacks.registry.REGISTRY is the list; these are its public face).
ATTACKS = attack_names()
DEFAULT_ATTACKS = default_attacks()
SCORES_FILE = "scores.parquet"


@dataclass
class AttackConfig:
    """What to score and how (defaults: the study's settings; docs/design.md §5).

    attacks: names of the registry (ATTACKS). response_only: score the response tokens of instruction records (a
    {"text"} record is always scored whole). ks: Min-K% fractions. mope_n, mope_sigma: MoPe perturbations and their
    std. recall_shots: non-members in ReCaLL's prefix. batch_tokens: padded tokens per forward pass.
    max_len: cut each record to this many tokens (None: to the model's positions, see models.model_positions;
    never past them). padding_side: "right" or "left" (scores do not depend on it).
    seed: MoPe noise and the ReCaLL prefix choice. autocast: bf16 autocast (None: on a GPU only).
    add_eos: score {"text"} records with an EOS appended (default: tokenizer(text) as it is, as the field does).
    rmia_a, rmia_gamma: RMIA's offline correction a (1: none) and its threshold γ on the likelihood ratio.
    con_recall_gamma: Con-ReCaLL's weight γ of the member-prefix likelihood. dc_pdd_clip: DC-PDD's upper bound.
    """

    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    response_only: bool = True
    ks: tuple[float, ...] = (0.1, 0.2)
    mope_n: int = 10
    mope_sigma: float = 0.01
    recall_shots: int = 3
    batch_tokens: int = 8192
    max_len: int | None = None
    padding_side: str = "right"
    seed: int = 0
    autocast: bool | None = None
    add_eos: bool = False
    rmia_a: float = 1.0
    rmia_gamma: float = 1.0
    con_recall_gamma: float = 1.0
    dc_pdd_clip: float = 0.01

    def __post_init__(self):
        self.attacks = (self.attacks,) if isinstance(self.attacks, str) else tuple(dict.fromkeys(self.attacks))
        self.ks = tuple(float(k) for k in self.ks)
        unknown = [a for a in self.attacks if a not in REGISTRY]
        if unknown or not self.attacks:
            raise ValueError(f"unknown attack(s) {unknown or '(none given)'}; choose from {', '.join(REGISTRY)}")
        if not self.ks or not all(0 < k <= 1 for k in self.ks):
            raise ValueError(f"Min-K% fractions must lie in (0, 1], got {self.ks}")
        if self.mope_n < 1 or self.mope_sigma < 0:
            raise ValueError(f"MoPe needs mope_n ≥ 1 and mope_sigma ≥ 0 (got {self.mope_n}, {self.mope_sigma})")
        if self.recall_shots < 1:
            raise ValueError(f"recall_shots must be ≥ 1, got {self.recall_shots}")
        if self.batch_tokens < 1:
            raise ValueError(f"batch_tokens must be ≥ 1, got {self.batch_tokens}")
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len (CLI --max-len) must be ≥ 2: a token to predict from and one to score; "
                             f"got {self.max_len}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if not 0 <= self.rmia_a <= 1 or self.rmia_gamma <= 0 or self.dc_pdd_clip <= 0:
            raise ValueError(f"rmia_a must lie in [0, 1], rmia_gamma and dc_pdd_clip be > 0 (got {self.rmia_a}, "
                             f"{self.rmia_gamma}, {self.dc_pdd_clip})")

    def columns(self, ref_names: list[str], n_blocks: int) -> list[str]:
        """The table's score columns, in the registry's order."""
        return [c for a in REGISTRY.values() if a.name in self.attacks
                for c in a.column_names(self, ref_names, n_blocks)]


def score(model: nn.Module, tokenizer, records: list[dict], attacks=None, *, ref_model: nn.Module | None = None,
          ref_tokenizer=None, ref_models: dict | None = None, membership=None, recall_prefix: list[dict] | None = None,
          references: dict | None = None, population: list[dict] | None = None,
          member_prefix: list[dict] | None = None, frequency_corpus: list[dict] | None = None,
          out: str | Path | None = None, progress: bool = True, config: AttackConfig | None = None, **options):
    """Score `records` with every attack in `attacks`; returns a pandas DataFrame, one row per record.

    Columns: id (the record's index), member (when `membership` is given), category (when records have one),
    n_tokens (scored tokens), then one column per score, higher = more likely a member: loss, zlib,
    lowercase, min_k@k, min_k_pp@k, ref (one column per reference model: the key of `ref_models`, or "ref"
    for ref_model/ref_tokenizer), mope, mope_block@l (one per transformer block), gradnorm, recall,
    con_recall, dc_pdd, rmia, lira.
    attacks: names from ATTACKS (default: the config's, DEFAULT_ATTACKS). `options` are AttackConfig fields
    (ks=, mope_n=, batch_tokens=, ...) applied over `config`. A record with no scored token scores NaN.

    Forward passes per batch: one for loss, zlib, min_k and min_k_pp together; lowercase one more (the
    lower-cased text tokenizes differently); ref one per reference model; recall one (prefix + record);
    mope mope_n + 1; mope_block mope_n per block; gradnorm one forward and backward per record; con_recall
    two (member and non-member prefix; the latter shared with recall); dc_pdd none.

    rmia and lira compare the target with `references` ({name: model, (model, tokenizer) or path}: a model
    object shares the target's tokenizer, a path brings its own), OUT models that never saw the members.
    Each reference scores the records (and rmia's `population`: non-members disjoint from the records) once,
    cached under out/references/; the target scores the population once too. dc_pdd's token frequencies
    come from `frequency_corpus` (default: the population). con_recall's prefixes: `member_prefix` (default:
    recall_shots members chosen by seed from `membership`) and recall's non-member prefix; records serving
    as a prefix score NaN under recall and con_recall.

    recall's prefix: `recall_prefix` records, else recall_shots non-members chosen by seed from `membership`;
    those prefix records get recall = NaN (evaluate() skips them). With out=DIR, finished groups of records
    are written under DIR/parts and reused by a rerun with the same models and settings; the table is also
    written to DIR/scores.parquet. Under torch.distributed each process scores a share of the records;
    every process returns the whole table. Each model runs where its parameters are (the records follow);
    models are put in eval mode while scoring and handed back in their former mode.
    """
    fields = {f.name for f in dataclasses.fields(AttackConfig)}
    if set(options) - fields:
        raise ValueError(f"unknown option(s) {sorted(set(options) - fields)}; "
                         f"score() takes {', '.join(sorted(fields))}")
    cfg = dataclasses.replace(config or AttackConfig(), **options)
    if attacks is not None:
        cfg = dataclasses.replace(cfg, attacks=attacks)
    cfg = dataclasses.replace(cfg, max_len=context_len(model, cfg.max_len))
    refs = _reference_models(ref_model, ref_tokenizer, ref_models)
    if refs and "ref" not in cfg.attacks:
        cfg = dataclasses.replace(cfg, attacks=(*cfg.attacks, "ref"))
    if "ref" in cfg.attacks and not refs:
        raise ValueError("attack 'ref' needs a reference model: pass ref_model= and ref_tokenizer= (or ref_models=)")
    if not records:
        raise ValueError("no records to score")
    labels = _membership(membership, len(records))
    calibration = _Calibration(tokenizer, records, cfg, references, population, frequency_corpus)
    job = _Job(model, tokenizer, records, cfg, refs, labels, recall_prefix, member_prefix, calibration.frequencies)
    table = calibration.add_scores(model, job.run(out, progress), out)
    if labels is not None:
        table = with_percentiles(table)
    if out is not None and rank_and_world()[0] == 0:
        with atomic_path(Path(out) / SCORES_FILE) as tmp:
            table.to_parquet(tmp, index=False)
    return table


class _Calibration:
    """What the calibrated attacks (rmia, lira) and dc_pdd need beyond the target's own pass: references,
    population, token frequencies; the registry's calibrated scorers read target_ll, ref_ll, n and population_ll()."""

    def __init__(self, tokenizer, records, cfg: AttackConfig, references, population, frequency_corpus):
        self.tokenizer, self.records, self.cfg, self.n = tokenizer, records, cfg, len(records)
        needing = lambda need: [a for a in cfg.attacks if need in REGISTRY[a].needs]  # noqa: E731
        self.wanted = selected(cfg.attacks, calibrated=True)
        if needing("references") and not references:
            raise ValueError(f"attack(s) {needing('references')} compare the target with reference models: pass "
                             "references={name: model or path} (models that never saw the members; CLI --reference)")
        self.population = list(population or [])
        if needing("population") and not self.population:
            raise ValueError(f"{' and '.join(needing('population'))} needs population=[records]: non-members of the "
                             "target, disjoint from the scored records (CLI --population FILE)")
        scored = {record_key(r) for r in records}
        if any(record_key(r) in scored for r in self.population):
            raise ValueError("a population record is also a scored record; the population must be disjoint from them")
        self.refs = resolve_references(references, tokenizer) if needing("references") else {}
        corpus = frequency_corpus if frequency_corpus is not None else self.population
        if needing("frequency_corpus") and not corpus:
            raise ValueError(f"{' and '.join(needing('frequency_corpus'))} estimates token frequencies from a "
                             "reference corpus: pass frequency_corpus=[records] (or population=)")
        self.frequencies = token_frequencies(tokenizer, corpus) if needing("frequency_corpus") else None

    def add_scores(self, model, table, out):
        """The table with the calibrated attacks' columns added and the internal mean-ℓ_t column dropped."""
        if self.wanted:
            c = self.cfg
            self._options = {"response_only": c.response_only, "max_len": c.max_len, "add_eos": c.add_eos,
                             "batch_tokens": c.batch_tokens, "padding_side": c.padding_side, "autocast": c.autocast}
            self._model, self._out = model, out
            self.ref_ll = np.stack([cached_mean_ll(m, t, self.records + self.population, self._folder(name),
                                                   **self._options) for name, (m, t) in self.refs.items()])
            self.target_ll = table["_ll"].to_numpy()
            for attack in self.wanted:
                for column, values in attack.score(self).items():
                    table[column] = values
        return table.drop(columns="_ll")

    def population_ll(self) -> np.ndarray:
        """The target's mean ℓ_t over the population (cached under out/references/_target)."""
        return cached_mean_ll(self._model, self.tokenizer, self.population, self._folder("_target"), **self._options)

    def _folder(self, name: str) -> Path | None:
        return Path(self._out) / "references" / name if self._out is not None else None


def _reference_models(ref_model, ref_tokenizer, ref_models) -> dict[str, tuple]:
    refs = dict(ref_models or {})
    if (ref_model is None) != (ref_tokenizer is None):
        raise ValueError("pass ref_model and ref_tokenizer together "
                         "(the reference scores the text with its own tokenizer)")
    if ref_model is not None:
        refs["ref"] = (ref_model, ref_tokenizer)
    for name, pair in refs.items():
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"ref_models[{name!r}] must be a (model, tokenizer) pair")
        if name in META_COLUMNS or name in REGISTRY and name != "ref":
            raise ValueError(f"reference model name {name!r} clashes with a column name; rename it")
    return refs


def _membership(membership, n: int) -> list[int] | None:
    if membership is None:
        return None
    labels = [int(m) for m in membership]
    if len(labels) != n or set(labels) - {0, 1}:
        raise ValueError(f"membership must hold one 0/1 label per record ({n} records, got {len(labels)} labels "
                         f"with values {sorted(set(labels))[:5]})")
    return labels


def record_hash(record: dict) -> str:
    """The exact content of a record (resume key): identical records are scored once."""
    return digest(record, 24)


class _Job:
    """One scoring run: the encoded records, the shared per-group computations, resume and gathering."""

    def __init__(self, model, tokenizer, records, cfg: AttackConfig, refs, labels, recall_prefix,
                 member_prefix=None, frequencies: np.ndarray | None = None):
        self.model, self.tokenizer, self.records, self.cfg, self.refs, self.labels = (
            model, tokenizer, records, cfg, refs, labels)
        self.items = encode_scored(tokenizer, records, cfg.response_only, cfg.max_len, add_eos=cfg.add_eos)
        self.keys = [record_hash(r) for r in records]
        self.blocks = (list(transformer_blocks(model)) if any("blocks" in REGISTRY[a].needs for a in cfg.attacks)
                       else [])
        self.columns = cfg.columns(list(refs), len(self.blocks))
        self.batching = {"pad_id": pad_id(tokenizer), "batch_tokens": cfg.batch_tokens,
                         "padding_side": cfg.padding_side, "autocast": cfg.autocast}
        self.frequencies = frequencies
        self.prefix, self.prefix_keys = self._recall_prefix(recall_prefix)
        self.member_prefix, member_keys = self._member_prefix(member_prefix)
        self.prefix_keys |= member_keys

    def _member_prefix(self, member_prefix) -> tuple[list[int], set[str]]:
        """con_recall's member prefix: the given records, else recall_shots members chosen by seed."""
        if "con_recall" not in self.cfg.attacks:
            return [], set()
        if member_prefix is None:
            if self.labels is None:
                raise ValueError("con_recall needs member prefix records: pass membership= (a few members are then "
                                 "held out as the prefix) or member_prefix=[...]")
            member_prefix = [self.records[i] for i in choose_prefix(self.labels, self.cfg.recall_shots, self.cfg.seed,
                                                                    members=True)]
        if not member_prefix:
            raise ValueError("member_prefix is empty; give at least one member record")
        return prefix_ids(self.tokenizer, member_prefix), {record_hash(r) for r in member_prefix}

    def _recall_prefix(self, recall_prefix) -> tuple[list[int], set[str]]:
        if "recall" not in self.cfg.attacks and "con_recall" not in self.cfg.attacks:
            return [], set()
        if recall_prefix is None:
            if self.labels is None:
                raise ValueError("recall needs non-member prefix records: pass membership= (a few non-members are "
                                 "then held out as the prefix) or recall_prefix=[...]")
            recall_prefix = [self.records[i] for i in choose_prefix(self.labels, self.cfg.recall_shots, self.cfg.seed)]
        if not recall_prefix:
            raise ValueError("recall_prefix is empty; give at least one non-member record")
        prefix_keys = {record_hash(r) for r in recall_prefix}
        if self.labels is not None:
            members = {record_key(r) for r, m in zip(self.records, self.labels) if m}
            if any(record_key(r) in members for r in recall_prefix):
                raise ValueError("a recall prefix record is a member; ReCaLL's prefix must be non-members only")
        return prefix_ids(self.tokenizer, recall_prefix), prefix_keys

    def settings_hash(self) -> str:
        """What the scores depend on: models, tokenizers, settings, ReCaLL prefix (not batching or world size)."""
        cfg = dataclasses.asdict(self.cfg)
        for name in ("batch_tokens", "padding_side"):
            cfg.pop(name)
        ident = {"config": cfg, "model": model_fingerprint(self.model),
                 "tokenizer": tokenizer_fingerprint(self.tokenizer),
                 "refs": {n: [model_fingerprint(m), tokenizer_fingerprint(t)] for n, (m, t) in self.refs.items()},
                 "prefix": self.prefix, "device": model_device(self.model).type, "columns": self.columns,
                 "member_prefix": self.member_prefix,
                 "frequencies": (None if self.frequencies is None
                                 else digest_bytes(self.frequencies.tobytes(), 64))}
        return digest(ident)

    def run(self, out, progress: bool):
        rank, world = rank_and_world()
        with eval_mode(self.model, *(m for m, _ in self.refs.values())):  # no dropout while scoring
            store = Parts(Path(out) / "parts" / self.settings_hash(), self.part_columns()) if out else None
            done = store.load() if store else {}
            if world > 1:
                dist.barrier()  # every rank has read the finished parts before any rank writes new ones
            first = {}
            for i, key in enumerate(self.keys):
                if key not in done:
                    first.setdefault(key, i)
            todo = sorted(first.values(), key=lambda i: (len(self.items[i]), i))[rank::world]
            groups = [[todo[j] for j in g] for g in token_budget_batches([len(self.items[i]) for i in todo],
                                                                          self.cfg.batch_tokens)]
            new = {}
            self._bar = tqdm(total=len(todo), desc=f"attacks (rank {rank})" if world > 1 else "attacks",
                             unit="rec", disable=not progress or rank != 0)
            for group in groups:
                rows = self._score_group(group)
                if store:
                    store.write(rows)
                new.update(rows)
                self._bar.update(len(group))
            self._bar.close()
            done.update(_gather(new, world))
        return self._table(done)

    def _score_group(self, group: list[int]) -> dict[str, list[float]]:
        """Every requested score of a group of records: one shared forward pass, then each attack's scorer."""
        cfg, model = self.cfg, self.model
        batch = pad_batch([self.items[i] for i in group], self.batching["pad_id"], cfg.padding_side)
        with inference_context(model_device(model), cfg.autocast):
            stats = forward_stats(model, batch)
        g = Group(self, group, batch, stats, logit_scores(stats, cfg.ks))
        scores = {"n_tokens": stats.n_tokens().astype(float), "_ll": g.ll}
        for attack in selected(cfg.attacks, calibrated=False):
            self.stage(attack.name)
            scores.update(attack.score(g))
        names = self.part_columns()
        return {self.keys[i]: [float(scores[c][j]) for c in names] for j, i in enumerate(group)}

    def stage(self, text: str) -> None:
        """What the progress bar says is being scored."""
        self._bar.set_postfix_str(text)

    def part_columns(self) -> list[str]:
        """What a finished group keeps: n_tokens, the target's mean ℓ_t (the calibrated attacks' statistic), scores."""
        calibrated = {c for a in selected(self.cfg.attacks, calibrated=True)
                      for c in a.column_names(self.cfg, list(self.refs), len(self.blocks))}
        return ["n_tokens", "_ll", *(c for c in self.columns if c not in calibrated)]

    def _table(self, rows: dict[str, list[float]]):
        import pandas as pd

        missing = [i for i, k in enumerate(self.keys) if k not in rows]
        if missing:
            raise RuntimeError(f"{len(missing)} record(s) were not scored (e.g. record {missing[0]}); rerun to resume")
        values = np.array([rows[k] for k in self.keys], dtype=np.float64).reshape(len(self.keys), -1)
        table = pd.DataFrame({"id": np.arange(len(self.records))})
        if self.labels is not None:
            table["member"] = self.labels
        if any("category" in r for r in self.records):
            table["category"] = [r.get("category", "") for r in self.records]
        for j, column in enumerate(self.part_columns()):
            table[column] = values[:, j].astype(np.int64) if column == "n_tokens" else values[:, j]
        return table


def _gather(rows: dict, world: int) -> dict:
    """Every rank's new rows, on every rank."""
    if world == 1:
        return rows
    parts = [None] * world
    dist.all_gather_object(parts, rows)
    return {k: v for part in parts for k, v in part.items()}

