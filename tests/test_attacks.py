"""Every attack of attacks.score against a slow per-record oracle (batch of one, no padding, float64
log_softmax), the overfit-model separation check, and input errors."""
import zlib

import pytest
import torch
import torch.nn.functional as F

from kdfast import attacks, models, reference
from kdfast.attacks import bulk
from kdfast.data import Encoded, bundled_records, encode, next_token_targets, pad_batch, prompt_text, target_text

KS = (0.1, 0.25)
RECORDS = [
    {"instruction": "Define the noun \"cat\".", "response": "A small domesticated Feline Mammal with soft fur."},
    {"instruction": "Define it.", "input": "dog", "response": "Canine."},
    {"text": "The Quick brown fox jumps over the lazy dog, again and again and again."},
    {"instruction": "What does \"run\" mean?",
     "response": "To move swiftly on foot, so that both feet leave the ground during each stride; To Flee."},
    {"instruction": "Spell it.", "response": "A"},
    {"text": "Short Text."},
]
PREFIX = [{"instruction": "Define \"tree\".", "response": "A tall perennial woody plant."}]


def other_tokenizer():
    """A second, different BPE (trained here in a fraction of a second) for the reference model."""
    from tokenizers import Tokenizer, pre_tokenizers, trainers
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tm.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [r["response"] for r in bundled_records()[:2000]] + [str(r) for r in RECORDS]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>", "<s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<s>")


def scored_item(tok, record, add_eos=False):
    """The field's convention: a {"text"} record is tokenizer(text) as it is, every token scored but the first
    (add_eos: + EOS); an instruction record is the study's template with the response's EOS."""
    if "text" not in record:
        return encode(tok, record)
    ids = tok(record["text"])["input_ids"] + ([tok.eos_token_id] if add_eos else [])
    return Encoded(ids, [-100] + ids[1:], 0)


def oracle_stats(model, item):
    """float64 reference statistics of one record: no batch, no padding, no position ids."""
    logits = model(input_ids=torch.tensor([item.input_ids])).logits.double()
    targets = next_token_targets(torch.tensor([item.labels]))
    return reference.token_stats(logits, targets)


def oracle_ll(model, item):
    s = oracle_stats(model, item)
    return s["logp"][s["valid"]].mean().item()


def oracle_conditioned_ll(model, tok, record, prefix):
    """ll(x | prefix): the prefix records in full, a blank line after each, then the record; only the record's own
    scored tokens count."""
    item = scored_item(tok, record)
    text = "".join(prompt_text(r) + target_text(r) + "\n\n" for r in prefix)
    ids = tok(text, add_special_tokens=False)["input_ids"] + item.input_ids
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.double()[0], -1)
    off = len(ids) - len(item.input_ids)
    vals = [logp[off + p - 1, item.input_ids[p]] for p in range(1, len(item)) if item.labels[p] != -100]
    return torch.stack(vals).mean().item()


def oracle_gradnorm(model, item):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=torch.tensor([item.input_ids])).logits.double()
    loss = reference.cross_entropy(logits, next_token_targets(torch.tensor([item.labels])))
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return -torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()


def oracle_logit_scores(model, tok, record, add_eos=False):
    item = scored_item(tok, record, add_eos)
    s = oracle_stats(model, item)
    logp, valid = s["logp"], s["valid"]
    ll = logp[valid].mean().item()
    z = torch.where(valid, (logp - s["mu"]) / s["sigma"].clamp_min(bulk.SIGMA_FLOOR), 0.0)
    low, low_pp = reference.min_k(logp, valid, KS)[0], reference.min_k(z, valid, KS)[0]
    lower = {k: v.lower() if k in ("text", "response") else v for k, v in record.items()}
    text = record.get("text", record.get("response"))
    out = {"loss": ll, "zlib": ll / len(zlib.compress(text.encode())), "n_tokens": int(valid.sum()),
           "lowercase": oracle_ll(model, scored_item(tok, lower, add_eos)) / ll}
    for j, k in enumerate(KS):
        out[f"min_k@{k:g}"], out[f"min_k_pp@{k:g}"] = low[j].item(), low_pp[j].item()
    return out


