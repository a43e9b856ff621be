"""Audit configuration: presets build and validate without downloads; each kind of mistake names its key and fix."""
import dataclasses
import typing

import pytest

from kdfast.audit import ConfigError, load_config
from kdfast.audit.config import PRESETS, AuditConfig
from kdfast.cli import main
from kdfast.commands.audit import parse_overrides
from kdfast.distill import DistillConfig


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate(name):
    cfg = load_config(preset_name=name)
    assert cfg.name == name and cfg.students.techniques
    assert cfg.data.max_prompt_len < cfg.data.max_len


def test_paper_presets_follow_the_study():
    gpt2 = load_config(preset_name="paper-gpt2")
    assert (gpt2.teacher.model == "gpt2-xl"
            and list(gpt2.students.sizes.values()) == ["gpt2-large", "gpt2-medium", "gpt2"])
    assert gpt2.data.source == "hub:databricks/databricks-dolly-15k" and gpt2.data.fields == {"input": "context"}
    llama = load_config(preset_name="paper-llama")
    assert llama.teacher.lora_rank > 0
    assert DistillConfig(technique="distillm", **llama.students.distill).lora_rank == llama.teacher.lora_rank


@pytest.mark.parametrize("overrides,message", [
    ({"students": {"techniqes": ["kd"]}}, r"unknown config key 'students.techniqes' \(did you mean 'techniques'\?\)"),
    ({"bogus": 1}, r"unknown config key 'bogus'"),
    ({"students": {"techniques": ["kdd"]}}, r"students.techniques: unknown value 'kdd' \(did you mean 'kd'\?\); "
                                            r"choose from kd, seqkd, imitkd, gkd, minillm, distillm$"),
    ({"students": {"techniques": "kd"}}, r"students.techniques: expected a list, got 'kd'; write a list, e.g. "
                                         r"students.techniques=\[kd\]"),
    ({"attacks": {"attacks": ["los"]}}, r"attacks.attacks: unknown value 'los'"),
    ({"ablations": {"divergence": ["kl"]}}, r"ablations.divergence: unknown value 'kl'"),
    ({"ablations": {"teacher_topk": [8, 0]}}, r"^ablations.teacher_topk: 0 is out of range; give a number >= 1$"),
    ({"ablations": {"teacher_topk": [-1]}}, r"^ablations.teacher_topk: -1 is out of range; give a number >= 1$"),
    ({"ablations": {"teacher_topk": [2.5]}}, r"^ablations.teacher_topk: expected an integer, got 2.5$"),
    ({"ablations": {"teacher_topk": [8]}, "students": {"per_technique": {"kd": {"student_gen_fraction": 0.5}}}},
     r"ablations.teacher_topk: the KD settings .* cannot train from a teacher cache: .*student_gen_fraction=0"),
    ({"students": {"sizes": {}}}, r"students.sizes is empty"),
    ({"students": {"sizes": {"s": "x", "t": [0.5]}}}, r"students.sizes.t: give a list of teacher layer indices"),
    ({"students": {"techniques": [], "control": False}}, r"nothing to audit"),
    ({"data": {"max_prompt_len": 200, "max_len": 100}}, r"data.max_prompt_len \(200\) must be below data.max_len"),
    ({"data": 3}, r"data: expected a mapping"),
    ({"students": {"per_technique": {"gkd": {"lr": "fast"}}}}, r"students.per_technique.gkd .*lr must be a number"),
    ({"students": {"distill": {"max_new_token": 8}}}, r"students.distill .*max_new_token.*max_new_tokens"),
])
def test_mistakes_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def _int_keys(cls=AuditConfig, path: str = "") -> list[tuple[str, object]]:
    """(dotted key, -5 as that key takes it) of every integer setting (counts, sizes, the seed, lists of k)."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _int_keys(hint, f"{f.name}.")
        elif int in (hint, *typing.get_args(hint)):
            keys.append((path + f.name, [-5] if typing.get_origin(hint) is list else -5))
    return keys


@pytest.mark.parametrize("key,value", _int_keys())
def test_negative_counts_are_refused(key, value):
    """Every integer setting has a range: -5 (attacks.n_records=-5 once attacked private[:-5]) stops at the key."""
    section, _, leaf = key.rpartition(".")
    with pytest.raises(ConfigError, match=rf"^{key}: -5 is out of range; give a number >= \d"):
        load_config(preset_name="tiny", overrides={section: {leaf: value}} if section else {leaf: value})


@pytest.mark.parametrize("setting,message", [
    ("attacks.n_records=-5", "attacks.n_records: -5 is out of range; give a number >= 1"),
    ("students.techniques=[kd, gdk]", "students.techniques: unknown value 'gdk' (did you mean 'gkd'?); choose from "
                                      "kd, seqkd, imitkd, gkd, minillm, distillm"),
    ("ablations.teacher_topk=[8, 0]", "ablations.teacher_topk: 0 is out of range; give a number >= 1"),
    ("ablations.teacher_topk=[8, 100000]", "ablations.teacher_topk: k=100000 exceeds the teacher's vocabulary"),
])
def test_mistakes_from_the_cli(capsys, setting, message):
    assert main(["audit", "--preset", "tiny", "--check", "--set", setting]) == 2
    assert message in capsys.readouterr().err


def test_yaml_file(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("preset: tiny\nstudents:\n  techniques: [kd, gkd]\n  lr: 1e-4\n")
    cfg = load_config(path)
    assert cfg.name == "tiny" and cfg.students.techniques == ["kd", "gkd"] and cfg.teacher.model == "tiny:llama"
    assert cfg.students.lr == 1e-4  # YAML 1.1 would read a string
    path.write_text("students: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_missing_inputs_fail_before_work(tmp_path):
    from kdfast.audit.pipeline import check_inputs

    with pytest.raises(ConfigError, match="data.source: file .*missing.jsonl not found"):
        check_inputs(load_config(overrides={"data": {"source": str(tmp_path / "missing.jsonl")}}))
    with pytest.raises(ConfigError, match="teacher.model: model folder ./nowhere not found"):
        check_inputs(load_config(overrides={"teacher": {"model": "./nowhere"}}))
    with pytest.raises(ConfigError, match="unknown tiny model"):
        check_inputs(load_config(overrides={"teacher": {"model": "tiny:bert"}}))


def test_overrides_merge_settings_and_replace_sizes():
    cfg = load_config(overrides={"students": {"per_technique": {"minillm": {"lr": 1e-4}}, "sizes": {"one": [0]}}})
    default = load_config().students.per_technique["minillm"]
    assert cfg.students.per_technique["minillm"] == {**default, "lr": 1e-4}
    assert cfg.students.sizes == {"one": [0]}


def test_parse_overrides():
    assert parse_overrides(["students.epochs=2", "attacks.ks=[0.1, 0.3]", "redact=true", "students.lr=1e-3"]) == {
        "students": {"epochs": 2, "lr": 0.001}, "attacks": {"ks": [0.1, 0.3]}, "redact": True}
    with pytest.raises(ConfigError, match="write KEY=VALUE"):
        parse_overrides(["students.epochs"])
