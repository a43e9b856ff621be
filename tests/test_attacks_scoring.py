"""score()'s batching, resume and sharding: an interrupted run resumes to the same table; two processes give the
table of one; the parts are keyed by the settings."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from kdfast import attacks, models
from kdfast.attacks import scoring
from kdfast.data import bundled_records

ATTACKS = ("loss", "zlib", "min_k", "min_k_pp", "mope")


@pytest.fixture(scope="module")
def setup():
    return models.tiny_model("llama", seed=11), models.tiny_tokenizer(), bundled_records()[:24]


def test_batching_does_not_change_scores(setup):
    model, tok, records = setup
    small = attacks.score(model, tok, records, ATTACKS, mope_n=2, batch_tokens=200, progress=False)
    large = attacks.score(model, tok, records, ATTACKS, mope_n=2, batch_tokens=5000, padding_side="left",
                          progress=False)
    pd.testing.assert_frame_equal(small, large, atol=1e-5, rtol=0)


def test_resume_after_interruption_gives_the_same_table(setup, tmp_path, monkeypatch):
    model, tok, records = setup
    records = records + records[:2]  # duplicates are scored once, and fill both rows
    kw = dict(attacks=ATTACKS, mope_n=2, batch_tokens=400, membership=[1] * 13 + [0] * 13, progress=False)
    full = attacks.score(model, tok, records, out=tmp_path / "full", **kw)
    original, scored = scoring._Job._score_group, []

    def interrupted(self, group):
        if len(scored) == 2:
            raise KeyboardInterrupt
        scored.append(group)
        return original(self, group)

    monkeypatch.setattr(scoring._Job, "_score_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        attacks.score(model, tok, records, out=tmp_path / "run", **kw)
    assert not (tmp_path / "run" / scoring.SCORES_FILE).exists()
    first = sum(map(len, scored))
    scored.clear()
    monkeypatch.setattr(scoring._Job, "_score_group", lambda self, g: scored.append(g) or original(self, g))
    resumed = attacks.score(model, tok, records, out=tmp_path / "run", **kw)
    assert sum(map(len, scored)) == 24 - first  # only what was left, each distinct record once
    pd.testing.assert_frame_equal(resumed, full, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / scoring.SCORES_FILE), full)
    scored.clear()
    attacks.score(model, tok, records, out=tmp_path / "run", **{**kw, "mope_sigma": 0.02})
    assert sum(map(len, scored)) == 24  # other settings: nothing reused
    assert len(list((tmp_path / "run" / "parts").iterdir())) == 2


def test_two_processes_give_the_table_of_one(tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU) -m kdfast attack equals a one-process run."""
    model, tok = models.tiny_model("llama", seed=12), models.tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    records = bundled_records()[:40]
    pd.DataFrame(records[:20]).to_json(tmp_path / "members.jsonl", orient="records", lines=True)
    pd.DataFrame(records[20:]).to_json(tmp_path / "nonmembers.jsonl", orient="records", lines=True)
    args = ["attack", "--model", str(tmp_path / "model"), "--members", str(tmp_path / "members.jsonl"),
            "--nonmembers", str(tmp_path / "nonmembers.jsonl"), "--attacks", *ATTACKS, "recall", "--mope-n", "2",
            "--batch-tokens", "600", "--bootstrap", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "kdfast", *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from kdfast.cli import main

    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one = pd.read_parquet(tmp_path / "one" / scoring.SCORES_FILE)
    two = pd.read_parquet(tmp_path / "two" / scoring.SCORES_FILE)
    pd.testing.assert_frame_equal(one, two, atol=1e-5, rtol=0)
    assert two["recall"].isna().sum() == 3 and np.isfinite(two["mope"]).all()
    assert (tmp_path / "two" / "metrics.json").exists() and "loss" in run.stdout


def test_records_over_the_models_positions_are_cut_not_crashed():
    """A GPT-2-family model (learned positions) on a record far past them: score() cuts to the positions."""
    model, tok = models.tiny_model("gpt2", max_positions=128), models.tiny_tokenizer()
    assert models.model_positions(model) == 128
    long = [{"instruction": "say it", "response": "word " * 5000}, {"instruction": "x " * 300, "response": "ok"},
            {"text": "a b " * 5000}]
    records = bundled_records()[:6] + long
    assert attacks.records_cut(tok, records, 128) == 3 and attacks.records_cut(tok, records, None) == 0
    table = attacks.score(model, tok, records, ("loss", "lowercase", "recall"), membership=[1, 0] * 4 + [1],
                          recall_shots=2, progress=False)
    assert table["n_tokens"].iloc[-3:].tolist() == [128 - 68, 1, 127]  # the response's end, the prompt's start cut
    assert table["loss"].notna().all() and table["recall"].iloc[-3:].isna().all()  # no room left for the prefix
    assert attacks.score(model, tok, records[-1:], ("loss",), max_len=10, progress=False)["n_tokens"].item() == 9
