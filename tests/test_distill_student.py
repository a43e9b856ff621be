"""make_student: students of the teacher's family from chosen blocks (GPT-2, OPT, LLaMA)."""
import pytest
import torch

from kdfast import models
from kdfast.distill import make_student
from kdfast.generation import generate


def _ids():
    return torch.randint(2, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", models.FAMILIES)
def test_all_blocks_reproduce_the_teacher_and_subsets_copy_blocks(family):
    teacher = models.tiny_model(family, seed=3, layers=3, hidden=32)
    with torch.no_grad():
        full = make_student(teacher, layers=[0, 1, 2])
        assert torch.allclose(full(input_ids=_ids()).logits, teacher(input_ids=_ids()).logits, atol=1e-6)
    student = make_student(teacher, layers=[2, 0])
    blocks_t, blocks_s = models.transformer_blocks(teacher), models.transformer_blocks(student)
    assert len(blocks_s) == 2 and student.config.num_hidden_layers == 2 and len(blocks_t) == 3
    for s_block, t_index in zip(blocks_s, [2, 0]):
        for a, b in zip(s_block.state_dict().values(), blocks_t[t_index].state_dict().values()):
            assert torch.equal(a, b)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    with torch.no_grad():
        next(student.parameters()).add_(1.0)   # a copy: the teacher is untouched
    assert not torch.equal(next(student.parameters()), next(teacher.parameters()))


@pytest.mark.parametrize("family", models.FAMILIES)
def test_reindexed_blocks_decode_with_the_kv_cache(family):
    """Greedy decoding with the cache equals re-running the whole sequence (layer indices were re-numbered)."""
    student = make_student(models.tiny_model(family, seed=4, layers=3, hidden=32), layers=[2]).eval()
    prompt = _ids()[0].tolist()
    cached = generate(student, [prompt], 6, pad_id=1, eos_id=None)[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(student(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert cached == ids[len(prompt):]


def test_num_layers_and_errors():
    teacher = models.tiny_model("gpt2", seed=0, layers=5, hidden=32)
    assert make_student(teacher, num_layers=3).config.num_hidden_layers == 3
    student = make_student(teacher, num_layers=3)
    chosen = [models.transformer_blocks(teacher)[i] for i in (0, 2, 4)]
    for s, t in zip(models.transformer_blocks(student), chosen):
        assert torch.equal(s.attn.c_attn.weight, t.attn.c_attn.weight)
    assert make_student(teacher, layers=[-1]).config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="out of range: the teacher has 5 blocks"):
        make_student(teacher, layers=[0, 5])
    with pytest.raises(ValueError, match="repeat a block"):
        make_student(teacher, layers=[1, 1])
    with pytest.raises(ValueError, match="exactly one of"):
        make_student(teacher)
    with pytest.raises(ValueError, match="num_layers must lie in"):
        make_student(teacher, num_layers=6)


def _copied_from(student, teacher) -> list[int]:
    """Which teacher block each student block is a copy of (by weights)."""
    t_blocks = models.transformer_blocks(teacher)
    return [next(i for i, t in enumerate(t_blocks)
                 if all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), t.state_dict().values())))
            for s in models.transformer_blocks(student)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_risk_rules_keep_the_lowest_or_highest_risk_blocks(family):
    teacher = models.tiny_model(family, seed=1, layers=6, hidden=32)
    auc = [0.61, 0.52, 0.70, 0.50, 0.58, 0.66]  # per-block MoPe AUC
    low = make_student(teacher, "low_risk", num_layers=3, risk=auc)
    high = make_student(teacher, "high_risk", num_layers=3, risk={str(i): a for i, a in enumerate(auc)})
    # one record at a time: rank the blocks by hand
    ranked = sorted(range(6), key=lambda i: auc[i])
    assert _copied_from(low, teacher) == sorted(ranked[:3]) == [1, 3, 4]
    assert _copied_from(high, teacher) == sorted(ranked[-3:]) == [0, 2, 5]
    assert low.config.num_hidden_layers == high.config.num_hidden_layers == 3
    evenly = make_student(teacher, "evenly", num_layers=3)
    assert _copied_from(evenly, teacher) == _copied_from(make_student(teacher, num_layers=3), teacher)


def test_risk_rule_ties_and_errors():
    teacher = models.tiny_model("gpt2", seed=0, layers=4, hidden=32)
    from kdfast.distill.student import choose_blocks

    assert choose_blocks(4, "low_risk", 2, [0.5, 0.5, 0.5, 0.4]) == [0, 3]  # a tie goes to the earlier block
    assert choose_blocks(4, "high_risk", 4, [0.1, 0.2, 0.3, 0.4]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="needs risk="):
        make_student(teacher, "low_risk", num_layers=2)
    with pytest.raises(ValueError, match="needs num_layers"):
        make_student(teacher, "high_risk", risk=[0.5] * 4)
    with pytest.raises(ValueError, match="the teacher has 4 blocks"):
        make_student(teacher, "low_risk", num_layers=2, risk=[0.5] * 3)
    with pytest.raises(ValueError, match="unknown block rule 'lowrisk'"):
        make_student(teacher, "lowrisk", num_layers=2, risk=[0.5] * 4)
    with pytest.raises(ValueError, match="num_layers must lie in"):
        make_student(teacher, "low_risk", num_layers=5, risk=[0.5] * 4)