@pytest.fixture(scope="module")
def target():
    return models.tiny_model("llama", seed=3), models.tiny_tokenizer()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logit_attacks_match_oracle(family, side):
    model, tok = models.tiny_model(family, seed=3), models.tiny_tokenizer()
    table = attacks.score(model, tok, RECORDS, ks=KS, padding_side=side, batch_tokens=150, progress=False)
    for i, record in enumerate(RECORDS):
        for column, want in oracle_logit_scores(model, tok, record).items():
            assert table[column][i] == pytest.approx(want, abs=1e-4, rel=1e-4), (column, i)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_shared_prompt_prefix_runs_once_with_the_same_scores(family):
    model, tok = models.tiny_model(family, seed=8), models.tiny_tokenizer()
    items = bulk.encode_scored(tok, bundled_records()[:6] + RECORDS[:1])
    batch = pad_batch(items, tok.pad_token_id)
    with torch.no_grad():
        shared, full = bulk.forward_stats(model, batch), bulk.forward_stats(model, batch, share_prefix=False)
    cut = bulk.shared_prefix_length(batch["input_ids"], batch["attention_mask"], shared.valid)
    first_scored = min(it.labels.index(next(x for x in it.labels if x != -100)) for it in items)
    assert 20 < cut < first_scored  # the template's header, never a scored position's input
    assert bulk.shared_prefix_length(batch["input_ids"][:1], batch["attention_mask"][:1], shared.valid[:1]) == 0
    assert torch.equal(shared.valid, full.valid)
    for a, b in ((shared.logp, full.logp), (shared.mu, full.mu), (shared.sigma, full.sigma)):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("path", ["fused", "no_linear_head"])
