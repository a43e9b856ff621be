"""LoRA through peft: a wrapped model equals its merged form, only adapters train, the saved student is a plain
model plus a peft adapter that load_model and PeftModel reload, and QLoRA trains adapters on an NF4 base."""
import json

import pytest
import torch

from kdfast import models
from kdfast.data import bundled_records
from kdfast.distill import DistillConfig, Distiller, DistillError
from kdfast.lora import adapter_parameters, apply_lora, has_lora, merge_lora, merged_state_dict, save_adapter

FAMILIES = {"gpt2": ["c_attn"], "opt": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"]}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _ids(model, gen, length=9):
    return torch.randint(0, model.config.vocab_size, (2, length), generator=gen)


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapped_equals_merged(family, gen):
    model = models.tiny_model(family, seed=3, hidden=32).eval()
    ids = _ids(model, gen)
    before = _logits(model, ids)
    names = apply_lora(model, rank=4, alpha=8)
    assert names and all(n.rsplit(".", 1)[-1] in FAMILIES[family] for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{x}.default.weight" for n in names for x in "AB"} == set(adapter_parameters(model))
    torch.testing.assert_close(_logits(model, ids), before)    # B = 0: the adapters start as the identity
    for name, p in adapter_parameters(model).items():
        if "lora_B" in name:
            p.data.normal_(0, 0.5, generator=gen)
    wrapped = _logits(model, ids)
    assert (wrapped - before).abs().max() > 1e-3
    fresh = models.tiny_model(family, seed=3, hidden=32).eval()
    fresh.load_state_dict(merged_state_dict(model, model.state_dict()))
    torch.testing.assert_close(_logits(fresh, ids), wrapped, rtol=1e-5, atol=1e-5)
    merge_lora(model)
    assert not has_lora(model)
    torch.testing.assert_close(_logits(model, ids), wrapped, rtol=1e-5, atol=1e-5)


def test_bad_targets_name_the_layers():
    model = models.tiny_model("llama", seed=0, hidden=32)
    with pytest.raises(ValueError, match="q_proj"):
        apply_lora(model, rank=2, targets="qkv")
    with pytest.raises(ValueError, match="not a linear layer"):
        apply_lora(model, rank=2, targets="embed_tokens")
    with pytest.raises(DistillError, match="lora_rank"):
        DistillConfig(technique="sft", lora_rank=-1)


def _config(out, **kw):
    return DistillConfig(**{**dict(technique="sft", lr=1e-2, batch_size=4, max_steps=4, max_len=112,
                                   max_prompt_len=100, lora_rank=4, progress=False, out=str(out), save_every=100,
                                   device="cpu"), **kw})


def _train(out, student=None, **kw):
    student = student if student is not None else models.tiny_model("llama", seed=2, hidden=32)
    distiller = Distiller(None, student, models.tiny_tokenizer(), _config(out, **kw))
    return distiller.student, distiller.train(bundled_records()[:16])


def test_distiller_trains_adapters_saves_merged_and_resumes(tmp_path, gen):
    init = models.tiny_model("llama", seed=2, hidden=32).state_dict()
    student, summary = _train(tmp_path / "a")
    merged = merged_state_dict(student, student.state_dict())
    moved = {k for k, v in merged.items() if not torch.equal(v, init[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved)
    final, _ = models.load_model(summary.final)
    assert not has_lora(final)
    ids = _ids(final, gen, 7)
    torch.testing.assert_close(_logits(final, ids), _logits(student.eval(), ids), rtol=1e-5, atol=1e-5)

    stopped = Distiller(None, models.tiny_model("llama", seed=2, hidden=32), models.tiny_tokenizer(),
                        _config(tmp_path / "b")).train(bundled_records()[:16], on_step=lambda s, m: s == 2)
    assert stopped.stopped_early
    checkpoint = next((tmp_path / "b" / "checkpoints").glob("step-*")) / "student.safetensors"
    from safetensors.torch import load_file
    assert load_file(str(checkpoint)).keys() == adapter_parameters(student).keys()  # the adapters, peft's names
    resumed, _ = _train(tmp_path / "b", resume=True)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), resumed.state_dict().values()))


def _base(tmp_path):
    """The tiny llama _train starts from, saved as a model folder."""
    base = tmp_path / "base"
    models.tiny_model("llama", seed=2, hidden=32).save_pretrained(base, safe_serialization=True)
    models.tiny_tokenizer().save_pretrained(base)
    return base


def test_adapter_saved_in_peft_format_reloads_as_the_student(tmp_path, gen):
    """A student loaded from a folder: final/adapter names that folder as its base, and both load_model and peft's
    own PeftModel.from_pretrained rebuild the trained student from it."""
    base = _base(tmp_path)
    student, summary = _train(tmp_path / "run", student=models.load_model(base)[0])
    adapter = tmp_path / "run" / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base.resolve()) and config["r"] == 4
    assert (adapter / "adapter_model.safetensors").exists()
    ids = _ids(student, gen)
    want = _logits(student.eval(), ids)
    loaded, tokenizer = models.load_model(adapter)
    assert not has_lora(loaded) and tokenizer.get_vocab() == models.tiny_tokenizer().get_vocab()
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=1e-5, atol=1e-5)
    peft = models.import_peft()
    with_peft = peft.PeftModel.from_pretrained(models.load_model(base)[0], str(adapter))
    torch.testing.assert_close(_logits(with_peft, ids), want, rtol=1e-5, atol=1e-5)
    assert models.load_tokenizer(adapter).get_vocab() == tokenizer.get_vocab()


