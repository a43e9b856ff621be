"""The shared loop: global-token accumulation, exact resume, final save, bad inputs rejected early."""
import json

import pytest
import torch

from kdfast import models
from kdfast.data import RecordError, bundled_records
from kdfast.distill import DistillConfig, Distiller, DistillError

SMALL = dict(max_len=112, max_prompt_len=100, max_new_tokens=8, warmup_steps=1, progress=False, num_rollouts=8)



def _run(technique="kd", family="opt", records=None, on_step=None, evals=None, lm=None, **kw):
    teacher = models.tiny_model(family, seed=1, hidden=32, initializer_range=0.2)
    student = models.tiny_model(family, seed=2, hidden=32)
    cfg = DistillConfig(technique=technique, lr=1e-3, **{**SMALL, **kw})
    summary = Distiller(teacher, student, models.tiny_tokenizer(), cfg).train(
        records or bundled_records()[:16], evals, lm, on_step=on_step)
    return student, summary


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("fused", [True, False])
def test_accumulation_matches_one_big_batch(fused):
    """2 micro-batches of 4 = 1 of 8: losses are summed and divided by the tokens of the whole step (the records'
    responses have uneven lengths, so per-micro-batch means would differ), the LM-text term likewise."""
    records = bundled_records()[:16]
    assert len({len(r["response"]) for r in records[:8]}) > 4
    lm = [{"text": r["response"] * (1 + i % 3)} for i, r in enumerate(records)]
    kw = dict(max_steps=3, disable_dropout=True, fused=fused, lm_kd_ratio=0.5)
    one, s1 = _run(batch_size=8, grad_accum=1, lm=lm, **kw)
    two, s2 = _run(batch_size=4, grad_accum=2, lm=lm, **kw)
    four, _ = _run(batch_size=2, grad_accum=4, lm=lm, **kw)
    init = models.tiny_model("opt", seed=2, hidden=32)
    assert _max_diff(one, init) > 1e-3             # training moved the weights ...
    assert _max_diff(one, two) < 5e-5 and _max_diff(one, four) < 5e-5   # ... the same way
    assert s1.tokens == s2.tokens and s1.loss == pytest.approx(s2.loss, rel=1e-5)


@pytest.mark.parametrize("technique", ["imitkd", "distillm", "minillm"])
def test_resume_is_exact(tmp_path, technique):
    """Stop after step 3 (checkpoint), resume to step 6: bit-identical to an uninterrupted run (dropout on, replay
    buffer / adaptive schedule / PPO rollouts, eval and LM-text streams included)."""
    records = bundled_records()[:16]
    kw = dict(technique=technique, family="gpt2", batch_size=4, max_steps=6, save_every=100, eval_every=2,
              evals=records[:4], lm=[{"text": r["response"]} for r in records], init_threshold=0.5)
    whole, summary = _run(out=str(tmp_path / "a"), **kw)
    _, stopped = _run(out=str(tmp_path / "b"), on_step=lambda step, m: step == 3, **kw)
    assert stopped.stopped_early and stopped.steps == 3 and stopped.final is None
    resumed, again = _run(out=str(tmp_path / "b"), resume=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert (again.steps, again.tokens, again.loss) == (summary.steps, summary.tokens, summary.loss)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3, 4, 5, 6]


def test_final_student_checkpoints_and_reruns(tmp_path):
    out = tmp_path / "run"
    student, summary = _run(out=str(out), max_steps=4, save_every=1, keep_checkpoints=2, batch_size=4)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    loaded, tok = models.load_model(out / "final")
    assert _max_diff(loaded, student) == 0.0 and len(tok) == 1024
    assert json.loads((out / "summary.json").read_text())["steps"] == 4 and summary.final == str(out / "final")
    assert "4/4 steps" in str(summary)
    with pytest.raises(DistillError, match=r"already holds a run; pass --resume \(resume=True in Python\)"):
        _run(out=str(out), max_steps=4, batch_size=4)
    _, again = _run(out=str(out), max_steps=4, batch_size=4, resume=True)   # finished: not repeated
    assert again == summary
    other = tmp_path / "other"
    _run(out=str(other), max_steps=4, batch_size=4, on_step=lambda step, m: step == 2)
    with pytest.raises(DistillError, match=r"different configuration \(batch_size: 4 -> 8\)"):
        _run(out=str(other), max_steps=4, batch_size=8, resume=True)


def test_bad_inputs_fail_early():
    tok = models.tiny_tokenizer()
    teacher = models.tiny_model("llama", seed=1, hidden=32)
    other = models.tiny_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(models.ModelError, match="tokenizers differ"):
        Distiller(teacher, models.tiny_model("llama", hidden=32), tok, teacher_tokenizer=other)
    wide = models.tiny_model("llama", seed=2, hidden=32, vocab_size=1040)
    with pytest.raises(DistillError, match="output head has 1024 rows and the student's 1040.*vocab='intersect'"):
        Distiller(teacher, wide, tok)
    with pytest.raises(DistillError, match="tokenizer has 1025 tokens but the student's output head only 1024"):
        Distiller(teacher, models.tiny_model("llama", hidden=32), other)
    with pytest.raises(DistillError, match="technique 'kd' needs a teacher"):
        Distiller(None, models.tiny_model("llama", hidden=32), tok)
    with pytest.raises(RecordError, match="training record 1: empty response"):
        _run(records=[{"instruction": "a", "response": "b"}, {"instruction": "c", "response": ""}], max_steps=1)
    long = {"instruction": "Define " + "very " * 80 + "long.", "response": "x"}
    with pytest.raises(RecordError, match="record 0: prompt has"):
        _run(records=[long] + bundled_records()[:8], max_steps=1, batch_size=4, long_prompts="error")
    with pytest.warns(UserWarning, match="dropped 1 of 9 training records"):
        _run(records=[long] + bundled_records()[:8], max_steps=1, batch_size=4, long_prompts="drop")
    with pytest.raises(DistillError, match="cannot fill one batch of 8"):
        _run(records=bundled_records()[:4], max_steps=1, batch_size=8)


def test_vocab_intersect_and_sft_without_teacher_and_bf16():
    tok = models.tiny_tokenizer()
    teacher = models.tiny_model("llama", seed=1, hidden=32)
    wide = models.tiny_model("llama", seed=2, hidden=32, vocab_size=1040)
    cfg = DistillConfig(vocab="intersect", lr=1e-3, max_steps=2, batch_size=4, **SMALL)
    assert Distiller(teacher, wide, tok, cfg).train(bundled_records()[:8]).steps == 2
    sft = DistillConfig(technique="sft", lr=1e-3, max_steps=2, batch_size=4, bf16=True, **SMALL)
    summary = Distiller(None, models.tiny_model("llama", hidden=32), tok, sft).train(bundled_records()[:8])
    assert summary.steps == 2 and summary.loss == summary.loss


def test_resume_with_other_records_is_refused(tmp_path):
    """Issue 12 item 3: a resumed run trains on the records it started with, or says which differ."""
    out = str(tmp_path / "run")
    _run(out=out, max_steps=4, batch_size=4, save_every=1, on_step=lambda step, m: step == 2)
    with pytest.raises(DistillError, match=r"cannot resume .*: it trained on train data .* now given .*--out"):
        _run(out=out, max_steps=4, batch_size=4, resume=True, records=bundled_records()[100:116])
