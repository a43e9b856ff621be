"""The trainer's memory levers: gradient checkpointing, bitsandbytes teacher, 8-bit/Adafactor optimizers,
bf16 master."""
import pytest
import torch

from kdfast import models
from kdfast.data import bundled_records
from kdfast.distill import DistillConfig, Distiller, DistillError
from kdfast.distill.data import collate, encode_training
from kdfast.distill.objective import divergence_sum, forward_rows, valid

SMALL = dict(max_len=112, max_prompt_len=100, max_new_tokens=6, warmup_steps=0, progress=False, batch_size=4,
             lr=2e-3, lr_scheduler="constant")


def _pair(family="llama", hidden=64):
    # hidden 64: every matrix has >= 4096 elements, so bitsandbytes keeps 8-bit states for them
    teacher = models.tiny_model(family, seed=1, hidden=hidden, initializer_range=0.2)
    student = models.tiny_model(family, seed=2, hidden=hidden)
    return teacher, student


def _run(family="llama", records=None, on_step=None, **kw):
    teacher, student = _pair(family)
    cfg = DistillConfig(**{**SMALL, **kw})
    summary = Distiller(teacher, student, models.tiny_tokenizer(), cfg).train(records or bundled_records()[:8],
                                                                              on_step=on_step)
    return student, summary


LEVERS = [dict(gradient_checkpointing=True), dict(optim="adamw_8bit"), dict(optim="paged_adamw_8bit"),
          dict(optim="adafactor"), dict(master_weights="bf16"), dict(teacher_quantize="nf4"),
          dict(teacher_quantize="int8"),
          dict(gradient_checkpointing=True, teacher_quantize="nf4", optim="adamw_8bit", master_weights="bf16")]


@pytest.mark.parametrize("levers", LEVERS, ids=lambda d: "+".join(f"{k}={v}" for k, v in d.items()))
def test_loss_finite_and_falling(levers):
    """Eight steps over the same 8 records (two batches of 4): each lever still learns."""
    losses = []
    _, summary = _run(max_steps=8, on_step=lambda step, m: losses.append(m["loss"]), **levers)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < 0.95 * sum(losses[:2]), losses


def test_bf16_master_trains_a_bf16_student():
    student, _ = _run(max_steps=1, master_weights="bf16")
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("optim", ["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor"])
def test_resume_is_exact_with_each_optimizer(tmp_path, optim):
    """Stop after step 2 (checkpoint), resume to step 4: bit-identical to a run without the stop."""
    kw = dict(family="gpt2", max_steps=4, save_every=100, optim=optim, gradient_checkpointing=True)
    whole, summary = _run(out=str(tmp_path / "a"), **kw)
    _, stopped = _run(out=str(tmp_path / "b"), on_step=lambda step, m: step == 2, **kw)
    assert stopped.stopped_early and stopped.steps == 2
    resumed, again = _run(out=str(tmp_path / "b"), resume=True, **kw)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert again.loss == summary.loss


def _grads(family, checkpointing, fused, lora=False):
    teacher, student = _pair(family, hidden=32)
    if lora:
        from kdfast.lora import apply_lora
        apply_lora(student, 4, 8.0, "q_proj,v_proj,c_attn,fc1,fc2")
    if checkpointing:
        models.enable_checkpointing(student)
    student.train()  # dropout on: the non-reentrant recomputation must replay its RNG
    tok = models.tiny_tokenizer()
    batch = collate(encode_training(tok, bundled_records()[:4], 112, 100), tok.pad_token_id, torch.device("cpu"))
    torch.manual_seed(0)
    rows = forward_rows(student, batch, fused)
    with torch.no_grad():
        trows = forward_rows(teacher, batch, fused)
    loss = divergence_sum(rows, trows, batch["targets"][valid(batch)], kind="fkl", soft_weight=1.0, hard_weight=0.5,
                          beta=0.5, alpha=0.1, temperature=1.0, vocab="error")
    loss.backward()
    return {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", models.FAMILIES)
@pytest.mark.parametrize("fused,lora", [(True, False), (False, False), (True, True)])
def test_checkpointed_gradients_equal_unchecked(family, fused, lora):
    plain, checked = _grads(family, False, fused, lora), _grads(family, True, fused, lora)
    assert plain.keys() == checked.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checked[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("technique", ["gkd", "minillm"])
def test_checkpointing_with_generation_techniques(technique):
    """Generation runs in eval mode (checkpointing off, KV cache usable), training steps in train mode."""
    losses = []
    _, summary = _run(technique=technique, family="opt", max_steps=2, gradient_checkpointing=True, num_rollouts=4,
                      on_step=lambda step, m: losses.append(m["loss"]))
    assert summary.steps == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("quantize,tol", [("nf4", 0.2), ("int8", 0.03)])
def test_quantized_teacher_logits_close(quantize, tol):
    """Same weights, quantized: logits within tol of the unquantized model's (relative L2), but not equal."""
    plain, _ = models.load_model("tiny:llama")
    quant, _ = models.load_model("tiny:llama", quantize=quantize)
    assert models.is_quantized(quant) and not models.is_quantized(plain)
    assert quant.get_output_embeddings().weight.dtype.is_floating_point
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(ids).logits.float(), quant(ids).logits.float()
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < tol, rel


def test_nf4_layers_of_odd_widths_run_on_every_cpu():
    """Widths bitsandbytes' AVX512-BF16 repacking cannot take (input 200 and output 200: not multiples of 64 / 32)
    crashed the first no-grad forward on such CPUs; those layers now take the plain NF4 path there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=128, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512)
    plain = LlamaForCausalLM(cfg).eval()
    quant = models.quantize_model(plain, "nf4", device="cpu")
    odd = [m for m in quant.modules() if hasattr(m, "support_avx512bf16_for_cpu") and 200 in (m.in_features,
                                                                                              m.out_features)]
    assert len(odd) == 6 and not any(m.support_avx512bf16_for_cpu for m in odd)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = plain(ids).logits, quant(ids).logits.float()
    assert 0 < float((a - b).norm() / a.norm()) < 0.2


def test_trainer_never_moves_a_quantized_teacher():
    teacher, _ = models.load_model("tiny:llama", quantize="nf4")
    student = models.tiny_model("llama", seed=2)
    linear = next(m for m in teacher.modules() if type(m).__module__.startswith("bitsandbytes"))
    before = linear.weight.data_ptr()
    d = Distiller(teacher, student, models.tiny_tokenizer(), DistillConfig(teacher_dtype="float16", **SMALL))
    assert d.teacher is teacher and linear.weight.data_ptr() == before


def test_bad_lever_inputs_name_the_choices():
    with pytest.raises(DistillError, match="unknown optim 'sgd'; choose one of adamw, adamw_8bit"):
        DistillConfig(optim="sgd")
    with pytest.raises(DistillError, match="unknown teacher_quantize 'fp4'; choose one of nf4, int8"):
        DistillConfig(teacher_quantize="fp4")
    with pytest.raises(DistillError, match="master_weights"):
        DistillConfig(master_weights="fp8")
    with pytest.raises(models.ModelError, match="unknown quantization 'int4'; choose one of nf4, int8"):
        models.load_model("tiny:gpt2", quantize="int4")


def test_quantized_student_is_refused_with_the_reason():
    teacher = models.tiny_model("llama", seed=1)
    student, _ = models.load_model("tiny:llama", quantize="int8")
    with pytest.raises(DistillError, match="student is quantized.*no gradient"):
        Distiller(teacher, student, models.tiny_tokenizer(), DistillConfig(**SMALL))
