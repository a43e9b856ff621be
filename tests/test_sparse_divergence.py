"""kdfast.sparse_distill_loss and fused_linear_sparse_distill_loss against the float64 reference, the reference
against a one-token-at-a-time formula, and k = V against the dense loss."""
import math

import pytest
import torch

import kdfast
from kdfast import reference as ref

KINDS = ref.KINDS
GRAD_TOL = {torch.float64: (1e-9, 1e-11), torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-3)}


@pytest.fixture
def small_blocks(monkeypatch):
    """Interpreter runs with 128-wide blocks so that V=300 spans several blocks and a ragged tail."""
    from kdfast.kernels import divergence as kernels
    from kdfast.kernels import sparse_divergence as sparse_kernels

    monkeypatch.setattr(kernels, "launch_config", lambda V: (128, 4))
    monkeypatch.setattr(sparse_kernels, "launch_config", lambda V: (128, 4))


def sparse_problem(gen, lead=(2, 5), V=37, k=6, temperature=1.3, dtype=torch.float64):
    """Student logits with −inf entries (one on a cached id), teacher top-k at T with a −inf log-prob, labels with
    ignored tokens whose ids are garbage (padding)."""
    s = torch.randn(*lead, V, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(*lead, V, generator=gen, dtype=torch.float64) * 2
    top = torch.log_softmax(t / temperature, -1).topk(k, -1)
    ids, lp = top.indices.clone(), top.values.clone()
    fs, fids, flp = s.view(-1, V), ids.view(-1, k), lp.view(-1, k)
    fs[0, :5] = -math.inf
    fs[1, fids[1, 2]] = -math.inf
    flp[2, -1] = -math.inf
    labels = torch.randint(0, V, lead, generator=gen)
    labels.view(-1)[1::4] = -100
    fids[1::4] = V + 7  # ignored tokens: never read, never checked
    return s.to(dtype), ids.to(torch.int32), lp, labels


def run(fn, s, *args, cotangent=None, **kw):
    s = s.detach().clone().requires_grad_()
    out = fn(s, *args, **kw)
    if out.requires_grad:
        (out if cotangent is None else out * cotangent).sum().backward()
    return out.detach(), torch.zeros_like(s) if s.grad is None else s.grad


def assert_grad_close(got, want, dtype):
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * want.abs().max().item() + 1e-30)


def one_token(s, ids, lp, kind, tail, beta, alpha, T):
    """The divergence of one token from plain Python floats: the k (+1) outcomes, then the docs/design.md §3 formula."""
    z = [v / T for v in s]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z if v > -math.inf))
    q = [math.exp(z[i] - lse) for i in ids]
    p = [math.exp(v) for v in lp]
    if tail == "renorm":
        p = [v / sum(p) for v in p]
    else:
        q.append(sum(math.exp(v - lse) for j, v in enumerate(z) if j not in ids))
        p.append(max(0.0, 1 - sum(p)))

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))

    # An outcome with probability 0 under either model contributes 0 (the −inf convention of the dense op).
    live = [(x, y) for x, y in zip(p, q) if x > 0 and y > 0]
    p, q = [x for x, _ in live], [y for _, y in live]
    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    if kind == "jsd":
        mix = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        return beta * kl(p, mix) + (1 - beta) * kl(q, mix)
    if kind == "skl":
        return kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q)])
    return kl(q, [(1 - alpha) * x + alpha * y for x, y in zip(p, q)])


