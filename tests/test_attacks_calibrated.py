"""rmia, lira, dc_pdd and con_recall against float64 one-record-at-a-time implementations written here from the
papers' definitions; the reference cache; calibrated thresholds and per-record percentiles."""
import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from kdfast import attacks, models
from kdfast.attacks import lira, metrics, scoring
from kdfast.data import bundled_records, encode, prompt_text, target_text

RECORDS = bundled_records()[:8] + [{"text": "The quick brown fox jumps over the lazy dog, again and again."},
                                   {"text": "A tall perennial woody plant, with a trunk and branches."}]
MEMBERSHIP = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
POPULATION = bundled_records()[100:107] + [{"text": "Another short text that nobody trained on."}]


def item_of(tok, record):
    if "text" in record:
        ids = tok(record["text"])["input_ids"]
        return ids, [-100] + ids[1:]
    it = encode(tok, record)
    return it.input_ids, it.labels


def token_logps(model, ids, labels):
    """(ℓ_t, token) of the scored positions (labels != -100), each predicted from the ids before it; float64."""
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.double()[0], -1)
    return [(logp[p - 1, labels[p]].item(), labels[p]) for p in range(1, len(labels)) if labels[p] != -100]


def mean_ll(model, tok, record):
    return float(np.mean([lp for lp, _ in token_logps(model, *item_of(tok, record))]))


def conditioned_ll(model, tok, record, prefix):
    ids, labels = item_of(tok, record)
    pre = tok("".join(prompt_text(r) + target_text(r) + "\n\n" for r in prefix), add_special_tokens=False)["input_ids"]
    return float(np.mean([lp for lp, _ in token_logps(model, pre + ids, [-100] * len(pre) + labels)]))


@pytest.fixture(scope="module")
def setup():
    tok = models.tiny_tokenizer()
    target = models.tiny_model("llama", seed=31)
    refs = {f"r{i}": models.tiny_model("llama", seed=32 + i) for i in range(4)}
    target_ll = {id(r): mean_ll(target, tok, r) for r in RECORDS + POPULATION}
    ref_ll = {n: {id(r): mean_ll(m, tok, r) for r in RECORDS + POPULATION} for n, m in refs.items()}
    return tok, target, refs, target_ll, ref_ll


def oracle_rmia(x, target_ll, ref_ll, names, a, gamma):
    """Zarifzadeh et al.: Pr(·|θ) = exp(mean ℓ_t); Pr(·) = ((1+a)·mean_ref Pr(·|θ_ref) + (1−a))/2 (offline);
    score = fraction of population z with [Pr(x|θ)/Pr(x)] / [Pr(z|θ)/Pr(z)] ≥ γ."""
    def ratio(r):
        marginal = sum(math.exp(ref_ll[n][id(r)]) for n in names) / len(names)
        return math.exp(target_ll[id(r)]) / (((1 + a) * marginal + (1 - a)) / 2)

    return sum(ratio(x) / ratio(z) >= gamma for z in POPULATION) / len(POPULATION)


@pytest.mark.parametrize("n_refs, a, gamma", [(1, 1.0, 1.0), (3, 0.3, 1.02), (2, 0.6, 0.97)])
def test_rmia_matches_the_paper(setup, n_refs, a, gamma):
    tok, target, refs, target_ll, ref_ll = setup
    names = list(refs)[:n_refs]
    table = attacks.score(target, tok, RECORDS, ("loss", "rmia"), references={n: refs[n] for n in names},
                          population=POPULATION, rmia_a=a, rmia_gamma=gamma, progress=False)
    want = [oracle_rmia(x, target_ll, ref_ll, names, a, gamma) for x in RECORDS]
    np.testing.assert_allclose(table["rmia"], want, atol=1e-12)
    assert len(set(want)) > 2  # the scores discriminate: not all 0 or 1


@pytest.mark.parametrize("n_refs", [2, 4])
def test_lira_per_record_and_global_sigma(setup, n_refs):
    tok, target, refs, target_ll, ref_ll = setup
    names = list(refs)[:n_refs]
    table = attacks.score(target, tok, RECORDS, ("lira",), references={n: refs[n] for n in names}, progress=False)
    every = [ref_ll[n][id(x)] for x in RECORDS for n in names]
    global_sigma = math.sqrt(sum((v - sum(every) / len(every)) ** 2 for v in every) / len(every))
    for i, x in enumerate(RECORDS):
        out = [ref_ll[n][id(x)] for n in names]
        mu = sum(out) / n_refs
        sigma = math.sqrt(sum((v - mu) ** 2 for v in out) / n_refs) if n_refs >= lira.MIN_PER_RECORD else global_sigma
        # fp32 model, σ small
        assert table["lira"][i] == pytest.approx((target_ll[id(x)] - mu) / sigma, rel=1e-3, abs=1e-3)


def test_dc_pdd_matches_the_paper(setup):
    tok, target = setup[0], setup[1]
    corpus = bundled_records()[200:260]
    counts = Counter(t for r in corpus for t in tok(target_text(r))["input_ids"])
    total, vocab = sum(counts.values()), len(tok)
    table = attacks.score(target, tok, RECORDS, ("dc_pdd",), frequency_corpus=corpus, dc_pdd_clip=0.004,
                          progress=False)
    for i, x in enumerate(RECORDS):
        seen, alphas = set(), []
        for lp, token in token_logps(target, *item_of(tok, x)):
            if token in seen:
                continue  # first occurrences only
            seen.add(token)
            freq = (counts[token] + 1) / (total + vocab)
            alphas.append(min(math.exp(lp) * math.log(1 / freq), 0.004))
        assert table["dc_pdd"][i] == pytest.approx(sum(alphas) / len(alphas), rel=1e-5)
    assert (table["dc_pdd"] < 0.004).any() and (table["dc_pdd"] > 0).all()


