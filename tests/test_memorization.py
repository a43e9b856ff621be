"""Memorization: match accuracy on an overfit model, one-pass extraction == real greedy generation, the
teacher-conditioned and agreement figures on hand-worked cases, and `kdfast memorize` end to end."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from kdfast import memorization as mem
from kdfast import models
from kdfast.cli import main as cli
from kdfast.data import bundled_records, encode, encode_all, next_token_targets, pad_batch
from kdfast.generation import generate
from kdfast.memorization import match as match_module

TIE_GAP = 1e-4  # top-2 logit gaps below this could flip between a full pass and KV-cached decoding


@pytest.fixture(scope="module")
def tok():
    return models.tiny_tokenizer()


@pytest.fixture(scope="module")
def overfit(tok):
    """A tiny LLaMA trained to reproduce 16 WordNet records; 16 others held out."""
    records = bundled_records()
    train, held = records[:16], records[16:32]
    model = models.tiny_model("llama", seed=0)
    batch = pad_batch(encode_all(tok, train)[0], tok.pad_token_id)
    targets = next_token_targets(batch["labels"])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(250):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), train, held


# --- match accuracy ---------------------------------------------------------------------------------

def test_match_accuracy_overfit_vs_held_out(overfit, tok):
    model, train, held = overfit
    seen = mem.match_accuracy(model, tok, train, n_tokens=16, batch_size=5, progress=False)
    unseen = mem.match_accuracy(model, tok, held, n_tokens=16, batch_size=5, progress=False)
    assert seen.accuracy.mean() >= 0.9 and seen.approx.mean() >= 0.9
    assert unseen.accuracy.mean() <= 0.2 and unseen.approx.sum() == 0
    lengths = [len(encode(tok, r).input_ids) - encode(tok, r).prompt_len for r in train]
    assert seen.n_compared.tolist() == [min(16, n) for n in lengths]  # short responses: over their length (+EOS)
    exact = np.flatnonzero(seen.exact & (seen.n_compared < 16))  # whole response + EOS reproduced
    assert exact.size and all(seen.generated[i] == train[i]["response"] for i in exact)
    one_by_one = mem.match_accuracy(model, tok, train[:6], n_tokens=16, batch_size=1, progress=False)
    assert np.array_equal(one_by_one.accuracy, seen.accuracy[:6])
    assert one_by_one.generated_ids == seen.generated_ids[:6]


def test_match_accuracy_scoring(tok, monkeypatch):
    """Position match, the shorter-response rule, early stops and the edit distance, with generations fixed."""
    records = [{"instruction": "a", "response": "one two three four five six seven eight nine ten"},
               {"instruction": "b", "response": "cat"}]
    truth = [encode(tok, r).input_ids[encode(tok, r).prompt_len:] for r in records]
    assert len(truth[0]) > 8 and len(truth[1]) <= 3
    wrong = (truth[0][0] + 1) % 1000
    fixed = [[wrong] + truth[0][1:8], truth[1][:1]]  # one substitution; the second stops after 1 token
    monkeypatch.setattr(match_module, "generate", lambda model, prompts, n, **kw: [f[:n] for f in fixed])
    r = mem.match_accuracy(torch.nn.Module(), tok, records, n_tokens=8, approx_threshold=0.125, progress=False)
    n1 = len(truth[1])
    assert r.n_compared.tolist() == [8, n1]
    assert r.accuracy.tolist() == [7 / 8, 1 / n1]
    assert r.edit_distance.tolist() == [1 / 8, (n1 - 1) / n1]
    assert r.approx.tolist() == [True, n1 - 1 <= 0.125 * n1]
    with pytest.raises(ValueError, match="plain"):
        mem.match_accuracy(None, tok, [{"text": "x y"}], progress=False)


def test_edit_distance_hand_worked():
    assert mem.edit_distance(list("kitten"), list("sitting")) == 3  # k->s, e->i, +g
    assert mem.edit_distance([1, 2, 3, 4], [1, 3, 4, 5]) == 2  # delete 2, insert 5
    assert mem.edit_distance([], [7, 8]) == 2 and mem.edit_distance([5], [5]) == 0
    assert mem.normalized_edit_distance([1, 2, 3, 9, 9], [1, 2, 3]) == 0.0  # text after the truth is free
    assert mem.normalized_edit_distance([1, 9, 3], [1, 2, 3, 4]) == 0.5  # 1 substitution + 1 missing
    assert mem.normalized_edit_distance([], [1, 2]) == 1.0


# --- extraction --------------------------------------------------------------------------------------

def _tie_free(model, pairs: list[tuple[list[int], list[int]]], matched: torch.Tensor) -> list[bool]:
    """Per (prefix, suffix): every suffix position greedy decoding reaches (up to its first miss) has a top-2
    logit gap above TIE_GAP."""
    out = []
    with torch.no_grad():
        for (prefix, suffix), m in zip(pairs, matched.tolist()):
            logits = model(input_ids=torch.tensor([prefix + suffix[:-1]])).logits[0, len(prefix) - 1:].float()
            top2 = logits.topk(2, dim=-1).values
            out.append(bool((top2[: m + 1, 0] - top2[: m + 1, 1] > TIE_GAP).all()))
    return out


def _assert_methods_agree(model, data, prefix_len, suffix_len, min_rows, min_positive, tokenizer=None, **kw):
    fwd = mem.extraction(model, data, prefix_len, suffix_len, tokenizer=tokenizer, progress=False, **kw)
    gen = mem.extraction(model, data, prefix_len, suffix_len, tokenizer=tokenizer, method="generate", progress=False,
                         **kw)
    pairs = (mem.extraction_pairs(tokenizer, data, prefix_len, suffix_len) if tokenizer else
             [(r[:p], r[p:p + suffix_len]) for r, p in zip(data, prefix_len)])
    ok = torch.tensor(_tie_free(model, pairs, gen.matched)) & fwd.checked
    assert int(ok.sum()) >= min_rows, "too many near-ties or short records: the comparison would be vacuous"
    assert torch.equal(fwd.matched[ok], gen.matched[ok]) and torch.equal(fwd.extractable[ok], gen.extractable[ok])
    assert int(fwd.extractable[ok].sum()) >= min_positive
    return fwd


@pytest.mark.parametrize("family", models.FAMILIES)
def test_extraction_one_pass_equals_generation_random_model(family, gen):
    """A random model: its own greedy continuations are extractable; a token changed at j stops the match at j.
    Prefixes of 4..15 tokens: the one-pass batches are left-padded, so positions must skip the padding."""
    model = models.tiny_model(family, seed=1)
    lens = [4 + i for i in range(12)]
    prefixes = [torch.randint(2, 1000, (n,), generator=gen).tolist() for n in lens]
    own = [p + c for p, c in zip(prefixes, generate(model, prefixes, 8, pad_id=1, eos_id=None, batch_size=12))]
    where = [i % 8 for i in range(12)]
    corrupt = [r[:n + j] + [(r[n + j] + 7) % 1000] + r[n + j + 1:] for r, n, j in zip(own, lens, where)]
    noise = [torch.randint(2, 1000, (n + 8,), generator=gen).tolist() for n in lens]
    rows = own + corrupt + noise
    fwd = _assert_methods_agree(model, rows, lens * 3, 8, min_rows=30, min_positive=10)
    assert fwd.extractable[:12].all() and fwd.matched[12:24].tolist() == where
    one_by_one = mem.extraction(model, rows, lens * 3, 8, batch_size=1, progress=False)
    assert torch.equal(one_by_one.matched, fwd.matched)


def test_extraction_one_pass_equals_generation_overfit(overfit, tok):
    model, train, held = overfit
    records = train + held
    fwd = _assert_methods_agree(model, records, None, 6, min_rows=28, min_positive=12, tokenizer=tok,
                                on_short="skip")
    assert fwd.extractable[:16].sum() >= 14 and fwd.extractable[16:].sum() <= 2
    # the whole prompt as prefix: extractable == every compared token matches (responses at least 6 tokens long)
    acc = mem.match_accuracy(model, tok, records, n_tokens=6, progress=False)
    assert np.array_equal(fwd.extractable.numpy(), acc.exact & fwd.checked.numpy())


def test_extraction_independent_of_batch_and_padding(overfit, tok):
    model, train, held = overfit
    records = (held[:6] + train)[::-1]  # prompts of many lengths: left padding differs between batchings
    full = mem.extraction(model, records, None, 6, tokenizer=tok, batch_size=32, progress=False)
    for batch_size in (1, 5):
        other = mem.extraction(model, records, None, 6, tokenizer=tok, batch_size=batch_size, progress=False)
        assert torch.equal(other.matched, full.matched)
    rows = [p + s for p, s in mem.extraction_pairs(tok, records, 12, 6)]
    as_lists = mem.extraction(model, rows, 12, 6, batch_size=3, progress=False)
    as_tensor = mem.extraction(model, torch.tensor([r[:18] for r in rows]), 12, 6, batch_size=7, progress=False)
    assert torch.equal(as_lists.matched, as_tensor.matched)
    assert torch.equal(as_lists.matched, mem.extraction(model, records, 12, 6, tokenizer=tok, progress=False).matched)


def test_extraction_logits_path_when_head_is_not_plain(overfit, tok):
    model, train, _ = overfit
    fused = mem.extraction(model, train, None, 6, tokenizer=tok, progress=False)
    model.config.logits_scaling = 2.0  # output_head refuses it; LLaMA ignores it, so the logits are unchanged
    try:
        via_logits = mem.extraction(model, train, None, 6, tokenizer=tok, progress=False)
    finally:
        del model.config.logits_scaling
    assert torch.equal(fused.matched, via_logits.matched) and fused.extractable.sum() >= 14


def test_extraction_short_records_and_errors(tok):
    model = models.tiny_model("gpt2", seed=0)
    rows = [list(range(2, 20)), list(range(2, 10))]
    with pytest.raises(ValueError, match="too short.*record 1.*on_short='skip'"):
        mem.extraction(model, rows, 8, 8, progress=False)
    res = mem.extraction(model, rows, 8, 8, on_short="skip", progress=False)
    assert res.checked.tolist() == [True, False] and not res.extractable[1] and res.matched[1] == 0
    assert mem.extractable(model, rows, 8, 8, on_short="skip", progress=False).shape == (2,)
    frame = res.to_frame()
    assert frame["extractable"].isna().tolist() == [False, True]
    with pytest.raises(ValueError, match="tokenizer="):
        mem.extraction(model, [{"instruction": "a", "response": "b"}], progress=False)
    with pytest.raises(ValueError, match="integer prefix_len"):
        mem.extraction(model, [{"text": "a b c"}], None, 2, tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="method"):
        mem.extraction(model, rows, 8, 8, method="beam", progress=False)


# --- teacher-conditioned, agreement, summary -----------------------------------------------------------

def test_prompts_over_the_models_positions_are_cut_from_their_start(tok):
    """A GPT-2-family model (learned positions) on a 100k-character prompt: match and extraction cut it, no crash."""
    model = models.tiny_model("gpt2", max_positions=128)
    records = bundled_records()[:3] + [{"instruction": "long " * 20000, "response": "short answer here"}]
    fitted, whole = mem.fit_prompts(tok, records, 128, 16), encode(tok, records[-1])
    assert [e.truncated for e in fitted] == [False, False, False, True] and fitted[-1].prompt_len == 112
    assert fitted[-1].input_ids == whole.input_ids[whole.prompt_len - 112:]  # the prompt's end, then the response
    res = mem.match_accuracy(model, tok, records, n_tokens=16, progress=False)
    assert res.n_compared[-1] == min(16, len(whole) - whole.prompt_len)
    ext = mem.extraction(model, records, None, 4, tokenizer=tok, progress=False)
    assert ext.checked.all()
    with pytest.raises(ValueError, match="--prefix-len, --suffix-len"):
        mem.extraction(model, records, 120, 16, tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="--n-tokens"):
        mem.match_accuracy(model, tok, records, n_tokens=128, progress=False)


def test_teacher_conditioned_hand_computed():
    teacher = [0.55, 0.65, 0.95, 0.4, 0.7]
    student = [0.6, 0.1, 0.8, 0.9, 0.7]
    rows = mem.teacher_conditioned(teacher, student, taus=(0.5, 0.7, 0.9, 0.96))
    r5, r7, r9, r96 = rows
    assert (r5.n_teacher, r5.n_both) == (4, 3)  # teacher > 0.5: records 0, 1, 2, 4; student > 0.5: 0, 2, 4
    assert r5.student_mean == pytest.approx(0.55) and r5.student_fraction == 0.75
    assert (r7.n_teacher, r7.n_both, r7.student_mean) == (1, 1, 0.8)  # 0.7 is not above 0.7
    assert (r9.n_teacher, r9.n_both, r9.student_fraction) == (1, 0, 0.0)
    assert r96.n_teacher == 0 and math.isnan(r96.student_mean) and math.isnan(r96.student_fraction)
    with pytest.raises(ValueError, match="same records"):
        mem.teacher_conditioned([0.1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mem.teacher_conditioned([1.5], [0.1])


def test_agreement_hand_computed():
    mia = [0.9, 0.8, 0.7, 0.1, 0.2, 0.3]
    memorized = np.array([1, 0, 1, 0, 0, 1], dtype=bool)
    a = mem.agreement(mia, memorized, mia_threshold=0.5)
    assert (a.both, a.mia_only, a.mem_only, a.neither) == (2, 1, 1, 2)
    assert a.jaccard == 0.5 and a.kappa == pytest.approx(1 / 3)  # p_o = 4/6, p_e = 1/2
    assert a.mia_threshold == 0.5 and a.mem_threshold is None and a.n == 6
    c = mem.agreement(mia, memorized, flag_rate=0.5)  # the rate applies to the numeric side; booleans stay as is
    assert (c.both, c.mia_only, c.mem_only, c.neither) == (2, 1, 1, 2) and c.mia_threshold == 0.7
    b = mem.agreement(mia, [0.9, 0.0, 0.8, 0.1, 0.2, 0.7], flag_rate=0.5)  # top 3 of each: the same sets
    assert (b.both, b.mia_only, b.mem_only) == (2, 1, 1) and b.mia_threshold == 0.7 and b.mem_threshold == 0.7
    none = mem.agreement([0.1, 0.2], [0.0, 0.0], mia_threshold=0.5, mem_threshold=0.5)
    assert math.isnan(none.jaccard) and math.isnan(none.kappa) and none.neither == 2
    same = mem.agreement(mia, mia, flag_rate=1 / 3)
    assert same.kappa == pytest.approx(1.0) and same.jaccard == 1.0
    with pytest.raises(ValueError, match="threshold or a flag rate"):
        mem.agreement(mia, mia, mia_threshold=0.5)
    with pytest.raises(ValueError, match="NaN"):
        mem.agreement([0.1, float("nan")], [True, False], mia_threshold=0.5)


def test_flag_rate_never_splits_ties():
    flags, cut = mem.flag([3.0, 2.0, 2.0, 1.0], rate=0.5)  # a tie across the boundary stays unflagged
    assert flags.tolist() == [True, False, False, False] and cut == 3.0
    flags, cut = mem.flag([1.0, 1.0, 1.0], rate=0.5)
    assert not flags.any() and cut == math.inf
    flags, _ = mem.flag([0.2, 0.9, 0.5], rate=1.0)
    assert flags.all()


def test_group_summary_gap():
    acc = np.array([1.0, 0.5, 0.0, 0.25])
    match = mem.MatchResult(accuracy=acc, n_compared=np.full(4, 4), edit_distance=1 - acc, approx=acc >= 0.9,
                            generated_ids=[[]] * 4, generated=[""] * 4, n_tokens=4, approx_threshold=0.1)
    ext = mem.Extraction(extractable=torch.tensor([True, False, False, False]), matched=torch.tensor([4, 2, 0, 0]),
                         checked=torch.tensor([True, True, False, True]), prefix_len=None, suffix_len=4,
                         method="forward")
    s = mem.group_summary(match, ext, membership=[1, 1, 0, 0])
    assert s["members"]["accuracy"] == 0.75 and s["nonmembers"]["accuracy"] == 0.125
    assert s["gap"]["accuracy"] == 0.625 and s["gap"]["exact_rate"] == 0.5
    assert s["nonmembers"]["extraction_checked"] == 1 and s["gap"]["extractable_rate"] == 0.5


# --- CLI -----------------------------------------------------------------------------------------------

def test_cli_memorize_end_to_end(overfit, tok, tmp_path, capsys):
    model, train, held = overfit
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    members, nonmembers = tmp_path / "members.jsonl", tmp_path / "nonmembers.jsonl"
    members.write_text("".join(json.dumps(r) + "\n" for r in train))
    nonmembers.write_text("".join(json.dumps(r) + "\n" for r in held))
    out = tmp_path / "out"
    argv = ["memorize", "--model", str(folder), "--teacher", str(folder), "--records", str(members),
            "--nonmembers", str(nonmembers), "--n-tokens", "12", "--suffix-len", "6", "--out", str(out), "--quiet",
            "--batch-size", "8"]
    assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "gap" in printed and "teacher-conditioned" in printed
    summary = json.loads((out / "summary.json").read_text())
    figures = summary["model_figures"]
    assert figures["gap"]["accuracy"] > 0.7 and figures["members"]["extractable_rate"] >= 0.85
    rows = summary["teacher_conditioned"]["rows"]  # the teacher is the model itself: it keeps all it memorized
    assert summary["teacher_conditioned"]["on"] == "members" and all(r["student_fraction"] == 1.0 for r in rows)
    table = pd.read_parquet(out / "records.parquet")
    assert len(table) == 32 and table["member"].sum() == 16
    assert np.array_equal(table["accuracy"], table["teacher_accuracy"])
    assert cli(argv) == 0 and "reusing" in capsys.readouterr().out  # a rerun takes both models from the cache
    limited = ["memorize", "--model", str(folder), "--members", str(members), "--nonmembers", str(nonmembers),
               "--limit", "3", "--no-extraction", "--n-tokens", "4", "--out", str(tmp_path / "few"), "--quiet"]
    assert cli(limited) == 0
    assert pd.read_parquet(tmp_path / "few" / "records.parquet")["member"].tolist() == [1, 1, 1, 0, 0, 0]

    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps(train[0]) + "\n")
    assert cli(["memorize", "--model", str(folder), "--records", str(members), "--nonmembers", str(both),
                "--out", str(out)]) == 2
    assert "both in" in capsys.readouterr().err
    assert cli(["memorize", "--model", str(folder), "--records", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_memorize_says_what_it_cut_and_what_it_checked_on_fewer(tok, tmp_path, capsys):
    """A 100k-character prompt on a GPT-2-family model is cut with a counted warning; fewer records than --limit
    asks, and records too short for the extraction suffix, are said with both numbers, in the output and the json."""
    folder = tmp_path / "gpt2"
    models.tiny_model("gpt2", max_positions=128).save_pretrained(folder)
    tok.save_pretrained(folder)
    records = bundled_records()[:8]
    records[0] = {**records[0], "instruction": "long " * 20000}
    members, nonmembers = tmp_path / "members.jsonl", tmp_path / "nonmembers.jsonl"
    members.write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    nonmembers.write_text("".join(json.dumps(r) + "\n" for r in records[4:]))
    out = tmp_path / "out"
    assert cli(["memorize", "--model", str(folder), "--records", str(members), "--nonmembers", str(nonmembers),
                "--n-tokens", "8", "--suffix-len", "20", "--limit", "50", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "1 of 8 records cut to 128 tokens from their prompt's start (the model's positions); pass --max-len" \
        in printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records_cut_to_max_len"] == {"model": 1}
    assert summary["notices"] == [f"--limit 50 asked, 4 records in {members}",
                                  f"--limit 50 asked, 4 records in {nonmembers}",
                                  "model: extraction checked 6 of 8 records, those whose response holds a 20-token "
                                  "suffix (EOS included); lower --suffix-len to check more"]
    assert all(f"note: {n}" in printed.out for n in summary["notices"])
    assert "model: 1 of 8 records cut from their prompt's start to fit the model's positions" in printed.out
    assert pd.read_parquet(out / "records.parquet")["prompt_cut"].tolist() == [True] + [False] * 7
    assert cli(["memorize", "--model", str(folder), "--records", str(members), "--prefix-len", "120",
                "--suffix-len", "20", "--out", str(tmp_path / "over")]) == 2
    assert "--prefix-len, --suffix-len" in capsys.readouterr().err
