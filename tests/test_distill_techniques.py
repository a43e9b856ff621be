"""Each technique lowers its own objective on GPT-2, OPT and LLaMA; MiniLLM's returns and weights; DistiLLM's
schedule; SeqKD's cache."""
import math
import random
from types import SimpleNamespace

import pytest
import torch

from kdfast import models
from kdfast.data import Encoded, bundled_records
from kdfast.distill import TECHNIQUES, DistillConfig, Distiller
from kdfast.distill.techniques import minillm, seqkd
from kdfast.distill.techniques.distillm import DistiLLM

SMALL = dict(max_len=112, max_prompt_len=100, max_new_tokens=8, batch_size=4, warmup_steps=0, progress=False,
             num_rollouts=8)



def _pair(family):
    """A peaked random teacher (KL to a fresh student ≈ 1 nat per token) and a student of the same family."""
    return (models.tiny_model(family, seed=1, hidden=32, initializer_range=0.2),
            models.tiny_model(family, seed=2, hidden=32))


GENERATED = {"sft": (0, 0), "kd": (0, 0), "seqkd": (0, 0), "imitkd": (1, 1), "gkd": (0.1, 0.9),
             "distillm": (0.1, 1), "minillm": (1, 1)}


@pytest.mark.parametrize("family, technique", [("llama", t) for t in TECHNIQUES]
                         + [(f, t) for f in ("gpt2", "opt") for t in TECHNIQUES])
def test_lowers_its_objective(family, technique):
    """20 steps on 8 fixed records: the mean objective of the last 5 steps is below that of the first 5."""
    teacher, student = _pair(family)
    cfg = DistillConfig(technique=technique, lr=3e-3, max_steps=20, init_threshold=0.5, **SMALL)
    seen = []
    Distiller(teacher, student, models.tiny_tokenizer(), cfg).train(bundled_records()[:8],
                                                                    on_step=lambda s, m: seen.append(m))
    objective = [m["objective"] for m in seen]
    assert all(math.isfinite(o) for o in objective)
    assert sum(objective[-5:]) / 5 < sum(objective[:5]) / 5
    generated = sum(m["generated"] for m in seen) / len(seen)
    low, high = GENERATED[technique]
    assert low <= generated <= high


def test_minillm_returns_and_importance_weight():
    r = torch.tensor([1.0, -2.0, 0.5])
    want = torch.tensor([1.0 + 0.9 * -2.0 + 0.81 * 0.5, -2.0 + 0.9 * 0.5, 0.5])
    torch.testing.assert_close(minillm._returns(r, 0.9, length_norm=False), want)
    torch.testing.assert_close(minillm._returns(r, 0.9, length_norm=True), want / torch.tensor([3.0, 2.0, 1.0]))
    log_q, log_p = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -0.5])
    q, p = log_q.exp(), log_p.exp()
    torch.testing.assert_close(minillm._importance_weight(log_q, log_p, 0.2), q / (0.8 * q + 0.2 * p))
    torch.testing.assert_close(minillm._importance_weight(log_q, log_p, 0.0), torch.ones(2))
    torch.testing.assert_close(minillm._importance_weight(log_q, log_p, 1.0), q / p)


def _distillm(threshold, capacity=4):
    calls = []

    def generate_student(examples, seed):
        calls.append(seed)
        return [Encoded(e.input_ids + [7], e.labels + [7], e.prompt_len) for e in examples]

    ctx = SimpleNamespace(cfg=DistillConfig(technique="distillm", buffer_size=capacity, init_threshold=threshold),
                          total_steps=100, rng=lambda *k: random.Random(str(k)), seed=lambda *k: hash(k),
                          generate_student=generate_student)
    return DistiLLM(ctx), calls


def test_distillm_adaptive_schedule():
    technique, _ = _distillm(0.0)
    for loss, want in [(2.0, 0.0), (1.9, 0.0), (2.05, 0.0), (2.1, 0.1), (2.15, 0.1), (2.2, 0.2), (5.0, 0.3)]:
        technique.on_eval(loss)
        assert technique.threshold == pytest.approx(want)
    for _ in range(20):
        technique.on_eval(10.0 + _)
    assert technique.threshold == 1.0
    examples = [Encoded([1, 2, 3], [-100, -100, 3], 2)] * 2
    never, calls = _distillm(0.0)
    assert all(never.choose(examples, s, 0) == (examples, False) for s in range(20)) and not calls
    always, calls = _distillm(1.0, capacity=4)
    kinds = []
    for s in range(30):
        seqs, generated = always.choose(examples, s, 0)
        assert generated and all(x.input_ids[-1] == 7 for x in seqs)
        kinds.append(len(calls))
    assert kinds[1] == 2 and always.buffer.full   # fills the buffer with fresh samples first
    assert len(calls) < 30                       # then replays from it part of the time (share 1 − t/T)


def test_seqkd_caches_teacher_samples(tmp_path, monkeypatch):
    calls = []
    real = seqkd.generate

    def counting(model, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, prompts, *args, **kwargs)

    monkeypatch.setattr(seqkd, "generate", counting)
    records = bundled_records()[:8]
    cfg = dict(technique="seqkd", lr=1e-3, max_steps=1, seqkd_cache=str(tmp_path / "cache"), **SMALL)
    teacher, student = _pair("llama")
    Distiller(teacher, student, models.tiny_tokenizer(), DistillConfig(**cfg)).train(records)
    assert sum(calls) == 8 and len(list((tmp_path / "cache").glob("teacher-*.json"))) == 1
    Distiller(teacher, models.tiny_model("llama", seed=3, hidden=32), models.tiny_tokenizer(),
              DistillConfig(**cfg)).train(records)
    assert sum(calls) == 8   # the second run read the cache
    with torch.no_grad():
        next(teacher.parameters()).add_(0.5)   # another teacher: new samples
    Distiller(teacher, student, models.tiny_tokenizer(), DistillConfig(**cfg)).train(records)
    assert sum(calls) == 16 and len(list((tmp_path / "cache").glob("teacher-*.json"))) == 2
