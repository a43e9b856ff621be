"""`kdfast attack` end to end on a tiny saved model, and its input errors."""
import json
import os
import socket

import pandas as pd
import pytest

from kdfast import models
from kdfast.cli import main
from kdfast.commands.attack import parse_ref_models
from kdfast.data import bundled_records


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("attack")
    tok = models.tiny_tokenizer()
    for name, seed in (("model", 0), ("ref", 1)):
        models.tiny_model("llama", seed=seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    records = bundled_records()[:24]
    pd.DataFrame(records[:12]).to_json(root / "members.jsonl", orient="records", lines=True)
    pd.DataFrame(records[12:]).to_csv(root / "nonmembers.csv", index=False)
    return root


def test_end_to_end(files, capsys):
    out = files / "out"
    rc = main(["attack", "--model", str(files / "model"), "--members", str(files / "members.jsonl"),
               "--nonmembers", str(files / "nonmembers.csv"), "--ref-model", f"base={files / 'ref'}",
               "--attacks", "loss", "min_k", "gradnorm", "--ks", "0.2", "--bootstrap", "100", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "AUC" in printed and "min_k@0.2" in printed and "ref_base" in printed
    table = pd.read_parquet(out / "scores.parquet")
    scores = ["loss", "min_k@0.2", "ref_base", "gradnorm"]
    assert list(table.columns) == ["id", "member", "category", "n_tokens", *scores, *(f"pct_{c}" for c in scores)]
    assert table["pct_loss"].between(0, 100).all()
    assert table["member"].sum() == 12 and len(table) == 24
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["results"]) == {"loss", "min_k@0.2", "ref_base", "gradnorm"}
    loss = metrics["results"]["loss"]
    assert loss["calibrated"]["n_calibration"] == 6 and set(loss["calibrated"]["at_fpr"]) == {"0.1", "0.01", "0.001"}
    assert (0 <= loss["auc"] <= 1 and len(loss["auc_ci95"]) == 2
            and set(loss["tpr_at_fpr"]) == {"0.25", "0.05", "0.01", "0.001", "0"})
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_input_errors(files, tmp_path, capsys):
    base = ["attack", "--model", str(files / "model"), "--out", str(tmp_path / "out")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d"}\n{"oops"\n')
    assert main([*base, "--members", str(bad), "--nonmembers", str(files / "nonmembers.csv")]) == 2
    assert f"{bad}: line 3" in capsys.readouterr().err
    assert main([*base, "--members", str(files / "members.jsonl"), "--nonmembers", str(files / "members.jsonl")]) == 2
    assert "both in" in capsys.readouterr().err
    assert main([*base, "--members", str(files / "members.jsonl"), "--nonmembers", str(files / "nonmembers.csv"),
                 "--attacks", "ref"]) == 2
    assert "--ref-model" in capsys.readouterr().err
    assert main([*base, "--members", str(files / "members.jsonl"), "--nonmembers", str(files / "nonmembers.csv"),
                 "--attacks", "loss", "bogus"]) == 2
    assert "unknown attack" in capsys.readouterr().err


def test_ref_model_names():
    assert parse_ref_models(["gpt2"]) == {"ref": "gpt2"}
    assert parse_ref_models(["a=gpt2", "stablelm=./x"]) == {"ref_a": "gpt2", "ref_stablelm": "./x"}
    assert parse_ref_models(["gpt2", "./y"]) == {"ref_1": "gpt2", "ref_2": "./y"}
    with pytest.raises(ValueError, match="distinct"):
        parse_ref_models(["a=gpt2", "a=opt"])


def test_long_records_are_cut_to_the_models_positions(tmp_path, capsys):
    """A GPT-2-family model on a 100k-character record: cut with a counted warning, the count in metrics.json."""
    model = tmp_path / "gpt2"
    models.tiny_model("gpt2", max_positions=128).save_pretrained(model)
    models.tiny_tokenizer().save_pretrained(model)
    records = bundled_records()[:12]
    records[0] = {**records[0], "response": "long " * 20000}
    pd.DataFrame(records[:6]).to_json(tmp_path / "members.jsonl", orient="records", lines=True)
    pd.DataFrame(records[6:]).to_json(tmp_path / "nonmembers.jsonl", orient="records", lines=True)
    base = ["attack", "--model", str(model), "--members", str(tmp_path / "members.jsonl"),
            "--nonmembers", str(tmp_path / "nonmembers.jsonl"), "--attacks", "loss", "--bootstrap", "0"]
    assert main([*base, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr()
    assert "1 of 12 records cut to 128 tokens (the model's positions); pass --max-len to choose" in printed.err
    assert "1 cut to 128 tokens" in printed.out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["records_cut_to_max_len"] == 1 and metrics["config"]["max_len"] == 128
    assert pd.read_parquet(tmp_path / "out" / "scores.parquet")["n_tokens"].max() <= 127
    assert main([*base, "--max-len", "512", "--out", str(tmp_path / "over")]) == 2
    assert "--max-len 512 is more than the 128 positions" in capsys.readouterr().err


@pytest.mark.parametrize("command,flag,value,message", [
    ("attack", "--limit", "-5", "-5 is out of range; give a number >= 1"),
    ("attack", "--mope-n", "0", "0 is out of range; give a number >= 1"),
    ("attack", "--bootstrap", "-1", "-1 is out of range; give a number >= 0"),
    ("attack", "--ks", "1.5", "1.5 is out of range; give a number > 0 and <= 1"),
    ("attack", "--calibration", "1", "1.0 is out of range; give a number >= 0 and < 1"),
    ("attack", "--seed", "x", "'x' is not an integer"),
    ("memorize", "--limit", "-5", "-5 is out of range; give a number >= 1"),
    ("memorize", "--n-tokens", "0", "0 is out of range; give a number >= 1"),
    ("memorize", "--batch-size", "-2", "-2 is out of range; give a number >= 1"),
    ("distill", "--limit", "-5", "-5 is out of range; give a number >= 1"),
])
def test_bad_counts_stop_at_the_flag(command, flag, value, message, capsys):
    """A negative or zero count never reaches the work (--limit -5 once meant 'all but the last 5')."""
    inputs = {"attack": ["--model", "tiny:llama", "--members", "m.jsonl", "--nonmembers", "n.jsonl"],
              "memorize": ["--model", "tiny:llama", "--records", "m.jsonl"],
              "distill": ["--student", "tiny:llama", "--data", "m.jsonl"]}[command]
    with pytest.raises(SystemExit) as stop:
        main([command, *inputs, "--out", "o", flag, value])
    assert stop.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_fields_maps_the_columns_of_both_files(files, tmp_path, capsys):
    """attack takes --fields as memorize and distill do; without it the error names the flag to use."""
    records = bundled_records()[:16]
    for name, part in (("m.csv", records[:8]), ("n.csv", records[8:])):
        pd.DataFrame({"q": [r["instruction"] for r in part], "a": [r["response"] for r in part]}).to_csv(
            tmp_path / name, index=False)
    run = ["attack", "--model", str(files / "model"), "--members", str(tmp_path / "m.csv"), "--nonmembers",
           str(tmp_path / "n.csv"), "--attacks", "loss", "--bootstrap", "0", "--calibration", "0"]
    assert main([*run, "--out", str(tmp_path / "a")]) == 2
    assert f"{tmp_path / 'm.csv'}: line 2: missing field(s)" in capsys.readouterr().err
    assert main([*run, "--out", str(tmp_path / "b"), "--fields", "instruction=q,response=a"]) == 0
    assert "16 records (8 members)" in capsys.readouterr().out


def test_an_out_of_another_model_or_a_live_writer_is_refused(files, tmp_path, capsys):
    """Issue 12 item 2: a second model's attack never overwrites the first one's results, nor races a live run."""
    run = ["attack", "--members", str(files / "members.jsonl"), "--nonmembers", str(files / "nonmembers.csv"),
           "--attacks", "loss", "--bootstrap", "0", "--calibration", "0", "--out", str(tmp_path / "out")]
    assert main([*run, "--model", str(files / "model")]) == 0
    before = (tmp_path / "out" / "scores.parquet").read_bytes()
    capsys.readouterr()
    assert main([*run, "--model", str(files / "ref")]) == 2
    err = capsys.readouterr().err
    assert "holds the results of another run" in err and str(files / "ref") in err and "give another --out" in err
    assert (tmp_path / "out" / "scores.parquet").read_bytes() == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / ".kdfast.lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    assert main([*run[:-1], str(tmp_path / "busy"), "--model", str(files / "model")]) == 2
    assert f"another kdfast process (pid {os.getpid()}) is writing there" in capsys.readouterr().err


def test_a_peft_adapter_is_attacked_as_its_merged_model(files, tmp_path, capsys):
    """--model <peft adapter folder>: load_model merges it on its base (adapter_config.json names files/model)."""
    from kdfast.lora import adapter_parameters, apply_lora, merge_lora, save_adapter

    model, tok = models.load_model(files / "model")
    apply_lora(model, 4)
    for p in adapter_parameters(model).values():
        p.data.normal_(0, 0.5)
    save_adapter(model, model.state_dict(), tmp_path / "adapter")
    merge_lora(model).save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")
    losses = []
    for name in ("adapter", "merged"):
        assert main(["attack", "--model", str(tmp_path / name), "--members", str(files / "members.jsonl"),
                     "--nonmembers", str(files / "nonmembers.csv"), "--attacks", "loss", "--bootstrap", "10",
                     "--out", str(tmp_path / f"out-{name}")]) == 0
        losses.append(pd.read_parquet(tmp_path / f"out-{name}" / "scores.parquet")["loss"])
    pd.testing.assert_series_equal(losses[0], losses[1], rtol=1e-5)  # B ~ N(0, 0.5): both differ from the base
