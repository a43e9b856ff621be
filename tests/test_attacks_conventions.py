"""The field's scoring convention (text records as tokenizer(text), with and without a BOS-adding tokenizer; add_eos
the old way), and the benchmark-format loader with its errors, in the library and `kdfast attack --data`."""
import json
import zlib

import pandas as pd
import pytest
import torch

from kdfast import attacks, models
from kdfast.cli import main
from kdfast.data import RecordError, load_labeled

TEXTS = [{"text": "The Quick brown fox jumps over the lazy dog, again and again."}, {"text": "Short Text."},
         {"text": "A tall perennial woody plant, with a trunk and branches."}]
KS = (0.2,)


def bos_tokenizer():
    """The tiny tokenizer made to add BOS, as LLaMA's and SmolLM's do."""
    from tokenizers import processors

    tok = models.tiny_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return tok


def oracle(model, tok, text, add_eos=False):
    """float64 scores of one text scored as ids = tokenizer(text) (+ EOS), positions 1.. predicted from the ones
    before."""
    ids = tok(text)["input_ids"] + ([tok.eos_token_id] if add_eos else [])
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.double()[0, :-1], -1)
    target = torch.tensor(ids[1:])
    ll_t = logp.gather(-1, target[:, None])[:, 0]
    mu = (logp.exp() * logp).sum(-1)
    sigma = ((logp.exp() * logp.pow(2)).sum(-1) - mu.pow(2)).clamp_min(0).sqrt()
    z = (ll_t - mu) / sigma.clamp_min(1e-6)
    k = max(1, int(torch.ceil(torch.tensor(0.2 * len(ll_t)))))  # kdfast rounds k·n up
    ll = ll_t.mean().item()
    return {"n_tokens": len(ids) - 1, "loss": ll, "zlib": ll / len(zlib.compress(text.encode())),
            "min_k@0.2": ll_t.sort().values[:k].mean().item(), "min_k_pp@0.2": z.sort().values[:k].mean().item()}


@pytest.mark.parametrize("add_eos", [False, True])
@pytest.mark.parametrize("bos", [False, True])
def test_logit_attacks_score_tokenizer_text_as_it_is(bos, add_eos):
    tok = bos_tokenizer() if bos else models.tiny_tokenizer()
    assert (tok("Short Text.")["input_ids"][0] == tok.bos_token_id) == bos
    model, ref = models.tiny_model("llama", seed=21), models.tiny_model("gpt2", seed=22)
    table = attacks.score(model, tok, TEXTS, ("loss", "zlib", "min_k", "min_k_pp"), ks=KS, add_eos=add_eos,
                          ref_models={"ref": (ref, tok)}, batch_tokens=40, padding_side="left", progress=False)
    for i, record in enumerate(TEXTS):
        want = oracle(model, tok, record["text"], add_eos)
        for column, value in want.items():
            assert table[column][i] == pytest.approx(value, abs=1e-4, rel=1e-4), (column, i)
        assert table["ref"][i] == pytest.approx(want["loss"] - oracle(ref, tok, record["text"], add_eos)["loss"],
                                                abs=1e-4)


