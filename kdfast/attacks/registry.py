"""The attack registry (docs/design.md §5): one entry per attack, its score columns, its scorer and what it needs, in
the table's column order. Adding an attack is one entry here (and its formula's module)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from kdfast.attacks.bulk import encode_scored, lowercased, mean_log_likelihoods, scored_text, zlib_length
from kdfast.attacks.con_recall import con_recall_scores
from kdfast.attacks.dc_pdd import dc_pdd_score
from kdfast.attacks.gradnorm import gradnorm_scores
from kdfast.attacks.lira import lira_scores
from kdfast.attacks.perturb import mope_scores
from kdfast.attacks.recall import conditioned_ll, recall_scores
from kdfast.attacks.ref import ref_scores
from kdfast.attacks.rmia import rmia_scores
from kdfast.data import next_token_targets

if TYPE_CHECKING:
    from kdfast.attacks.scoring import AttackConfig

# What an entry's `needs` may hold. Inputs score() must be given (its argument; the `kdfast attack` flag):
INPUTS = {
    "ref_models": ("ref_models= (or ref_model= and ref_tokenizer=)", "--ref-model MODEL"),
    "references": ("references={name: model or path}", "--reference NAME=MODEL"),
    "population": ("population=[records]", "--population FILE"),
    "frequency_corpus": ("frequency_corpus=[records] (or population=)", "--population FILE"),
    "membership": ("membership= (or the prefix records)", "--members/--nonmembers or --data"),
}
# ... and the work an attack adds to the shared forward pass (what a caller weighs before asking for it).
COSTS = ("extra_pass", "perturbation", "blocks", "gradients")


@dataclass(frozen=True)
class Attack:
    """One membership-inference attack (higher score = more likely a member).

    score: per group of records, a function of the Group (the shared forward pass's statistics and the passes
    several attacks share) -> {column: float64 [records of the group]}; with calibrated=True, once over the whole
    table, a function of a calibration context -> {column: [records]}: its cfg (rmia_a, rmia_gamma), n (records),
    target_ll [n], ref_ll [R, n + population] (the references' mean ℓ_t) and population_ll() (the target's).
    columns(config, ref_names, n_blocks): its score columns (default: one, named as the attack).
    needs: keys of INPUTS and COSTS. default: in DEFAULT_ATTACKS.
    """

    name: str
    score: Callable[..., dict[str, np.ndarray]]
    columns: Callable[[AttackConfig, list[str], int], list[str]] | None = None
    needs: frozenset[str] = field(default_factory=frozenset)
    default: bool = False
    calibrated: bool = False

    def column_names(self, config: AttackConfig, ref_names: list[str], n_blocks: int) -> list[str]:
        return self.columns(config, ref_names, n_blocks) if self.columns else [self.name]


class Group:
    """One padded batch of records being scored: the shared forward pass's output (logit: loss, min_k@k,
    min_k_pp@k; ll: mean ℓ_t; stats: per-token statistics) and, once asked for, the passes attacks share."""

    def __init__(self, job, indices: list[int], batch: dict, stats, logit: dict[str, np.ndarray]):
        self.job, self.cfg, self.indices, self.batch, self.stats = job, job.cfg, indices, batch, stats
        self.logit = logit
        self.items = [job.items[i] for i in indices]
        self.records = [job.records[i] for i in indices]
        self.ll = logit["loss"]
        self._shared: dict[str, np.ndarray] = {}

    def shared(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        """compute()'s result, computed once per group for every attack that asks for `key`."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    def prefix_rows(self) -> list[bool]:
        """Which records serve as a (Con-)ReCaLL prefix (they score NaN there)."""
        return [self.job.keys[i] in self.job.prefix_keys for i in self.indices]

    def nonmember_ll(self) -> np.ndarray:
        """ll(x | non-member prefix), shared by recall and con_recall."""
        j = self.job
        return self.shared("nonmember_ll", lambda: conditioned_ll(j.model, self.items, j.prefix,
                                                                  j.tokenizer.bos_token_id, self.cfg.max_len,
                                                                  **j.batching))

    def mope_base(self) -> np.ndarray:
        """Mean ℓ_t at θ through the head module (its hooks run, as under the perturbations), shared by the MoPes."""
        return self.shared("mope_base", lambda: mean_log_likelihoods(self.job.model, self.items, fused=False,
                                                                     **self.job.batching))

    def mope(self, scope=None) -> np.ndarray:
        c = self.cfg
        return mope_scores(self.job.model, self.items, self.mope_base(), n=c.mope_n, sigma=c.mope_sigma, seed=c.seed,
                           scope=scope, **self.job.batching)


def _per_k(name: str):
    return lambda cfg, refs, n_blocks: [f"{name}@{k:g}" for k in cfg.ks]


def _from_shared_pass(name: str):
    """A scorer reading its columns off the shared pass's logit scores."""
    return lambda g: {c: g.logit[c] for c in REGISTRY[name].column_names(g.cfg, [], 0)}


def _zlib(g: Group) -> dict:
    return {"zlib": g.ll / np.array([zlib_length(scored_text(r, g.cfg.response_only)) for r in g.records])}