def _adapter(tmp_path, base):
    """An adapter folder of a tiny llama with non-zero adapters, its adapter_config naming `base`."""
    model = models.tiny_model("llama", seed=2, hidden=32)
    apply_lora(model, 4)
    for p in adapter_parameters(model).values():
        p.data.normal_(0, 0.5)
    folder = save_adapter(model, model.state_dict(), tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
    return model, folder


def test_adapter_with_a_missing_base_says_which_and_how_to_fix(tmp_path, gen):
    gone = str(tmp_path / "deleted-base")
    model, folder = _adapter(tmp_path, gone)
    with pytest.raises(models.ModelError, match=r"(?s)base_model_name_or_path '.*deleted-base'.*not found.*base="):
        models.load_model(folder)
    base = _base(tmp_path)
    loaded, _ = models.load_model(folder, base=base)  # the fix the error names
    ids = _ids(model, gen)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model.eval(), ids), rtol=1e-5, atol=1e-5)
    _adapter(tmp_path, None)
    with pytest.raises(models.ModelError, match="names no base_model_name_or_path"):
        models.load_model(folder)
    with pytest.raises(models.ModelError, match="base=.* is for a peft adapter folder"):
        models.load_model("tiny:llama", base=base)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(models.ModelError, match="adapter_model.safetensors"):
        models.load_model(folder, base=base)


def test_student_quantize_needs_lora_rank():
    with pytest.raises(DistillError, match=r"student_quantize=.*lora_rank"):
        DistillConfig(technique="sft", student_quantize="nf4")
    with pytest.raises(DistillError, match="unknown student_quantize"):
        DistillConfig(technique="sft", student_quantize="int4", lora_rank=4)
    with pytest.raises(DistillError, match="master_weights"):
        DistillConfig(technique="sft", student_quantize="nf4", lora_rank=4, master_weights="bf16")


def _nf4_bases(model):
    return {n: m for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")}


def test_qlora_trains_fp32_adapters_on_a_frozen_nf4_base(tmp_path, gen):
    losses = []
    student = models.tiny_model("llama", seed=2, hidden=64)
    distiller = Distiller(None, student, models.tiny_tokenizer(),
                          _config(tmp_path / "q", student_quantize="nf4", max_steps=8, lr=3e-2))
    quantized = distiller.student
    bases = _nf4_bases(quantized)
    assert models.is_quantized(quantized) and any(n.endswith("q_proj.base_layer") for n in bases)
    adapters = adapter_parameters(quantized)
    assert {p.dtype for p in adapters.values()} == {torch.float32}
    frozen = {k: v.clone() for k, v in quantized.state_dict().items() if k not in adapters}
    start = {k: v.detach().clone() for k, v in adapters.items()}
    summary = distiller.train(bundled_records()[:32], on_step=lambda s, m: losses.append(m["loss"]))
    assert sum(losses[-3:]) / 3 < losses[0]
    after = quantized.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # the NF4 base and everything else as it was
    assert any(not torch.equal(adapters[k], v) for k, v in start.items())
    assert _nf4_bases(quantized).keys() == bases.keys()
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_type == "nf4" for m in bases.values())
    final, _ = models.load_model(summary.final)  # merged and dequantized: a plain fp32 model
    assert not models.is_quantized(final) and not has_lora(final)
    assert {p.dtype for p in final.parameters()} == {torch.float32}
    assert "quantization_config" not in json.loads((tmp_path / "q" / "final" / "config.json").read_text())
    ids = _ids(final, gen)
    want, got = _logits(quantized.eval(), ids), _logits(final, ids)
    assert (got - want).norm() / want.norm() < 0.02  # the NF4 forward computes in bf16 where bf16 is native
    assert (tmp_path / "q" / "final" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.gpu
def test_qlora_trains_on_cuda(tmp_path, cuda):
    """The QLoRA student on the GPU (bitsandbytes' CUDA NF4 kernels): the base stays NF4, the adapters learn."""
    losses = []
    distiller = Distiller(None, models.tiny_model("llama", seed=2, hidden=64), models.tiny_tokenizer(),
                          _config(tmp_path / "q", student_quantize="nf4", max_steps=8, lr=3e-2, device="cuda"))
    bases = _nf4_bases(distiller.student)
    summary = distiller.train(bundled_records()[:32], on_step=lambda s, m: losses.append(m["loss"]))
    assert sum(losses[-3:]) / 3 < losses[0]
    assert bases and all(m.weight.dtype == torch.uint8 and m.weight.device.type == "cuda" for m in bases.values())
    final, _ = models.load_model(summary.final)
    assert not models.is_quantized(final) and not has_lora(final)


def test_qlora_resumes_exactly(tmp_path):
    """The checkpoint holds the adapters and their optimizer state; the NF4 base is quantized again from the student."""
    whole, _ = _train(tmp_path / "a", student_quantize="nf4")
    stopped = Distiller(None, models.tiny_model("llama", seed=2, hidden=32), models.tiny_tokenizer(),
                        _config(tmp_path / "b", student_quantize="nf4")).train(bundled_records()[:16],
                                                                              on_step=lambda s, m: s == 2)
    assert stopped.stopped_early
    resumed, _ = _train(tmp_path / "b", student_quantize="nf4", resume=True)
    a, b = adapter_parameters(whole), adapter_parameters(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert models.is_quantized(resumed)
