"""MiniLLM's mixed sampler: draws from (1 − α)q + αp, steps both models' KV caches correctly."""
import pytest
import torch
from scipy.stats import chisquare
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from kdfast import models
from kdfast.distill.mixed_sampling import sample_mixture
from kdfast.generation import generate


class FixedNext(nn.Module):
    """A stub LM whose next-token distribution is `probs`, whatever the context."""

    def __init__(self, probs):
        super().__init__()
        self.register_buffer("logits", torch.tensor(probs).log())
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        return CausalLMOutputWithPast(logits=self.logits.expand(*input_ids.shape, -1))


Q = [0.5, 0.2, 0.1, 0.1, 0.05, 0.05]
P = [0.05, 0.05, 0.1, 0.2, 0.3, 0.3, 0.0, 0.0]   # a larger head: only the common 6 entries count


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_first_token_frequencies_follow_the_mixture(alpha):
    n = 4000
    prompts = [[1, 2, 3]] * n
    out = sample_mixture(FixedNext(Q), FixedNext(P), prompts, 1, alpha=alpha, pad_id=0, eos_id=None,
                         batch_size=n, seed=0)
    counts = torch.bincount(torch.tensor([o[0] for o in out]), minlength=6).double()
    p6 = torch.tensor(P[:6]) / sum(P[:6])
    expected = ((1 - alpha) * torch.tensor(Q) + alpha * p6) * n
    keep = expected > 0
    assert counts[~keep].sum() == 0
    assert chisquare(counts[keep].numpy(), expected[keep].numpy()).pvalue > 1e-3


def test_seeded_and_cut_after_eos():
    prompts = [[1, 2], [3]] * 50
    a = sample_mixture(FixedNext(Q), FixedNext(P), prompts, 5, alpha=0.5, pad_id=9, eos_id=0, seed=1)
    assert a == sample_mixture(FixedNext(Q), FixedNext(P), prompts, 5, alpha=0.5, pad_id=9, eos_id=0, seed=1)
    assert all(0 not in row[:-1] and 9 not in row for row in a)
    assert any(row[-1] == 0 and len(row) < 5 for row in a) and all(len(row) <= 5 for row in a)


@pytest.mark.parametrize("family", models.FAMILIES)
def test_pure_mixtures_decode_like_generate(family):
    """α=0 greedy is the student's greedy decoding, α=1 the teacher's: caches, positions and left padding work."""
    student = models.tiny_model(family, seed=5, hidden=32)
    teacher = models.tiny_model(family, seed=6, hidden=32, initializer_range=0.2)
    prompts = [[5, 17, 250, 9], [44, 3], [7, 8, 9, 10, 11, 12]]
    for alpha, model in ((0.0, student), (1.0, teacher)):
        mixed = sample_mixture(student, teacher, prompts, 5, alpha=alpha, pad_id=1, eos_id=0, do_sample=False,
                               batch_size=3)
        assert mixed == generate(model, prompts, 5, pad_id=1, eos_id=0, batch_size=3)