def test_con_recall_matches_the_paper(setup):
    tok, target = setup[0], setup[1]
    member_prefix, nonmember_prefix = [RECORDS[0], RECORDS[1]], [RECORDS[6]]
    table = attacks.score(target, tok, RECORDS, ("recall", "con_recall"), membership=MEMBERSHIP,
                          member_prefix=member_prefix, recall_prefix=nonmember_prefix, con_recall_gamma=0.5,
                          progress=False)
    for i, x in enumerate(RECORDS):
        if i in (0, 1, 6):
            assert np.isnan(table["con_recall"][i])  # a prefix record is held out
            continue
        ll = mean_ll(target, tok, x)
        non, mem = conditioned_ll(target, tok, x, nonmember_prefix), conditioned_ll(target, tok, x, member_prefix)
        assert table["con_recall"][i] == pytest.approx((non - 0.5 * mem) / ll, rel=1e-4)
        assert table["recall"][i] == pytest.approx(non / ll, rel=1e-4)
    chosen = attacks.score(target, tok, RECORDS, ("con_recall",), membership=MEMBERSHIP, recall_shots=2, progress=False)
    held = chosen["con_recall"].isna().to_numpy()
    assert held.sum() == 4 and held[:5].sum() == 2  # two members and two non-members serve as prefixes


def test_references_are_scored_once_and_cached(setup, tmp_path, monkeypatch):
    tok, target, refs = setup[:3]
    kw = dict(attacks=("rmia", "lira"), references={"r0": refs["r0"]}, population=POPULATION, progress=False,
              out=tmp_path)
    first = attacks.score(target, tok, RECORDS, **kw)
    assert (tmp_path / "references" / "r0" / "parts").is_dir()
    calls = []
    original = scoring._Job._score_group
    monkeypatch.setattr(scoring._Job, "_score_group", lambda self, g: calls.append(g) or original(self, g))
    again = attacks.score(target, tok, RECORDS, **kw)
    assert calls == []  # target, reference and population rows all read back
    pd.testing.assert_frame_equal(first, again)


def test_calibrated_attack_input_errors(setup):
    tok, target, refs = setup[:3]
    with pytest.raises(ValueError, match="references="):
        attacks.score(target, tok, RECORDS, ("lira",), progress=False)
    with pytest.raises(ValueError, match="population="):
        attacks.score(target, tok, RECORDS, ("rmia",), references={"r": refs["r0"]}, progress=False)
    with pytest.raises(ValueError, match="disjoint"):
        attacks.score(target, tok, RECORDS, ("rmia",), references={"r": refs["r0"]}, population=RECORDS[:2],
                      progress=False)
    with pytest.raises(ValueError, match="frequency_corpus"):
        attacks.score(target, tok, RECORDS, ("dc_pdd",), progress=False)


def test_calibration_split_is_disjoint_and_seeded():
    cal, held = metrics.calibration_split(101, 0.5, seed=3)
    assert len(cal) == 50 and len(held) == 51 and not set(cal) & set(held) and set(cal) | set(held) == set(range(101))
    assert np.array_equal(cal, metrics.calibration_split(101, 0.5, seed=3)[0])
    assert not np.array_equal(cal, metrics.calibration_split(101, 0.5, seed=4)[0])
    with pytest.raises(ValueError, match="fraction"):
        metrics.calibration_split(10, 1.0)


def test_calibrated_thresholds_by_hand():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 300 + [0] * 2000)
    scores = np.concatenate([rng.normal(1.5, 1, 300), rng.normal(0, 1, 2000)])
    scores[5] = np.nan
    got = metrics.calibrated_thresholds(labels, scores, 0.5, seed=7)
    keep = np.isfinite(scores)
    neg, pos = scores[keep & (labels == 0)], scores[keep & (labels == 1)]
    order = np.random.default_rng(7).permutation(neg.size)
    cal, held = neg[np.sort(order[:1000])], neg[np.sort(order[1000:])]
    for x in (0.1, 0.01, 0.001):
        allowed = math.floor(x * cal.size + 1e-9)
        tau = sorted(cal, reverse=True)[allowed]
        assert sum(c > tau for c in cal) <= allowed
        r = got["at_fpr"][f"{x:g}"]
        assert r["threshold"] == tau
        assert r["tpr"] == pytest.approx(sum(p > tau for p in pos) / pos.size)
        assert r["fpr"] == pytest.approx(sum(h > tau for h in held) / held.size)
    assert 0.05 < got["at_fpr"]["0.1"]["fpr"] < 0.15 and got["at_fpr"]["0.1"]["tpr"] > 0.3
    table = pd.DataFrame({"member": labels, "s": scores})
    assert attacks.evaluate(table, n_bootstrap=0, calibration=0.5, seed=7)["s"]["calibrated"] == got


def test_percentiles_against_nonmembers():
    table = pd.DataFrame({"id": range(6), "member": [1, 1, 0, 0, 0, 0], "n_tokens": 3,
                          "s": [5.0, 0.5, 0.0, 1.0, 2.0, np.nan]})
    out = metrics.with_percentiles(table)
    np.testing.assert_allclose(out["pct_s"], [100, 100 / 3, 100 / 3, 200 / 3, 100, np.nan])
    assert metrics.score_columns(out) == ["s"]