@pytest.mark.parametrize("kind", KINDS)
def test_reference_matches_one_token_formula(gen, kind):
    T = 1.3
    s, ids, lp, _ = sparse_problem(gen, lead=(7,), temperature=T)
    ids = ids.long()
    ids[1::4] = torch.arange(ids.shape[1])
    got = ref.sparse_distill_loss(s, ids, lp, kind, "bucket", 0.3, 0.2, T, reduction="none")
    for r in range(s.shape[0]):
        want = one_token(s[r].tolist(), ids[r].tolist(), lp[r].tolist(), kind, "bucket", 0.3, 0.2, T)
        assert got[r].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    got = ref.sparse_distill_loss(s, ids, lp, "fkl", "renorm", temperature=T, reduction="none")
    for r in range(s.shape[0]):
        assert got[r].item() == pytest.approx(one_token(s[r].tolist(), ids[r].tolist(), lp[r].tolist(), "fkl",
                                                        "renorm", 0, 0, T), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_torch_matches_reference(gen, kind, reduction):
    s, ids, lp, labels = sparse_problem(gen)
    cot = torch.randn(labels.shape, generator=gen, dtype=torch.float64) if reduction == "none" else None
    kw = dict(labels=labels, temperature=1.3, beta=0.3, alpha=0.2, reduction=reduction, cotangent=cot)
    want, want_g = run(kdfast.sparse_distill_loss, s, ids, lp, kind, backend="reference", **kw)
    got, got_g = run(kdfast.sparse_distill_loss, s, ids, lp, kind, backend="torch", **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert_grad_close(got_g, want_g, torch.float64)
    assert got_g.view(-1, s.shape[-1])[1::4].abs().max() == 0  # ignored tokens


def test_renorm_matches_reference_and_rejects_other_kinds(gen):
    s, ids, lp, labels = sparse_problem(gen)
    want, want_g = run(kdfast.sparse_distill_loss, s, ids, lp, "fkl", tail="renorm", labels=labels, temperature=1.3,
                       backend="reference")
    got, got_g = run(kdfast.sparse_distill_loss, s, ids, lp, "fkl", tail="renorm", labels=labels, temperature=1.3,
                     backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert_grad_close(got_g, want_g, torch.float64)
    for kind in ("rkl", "jsd", "tvd"):
        with pytest.raises(ValueError, match="renorm.*fkl.* only.*bucket"):
            kdfast.sparse_distill_loss(s, ids, lp, kind, tail="renorm")


@pytest.mark.parametrize("backend", ("torch", "reference", "triton"))
def test_whole_vocabulary_equals_dense_loss(gen, backend, small_blocks):
    """k = V: the k+1 bucket outcomes are the vocabulary and an empty rest, so the loss is the dense one."""
    V, T = 150, 0.7
    dtype = torch.float32 if backend == "triton" else torch.float64
    lead = (2, 2) if backend == "triton" else (3, 4)  # the interpreter is slow
    s = torch.randn(*lead, V, generator=gen, dtype=torch.float64) * 2
    t = torch.randn(*lead, V, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, V, lead, generator=gen)
    labels[0, 1] = -100
    perm = torch.argsort(torch.rand(*lead, V, generator=gen), -1)
    lp = torch.log_softmax(t / T, -1).gather(-1, perm)
    for kind in KINDS:
        kw = dict(labels=labels, temperature=T, beta=0.4, alpha=0.3)
        got, got_g = run(kdfast.sparse_distill_loss, s.to(dtype), perm, lp.to(dtype), kind, backend=backend, **kw)
        dense_backend = "torch" if backend == "reference" else backend
        want, want_g = run(kdfast.distill_loss, s.to(dtype), t.to(dtype), kind, backend=dense_backend, **kw)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)
        assert_grad_close(got_g, want_g, dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_reference(gen, kind, small_blocks):
    s, ids, lp, labels = sparse_problem(gen, lead=(6,), V=300, k=5, temperature=1.7, dtype=torch.float32)
    kw = dict(labels=labels, temperature=1.7, beta=0.3, alpha=0.2)
    want, want_g = run(kdfast.sparse_distill_loss, s.double(), ids, lp, kind, backend="reference", **kw)
    got, got_g = run(kdfast.sparse_distill_loss, s, ids, lp.float(), kind, backend="triton", **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert_grad_close(got_g, want_g, torch.float32)


def test_triton_renorm_bf16_and_in_place(gen, small_blocks):
    s, ids, lp, labels = sparse_problem(gen, lead=(5,), V=260, k=7, dtype=torch.bfloat16)
    want, want_g = run(kdfast.sparse_distill_loss, s.double(), ids, lp, "fkl", tail="renorm", labels=labels,
                       temperature=1.3, backend="reference")
    got, got_g = run(kdfast.sparse_distill_loss, s, ids, lp.half(), "fkl", tail="renorm", labels=labels,
                     temperature=1.3, backend="triton")
    torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)
    assert_grad_close(got_g, want_g, torch.bfloat16)
    leaf = s.float().requires_grad_()
    logits = leaf * 1.0
    kdfast.sparse_distill_loss(logits, ids, lp, "fkl", labels=labels, backend="torch", inplace_grad=True).backward()
    expect, expect_g = run(kdfast.sparse_distill_loss, s.float(), ids, lp, "fkl", labels=labels, backend="torch")
    assert_grad_close(leaf.grad, expect_g, torch.float32)


def test_all_ignored_gives_zero(gen):
    s, ids, lp, labels = sparse_problem(gen)
    labels.fill_(-100)
    for backend in ("torch", "reference"):
        loss, grad = run(kdfast.sparse_distill_loss, s, ids, lp, "jsd", labels=labels, backend=backend)
        assert loss.item() == 0 and grad.abs().max() == 0


def test_bad_inputs_are_named(gen):
    s, ids, lp, labels = sparse_problem(gen, lead=(6,))
    dup = ids.clone()
    dup[0, 1] = dup[0, 0]
    with pytest.raises(ValueError, match="repeat an id"):
        kdfast.sparse_distill_loss(s, dup, lp, labels=labels)
    big = ids.clone()
    big[0, 0] = s.shape[-1]
    with pytest.raises(ValueError, match=r"outside \[0, 37\)"):
        kdfast.sparse_distill_loss(s, big, lp, labels=labels)
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        kdfast.sparse_distill_loss(s, ids, lp.clone().fill_(math.nan), labels=labels)
    with pytest.raises(ValueError, match="sum to .* > 1"):
        kdfast.sparse_distill_loss(s, ids, lp + 1.0, labels=labels)
    with pytest.raises(ValueError, match="must both be"):
        kdfast.sparse_distill_loss(s, ids[:, :3], lp, labels=labels)
    bad = s.clone()
    bad[2, 3] = math.nan
    with pytest.raises(ValueError, match="non-finite logits .* student at row 2"):
        kdfast.sparse_distill_loss(bad, ids, lp, labels=labels, backend="torch")
    bad[2, 3] = 0.0
    bad[1, 3] = math.nan  # an ignored token may hold anything
    kdfast.sparse_distill_loss(bad, ids, lp, labels=labels, backend="torch")
    with pytest.raises(ValueError, match="unknown tail"):
        kdfast.sparse_distill_loss(s, ids, lp, tail="drop")


@pytest.mark.parametrize("backend,kind", [("torch", "fkl"), ("torch", "jsd"), ("triton", "srkl"), ("triton", "fkl")])
def test_fused_linear_sparse_matches_materialized(gen, backend, kind, small_blocks):
    """Hidden states + head, chunked (a whole chunk ignored), with a hard loss at T != 1, against the reference."""
    n, H, V, k, T = 40, 12, 300, 8, 1.5
    dtype = torch.float32 if backend == "triton" else torch.float64
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    h, w, b = r(n, H), r(V, H) * 0.5, r(V)
    top = torch.log_softmax(r(n, V) * 2 / T, -1).topk(k, -1)
    ids, lp = top.indices.to(torch.int32), top.values
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[::3] = -100
    labels[16:32] = -100
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    logits = leaves[0] @ leaves[1].t() + leaves[2]
    want = 0.7 * ref.sparse_distill_loss(logits, ids.long().where(labels[:, None] != -100, torch.arange(k)), lp,
                                         kind, temperature=T, labels=labels)
    want = want + 0.3 * ref.cross_entropy(logits, labels)
    want.backward()
    got_leaves = [x.to(dtype).requires_grad_() for x in (h, w, b)]
    got = kdfast.fused_linear_sparse_distill_loss(got_leaves[0], got_leaves[1], ids, lp.to(dtype), labels, kind,
                                                  temperature=T, hard_weight=0.3, soft_weight=0.7,
                                                  student_bias=got_leaves[2], chunk_size=16, backend=backend)
    got.backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol)
    for g_got, leaf in zip(got_leaves, leaves):
        assert_grad_close(g_got.grad, leaf.grad, dtype)
