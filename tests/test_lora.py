"""LoRA adapters: a wrapped model equals its merged form, only adapters train, the saved student is a plain model."""
import pytest
import torch

from kdfast import models
from kdfast.data import bundled_records
from kdfast.distill import DistillConfig, Distiller, DistillError
from kdfast.lora import LoRALinear, apply_lora, merge_lora, merged_state_dict

FAMILIES = {"gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"]}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapped_equals_merged(family, gen):
    model = models.tiny_model(family, seed=3, hidden=32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen)
    before = _logits(model, ids)
    names = apply_lora(model, rank=4, alpha=8)
    assert names and all(n.rsplit(".", 1)[-1] in FAMILIES[family] for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{x}" for n in names for x in "ab"}
    torch.testing.assert_close(_logits(model, ids), before)    # B = 0: the adapters start as the identity
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_b.data.normal_(0, 0.5, generator=gen)
    wrapped = _logits(model, ids)
    assert (wrapped - before).abs().max() > 1e-3
    fresh = models.tiny_model(family, seed=3, hidden=32).eval()
    fresh.load_state_dict(merged_state_dict(model, model.state_dict()))
    torch.testing.assert_close(_logits(fresh, ids), wrapped, rtol=1e-5, atol=1e-5)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), wrapped, rtol=1e-5, atol=1e-5)


def test_bad_targets_name_the_layers():
    model = models.tiny_model("llama", seed=0, hidden=32)
    with pytest.raises(ValueError, match="q_proj"):
        apply_lora(model, rank=2, targets="qkv")
    with pytest.raises(ValueError, match="not a linear layer"):
        apply_lora(model, rank=2, targets="embed_tokens")
    with pytest.raises(DistillError, match="lora_rank"):
        DistillConfig(technique="sft", lora_rank=-1)


def _train(out, **kw):
    student = models.tiny_model("llama", seed=2, hidden=32)
    cfg = DistillConfig(technique="sft", lr=1e-2, batch_size=4, max_steps=4, max_len=112, max_prompt_len=100,
                        lora_rank=4, progress=False, out=str(out), save_every=100, **kw)
    summary = Distiller(None, student, models.tiny_tokenizer(), cfg).train(bundled_records()[:16])
    return student, summary


def test_distiller_trains_adapters_saves_merged_and_resumes(tmp_path, gen):
    init = models.tiny_model("llama", seed=2, hidden=32).state_dict()
    student, summary = _train(tmp_path / "a")
    merged = merged_state_dict(student, student.state_dict())
    moved = {k for k, v in merged.items() if not torch.equal(v, init[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved)
    final, _ = models.load_model(summary.final)
    assert not any(isinstance(m, LoRALinear) for m in final.modules())
    ids = torch.randint(0, final.config.vocab_size, (2, 7), generator=gen)
    torch.testing.assert_close(_logits(final, ids), _logits(student.eval(), ids), rtol=1e-5, atol=1e-5)

    stopped = Distiller(None, models.tiny_model("llama", seed=2, hidden=32), models.tiny_tokenizer(),
                        DistillConfig(technique="sft", lr=1e-2, batch_size=4, max_steps=4, max_len=112,
                                      max_prompt_len=100, lora_rank=4, progress=False, out=str(tmp_path / "b"),
                                      save_every=100)).train(bundled_records()[:16], on_step=lambda s, m: s == 2)
    assert stopped.stopped_early
    resumed, _ = _train(tmp_path / "b", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), resumed.state_dict().values()))
