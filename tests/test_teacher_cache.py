"""kdfast.distill.cache_teacher, TeacherCache and training from the cache: the cached rows are the teacher's, captures
resume, a cache of the whole vocabulary trains exactly as the live teacher, mismatches are named."""
import json
import math

import pytest
import torch

from kdfast import models
from kdfast.cli import main
from kdfast.data import bundled_records, load_records
from kdfast.distill import DistillConfig, Distiller, DistillError
from kdfast.distill import teacher_cache as tc
from kdfast.distill.data import encode_training
from kdfast.distill.techniques.seqkd import Sampling
from kdfast.store import tokenizer_fingerprint

LEN = dict(max_len=112, max_prompt_len=100)
SMALL = dict(**LEN, warmup_steps=1, progress=False, batch_size=4, disable_dropout=True)


def teacher():
    return models.tiny_model("opt", seed=1, hidden=32, initializer_range=0.2)


def capture(out, records, **kw):
    return tc.cache_teacher(teacher(), models.tiny_tokenizer(), records, out=out, progress=False, **{**LEN, **kw})


def test_cached_rows_are_the_teachers_top_k(tmp_path):
    records = bundled_records()[:7]
    summary = capture(tmp_path / "c", records, k=8, temperature=1.7, shard_records=3, logprob_dtype="float32")
    tok = models.tiny_tokenizer()
    items = encode_training(tok, records, LEN["max_len"], LEN["max_prompt_len"])
    assert summary.records == 7 and summary.tokens == sum(tc.n_targets(it) for it in items)
    assert summary.bytes_per_token == 8 * 8 and summary.shards_written == 3
    cache = tc.TeacherCache(tmp_path / "c")
    model = teacher()
    for i in (5, 0, 3):  # across shards, in any order
        it = items[i]
        ids, lp = cache.rows([it])
        with torch.no_grad():
            logits = model(torch.tensor([it.input_ids])).logits[0].double()
        keep = torch.tensor(it.labels[1:] + [-100]) != -100
        full = torch.log_softmax(logits[keep] / 1.7, -1)
        assert ids.shape == (int(keep.sum()), 8)
        torch.testing.assert_close(lp.double(), full.gather(1, ids), rtol=1e-5, atol=1e-5)
        assert torch.equal(full.topk(8, -1).values, full.gather(1, ids))  # the top 8, best first
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["k"] == 8 and manifest["temperature"] == 1.7
    assert manifest["tokenizer"] == tokenizer_fingerprint(tok) and len(manifest["keys"]) == 7


