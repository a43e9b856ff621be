"""The planner against measurement: predicted whole-step peaks within ±15% of real CPU steps on tiny models."""
import itertools

import pytest
import torch

from kdfast import models
from kdfast.data import bundled_records
from kdfast.distill import DistillConfig, Distiller
from kdfast.distill.plan import measure_step, plan_memory
from kdfast.memory import peak_bytes, resident_bytes

PLANNED = ("optim", "gradient_checkpointing", "teacher_quantize", "master_weights", "fused")
ALL = dict(gradient_checkpointing=True, teacher_quantize="nf4", optim="adamw_8bit", master_weights="bf16")
CASES = [("llama", {}), ("llama", dict(fused=False)), ("llama", dict(gradient_checkpointing=True)),
         ("llama", dict(optim="adamw_8bit")), ("llama", dict(optim="adafactor")),
         ("llama", dict(master_weights="bf16")),
         ("llama", dict(teacher_quantize="int8")), ("llama", ALL),
         ("gpt2", {}), ("gpt2", dict(gradient_checkpointing=True)), ("gpt2", ALL),
         ("opt", {}), ("opt", dict(teacher_quantize="nf4")), ("opt", ALL)]


def _records(n: int, chars: int) -> list[dict]:
    """Responses long enough that every record is cut to max_len: batch x max_len tokens, as the planner assumes."""
    pool = itertools.cycle(r["response"] for r in bundled_records()[:200])
    out = []
    for i in range(n):
        text = ""
        while len(text) < chars:
            text += next(pool) + " "
        out.append({"instruction": f"Define word {i}.", "response": text})
    return out


@pytest.mark.parametrize("family,levers", CASES, ids=[f"{f}-" + ("+".join(f"{k}={v}" for k, v in lv.items()) or "plain")
                                                      for f, lv in CASES])
def test_plan_within_15_percent_of_the_measured_peak(family, levers):
    """GPT-2 brings attention dropout (SDPA's math path on the CPU) and gelu_new; OPT ReLU; LLaMA a gated MLP."""
    teacher = models.tiny_model(family, seed=1, hidden=128, layers=4)
    student = models.tiny_model(family, seed=2, hidden=128, layers=4)
    cfg = DistillConfig(technique="kd", batch_size=4, max_len=256, max_prompt_len=128, max_steps=100,
                        warmup_steps=0, progress=False, lr=1e-5, **levers)
    measured = measure_step(Distiller(teacher, student, models.tiny_tokenizer(), cfg), _records(16, 2048))
    plan = plan_memory(teacher.config, student.config, batch_size=4, seq_len=256, device="cpu",
                       **{k: v for k, v in levers.items() if k in PLANNED})
    assert measured.step_peak > 0
    assert 0.85 <= plan.total_bytes / measured.total_bytes <= 1.15, (plan.parts, measured)


def test_resident_bytes_counts_shared_storage_once():
    model = models.tiny_model("llama", seed=0)  # tied embeddings: one storage for two names
    tensors = [*model.parameters(), *model.buffers()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    assert len(list(model.parameters())) < len(model.state_dict())  # the tie is there to count once
    assert resident_bytes(model) == sum(storages.values())
    x = torch.zeros(1000)
    assert resident_bytes(x, x[:10], [x]) == 4000


def test_cpu_peak_sees_a_transient_buffer():
    def make():
        big = torch.ones(1 << 20)  # 4 MiB, freed before the function returns
        return float(big.sum())
    assert 4 << 20 <= peak_bytes(make) < 5 << 20
