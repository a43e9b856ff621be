"""DP-SGD fine-tuning (Opacus) on tiny models: ε reported and within the target, loss falls, the accountant agrees."""
import pytest
import torch

from kdfast.distill.config import DistillError
from kdfast.distill.dp import DPConfig, train_dp
from kdfast.models import load_model

RECORDS = [{"instruction": f"Repeat the word {w}.", "response": f"{w} {w} {w}."}
           for w in ["apple", "stone", "river", "cloud", "tiger", "lemon", "piano", "ember"] * 4]


def _independent_epsilon(sigma, q, steps, delta, accountant):
    """ε of `steps` compositions of the Poisson-subsampled Gaussian, from Opacus's analysis functions directly."""
    if accountant == "rdp":
        from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

        orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("family,accountant", [("llama", "rdp"), ("gpt2", "prv")])
def test_dp_finetuning_spends_the_budget_and_learns(family, accountant):
    model, tok = load_model(f"tiny:{family}")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp = DPConfig(epsilon=50.0, delta=1e-5, max_grad_norm=1.0, accountant=accountant, physical_batch_size=4)
    summary = train_dp(model, tok, RECORDS, dp, epochs=6, lr=3e-3, batch_size=8, max_len=96, max_prompt_len=80)
    assert summary.steps == 6 * len(RECORDS) // 8 and summary.sample_rate == 8 / len(RECORDS)
    assert 0 < summary.epsilon <= dp.epsilon * 1.02 and summary.noise_multiplier > 0
    expected = _independent_epsilon(summary.noise_multiplier, summary.sample_rate, summary.steps, dp.delta, accountant)
    assert summary.epsilon == pytest.approx(expected, rel=1e-3)
    first, last = sum(summary.losses[:3]) / 3, sum(summary.losses[-3:]) / 3
    assert last < first, summary.losses
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb, before[next(n for n, p in model.named_parameters() if p is emb)])  # frozen
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dp_lora_trains_only_adapters_and_merges_them(family):
    """DP-LoRA: only the attention projections change (their merged adapters), every other weight stays, the
    accountant's ε is the one of the same σ, q and steps, and the model comes back plain (no LoRA layers)."""
    from kdfast.lora import has_lora

    model, tok = load_model(f"tiny:{family}")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp = DPConfig(epsilon=50.0, delta=1e-5, lora_rank=4, physical_batch_size=4)
    summary = train_dp(model, tok, RECORDS, dp, epochs=6, lr=1e-2, batch_size=8, max_len=96, max_prompt_len=80)
    assert not has_lora(model) and set(dict(model.named_parameters())) == set(before)
    expected = _independent_epsilon(summary.noise_multiplier, summary.sample_rate, summary.steps, dp.delta, "rdp")
    assert summary.epsilon == pytest.approx(expected, rel=1e-3)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    targets = ("q_proj.weight", "v_proj.weight", "c_attn.weight")
    assert moved and all(n.endswith(targets) for n in moved), moved
    first, last = sum(summary.losses[:3]) / 3, sum(summary.losses[-3:]) / 3
    assert last < first, summary.losses


def test_a_smaller_epsilon_needs_more_noise():
    model, tok = load_model("tiny:llama")
    kw = {"epochs": 1, "lr": 1e-3, "batch_size": 8, "max_len": 96, "max_prompt_len": 80}
    strict = train_dp(model, tok, RECORDS, DPConfig(epsilon=1.0), **kw)
    loose = train_dp(load_model("tiny:llama")[0], tok, RECORDS, DPConfig(epsilon=8.0), **kw)
    assert strict.noise_multiplier > loose.noise_multiplier and strict.epsilon < loose.epsilon


def test_bad_settings_fail_before_training():
    model, tok = load_model("tiny:opt")
    with pytest.raises(DistillError, match="OPT's learned positional embedding"):
        train_dp(model, tok, RECORDS, DPConfig(), epochs=1, lr=1e-3, batch_size=8, max_len=96, max_prompt_len=80)
    with pytest.raises(DistillError, match="teacher.dp.lora_rank must be 0"):
        DPConfig(lora_rank=-1).check()
    with pytest.raises(DistillError, match="teacher.dp.accountant: unknown 'gdp2'"):
        DPConfig(accountant="gdp2").check()
    with pytest.raises(DistillError, match="epsilon must be > 0"):
        DPConfig(epsilon=0).check()