def test_instruction_records_keep_the_response_eos():
    tok, model = models.tiny_tokenizer(), models.tiny_model("llama", seed=23)
    record = {"instruction": "Define \"oak\".", "response": "A tree."}
    table = attacks.score(model, tok, [record], ("loss",), progress=False)
    response = tok("A tree.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert table["n_tokens"][0] == len(response)


def test_ref_with_its_own_bos_tokenizer():
    """A reference whose tokenizer adds BOS scores tokenizer(text) of its own; the target's has none."""
    tok, ref_tok = models.tiny_tokenizer(), bos_tokenizer()
    model, ref = models.tiny_model("llama", seed=24), models.tiny_model("llama", seed=25)
    table = attacks.score(model, tok, TEXTS, ("loss",), ref_models={"ref": (ref, ref_tok)}, progress=False)
    for i, r in enumerate(TEXTS):
        want = oracle(model, tok, r["text"])["loss"] - oracle(ref, ref_tok, r["text"])["loss"]
        assert table["ref"][i] == pytest.approx(want, abs=1e-4)


def test_one_token_text_scores_nan():
    tok, model = models.tiny_tokenizer(), models.tiny_model("llama", seed=26)
    one = {"text": "a"}
    assert len(tok("a")["input_ids"]) == 1
    table = attacks.score(model, tok, [one, TEXTS[1]], ("loss", "min_k"), progress=False)
    assert table["n_tokens"][0] == 0 and pd.isna(table["loss"][0]) and pd.isna(table["min_k@0.1"][0])
    assert table["loss"][1] < 0


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_labeled_formats_and_errors(tmp_path):
    rows = [{"input": "first text", "label": 1}, {"input": "second text", "label": 0}, {"input": "third", "label": "1"}]
    records, labels = load_labeled(_write(tmp_path / "w.jsonl", rows), "input", "label")
    assert records == [{"text": "first text"}, {"text": "second text"}, {"text": "third"}] and labels == [1, 0, 1]
    pd.DataFrame(rows[:2]).to_csv(tmp_path / "w.csv", index=False)
    assert load_labeled(tmp_path / "w.csv") == (records[:2], [1, 0])
    pd.DataFrame({"text": ["a b", "c d"], "member": [True, False]}).to_parquet(tmp_path / "m.parquet")
    assert load_labeled(tmp_path / "m.parquet", "text", "member")[1] == [1, 0]
    bad = _write(tmp_path / "bad.jsonl", [rows[0], {"input": "x", "label": 2}])
    with pytest.raises(RecordError, match=r"bad\.jsonl: line 2: label 2 in column 'label' is not 0 or 1"):
        load_labeled(bad)
    missing = _write(tmp_path / "missing.jsonl", [rows[0], {"text": "x", "label": 0}])
    with pytest.raises(RecordError,
                       match=r"missing\.jsonl: line 2: no column 'input' \(the row has text, label\).*--text-column"):
        load_labeled(missing)
    with pytest.raises(RecordError, match=r"line 1: no column 'y'.*--label-column"):
        load_labeled(tmp_path / "w.jsonl", "input", "y")
    with pytest.raises(RecordError, match=r"w\.csv: line 3: label 'yes'"):
        pd.DataFrame({"input": ["a", "b"], "label": ["1", "yes"]}).to_csv(tmp_path / "w.csv", index=False)
        load_labeled(tmp_path / "w.csv")


def test_cli_data_file(tmp_path, capsys):
    tok = models.tiny_tokenizer()
    models.tiny_model("llama", seed=27).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    texts = [f"Text number {i} about the {w} and its neighbours."
             for i, w in enumerate(["oak", "elm", "ash", "fir", "yew", "box"])]
    data = _write(tmp_path / "wikimia.jsonl", [{"input": t, "label": i % 2} for i, t in enumerate(texts)])
    base = ["attack", "--model", str(tmp_path / "model"), "--bootstrap", "0", "--attacks", "loss"]
    assert main([*base, "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    assert table["member"].tolist() == [i % 2 for i in range(6)]
    assert table["n_tokens"].tolist() == [len(tok(t)["input_ids"]) - 1 for t in texts]
    assert main([*base, "--data", str(data), "--add-eos", "--out", str(tmp_path / "eos")]) == 0
    eos = pd.read_parquet(tmp_path / "eos" / "scores.parquet")
    assert (eos["n_tokens"] == table["n_tokens"] + 1).all()
    capsys.readouterr()
    assert main([*base, "--data", str(data), "--label-column", "member", "--out", str(tmp_path / "x")]) == 2
    assert "no column 'member'" in capsys.readouterr().err
    assert main([*base, "--data", str(data), "--members", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "either --data" in capsys.readouterr().err
    assert main([*base[:-1], "rmia", "--data", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "--reference NAME=MODEL and --population" in capsys.readouterr().err
