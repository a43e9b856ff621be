"""The attack registry is the one list: score()'s columns, the `kdfast attack` flags and the audit's attack names all
follow it, so a new attack is one entry."""
import numpy as np
import pandas as pd
import pytest

from kdfast import attacks, models
from kdfast.attacks.registry import REGISTRY, Attack, attack_names, default_attacks
from kdfast.audit import ConfigError, load_config
from kdfast.audit.config import OWN_SETTINGS, REF_ROLES, audit_attacks
from kdfast.cli import main
from kdfast.data import bundled_records

# Reads the shared forward pass only: two columns, neither a pass of its own.
DUMMY = Attack("dummy", lambda g: {"dummy@double": 2 * g.ll, "dummy@tokens": g.stats.n_tokens().astype(float)},
               lambda cfg, refs, n_blocks: ["dummy@double", "dummy@tokens"], needs=frozenset({"extra_pass"}))


@pytest.fixture
def dummy(monkeypatch):
    monkeypatch.setitem(REGISTRY, "dummy", DUMMY)


def test_names_defaults_and_column_order_come_from_the_registry():
    assert attacks.ATTACKS == attack_names() == tuple(REGISTRY)
    assert attacks.DEFAULT_ATTACKS == default_attacks() == ("loss", "zlib", "lowercase", "min_k", "min_k_pp")
    config = attacks.AttackConfig(attacks=("lira", "min_k", "ref", "mope_block", "loss"), ks=(0.1, 0.3))
    assert config.columns(["ref_a", "ref_b"], 2) == ["loss", "min_k@0.1", "min_k@0.3", "ref_a", "ref_b",
                                                     "mope_block@0", "mope_block@1", "lira"]


def test_a_new_entry_is_scored_and_offered_by_the_cli(dummy, tmp_path, capsys):
    model, tok = models.tiny_model("llama", seed=0), models.tiny_tokenizer()
    records = bundled_records()[:6]
    table = attacks.score(model, tok, records, ("dummy", "loss"), progress=False)
    assert list(table.columns[-3:]) == ["loss", "dummy@double", "dummy@tokens"]
    assert np.array_equal(table["dummy@double"], 2 * table["loss"])
    assert np.array_equal(table["dummy@tokens"], table["n_tokens"])

    with pytest.raises(SystemExit):
        main(["attack", "--help"])
    assert "lira, dummy (the attack registry)" in " ".join(capsys.readouterr().out.split())
    pd.DataFrame(records[:3]).to_json(tmp_path / "m.jsonl", orient="records", lines=True)
    pd.DataFrame(records[3:]).to_json(tmp_path / "n.jsonl", orient="records", lines=True)
    run = ["attack", "--model", "tiny:llama", "--members", str(tmp_path / "m.jsonl"), "--nonmembers",
           str(tmp_path / "n.jsonl"), "--bootstrap", "0", "--calibration", "0"]
    assert main([*run, "--attacks", "loss", "dummy", "--out", str(tmp_path / "out")]) == 0
    assert {"dummy@double", "dummy@tokens"} <= set(pd.read_parquet(tmp_path / "out" / "scores.parquet").columns)
    capsys.readouterr()
    assert main([*run, "--attacks", "bogus", "--out", str(tmp_path / "bad")]) == 2
    assert f"unknown attack(s) ['bogus']; choose from {', '.join(REGISTRY)}" in capsys.readouterr().err
    assert ", lira, dummy" in ", ".join(REGISTRY)


def test_an_attack_missing_an_input_names_the_flag():
    with pytest.raises(ValueError, match=r"attack 'lira' needs --reference NAME=MODEL \(ref models and references: "):
        attacks.run.run_attacks(attacks.run.AttackRun(model="tiny:llama", out="unused",
                                                      attacks=attacks.AttackConfig(attacks=("loss", "lira"))))


def test_the_audits_attack_names_are_the_registrys():
    names = audit_attacks()
    assert set(names) <= set(REGISTRY) | set(REF_ROLES) and set(REF_ROLES) <= set(names) and "ref" not in names
    assert set(OWN_SETTINGS) <= set(REGISTRY) and not set(OWN_SETTINGS) & set(names)
    assert "dc_pdd" not in names  # its reference corpus is nothing the audit has
    assert names.index("ref_base") == names.index("min_k_pp") + 1  # `ref`'s place in the column order
    with pytest.raises(ConfigError, match=rf"^attacks.attacks: unknown value 'bogus'; choose from {', '.join(names)}$"):
        load_config(preset_name="tiny", overrides={"attacks": {"attacks": ["loss", "bogus"]}})


def test_a_new_entry_the_audit_can_run_joins_its_config(dummy, monkeypatch):
    monkeypatch.setitem(REGISTRY, "dummy_calibrated", Attack("dummy_calibrated", lambda c: {}, calibrated=True,
                                                             needs=frozenset({"references"})))
    assert audit_attacks()[-1] == "dummy" and "dummy_calibrated" not in audit_attacks()
    assert load_config(preset_name="tiny", overrides={"attacks": {"attacks": ["loss", "dummy"]}}).attacks.attacks == [
        "loss", "dummy"]
