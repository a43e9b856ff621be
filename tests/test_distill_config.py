"""DistillConfig: technique defaults (docs/design.md §7), validation with clear errors, dict round trip."""
import pytest

from kdfast.distill import TECHNIQUES, DistillConfig, DistillError
from kdfast.distill.config import TECHNIQUE_DEFAULTS


def test_technique_defaults():
    assert set(TECHNIQUE_DEFAULTS) == set(TECHNIQUES)
    kd, sft, gkd = DistillConfig(), DistillConfig(technique="sft"), DistillConfig(technique="gkd")
    assert (kd.technique, kd.loss, kd.kd_ratio, kd.lr, kd.student_gen_fraction) == ("kd", "fkl", 1.0, 5e-5, 0.0)
    assert (sft.lr, sft.epochs, sft.kd_ratio, sft.needs_teacher) == (5e-5, 5, 0.0, False)
    assert (gkd.loss, gkd.student_gen_fraction, gkd.beta, gkd.buffer_size) == ("jsd", 0.5, 0.1, 0)
    mini = DistillConfig(technique="minillm")
    assert (mini.lr, mini.mix_alpha, mini.ppo_epochs, mini.clip_range, mini.loss) == (5e-6, 0.2, 4, 0.2, "rkl")
    dl = DistillConfig(technique="distillm")
    assert (dl.loss, dl.skew_alpha, dl.student_gen_fraction, dl.buffer_size) == ("srkl", 0.1, None, 1000)
    imit = DistillConfig(technique="imitkd")
    assert (imit.student_gen_fraction, imit.buffer_size, imit.loss) == (1.0, 1000, "fkl")
    assert DistillConfig(technique="kd", lr=1e-3, loss="rkl").lr == 1e-3   # explicit values win
    assert DistillConfig(max_len=512).max_prompt_len == 256


@pytest.mark.parametrize("kwargs, match", [
    ({"technique": "kdd"}, "unknown technique 'kdd'"),
    ({"loss": "kl"}, "unknown loss 'kl'; choose one of fkl"),
    ({"vocab": "pad"}, "unknown vocab"),
    ({"lr_scheduler": "step"}, "unknown lr_scheduler"),
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"kd_ratio": 1.5}, r"kd_ratio must lie in \[0, 1\]"),
    ({"student_gen_fraction": -0.1}, "student_gen_fraction must lie"),
    ({"lr": 0.0}, "lr must be positive"),
    ({"max_len": 64, "max_prompt_len": 64}, "leaves no room for a response"),
    ({"bf16": True, "fp16": True}, "choose one"),
    ({"technique": "sft", "kd_ratio": 0.5}, "sft trains without a teacher"),
    ({"epochs": 0}, "epochs must be positive"),
])
def test_validation(kwargs, match):
    with pytest.raises(DistillError, match=match):
        DistillConfig(**kwargs)


def test_from_dict_round_trip_and_unknown_keys():
    cfg = DistillConfig(technique="distillm", lr=1e-4, adam_betas=(0.9, 0.95))
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(DistillError, match=r"'btach_size' \(did you mean 'batch_size'\?\)"):
        DistillConfig.from_dict({"btach_size": 4})


def test_the_flags_choices_are_the_configs_literals():
    """One list per choice: the field's Literal annotation, read by DistillConfig and by `kdfast distill`."""
    from kdfast.cli import build_parser
    from kdfast.distill.config import LOSSES, choice_fields
    from kdfast.losses import VOCAB_POLICIES

    parser = build_parser("distill")._subparsers._group_actions[0].choices["distill"]
    flags = {a.dest: a.choices for a in parser._actions}
    assert choice_fields()["vocab"] == VOCAB_POLICIES and flags["vocab"] == list(VOCAB_POLICIES)
    assert flags["loss"] == list(LOSSES) and choice_fields()["loss"] == (*LOSSES, None)
    assert flags["teacher_dtype"] == ["auto", "float32", "bfloat16", "float16"]
    assert set(choice_fields()) == {d for d, c in flags.items() if c}
    with pytest.raises(DistillError, match="unknown vocab 'pad'; choose one of error, intersect$"):
        DistillConfig(vocab="pad")
