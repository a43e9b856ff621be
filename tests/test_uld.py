"""kdfast.ops.uld (ULD loss across vocabularies) against the float64 reference, and the reference against a
one-record-at-a-time version written from the paper."""
import itertools
import math

import pytest
import torch

from kdfast import reference as ref
from kdfast.ops import uld as ops

GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-3), torch.float16: (4e-3, 1e-3),
            torch.float64: (1e-9, 1e-12)}


def paper_uld(s_row: list[float], t_row: list[float], top_k: int | None, temperature: float,
              cs: float = 0.0, ct: float = 0.0) -> float:
    """Boizard et al. (2024), eq. 4, one token: softmax each side, sort decreasing, pad zeros, Σ|·| (first k)."""
    def probs(row, c):
        finite = [v / temperature for v in row if v != -math.inf]
        if not finite:
            return [0.0] * len(row)
        m = max(finite)
        z = sum(math.exp(v - m) for v in finite)
        return sorted((0.0 if v == -math.inf else math.exp(v / temperature - m) / z * math.exp(c) for v in row),
                      reverse=True)

    a, b = probs(s_row, cs), probs(t_row, ct)
    width = max(len(a), len(b))
    a, b = a + [0.0] * (width - len(a)), b + [0.0] * (width - len(b))
    k = width if top_k is None else min(top_k, width)
    return sum(abs(x - y) for x, y in zip(a[:k], b[:k]))


def distinct_logits(gen, lead, v):
    """Random rows without ties even after rounding to bf16: at a tie the sorted order, hence the subgradient,
    is arbitrary, and the reference and the op may pick different ones."""
    n = math.prod(lead)
    ranks = torch.stack([torch.randperm(v, generator=gen) for _ in range(n)]).double()
    scale = 1.0 + 2.0 * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    return ((ranks - v / 2) * (4.0 / v) * scale).view(*lead, v)


def pair(gen, lead, vs, vt, dtype):
    s = distinct_logits(gen, lead, vs)
    t = distinct_logits(gen, lead, vt) + 0.3
    fs, ft = s.view(-1, vs), t.view(-1, vt)
    fs[0, :3] = -math.inf
    ft[-1, 2:9] = -math.inf
    if fs.shape[0] > 2:
        fs[1] = -math.inf  # a row with no finite logit: an all-zero vector
    return s.to(dtype), t.to(dtype)


def labels_for(gen, lead):
    labels = torch.randint(0, 5, lead, generator=gen)
    labels.view(-1)[1::3] = -100
    return labels


@pytest.mark.parametrize("top_k", [None, 1, 5, 10_000])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_reference_matches_paper_per_record(gen, top_k, temperature):
    s, t = pair(gen, (6,), 11, 23, torch.float64)
    cs = torch.randn(6, generator=gen, dtype=torch.float64).clamp(max=0)
    ct = torch.randn(6, generator=gen, dtype=torch.float64).clamp(max=0)
    got = ref.uld(s, t, top_k, temperature, cs, ct)
    for i in range(6):
        want = paper_uld(s[i].tolist(), t[i].tolist(), top_k, temperature, float(cs[i]), float(ct[i]))
        assert got[i].item() == pytest.approx(want, rel=1e-12, abs=1e-14)


def run_ref(s, t, labels, cs, ct, cotangent=None, **kw):
    sd = s.detach().double().requires_grad_()
    cd = None if cs is None else cs.detach().double().requires_grad_()
    out = ref.uld_loss(sd, t.double(), labels=labels, student_log_scale=cd,
                       teacher_log_scale=None if ct is None else ct.double(), **kw)
    (out if cotangent is None else out * cotangent).sum().backward()
    return out.detach(), sd.grad, None if cd is None else cd.grad


def run_fast(s, t, labels, cs, ct, cotangent=None, **kw):
    s = s.detach().clone().requires_grad_()
    c = None if cs is None else cs.detach().clone().requires_grad_()
    out = ops.uld_loss(s, t, labels=labels, student_log_scale=c, teacher_log_scale=ct, **kw)
    (out if cotangent is None else out * cotangent).sum().backward()
    return out.detach(), s.grad, None if c is None else c.grad