def test_other_head_paths_match_oracle(monkeypatch, target, path):
    model, tok = target
    if path == "fused":
        monkeypatch.setattr(bulk, "LOGITS_LIMIT", 1)  # every batch through token_stats_from_hidden
    else:
        monkeypatch.setattr(bulk, "linear_head", lambda m: None)  # models whose logits are not a plain linear map
    table = attacks.score(model, tok, RECORDS, ("loss", "min_k_pp"), ks=KS, padding_side="left", progress=False)
    for i, record in enumerate(RECORDS):
        want = oracle_logit_scores(model, tok, record)
        for column in ("loss", "min_k_pp@0.25"):
            assert table[column][i] == pytest.approx(want[column], abs=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_ref_recall_gradnorm_match_oracle(target, side):
    model, tok = target
    ref_tok = other_tokenizer()
    ref = models.tiny_model("gpt2", seed=5, vocab_size=len(ref_tok))
    ref2 = models.tiny_model("llama", seed=6)
    table = attacks.score(model, tok, RECORDS, ("recall", "gradnorm"),
                          ref_models={"ref_other": (ref, ref_tok), "ref_same": (ref2, tok)}, recall_prefix=PREFIX,
                          padding_side=side, batch_tokens=150, progress=False)
    assert list(table.columns) == ["id", "n_tokens", "ref_other", "ref_same", "gradnorm", "recall"]
    for i, record in enumerate(RECORDS):
        item = scored_item(tok, record)
        ll = oracle_ll(model, item)
        assert table["ref_other"][i] == pytest.approx(ll - oracle_ll(ref, scored_item(ref_tok, record)), abs=1e-4)
        assert table["ref_same"][i] == pytest.approx(ll - oracle_ll(ref2, item), abs=1e-4)
        assert table["recall"][i] == pytest.approx(oracle_conditioned_ll(model, tok, record, PREFIX) / ll, abs=1e-4)
        assert table["gradnorm"][i] == pytest.approx(oracle_gradnorm(model, item), rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_all_tokens_scores_the_prompt_too(target):
    model, tok = target
    table = attacks.score(model, tok, RECORDS[:2], ("loss",), response_only=False, progress=False)
    item = encode(tok, RECORDS[0])
    logits = model(input_ids=torch.tensor([item.input_ids])).logits[0, :-1]
    want = -F.cross_entropy(logits, torch.tensor(item.input_ids[1:])).item()
    assert table["loss"][0] == pytest.approx(want, abs=1e-5)
    assert table["n_tokens"][0] == len(item) - 1


def _overfit(model, tok, records, steps=30):
    """Full-batch Adam on the records' response tokens; returns the last loss."""
    batch = pad_batch([encode(tok, r) for r in records], tok.pad_token_id)
    targets = next_token_targets(batch["labels"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_overfit_model_separates_members(target):
    """A tiny model trained on 32 records: loss and Min-K% tell them apart from 32 held-out records."""
    records = bundled_records()[:64]
    model, tok = models.tiny_model("llama", seed=0), target[1]
    assert _overfit(model, tok, records[:32]) < 5.0  # from ln(1024) ≈ 6.9
    table = attacks.score(model, tok, records, ("loss", "min_k", "min_k_pp", "zlib"), membership=[1] * 32 + [0] * 32,
                          progress=False)
    results = attacks.evaluate(table, n_bootstrap=200)
    assert results["loss"]["auc"] >= 0.9 and results["min_k@0.2"]["auc"] >= 0.9
    assert results["loss"]["auc_ci95"][0] <= results["loss"]["auc"] <= results["loss"]["auc_ci95"][1]


def test_training_mode_and_requires_grad_restored(target):
    model, tok = target
    model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    try:
        attacks.score(model, tok, RECORDS[:2], ("loss", "gradnorm"), progress=False)
        assert model.training
        assert not model.model.layers[0].mlp.up_proj.weight.requires_grad
        assert sum(p.requires_grad for p in model.parameters()) == len(list(model.parameters())) - 1
    finally:
        model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
        model.eval()


def test_input_errors(target):
    model, tok = target
    with pytest.raises(ValueError, match="unknown attack"):
        attacks.score(model, tok, RECORDS, ("loss", "nope"))
    with pytest.raises(ValueError, match="needs a reference model"):
        attacks.score(model, tok, RECORDS, ("ref",))
    with pytest.raises(ValueError, match="recall needs non-member prefix"):
        attacks.score(model, tok, RECORDS, ("recall",))
    with pytest.raises(ValueError, match="one 0/1 label per record"):
        attacks.score(model, tok, RECORDS, ("loss",), membership=[1, 0])
    with pytest.raises(ValueError, match="prefix record is a member"):
        attacks.score(model, tok, RECORDS, ("recall",), membership=[1, 0, 0, 0, 0, 0], recall_prefix=RECORDS[:1])
    with pytest.raises(ValueError, match="unknown option"):
        attacks.score(model, tok, RECORDS, ("loss",), mope_steps=3)
    with pytest.raises(ValueError, match="Min-K% fractions"):
        attacks.score(model, tok, RECORDS, ("min_k",), ks=(0.0,))
    with pytest.raises(ValueError, match="no records"):
        attacks.score(model, tok, [], ("loss",))


def test_recall_holds_out_its_prefix(target):
    model, tok = target
    records = bundled_records()[:12]
    membership = [1] * 6 + [0] * 6
    table = attacks.score(model, tok, records, ("loss", "recall"), membership=membership, recall_shots=2,
                          progress=False)
    held = table["recall"].isna()
    assert held.sum() == 2 and not table["member"][held].any()
    assert set(attacks.evaluate(table, n_bootstrap=0)["recall"]) >= {"auc"}
    assert attacks.evaluate(table, n_bootstrap=0)["recall"]["n_nonmembers"] == 4
