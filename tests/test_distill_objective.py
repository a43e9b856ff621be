"""Trainer losses: the fused-linear and logits paths agree (value and gradient); chunked log-probs are exact."""
import pytest
import torch
import torch.nn.functional as F

from kdfast import models
from kdfast.distill import objective
from kdfast.distill.data import collate, encode_training
from kdfast.distill.objective import Rows, divergence_sum, forward_rows, token_nll, valid

RECORDS = [{"instruction": "Define the noun \"cat\".", "response": "a small domesticated feline"},
           {"instruction": "Define \"run\".", "response": "to move fast"}]


@pytest.mark.parametrize("family, kind, soft, hard", [("gpt2", "fkl", 1.0, 0.0), ("opt", "srkl", 0.7, 0.3),
                                                     ("llama", "jsd", 0.5, 0.5), ("gpt2", "rkl", 0.0, 1.0)])
def test_fused_and_logits_paths_agree(family, kind, soft, hard):
    tok = models.tiny_tokenizer()
    student = models.tiny_model(family, seed=1, hidden=32)
    teacher = models.tiny_model(family, seed=2, hidden=32, initializer_range=0.2)
    batch = collate(encode_training(tok, RECORDS, 128, 100), tok.pad_token_id, "cpu")
    targets = batch["targets"][valid(batch)]
    kw = dict(kind=kind, soft_weight=soft, hard_weight=hard, beta=0.1, alpha=0.1, temperature=2.0, vocab="error")
    out = {}
    for fused in (True, False):
        student.zero_grad()
        with torch.no_grad():
            t = forward_rows(teacher, batch, fused)
        loss = divergence_sum(forward_rows(student, batch, fused), t, targets, **kw)
        loss.backward()
        first = next(p for p in models.transformer_blocks(student)[0].parameters() if p.ndim == 2)
        out[fused] = (loss.detach(), first.grad.clone())
    assert targets.numel() > 10 and out[True][0] > 0
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-3, atol=1e-6)


def test_token_nll_in_chunks_is_exact(monkeypatch):
    monkeypatch.setattr(objective, "TOKEN_NLL_CHUNK_ELEMENTS", 40 * 64)   # 40 rows per chunk over a 64-entry vocabulary
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(100, 8, generator=g, requires_grad=True)
    weight = torch.randn(64, 8, generator=g, requires_grad=True)
    bias = torch.randn(64, generator=g)
    targets = torch.randint(0, 64, (100,), generator=g)
    got = token_nll(Rows(hidden, (weight, bias)), targets)
    want = F.cross_entropy(hidden @ weight.T + bias, targets, reduction="none")
    torch.testing.assert_close(got, want)
    (gh, gw) = torch.autograd.grad(got.sum(), (hidden, weight))
    (wh, ww) = torch.autograd.grad(want.sum(), (hidden, weight))
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(gw, ww)


def test_empty_selection_gives_zero_with_a_graph():
    rows = Rows(torch.zeros(0, 4, requires_grad=True), (torch.zeros(8, 4, requires_grad=True), None))
    loss = divergence_sum(rows, None, torch.zeros(0, dtype=torch.long), kind="fkl", soft_weight=0.0,
                          hard_weight=1.0, beta=0.1, alpha=0.1, temperature=1.0, vocab="error")
    loss.backward()
    assert loss.item() == 0.0
