"""Triton kernel for divergences against a sparse teacher: one program per token row, loss and gradient in one launch.

Pass 1 streams the student row for its log-normalizer; the k (+1 rest) outcomes are then scored with the dense
kernel's per-entry terms; pass 2 writes the gradient of every vocabulary entry as if it lay outside S, and the
k entries of S are overwritten after a barrier. fp32 throughout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdfast.kernels.divergence import KIND_CODES, _lse, _step, _terms, _zero_row, launch_config


@triton.jit
def _outcomes(log_q_s, log_p_s, in_s, kk, k, TAIL_BUCKET: tl.constexpr):
    """log Q, log P over the outcomes (S, then rest at position k for bucket), and q_rest (0 for renorm)."""
    if TAIL_BUCKET:
        q_rest = tl.maximum(1.0 - tl.sum(tl.where(in_s, tl.exp(log_q_s), 0.0), 0), 0.0)
        p_rest = tl.maximum(1.0 - tl.sum(tl.where(in_s, tl.exp(log_p_s), 0.0), 0), 0.0)
        is_rest = kk == k
        log_q = tl.where(is_rest, tl.log(q_rest), log_q_s)
        log_p = tl.where(is_rest, tl.log(p_rest), log_p_s)
    else:
        m = tl.max(log_p_s, 0)
        base = tl.where(m == float("-inf"), 0.0, m)
        log_p = log_p_s - (base + tl.log(tl.sum(tl.exp(log_p_s - base), 0)))
        log_q = log_q_s
        q_rest = 0.0
    return log_q, log_p, q_rest


@triton.jit
def _sparse_row(s_row, ids_row, log_p_row, gs_row, loss_ptr, hard_ptr, bad_ptr, label, soft_scale, hard_scale, V,
                k, inv_temp, wp, wq, log_wp, log_wq, KIND: tl.constexpr, TAIL_BUCKET: tl.constexpr, GRAD: tl.constexpr,
                HARD: tl.constexpr, RAW: tl.constexpr, BLOCK: tl.constexpr, KBLOCK: tl.constexpr):
    m_x = float("-inf")
    z_x = 0.0
    m_r = float("-inf")
    z_r = 0.0
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        s = tl.load(s_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_x, d_x, e_x = _step(m_x, s * inv_temp)
        z_x = z_x * d_x + tl.sum(e_x, 0)
        if RAW:
            m_r, d_r, e_r = _step(m_r, s)
            z_r = z_r * d_r + tl.sum(e_r, 0)
    bad = tl.where(z_x != z_x, 1, 0)  # kdfast.ops.divergence.BAD_STUDENT: NaN/+inf make the sum-exp NaN
    lse_x = _lse(m_x, z_x)
    lse_r = _lse(m_r, z_r) if RAW else lse_x
    kk = tl.arange(0, KBLOCK)
    in_s = kk < k
    ids = tl.load(ids_row + kk, mask=in_s, other=0)
    # Read before pass 2: the gradient may overwrite the logits in place.
    s_on_s = tl.load(s_row + ids, mask=in_s, other=float("-inf")).to(tl.float32)
    log_q_s = s_on_s * inv_temp - lse_x
    log_p_s = tl.load(log_p_row + kk, mask=in_s, other=float("-inf")).to(tl.float32)
    log_q, log_p, q_rest = _outcomes(log_q_s, log_p_s, in_s, kk, k, TAIL_BUCKET)
    live = (log_q > float("-inf")) & (log_p > float("-inf"))
    f, g, h, q, p = _terms(log_q, log_p, 0.0, 0.0, live, wp, wq, log_wp, log_wq, KIND)
    tl.store(loss_ptr, tl.sum(f, 0))
    tl.store(bad_ptr, bad)
    if HARD:
        tl.store(hard_ptr, lse_r - tl.load(s_row + label).to(tl.float32))
    if GRAD:
        g_sum = tl.sum(g, 0)
        # Outside S: ∂f/∂x_v = q_v·(g_rest/q_rest − Σg); on S: g_v − q_v·Σg (written after the barrier).
        g_rest = tl.sum(tl.where(kk == k, g, 0.0), 0)
        rest_coef = tl.where(q_rest > 0, g_rest / tl.where(q_rest > 0, q_rest, 1.0), 0.0) - g_sum
        soft_scale_x = soft_scale * inv_temp
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            inb = cols < V
            s = tl.load(s_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
            q_v = tl.exp(s * inv_temp - lse_x)
            gv = q_v * rest_coef * soft_scale_x
            if HARD:
                q_raw = tl.exp(s - lse_r) if RAW else q_v
                gv += hard_scale * (q_raw - tl.where(cols == label, 1.0, 0.0))
            tl.store(gs_row + cols, gv.to(gs_row.dtype.element_ty), mask=inb)
        tl.debug_barrier()
        q_s = tl.exp(log_q_s)
        gv_s = (tl.where(in_s, g, 0.0) - q_s * g_sum) * soft_scale_x
        if HARD:
            q_raw_s = tl.exp(s_on_s - lse_r) if RAW else q_s
            gv_s += hard_scale * (q_raw_s - tl.where(ids == label, 1.0, 0.0))
        tl.store(gs_row + ids, gv_s.to(gs_row.dtype.element_ty), mask=in_s)


@triton.jit
def sparse_divergence_kernel(S, IDS, LP, GS, LOSS, HARD_LOSS, BAD, LABELS, SCALES, stride_s, stride_gs, V, k,
                             ignore_index, inv_temp, wp, wq, log_wp, log_wq,
                             KIND: tl.constexpr, TAIL_BUCKET: tl.constexpr, GRAD: tl.constexpr,
                             HAS_LABELS: tl.constexpr, HARD: tl.constexpr, RAW: tl.constexpr, BLOCK: tl.constexpr,
                             KBLOCK: tl.constexpr):
    """One token row: S [N, V] logits, IDS [N, k] int32, LP [N, k] fp32 -> LOSS [N] fp32, GS [N, V] gradient.

    SCALES holds (soft_scale, hard_scale): the gradient weights of the divergence and of the cross-entropy on LABELS.
    """
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    gs_row = GS + row * stride_gs
    soft_scale = tl.load(SCALES)
    hard_scale = tl.load(SCALES + 1)
    label = 0
    if HAS_LABELS:
        label = tl.load(LABELS + row)
    if label != ignore_index or not HAS_LABELS:
        _sparse_row(s_row, IDS + row * k, LP + row * k, gs_row, LOSS + row, HARD_LOSS + row, BAD + row, label,
                    soft_scale, hard_scale, V, k, inv_temp, wp, wq, log_wp, log_wq, KIND, TAIL_BUCKET, GRAD, HARD, RAW,
                    BLOCK, KBLOCK)
    else:
        _zero_row(gs_row, gs_row, LOSS + row, HARD_LOSS + row, BAD + row, V, GRAD, False, HARD, BLOCK)


def launch(student: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, grad: torch.Tensor | None,
           loss: torch.Tensor, hard_loss: torch.Tensor | None, bad: torch.Tensor, labels: torch.Tensor | None,
           scales: torch.Tensor, *, kind: str, tail: str, ignore_index: int, temperature: float,
           mix: tuple[float, ...]) -> None:
    """Run sparse_divergence_kernel: student [N, V] (unit column stride), ids [N, k] int32 and logprobs [N, k] fp32
    contiguous; outputs preallocated."""
    n, V = student.shape
    if n == 0:
        return
    k = ids.shape[1]
    block, num_warps = launch_config(V)
    wp, wq, log_wp, log_wq = mix
    sparse_divergence_kernel[(n,)](
        student, ids, logprobs, student if grad is None else grad, loss, loss if hard_loss is None else hard_loss,
        bad, loss if labels is None else labels, scales, student.stride(0), 0 if grad is None else grad.stride(0),
        V, k, ignore_index, 1.0 / temperature, wp, wq, log_wp, log_wq,
        KIND=KIND_CODES[kind], TAIL_BUCKET=tail == "bucket", GRAD=grad is not None, HAS_LABELS=labels is not None,
        HARD=hard_loss is not None, RAW=hard_loss is not None and temperature != 1.0, BLOCK=block,
        KBLOCK=triton.next_power_of_2(k + 1), num_warps=num_warps,
    )