def got_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_grad_close(got, want, dtype):
    # atol scales with the gradient's terms (q·e^c/T ≤ 1), not its value: where every sign agrees the exact
    # gradient is 0 and both sides hold rounding noise of those terms.
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * max(want.abs().max().item(), 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("lead,vs,vt", [((7,), 13, 29), ((2, 3), 50, 17), ((1,), 8, 8)])
@pytest.mark.parametrize("top_k", [None, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_values_and_gradients_match_reference(gen, monkeypatch, dtype, lead, vs, vt, top_k, reduction):
    monkeypatch.setattr(ops, "ULD_CHUNK_ELEMENTS", 64)  # several chunks, a ragged last one
    s, t = pair(gen, lead, vs, vt, dtype)
    labels = labels_for(gen, lead)
    cs = -torch.rand(lead, generator=gen, dtype=torch.float64).to(torch.float32)
    ct = -torch.rand(lead, generator=gen, dtype=torch.float64).to(torch.float32)
    cot = torch.rand(lead, generator=gen, dtype=torch.float64) + 0.5 if reduction == "none" else None
    kw = {"top_k": top_k, "temperature": 1.3, "reduction": reduction}
    want, want_gs, want_gc = run_ref(s, t, labels, cs, ct, cot, **kw)
    got, gs, gc = run_fast(s, t, labels, cs, ct, None if cot is None else cot.to(got_dtype(dtype)), **kw)
    assert gs.dtype == dtype
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert_grad_close(gs, want_gs, dtype)
    assert_grad_close(gc, want_gc, torch.float32)  # the log scales are fp32 inputs
    ignored = (labels == -100).reshape(-1)
    assert not gs.reshape(-1, vs)[ignored].any() and not gc.reshape(-1)[ignored].any()


def test_without_labels_or_scales(gen):
    s, t = pair(gen, (5,), 30, 12, torch.float32)
    want, want_gs, _ = run_ref(s, t, None, None, None, top_k=None)
    got, gs, _ = run_fast(s, t, None, None, None, top_k=None)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert_grad_close(gs, want_gs, torch.float32)


def test_loss_is_zero_for_a_permuted_vocabulary(gen):
    """ULD is invariant to the order of the vocabulary: a teacher that is a permutation of the student costs 0."""
    s = torch.randn(4, 40, generator=gen)
    t = s[:, torch.randperm(40, generator=gen)]
    assert ops.uld_loss(s, t).item() == pytest.approx(0.0, abs=1e-6)
    assert ops.uld_loss(s, torch.cat([t, torch.full((4, 9), -math.inf)], 1)).item() == pytest.approx(0.0, abs=1e-6)


def test_top_k_keeps_the_largest_entries(gen):
    s, t = torch.randn(3, 20, generator=gen), torch.randn(3, 33, generator=gen)
    full = ops.uld_loss(s, t, reduction="none")
    top = [ops.uld_loss(s, t, top_k=k, reduction="none") for k in (1, 5, 20, 33)]
    assert all((a <= b + 1e-6).all() for a, b in itertools.pairwise(top))
    torch.testing.assert_close(top[-1], full)


def test_nonfinite_and_bad_arguments_raise(gen):
    s, t = torch.randn(4, 10, generator=gen), torch.randn(4, 12, generator=gen)
    bad = s.clone()
    bad[2, 3] = math.nan
    with pytest.raises(ValueError, match="student at row 2"):
        ops.uld_loss(bad, t)
    labels = torch.tensor([0, 0, -100, 0])
    ops.uld_loss(bad, t, labels=labels)  # an ignored row may hold anything
    with pytest.raises(ValueError, match="top_k"):
        ops.uld_loss(s, t, top_k=0)
    with pytest.raises(ValueError, match="equal leading dims"):
        ops.uld_loss(s, t[:3])
    with pytest.raises(ValueError, match="student_log_scale"):
        ops.uld_loss(s, t, student_log_scale=torch.zeros(3))


def test_no_grad_and_reference_backend(gen):
    s, t = torch.randn(4, 10, generator=gen), torch.randn(4, 12, generator=gen)
    with torch.no_grad():
        fast = ops.uld_loss(s, t, top_k=3)
    torch.testing.assert_close(ops.uld_loss(s, t, top_k=3, backend="reference"), fast)


@pytest.mark.gpu
def test_cuda_matches_reference(gen, cuda):
    s, t = pair(gen, (64,), 3000, 5000, torch.bfloat16)
    labels = labels_for(gen, (64,))
    want, want_gs, _ = run_ref(s, t, labels, None, None, top_k=256)
    got, gs, _ = run_fast(s.to(cuda), t.to(cuda), labels.to(cuda), None, None, top_k=256)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    assert_grad_close(gs.cpu(), want_gs, torch.bfloat16)
