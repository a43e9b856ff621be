"""Model loading, tiny models, the hidden-state/head split and tokenizer checks."""
import json
import re

import pytest
import torch
import transformers

from kdfast import models
from kdfast.cli import main
from kdfast.data import encode, next_token_targets, pad_batch


@pytest.mark.parametrize("family", models.FAMILIES)
def test_hidden_and_head_reproduce_logits(family):
    model = models.tiny_model(family, seed=1)
    tok = models.tiny_tokenizer()
    items = [encode(tok, {"instruction": "Define the noun \"cat\".", "response": r}) for r in ("a small pet", "feline")]
    batch = pad_batch(items, tok.pad_token_id, side="left")
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    hidden, (weight, bias) = models.hidden_and_head(model, **kw)
    logits = model(**kw).logits
    manual = hidden @ weight.T + (0 if bias is None else bias)
    assert torch.allclose(manual, logits, atol=1e-5)
    assert hidden.shape[:2] == batch["input_ids"].shape and weight.shape[0] == logits.shape[-1]


def test_hidden_and_head_builds_no_kv_cache(monkeypatch):
    model = models.tiny_model("llama")
    seen = {}
    forward = model.base_model.forward
    monkeypatch.setattr(model.base_model, "forward", lambda *a, **kw: seen.update(kw) or forward(*a, **kw))
    models.hidden_and_head(model, torch.tensor([[1, 2, 3]]))
    assert seen["use_cache"] is False


@pytest.mark.parametrize("family", models.FAMILIES)
def test_left_and_right_padding_give_same_logits(family):
    model = models.tiny_model(family, seed=2)
    tok = models.tiny_tokenizer()
    items = [encode(tok, {"instruction": "Define it.", "response": r}) for r in ("short", "a much longer answer here")]
    out = {}
    for side in ("left", "right"):
        b = pad_batch(items, tok.pad_token_id, side=side)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits
        out[side] = logits[b["attention_mask"].bool()]
    assert torch.allclose(out["left"], out["right"], atol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="unknown model family"):
        models.tiny_config("bert")
    with pytest.raises(models.ModelError, match="not found"):
        models.load_model("./no/such/folder")
    tok = models.tiny_tokenizer()
    other = models.tiny_tokenizer()
    other.add_tokens(["<extra>"])
    models.check_same_tokenizer(tok, models.tiny_tokenizer())
    with pytest.raises(models.ModelError, match="tokenizers differ"):
        models.check_same_tokenizer(tok, other)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Run in tmp_path, which holds a runs/ folder, with every from_pretrained (the hub's door) refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()

    def no_hub(*args, **kwargs):
        raise AssertionError(f"sent to the hub: {args}")

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        monkeypatch.setattr(cls, "from_pretrained", no_hub)
    return tmp_path


@pytest.mark.parametrize("spec", ["runs/nope/final", "runs/nope", "./nope", "~/kdfast-nope", "/kdfast/nope",
                                  "a/b/c", "nope.gguf"])
def test_mistyped_local_path_is_not_found_without_the_hub(offline, spec):
    kind = "GGUF file" if spec.endswith(".gguf") else "model folder"
    for load in (models.load_model, models.load_tokenizer):
        with pytest.raises(models.ModelError, match=rf"^{kind} {re.escape(spec)} not found; check the path"):
            load(spec)


def test_hub_ids_stay_hub_ids(offline):
    assert models.local_path("HuggingFaceTB/SmolLM2-135M") is None and models.local_path("gpt2") is None
    assert models.local_path("runs").is_dir()  # an existing folder is local whatever its name


def test_mistyped_model_path_from_the_cli(offline, capsys):
    for name in ("m.jsonl", "n.jsonl"):
        (offline / name).write_text(json.dumps({"instruction": name, "response": "r"}) + "\n")
    args = ["attack", "--model", "runs/nope/final", "--members", "m.jsonl", "--nonmembers", "n.jsonl", "--out", "o"]
    assert main(args) == 2
    assert "model folder runs/nope/final not found; check the path" in capsys.readouterr().err


def test_local_folder_loads_safetensors_only(tmp_path):
    model, tok = models.tiny_model("gpt2"), models.tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, _ = models.load_model(tmp_path / "m")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(models.ModelError, match="no .safetensors"):
        models.load_model(tmp_path / "m")


def test_next_token_targets():
    labels = torch.tensor([[-100, -100, 5, 6, 7]])
    assert next_token_targets(labels).tolist() == [[-100, 5, 6, 7, -100]]


def test_transformer_blocks():
    for family in models.FAMILIES:
        assert len(models.transformer_blocks(models.tiny_model(family, layers=3))) == 3


@pytest.mark.parametrize("helper,uses", [("import_bitsandbytes", "optim.AdamW8bit"), ("import_peft", "LoraConfig")])
def test_bitsandbytes_is_imported_without_asking_the_hub(tmp_path, helper, uses):
    """On AVX512-BF16 CPUs bitsandbytes' import asks the Hub for a kernel (a request, then remote code): kdfast's
    import of it, and of peft (which imports it), must make no Hub request; the LoRA module imports peft only when
    LoRA is used. Run in a fresh interpreter, where bitsandbytes is not imported yet."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import huggingface_hub\n"
        "calls = []\n"
        "def refuse(self, *a, **k):\n"
        "    calls.append(a)\n"
        "    raise RuntimeError('no network in tests')\n"
        "huggingface_hub.HfApi.get_organization_overview = refuse\n"
        "import kdfast.lora\n"
        "assert 'peft' not in sys.modules and 'bitsandbytes' not in sys.modules\n"
        f"from kdfast.models import {helper}\n"
        f"module = {helper}()\n"
        f"assert module.{uses}\n"
        "print('hub requests:', len(calls))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "hub requests: 0" in out.stdout
    assert "kernels-community" not in out.stderr


def test_no_kdfast_path_asks_the_hub_through_bitsandbytes():
    """transformers' scheduler module imports peft and peft imports bitsandbytes: importing every kdfast module and
    training a few steps must not reach bitsandbytes' Hub lookup either. A fresh interpreter, as above."""
    import subprocess
    import sys

    script = (
        "import huggingface_hub, pkgutil, importlib, kdfast\n"
        "calls = []\n"
        "def refuse(self, *a, **k):\n"
        "    calls.append(a)\n"
        "    raise RuntimeError('no network in tests')\n"
        "huggingface_hub.HfApi.get_organization_overview = refuse\n"
        "for m in pkgutil.walk_packages(kdfast.__path__, 'kdfast.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "from kdfast.models import tiny_model, tiny_tokenizer\n"
        "from kdfast.distill import DistillConfig, Distiller\n"
        "tok = tiny_tokenizer()\n"
        "records = [{'instruction': f'word {i}', 'response': f'meaning {i} of it'} for i in range(8)]\n"
        "cfg = DistillConfig(technique='sft', max_steps=2, batch_size=4, progress=False)\n"
        "Distiller(None, tiny_model('llama'), tok, cfg).train(records)\n"
        "print('hub requests:', len(calls))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "hub requests: 0" in out.stdout
    assert "kernels-community" not in out.stderr
