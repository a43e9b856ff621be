"""The fused-linear op's own memory: an fp32 master head's gradient stays fp32, ignored rows never reach a matmul."""
import pytest
import torch
from test_fused_linear import HARD, SOFT, assert_close_rel, fast_run, problem, reference_run, small_blocks  # noqa: F401

from kdfast.ops import _chunks
from kdfast.ops import fused_linear as fl


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp32_master_head_with_bf16_hidden(backend, gen, small_blocks):  # noqa: F811 (the imported fixture)
    """bf16 hidden + fp32 weight/bias (autocast over an fp32 master): d(weight) comes back fp32, no bf16 round,
    and matches the float64 reference of the bf16-rounded weight as closely as the all-bf16 path does."""
    p = problem(gen, n=48, hs=32, ht=48, V=500, dtype=torch.float32)
    p["student_hidden"] = p["student_hidden"].bfloat16()
    p.update(teacher_hidden=p["teacher_hidden"].bfloat16(), teacher_weight=p["teacher_weight"].bfloat16(),
             teacher_bias=p["teacher_bias"].bfloat16())
    rounded = dict(p, student_weight=p["student_weight"].bfloat16(), student_bias=p["student_bias"].bfloat16())
    want, want_grads = reference_run(rounded, kind="rkl")
    got, grads = fast_run(p, kind="rkl", hard_weight=HARD, soft_weight=SOFT, chunk_size=16, backend=backend)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-3)
    for g, w in zip(grads, want_grads):
        assert_close_rel(g, w, 3e-2, 2e-2)
    _, bf16_grads = fast_run(rounded, kind="rkl", hard_weight=HARD, soft_weight=SOFT, chunk_size=16, backend=backend)
    # the fp32 gradient is the bf16 path's fp32 accumulator before its final rounding
    torch.testing.assert_close(grads[1].bfloat16(), bf16_grads[1], rtol=0, atol=0)


def test_fp32_weight_with_fp32_hidden_needs_no_cast(gen, monkeypatch):
    """Same dtype: the op multiplies by the weight itself (no copy of the [V, H] matrix)."""
    p = problem(gen, n=20, dtype=torch.float32)
    seen = []
    real = _chunks.linear
    monkeypatch.setattr(_chunks, "linear", lambda h, w, b: seen.append(w.data_ptr()) or real(h, w, b))
    weight = p["student_weight"].requires_grad_()
    fl.fused_linear_distill_loss(p["student_hidden"], weight, p["teacher_hidden"], p["teacher_weight"],
                                 labels=p["labels"], chunk_size=8, backend="torch").backward()
    assert weight.data_ptr() in seen and weight.grad.dtype == torch.float32


def test_ignored_rows_skip_the_matmuls(gen, monkeypatch):
    """Only the labelled rows are multiplied by the heads; the loss and every gradient still match the reference."""
    p = problem(gen, n=50)
    kept = int((p["labels"] != -100).sum())
    rows = []
    real = _chunks.linear
    monkeypatch.setattr(_chunks, "linear", lambda h, w, b: rows.append(h.shape[0]) or real(h, w, b))
    got, grads = fast_run(p, kind="jsd", hard_weight=HARD, soft_weight=SOFT, chunk_size=7, backend="torch")
    assert sum(rows) == 2 * kept < 2 * 50   # student + teacher head, kept rows only
    want, want_grads = reference_run(p, kind="jsd")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    assert bool((grads[0][p["labels"] == -100] == 0).all())


def test_all_rows_ignored(gen):
    p = problem(gen, n=12)
    p["labels"][:] = -100
    got, grads = fast_run(p, kind="fkl", chunk_size=5, backend="torch")
    assert float(got) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)


def test_backward_scales_the_stored_gradients_in_place(gen):
    """grad_output != 1 (a weighted or averaged loss): d(weight) is scaled where it lies, no [V, H] copy."""
    from kdfast.memory import peak_bytes

    p = problem(gen, n=64, hs=32, ht=32, V=4000, dtype=torch.float32)
    weight = p["student_weight"].requires_grad_()
    hidden = p["student_hidden"].requires_grad_()
    loss = fl.fused_linear_distill_loss(hidden, weight, p["teacher_hidden"], p["teacher_weight"],
                                        labels=p["labels"], chunk_size=16, backend="torch")
    (ref_h, ref_w), = [torch.autograd.grad(loss, (hidden, weight), retain_graph=False)]
    loss = fl.fused_linear_distill_loss(hidden, weight, p["teacher_hidden"], p["teacher_weight"],
                                        labels=p["labels"], chunk_size=16, backend="torch")
    assert peak_bytes(lambda: (0.5 * loss).backward()) < weight.numel() * 4 // 2
    torch.testing.assert_close(weight.grad, 0.5 * ref_w, rtol=1e-6, atol=0)
    torch.testing.assert_close(hidden.grad, 0.5 * ref_h, rtol=1e-6, atol=0)


def test_a_second_backward_through_the_node_is_refused(gen):
    p = problem(gen, n=16, dtype=torch.float32)
    weight = p["student_weight"].requires_grad_()
    loss = 0.5 * fl.fused_linear_distill_loss(p["student_hidden"], weight, p["teacher_hidden"], p["teacher_weight"],
                                              labels=p["labels"], chunk_size=8, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