def _lowercase(g: Group) -> dict:
    j, c = g.job, g.cfg
    lower = encode_scored(j.tokenizer, [lowercased(r, c.response_only) for r in g.records], c.response_only,
                          c.max_len, g.indices)
    return {"lowercase": -mean_log_likelihoods(j.model, lower, **j.batching) / np.maximum(-g.ll, 1e-12)}


def _ref(g: Group) -> dict:
    j, c = g.job, g.cfg
    batching = {k: v for k, v in j.batching.items() if k != "pad_id"}  # each reference pads with its own tokenizer
    out = {}
    for name, (ref, ref_tok) in j.refs.items():
        j.stage(name)
        out[name] = ref_scores(ref, ref_tok, g.records, g.ll, c.response_only, c.max_len, g.indices, c.add_eos,
                               **batching)
    return out


def _mope_block(g: Group) -> dict:
    out = {}
    for b, block in enumerate(g.job.blocks):
        g.job.stage(f"mope_block {b + 1}/{len(g.job.blocks)}")
        out[f"mope_block@{b}"] = g.mope(block)
    return out


def _recall(g: Group) -> dict:
    return {"recall": np.where(g.prefix_rows(), np.nan, recall_scores(g.ll, g.nonmember_ll()))}


def _con_recall(g: Group) -> dict:
    j = g.job
    member_ll = conditioned_ll(j.model, g.items, j.member_prefix, j.tokenizer.bos_token_id, g.cfg.max_len,
                               **j.batching)
    con = con_recall_scores(g.ll, g.nonmember_ll(), member_ll, g.cfg.con_recall_gamma)
    return {"con_recall": np.where(g.prefix_rows(), np.nan, con)}


def _dc_pdd(g: Group) -> dict:
    s = g.stats
    logp, valid = s.logp.double().cpu().numpy(), s.valid.cpu().numpy()
    targets = next_token_targets(g.batch["labels"]).cpu().numpy()
    return {"dc_pdd": np.array([dc_pdd_score(logp[b, valid[b]], targets[b, valid[b]], g.job.frequencies,
                                             g.cfg.dc_pdd_clip) for b in range(logp.shape[0])])}


def _rmia(c) -> dict:
    return {"rmia": rmia_scores(c.target_ll, c.ref_ll[:, :c.n], c.population_ll(), c.ref_ll[:, c.n:], c.cfg.rmia_a,
                                c.cfg.rmia_gamma)}


def _lira(c) -> dict:
    return {"lira": lira_scores(c.target_ll, c.ref_ll[:, :c.n])}


_ENTRIES = [
    Attack("loss", _from_shared_pass("loss"), default=True),
    Attack("zlib", _zlib, default=True),
    Attack("lowercase", _lowercase, needs=frozenset({"extra_pass"}), default=True),
    Attack("min_k", _from_shared_pass("min_k"), _per_k("min_k"), default=True),
    Attack("min_k_pp", _from_shared_pass("min_k_pp"), _per_k("min_k_pp"), default=True),
    # One column per reference model: the key of score()'s ref_models.
    Attack("ref", _ref, lambda cfg, refs, n_blocks: list(refs), frozenset({"ref_models", "extra_pass"})),
    Attack("mope", lambda g: {"mope": g.mope()}, needs=frozenset({"perturbation"})),
    Attack("mope_block", _mope_block, lambda cfg, refs, n_blocks: [f"mope_block@{b}" for b in range(n_blocks)],
           frozenset({"perturbation", "blocks"})),
    Attack("gradnorm", lambda g: {"gradnorm": gradnorm_scores(g.job.model, g.items, g.cfg.autocast)},
           needs=frozenset({"gradients"})),
    Attack("recall", _recall, needs=frozenset({"membership", "extra_pass"})),
    Attack("con_recall", _con_recall, needs=frozenset({"membership", "extra_pass"})),
    Attack("dc_pdd", _dc_pdd, needs=frozenset({"frequency_corpus"})),
    # Over the whole table once every record is scored: they compare each record with the references and population.
    Attack("rmia", _rmia, needs=frozenset({"references", "population"}), calibrated=True),
    Attack("lira", _lira, needs=frozenset({"references"}), calibrated=True),
]
REGISTRY: dict[str, Attack] = {a.name: a for a in _ENTRIES}


def attack_names() -> tuple[str, ...]:
    """Every registered attack, in column order."""
    return tuple(REGISTRY)


def default_attacks() -> tuple[str, ...]:
    """The attacks score() runs when none are named."""
    return tuple(a.name for a in REGISTRY.values() if a.default)


def selected(names, calibrated: bool) -> list[Attack]:
    """The registry's entries among `names`, in column order: per-group ones, or the calibrated ones."""
    return [a for a in REGISTRY.values() if a.name in names and a.calibrated == calibrated]


def missing_inputs(name: str, given: set[str]) -> list[str]:
    """The INPUTS keys attack `name` needs that `given` lacks."""
    return [n for n in INPUTS if n in REGISTRY[name].needs and n not in given]  # INPUTS order: messages stay put
