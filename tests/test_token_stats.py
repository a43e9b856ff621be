"""token_stats / token_stats_from_hidden / min_k against the float64 reference, on every backend."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import _ext, reference
from kdfast.ops.token_stats import min_k_counts

STATS = ("logp", "lse", "entropy", "mu", "sigma")


@pytest.fixture(params=["cpp", "torch"])
def backend(request):
    """The C++ kernel and the torch fallback; a C++ build that fails is a test failure, not a skip."""
    if request.param == "cpp" and _ext.load().ops is None:
        if os.environ.get("KDFAST_NO_EXT") == "1":
            pytest.skip("extension disabled by KDFAST_NO_EXT=1")
        pytest.fail(f"C++ extension unavailable: {_ext.load().reason}")
    return request.param


def check(st, logits, targets, ignore_index=-100, atol=2e-5, rtol=1e-5):
    """Every statistic within fp32 accuracy of the float64 reference on the same (input-dtype) values."""
    ref = reference.token_stats(logits.double(), targets, ignore_index)
    for name in STATS:
        got = getattr(st, name)
        assert got.dtype == torch.float32 and got.shape == targets.shape, name
        torch.testing.assert_close(got.double(), ref[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    assert st.top1.dtype == torch.bool
    assert torch.equal(st.top1, ref["top1"])
    assert torch.equal(st.valid, ref["valid"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 33, 1000, 1031, 4099])
def test_random_logits(backend, dtype, vocab, gen):
    # vocab sizes below, at and across the vector width and the C++ kernel's 1024-entry blocks
    logits = (torch.randn(48, vocab, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, vocab, (48,), generator=gen)
    targets[::7] = -100
    check(kdfast.token_stats(logits, targets, backend=backend), logits, targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_values_and_neg_inf(backend, dtype, gen):
    v = 3000
    logits = (torch.randn(8, v, generator=gen) * 3).to(dtype)
    logits[0, :] = torch.where(torch.rand(v, generator=gen) < 0.5, -1e4, 1e4).to(dtype)  # ±1e4, many tied maxima
    logits[1, ::3] = -math.inf  # padded-vocab style holes
    logits[2, :] = -math.inf
    logits[2, 2500] = 1.0  # a single finite entry: a point mass
    logits[3, :2047] = -math.inf  # -inf across whole leading blocks
    logits[4, 100] = 1e4  # one dominant logit
    logits[5] = logits[5] + 9000.0  # large common offset: the shift must cancel it exactly
    targets = torch.randint(0, v, (8,), generator=gen)
    targets[1] = 3  # a -inf target: logp = -inf
    targets[2] = 2500
    targets[4] = 100
    st = kdfast.token_stats(logits, targets, backend=backend)
    check(st, logits, targets, atol=1e-4, rtol=1e-5)
    assert st.logp[1] == -math.inf and st.logp[2] == 0 and st.sigma[2] == 0 and st.top1[2] and st.top1[4]


def test_ties_go_to_the_lowest_index(backend):
    v = 2600  # ties inside one block and across the C++ kernel's blocks
    logits = torch.zeros(6, v)
    for row, (a, b) in enumerate([(5, 9), (5, 9), (100, 2000), (100, 2000), (1023, 1024), (1023, 1024)]):
        logits[row, a] = logits[row, b] = 3.0
    targets = torch.tensor([5, 9, 100, 2000, 1023, 1024])
    st = kdfast.token_stats(logits, targets, backend=backend)
    assert st.top1.tolist() == [True, False, True, False, True, False]
    check(st, logits, targets)


def test_batched_and_strided_views(backend, gen):
    logits = torch.randn(3, 11, 517, generator=gen).to(torch.bfloat16)
    targets = torch.randint(0, 517, (3, 11), generator=gen)
    targets[1, 4] = -100
    st = kdfast.token_stats(logits, targets, backend=backend)
    assert st.logp.shape == (3, 11)
    check(st, logits, targets)
    # the usual shift for causal LMs: a non-contiguous view, read without a copy by the kernels
    shifted = kdfast.token_stats(logits[:, :-1], targets[:, 1:], backend=backend)
    check(shifted, logits[:, :-1], targets[:, 1:])
    # a row stride that breaks 16-byte alignment, and 4-D inputs
    odd = logits[..., 1:]
    check(kdfast.token_stats(odd, targets.clamp_max(515), backend=backend), odd, targets.clamp_max(515))
    four = logits.view(3, 11, 1, 517).expand(3, 11, 2, 517)
    t4 = targets[..., None].expand(3, 11, 2)
    check(kdfast.token_stats(four, t4, backend=backend), four, t4)


def test_ignored_targets(backend, gen):
    logits = torch.randn(5, 300, generator=gen)
    logits[2, 7] = math.nan  # garbage in ignored rows is never read
    targets = torch.tensor([1, -1, -1, 4, -1])
    st = kdfast.token_stats(logits, targets, ignore_index=-1, backend=backend)
    assert st.valid.tolist() == [True, False, False, True, False]
    for name in STATS:
        assert (getattr(st, name)[~st.valid] == 0).all()
    assert not st.top1[~st.valid].any()
    check(st, torch.nan_to_num(logits), targets, ignore_index=-1)


# A target outside the vocabulary: test_losses.test_one_label_check_everywhere (the losses' check, run first).
@pytest.mark.parametrize("poison, message", [(math.nan, "has NaN or \\+inf"), (math.inf, "has NaN or \\+inf"),
                                             ("all-inf", "has no finite logit")])
def test_bad_rows_raise(backend, poison, message, gen):
    logits = torch.randn(2, 4, 1500, generator=gen)
    targets = torch.randint(0, 1500, (2, 4), generator=gen)
    if poison == "all-inf":
        logits[1, 2] = -math.inf
    else:
        logits[1, 2, 1200] = poison
    with pytest.raises(ValueError, match=f"row 6 \\(position \\(1, 2\\)\\) {message}"):
        kdfast.token_stats(logits, targets, backend=backend)
    logits[1, 3, 0] = math.nan  # after the first bad row: still the first one is named
    with pytest.raises(ValueError, match="row 6 "):
        kdfast.token_stats(logits.to(torch.bfloat16), targets, backend=backend)


def test_backends_agree_at_vocab_scale(gen):
    if _ext.load().ops is None:
        pytest.skip(_ext.load().reason)
    logits = (torch.randn(32, 49152, generator=gen) * 2).to(torch.bfloat16)
    targets = torch.randint(0, 49152, (32,), generator=gen)
    a = kdfast.token_stats(logits, targets, backend="cpp")
    b = kdfast.token_stats(logits, targets, backend="torch")
    for name in STATS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=5e-5, rtol=1e-5)
    check(a, logits, targets)


def test_reference_and_float64(gen):
    logits = torch.randn(4, 9, 50, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 50, (4, 9), generator=gen)
    check(kdfast.token_stats(logits, targets, backend="reference"), logits, targets)
    check(kdfast.token_stats(logits, targets), logits, targets)  # float64 goes to the torch path


def test_argument_errors():
    with pytest.raises(ValueError, match="must agree"):
        kdfast.token_stats(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown backend"):
        kdfast.token_stats(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), backend="fast")
    with pytest.raises(ValueError, match="cannot run on a cpu"):
        kdfast.token_stats(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), backend="cuda")


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_from_hidden_matches_materialized(backend, chunk_size, gen):
    hidden = torch.randn(2, 13, 24, generator=gen)
    weight = torch.randn(301, 24, generator=gen) / 3
    bias = torch.randn(301, generator=gen)
    targets = torch.randint(0, 301, (2, 13), generator=gen)
    targets[0, :4] = -100  # prompt tokens: never projected
    st = kdfast.token_stats_from_hidden(hidden, weight, targets, bias=bias, chunk_size=chunk_size, backend=backend)
    logits = F.linear(hidden, weight, bias)
    check(st, logits, targets, atol=1e-4)
    st2 = kdfast.token_stats_from_hidden(hidden[0].to(torch.bfloat16), weight.to(torch.bfloat16), targets[0],
                                         chunk_size=chunk_size, backend=backend)
    assert st2.logp.shape == (13,)
    check(st2, F.linear(hidden[0].to(torch.bfloat16), weight.to(torch.bfloat16)), targets[0])


def test_from_hidden_names_bad_rows(backend):
    hidden = torch.ones(2, 2, 3)
    hidden[1, 1, 0] = math.nan  # the last valid token, in the second chunk
    hidden[0, 0, 0] = math.nan  # an ignored token: never projected
    targets = torch.tensor([[-100, 1], [0, 2]])
    with pytest.raises(ValueError, match=r"row 3 \(position \(1, 1\)\) has NaN"):
        kdfast.token_stats_from_hidden(hidden, torch.ones(5, 3), targets, chunk_size=2, backend=backend)


def test_min_k_counts_follow_the_reference():
    ks = (0.05, 0.1, 0.2, 0.3, 1 / 3, 0.5, 0.7, 1.0)
    n = torch.arange(0, 400)
    counts = min_k_counts(n, ks)
    expected = torch.tensor([[reference.min_k_count(k, int(m)) for k in ks] for m in n])
    assert torch.equal(counts, expected)


@pytest.mark.parametrize("min_k_backend", ["cpp", "torch"])
def test_min_k_against_sort_reference(min_k_backend, gen):
    if min_k_backend == "cpp" and _ext.load().ops is None:
        pytest.fail(f"C++ extension unavailable: {_ext.load().reason}")
    b, t = 40, 67
    values = torch.randn(b, t, generator=gen) * 3
    values[3, 5] = -math.inf
    lengths = torch.arange(b) % (t + 1)  # rows of 0, 1, 2, ... valid tokens: short rows, empty rows
    mask = torch.arange(t)[None, :] < lengths[:, None]
    mask[30:] &= torch.rand(10, t, generator=gen) < 0.6  # and scattered masks
    values[~mask] = math.nan  # masked-out positions may hold anything
    ks = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
    got = kdfast.min_k(values, mask, ks, backend=min_k_backend)
    want = reference.min_k(values, mask, ks)
    assert got.dtype == torch.float32 and got.shape == (b, len(ks))
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    assert (got[0] == 0).all() and torch.isfinite(got[1:]).sum() > 0
    one = kdfast.min_k(values[7], mask[7], ks, backend=min_k_backend)  # a single row [T]
    torch.testing.assert_close(one, got[7])


def test_min_k_errors():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        kdfast.min_k(torch.zeros(2, 3), ks=(0.0,))
    with pytest.raises(ValueError, match="NaN"):
        kdfast.min_k(torch.tensor([[1.0, math.nan]]))
    assert kdfast.min_k(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool)).eq(0).all()


# ---- CUDA kernels (run by benchmarks/gpu_check.sh: pytest -m gpu) ----

@pytest.fixture
def cuda_ext(cuda):
    if not _ext.load().cuda:
        pytest.fail(f"CUDA kernels unavailable: {_ext.load().reason}")
    return cuda


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 2049, 50257, 128256])
def test_cuda_matches_reference(cuda_ext, dtype, vocab, gen):
    # 1..2048 entries: a warp per row; beyond: a block per row. 50257 (GPT-2) misaligns every other row.
    n = 192
    logits = (torch.randn(n, vocab, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::5] = -100
    if vocab > 1:
        logits[1, ::3] = -math.inf
        logits[2] = torch.where(torch.rand(vocab, generator=gen) < 0.5, -1e4, 1e4).to(dtype)
        logits[3, : vocab // 2] = -math.inf
        logits[4] += 9000.0
        logits[6, vocab // 3] = logits[6, vocab - 1] = 1e4  # a tie across threads: the lower index wins
        targets[6] = vocab - 1
        targets[7] = 0 if vocab < 3 else int(logits[7].float().argmax())
    logits, targets = logits.to(cuda_ext), targets.to(cuda_ext)
    st = kdfast.token_stats(logits, targets, backend="cuda")
    check(st, logits, targets, atol=1e-4, rtol=2e-5)
    if vocab > 1:
        assert not st.top1[6] and st.top1[7]


@pytest.mark.gpu
def test_cuda_views_errors_and_agreement(cuda_ext, gen):
    logits = (torch.randn(4, 65, 32003, generator=gen) * 3).to(torch.bfloat16).to(cuda_ext)
    targets = torch.randint(0, 32003, (4, 65), generator=gen).to(cuda_ext)
    a = kdfast.token_stats(logits[:, :-1], targets[:, 1:], backend="cuda")
    b = kdfast.token_stats(logits[:, :-1], targets[:, 1:], backend="torch")
    for name in STATS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-4, rtol=2e-5)
    assert torch.equal(a.top1, b.top1)
    logits[2, 7, 31000] = math.nan
    with pytest.raises(ValueError, match=r"row 137 \(position \(2, 7\)\) has NaN"):
        kdfast.token_stats(logits, targets, backend="cuda")
    logits[2, 7] = -math.inf
    with pytest.raises(ValueError, match="row 137 .* no finite logit"):
        kdfast.token_stats(logits, targets, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 100, 4096, 8192, 9000])
def test_cuda_min_k(cuda_ext, t, gen):
    b = 24
    values = torch.randn(b, t, generator=gen) * 3
    mask = torch.rand(b, t, generator=gen) < 0.7
    mask[0] = False
    mask[1, 1:] = False
    ks = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
    got = kdfast.min_k(values.to(cuda_ext), mask.to(cuda_ext), ks, backend="cuda")  # 9000: torch fallback
    torch.testing.assert_close(got.cpu().double(), reference.min_k(values, mask, ks), atol=1e-5, rtol=1e-6)


@pytest.mark.gpu
def test_cuda_from_hidden(cuda_ext, gen):
    hidden = torch.randn(2, 300, 256, generator=gen).to(cuda_ext)
    weight = (torch.randn(128256, 256, generator=gen) / 16).to(cuda_ext)
    targets = torch.randint(0, 128256, (2, 300), generator=gen).to(cuda_ext)
    targets[:, :50] = -100
    prev, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        st = kdfast.token_stats_from_hidden(hidden, weight, targets, chunk_size=128, backend="cuda")
        logits = F.linear(hidden, weight)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    check(st, logits, targets, atol=2e-4)