def test_capture_resumes_and_refuses_other_settings(tmp_path, monkeypatch):
    records = bundled_records()[:7]
    whole = capture(tmp_path / "a", records, k=4, shard_records=2)
    calls = []
    real = tc._capture

    def dies_on_third_shard(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(tc, "_capture", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        capture(tmp_path / "b", records, k=4, shard_records=2)
    with pytest.raises(DistillError, match="unfinished"):
        tc.TeacherCache(tmp_path / "b")
    calls.clear()
    monkeypatch.setattr(tc, "_capture", real)
    resumed = capture(tmp_path / "b", records, k=4, shard_records=2)
    assert resumed.shards_written == 2 and resumed.tokens == whole.tokens
    a, b = tc.TeacherCache(tmp_path / "a"), tc.TeacherCache(tmp_path / "b")
    items = encode_training(models.tiny_tokenizer(), records, LEN["max_len"], LEN["max_prompt_len"])
    for x, y in zip(a.rows(items), b.rows(items)):
        assert torch.equal(x, y)
    with pytest.raises(DistillError, match="k: cached 4, now 8"):
        capture(tmp_path / "b", records, k=8, shard_records=2)
    with pytest.raises(DistillError, match="records"):
        capture(tmp_path / "b", records[:5], k=4, shard_records=2)


def _train(records, cache=None, **kw):
    student = models.tiny_model("opt", seed=2, hidden=32)
    cfg = DistillConfig(**{"technique": "kd", "lr": 1e-3, "max_steps": 3, "teacher_cache": cache, **SMALL, **kw})
    summary = Distiller(None if cache else teacher(), student, models.tiny_tokenizer(), cfg).train(records)
    return student, summary


@pytest.mark.parametrize("fused", [True, False])
def test_whole_vocabulary_cache_trains_as_the_live_teacher(tmp_path, fused):
    records = bundled_records()[:12]
    capture(tmp_path / "c", records, k=len(models.tiny_tokenizer()), temperature=1.5, logprob_dtype="float32")
    kw = dict(temperature=1.5, kd_ratio=0.7, fused=fused)
    live, s_live = _train(records, **kw)
    cached, s_cached = _train(records, str(tmp_path / "c"), **kw)
    assert s_cached.loss == pytest.approx(s_live.loss, rel=1e-5)
    diff = max(float((a - b).abs().max()) for a, b in zip(live.state_dict().values(), cached.state_dict().values()))
    init = models.tiny_model("opt", seed=2, hidden=32)
    moved = max(float((a - b).abs().max()) for a, b in zip(live.state_dict().values(), init.state_dict().values()))
    assert moved > 1e-3 and diff < 1e-5


def test_cache_mismatches_are_named(tmp_path):
    records = bundled_records()[:8]
    capture(tmp_path / "c", records, k=4)
    with pytest.raises(DistillError, match="temperature: cached at 1.0, the run uses 2.0"):
        _train(records, str(tmp_path / "c"), temperature=2.0)
    with pytest.raises(DistillError, match="max_len: cached with 112, the run uses 120"):
        _train(records, str(tmp_path / "c"), max_len=120)
    with pytest.raises(DistillError, match="4 of 12 training records are not in the cache"):
        _train(bundled_records()[:12], str(tmp_path / "c"))
    with pytest.raises(DistillError, match="student_gen_fraction=0"):
        DistillConfig(technique="gkd", teacher_cache="c")
    with pytest.raises(DistillError, match="student_gen_fraction=0"):
        DistillConfig(technique="distillm", teacher_cache="c")
    assert not DistillConfig(technique="seqkd", teacher_cache="c").needs_teacher  # from a --seqkd capture
    with pytest.raises(DistillError, match="minillm.*cannot train from teacher_cache"):
        DistillConfig(technique="minillm", teacher_cache="c", lm_kd_ratio=0.0)
    with pytest.raises(DistillError, match="renorm"):
        DistillConfig(technique="kd", loss="rkl", teacher_cache="c", teacher_cache_tail="renorm")
    assert not DistillConfig(technique="gkd", teacher_cache="c", student_gen_fraction=0.0).needs_teacher
    with pytest.raises(DistillError, match="no teacher cache"):
        _train(records, str(tmp_path / "nothing"))


def test_gkd_ground_truth_batches_and_resume_from_cache(tmp_path):
    records = bundled_records()[:8]
    capture(tmp_path / "c", records, k=16)
    kw = dict(technique="gkd", student_gen_fraction=0.0, max_steps=4, save_every=100)
    whole, summary = _train(records, str(tmp_path / "c"), out=str(tmp_path / "a"), **kw)
    student = models.tiny_model("opt", seed=2, hidden=32)
    cfg = DistillConfig(lr=1e-3, teacher_cache=str(tmp_path / "c"), out=str(tmp_path / "b"), **{**SMALL, **kw})
    stopped = Distiller(None, student, models.tiny_tokenizer(), cfg).train(records, on_step=lambda s, m: s == 2)
    assert stopped.stopped_early
    resumed, again = _train(records, str(tmp_path / "c"), out=str(tmp_path / "b"), resume=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert again.loss == summary.loss


def _spy_on_loads(monkeypatch) -> list[str]:
    """The model specs `kdfast distill` loads, in order."""
    loaded = []
    real = models.load_model

    def spy(spec, **kw):
        loaded.append(spec)
        return real(spec, **kw)

    monkeypatch.setattr("kdfast.distill.run.load_model", spy)
    return loaded


def test_cli_capture_then_distill_without_teacher(tmp_path, capsys, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in bundled_records()[:8]))
    assert main(["cache-teacher", "--teacher", "tiny:opt", "--data", str(data), "--k", "8", "--out",
                 str(tmp_path / "c"), "--max-len", "112", "--max-prompt-len", "100", "--no-progress"]) == 0
    assert "bytes/token" in capsys.readouterr().out
    real, loaded = models.load_model, _spy_on_loads(monkeypatch)
    assert main(["distill", "--student", "tiny:opt", "--technique", "kd", "--teacher-cache", str(tmp_path / "c"),
                 "--data", str(data), "--out", str(tmp_path / "run"), "--max-len", "112", "--max-prompt-len", "100",
                 "--max-steps", "2", "--batch-size", "4", "--no-progress"]) == 0
    assert loaded == ["tiny:opt"]  # the student only
    student, tok = real(str(tmp_path / "run" / "final"))  # the saved student loads and runs
    with torch.no_grad():
        logits = student(torch.tensor([tok("a word")["input_ids"]])).logits
    assert logits.shape[-1] >= len(tok) and torch.isfinite(logits).all()
    assert len(load_records(data)) == 8


# SeqKD from a --seqkd capture (tiny LLaMA pair): the samples are the live run's, and no teacher is loaded.
SEQKD = dict(max_new_tokens=12, gen_batch_size=4)


def llama_teacher():
    return models.tiny_model("llama", seed=1, hidden=32, initializer_range=0.2)


def seqkd_capture(out, records, sampling=Sampling(**SEQKD), **kw):
    return tc.cache_teacher(llama_teacher(), models.tiny_tokenizer(), records, out=out, progress=False, seqkd=True,
                            sampling=sampling, **{**LEN, **kw})


def _seqkd_train(records, cache=None, out=None, **kw):
    student = models.tiny_model("llama", seed=2, hidden=32)
    cfg = DistillConfig(**{"technique": "seqkd", "lr": 1e-3, "max_steps": 4, "teacher_cache": cache, "out": out,
                           "max_new_tokens": SEQKD["max_new_tokens"], **SMALL, **kw})
    losses = []
    summary = Distiller(None if cache else llama_teacher(), student, models.tiny_tokenizer(), cfg).train(
        records, on_step=lambda step, metrics: losses.append(metrics["loss"]))
    return summary, losses


def test_seqkd_from_cache_samples_and_trains_as_the_live_teacher(tmp_path):
    records = bundled_records()[:8]
    seqkd_capture(tmp_path / "c", records, k=len(models.tiny_tokenizer()), temperature=1.5, logprob_dtype="float32")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["seqkd"]["gen_temperature"] == 1.0 and manifest["seqkd"]["max_new_tokens"] == 12
    kw = dict(temperature=1.5, kd_ratio=0.7)
    s_live, live = _seqkd_train(records, out=str(tmp_path / "live"), **kw)
    s_cached, cached = _seqkd_train(records, str(tmp_path / "c"), **kw)
    drawn = json.loads(next((tmp_path / "live" / "seqkd-cache").glob("teacher-*.json")).read_text())["responses"]
    captured = json.loads((tmp_path / "c" / "seqkd.json").read_text())["responses"]
    assert captured == drawn and len(captured) == 8 and all(0 < len(r) <= 12 for r in captured)
    assert cached == pytest.approx(live, rel=1e-4)  # the KD term read from the cache on the sampled sequences
    assert all(map(math.isfinite, cached)) and cached[-1] < cached[0]
    _, ce_only = _seqkd_train(records, str(tmp_path / "c"), temperature=1.5, kd_ratio=0.0, max_steps=2)  # classic SeqKD
    assert all(map(math.isfinite, ce_only))


def test_seqkd_cache_mismatches_are_named(tmp_path):
    records = bundled_records()[:8]
    capture(tmp_path / "plain", records, k=4)
    with pytest.raises(DistillError, match="records' own responses.*--seqkd"):
        _seqkd_train(records, str(tmp_path / "plain"))
    seqkd_capture(tmp_path / "s", records, k=4)
    with pytest.raises(DistillError, match=r"gen_temperature: sampled with 1.0, the run uses 0.7.*same --gen-temp"):
        _seqkd_train(records, str(tmp_path / "s"), gen_temperature=0.7)
    with pytest.raises(DistillError, match=r"seed: sampled with 0, the run uses 3.*--seed"):
        _seqkd_train(records, str(tmp_path / "s"), seed=3)
    with pytest.raises(DistillError, match="prompts: the cache's samples answer 8 prompts, the run has 12"):
        _seqkd_train(bundled_records()[:12], str(tmp_path / "s"))
    with pytest.raises(DistillError, match="own samples.*--technique seqkd"):
        _train(records, str(tmp_path / "s"))
    with pytest.raises(DistillError, match="seqkd"):  # the capture refuses another capture's folder
        seqkd_capture(tmp_path / "s", records, sampling=Sampling(**{**SEQKD, "gen_temperature": 0.5}), k=4)


def test_cli_seqkd_capture_then_distill_without_teacher(tmp_path, capsys, monkeypatch):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in bundled_records()[:8]))
    lengths = ["--max-len", "112", "--max-prompt-len", "100", "--max-new-tokens", "8", "--no-progress"]
    assert main(["cache-teacher", "--teacher", "tiny:llama", "--data", str(data), "--k", "8", "--seqkd",
                 "--gen-batch-size", "4", "--out", str(tmp_path / "c"), *lengths]) == 0
    assert "bytes/token" in capsys.readouterr().out
    loaded = _spy_on_loads(monkeypatch)
    assert main(["distill", "--student", "tiny:llama", "--technique", "seqkd", "--teacher-cache", str(tmp_path / "c"),
                 "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4",
                 *lengths]) == 0
    assert loaded == ["tiny:llama"]  # the student only
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["loss"])
