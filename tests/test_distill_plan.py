"""kdfast plan: the memory arithmetic from configs only (no weights), its levers, budget verdicts and the CLI."""
import json

import pytest

from kdfast.cli import main
from kdfast.distill.plan import LORA_TARGETS, NF4_BYTES, _as_config, _shape, load_config, parse_bytes, plan_memory

LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINYLLAMA = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)


def test_parameter_counts_are_exact_and_weights_follow_them():
    plan = plan_memory(LLAMA_7B, TINYLLAMA)
    assert abs(plan.parts["teacher_weights"] / 2 - 6.74e9) / 6.74e9 < 0.01  # bf16 LLaMA-2-7B
    assert abs(plan.parts["student_weights"] / 4 - 1.10e9) / 1.10e9 < 0.01  # fp32 TinyLlama-1.1B


def test_every_lever_lowers_the_peak():
    """At 4 x 2048 tokens, where the activations outweigh the gradients (at 1 x 2048 checkpointing cannot help)."""
    base = plan_memory(LLAMA_7B, TINYLLAMA, batch_size=4).total_bytes
    for lever in (dict(teacher_quantize="nf4"), dict(teacher_quantize="int8"), dict(optim="adamw_8bit"),
                  dict(gradient_checkpointing=True), dict(master_weights="bf16")):
        assert plan_memory(LLAMA_7B, TINYLLAMA, batch_size=4, **lever).total_bytes < base, lever
    base = plan_memory(LLAMA_7B, TINYLLAMA).total_bytes
    frugal = plan_memory(LLAMA_7B, TINYLLAMA, teacher_quantize="nf4", optim="adamw_8bit", gradient_checkpointing=True)
    assert frugal.total_bytes < 24 * 2**30 < base


def test_budget_verdict_and_the_cheapest_fitting_levers():
    plan = plan_memory(LLAMA_7B, TINYLLAMA, budget="24GB")
    assert plan.fits is False and plan.suggestion
    assert plan_memory(LLAMA_7B, TINYLLAMA, **plan.suggestion).total_bytes == plan.suggestion_bytes <= 24 * 2**30
    assert parse_bytes("1.5GB") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="24GB"):
        parse_bytes("lots")


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="adamw_8bit"):
        plan_memory(LLAMA_7B, TINYLLAMA, optim="sgd")


def test_cli_json_and_table(tmp_path, capsys):
    teacher = tmp_path / "config.json"
    teacher.write_text(json.dumps(LLAMA_7B))
    assert main(["plan", "--teacher", str(teacher), "--student", "tiny:llama", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_bytes"] > out["parts"]["teacher_weights"] > 0
    assert main(["plan", "--teacher", str(teacher), "--student", "tiny:llama", "--budget", "1GB"]) == 0
    assert "does not fit" in capsys.readouterr().out


def test_a_model_spec_plans_as_its_config(tmp_path):
    """plan_memory takes what load_config takes (the plan command passes its flags as they are)."""
    teacher = tmp_path / "config.json"
    teacher.write_text(json.dumps(LLAMA_7B))
    by_spec = plan_memory(str(teacher), "tiny:llama", batch_size=2)
    assert by_spec.to_dict() == plan_memory(LLAMA_7B, load_config("tiny:llama"), batch_size=2).to_dict()
    assert by_spec.parts["teacher_weights"] > by_spec.parts["student_weights"] > 0


def test_fewer_targets_shrink_only_the_loss_part():
    full = plan_memory(LLAMA_7B, TINYLLAMA, batch_size=4, fused=False)
    half = plan_memory(LLAMA_7B, TINYLLAMA, batch_size=4, fused=False, target_fraction=0.5)
    assert half.parts["loss_workspace"] < full.parts["loss_workspace"]
    assert {k: v for k, v in half.parts.items() if k != "loss_workspace"} == \
        {k: v for k, v in full.parts.items() if k != "loss_workspace"}
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="target_fraction"):
            plan_memory(LLAMA_7B, TINYLLAMA, target_fraction=bad)
    with pytest.raises(SystemExit):
        main(["plan", "--student", "tiny:llama", "--target-fraction", "0"])


def test_nf4_student_base_under_fp32_adapters():
    """QLoRA: the student's block linears at NF4's 0.5 byte + absmax per parameter, the rest and the adapters fp32;
    gradients and optimizer states are the adapters' alone, as with plain LoRA."""
    lora = plan_memory(LLAMA_7B, TINYLLAMA, lora_rank=16)
    qlora = plan_memory(LLAMA_7B, TINYLLAMA, lora_rank=16, student_quantize="nf4")
    shape = _shape(_as_config(TINYLLAMA), LORA_TARGETS)
    adapters = 16 * shape.lora * 4
    assert qlora.parts["student_weights"] == int(shape.block_linear * NF4_BYTES + shape.other * 4 + adapters)
    assert lora.parts["student_weights"] == shape.total * 4 + adapters
    assert 1.0 < NF4_BYTES / 0.5 < 1.04  # the absmax of each 64-block (and theirs per 256): ~3% on the 4 bits
    assert {k: v for k, v in qlora.parts.items() if k != "student_weights"} == \
        {k: v for k, v in lora.parts.items() if k != "student_weights"}
    assert qlora.total_bytes < lora.total_bytes
    with pytest.raises(ValueError, match="student_quantize.*lora_rank"):
        plan_memory(LLAMA_7B, TINYLLAMA, student_quantize="nf4")
    with pytest.raises(ValueError, match="unknown student_quantize"):
        plan_memory(LLAMA_7B, TINYLLAMA, lora_rank=16, student_quantize="int4")


def test_cli_counts_a_qlora_student(capsys):
    args = ["plan", "--student", "tiny:llama", "--lora-rank", "8", "--json"]
    assert main(args) == 0
    lora = json.loads(capsys.readouterr().out)
    assert main(args + ["--student-quantize", "nf4"]) == 0
    qlora = json.loads(capsys.readouterr().out)
    assert qlora["settings"]["student_quantize"] == "nf4"
    assert qlora["parts"]["student_weights"] < lora["parts"]["student_weights"]
