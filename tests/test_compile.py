"""torch.compile(fullgraph=True) traces training and scoring steps that call the kdfast ops with no graph break,
and the compiled step gives the eager values and gradients."""
import pytest
import torch

import kdfast

V, H = 11, 8


def _no_graph_breaks(fn, *args):
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _grads(module: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in module.parameters()]


@pytest.fixture
def batch(gen):
    x = torch.randn(2, 3, H, generator=gen)
    teacher = torch.randn(2, 3, V, generator=gen) * 3
    labels = torch.randint(0, V, (2, 3), generator=gen)
    labels[0, 1] = -100
    return x, teacher, labels


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distill_loss_training_step(batch, gen, reduction):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    student = torch.nn.Linear(H, V)
    weights = torch.rand(2, 3, generator=gen)  # reduction="none": the backward scales by a grad_output != 1

    def step(x, teacher, labels):
        loss = kdfast.distill_loss(student(x), teacher, "jsd", beta=0.3, temperature=2.0, labels=labels,
                                   reduction=reduction, backend="auto")
        return loss if reduction == "mean" else (loss * weights).sum()

    _no_graph_breaks(step, *batch)
    eager = step(*batch)
    eager_grads = _grads(student, eager)
    compiled = torch.compile(step, fullgraph=True)(*batch)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(_grads(student, compiled), eager_grads):
        torch.testing.assert_close(got, want)


def test_fused_linear_training_step(batch, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    body, head = torch.nn.Linear(H, H), torch.nn.Linear(H, V)
    student = torch.nn.Sequential(body, head)
    teacher_hidden = torch.randn(2, 3, 5, generator=gen)
    teacher_weight = torch.randn(V, 5, generator=gen)

    def step(x, labels):
        return kdfast.fused_linear_distill_loss(body(x), head.weight, teacher_hidden, teacher_weight, labels,
                                                kind="rkl", hard_weight=0.5, soft_weight=0.7,
                                                student_bias=head.bias, chunk_size=2)

    x, _, labels = batch
    _no_graph_breaks(step, x, labels)
    eager = step(x, labels)
    eager_grads = _grads(student, eager)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, labels)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(_grads(student, compiled), eager_grads):
        torch.testing.assert_close(got, want)


@torch.no_grad()
def test_token_stats_scoring_step(batch):
    x, teacher, labels = batch
    hidden = x
    weight = torch.randn(V, H)

    def score(logits, hidden, labels):
        st = kdfast.token_stats(logits, labels)
        from_hidden = kdfast.token_stats_from_hidden(hidden, weight, labels, chunk_size=2)
        return st.logp, st.top1, from_hidden.entropy, kdfast.min_k(st.logp, st.valid, ks=(0.2, 0.5))

    _no_graph_breaks(score, teacher, hidden, labels)
    compiled = torch.compile(score, fullgraph=True, backend="aot_eager")(teacher, hidden, labels)
    for got, want in zip(compiled, score(teacher, hidden, labels)):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_distill_loss_training_step_cuda(cuda, dtype):
    """The Triton backend inside a compiled (inductor) step on the GPU, bf16 included."""
    torch.manual_seed(0)
    student = torch.nn.Linear(64, 1000, device=cuda, dtype=dtype)
    x = torch.randn(4, 33, 64, device=cuda, dtype=dtype)
    teacher = (torch.randn(4, 33, 1000, device=cuda) * 3).to(dtype)
    labels = torch.randint(0, 1000, (4, 33), device=cuda)
    labels[:, :5] = -100

    def step(x, teacher, labels):
        return kdfast.distill_loss(student(x), teacher, "skl", temperature=1.5, labels=labels)

    _no_graph_breaks(step, x, teacher, labels)
    eager = step(x, teacher, labels)
    eager_grads = _grads(student, eager)
    compiled = torch.compile(step, fullgraph=True)(x, teacher, labels)
    # inductor's bf16 GEMM may round the logits differently from eager's: a few bf16 ulps
    tol = dict(atol=2e-3, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(compiled, eager, **tol)
    for got, want in zip(_grads(student, compiled), eager_grads):
        torch.testing.assert_close(got, want, **tol)
