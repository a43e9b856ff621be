"""Triton kernels for the divergences (docs/design.md §3): one program per token row, the vocabulary in blocks.

Pass 1 gathers online max / sum-exp statistics of both models; pass 2 (only for kinds whose gradient needs a
row sum that depends on both log-normalizers) sums the per-entry gradients; the last pass writes the loss and
the gradients in the input dtype. Everything is fp32 and in log space; entries that are −inf in either model
contribute 0.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kdfast.runtime import triton_interpreting

FKL = tl.constexpr(0)
RKL = tl.constexpr(1)
JSD = tl.constexpr(2)
SKL = tl.constexpr(3)
SRKL = tl.constexpr(4)
TVD = tl.constexpr(5)
ZERO = tl.constexpr(6)
KIND_CODES = {"fkl": 0, "rkl": 1, "jsd": 2, "skl": 3, "srkl": 4, "tvd": 5, "zero": 6}


@triton.jit
def _step(m, v):
    """Online softmax step: the new running max, the factor rescaling sums taken against the old one, e^{v−max}."""
    m_new = tl.maximum(m, tl.max(v, 0))
    # A row that is −inf so far must not produce −inf − (−inf).
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp(m - base), tl.exp(v - base)


@triton.jit
def _lse(m, z):
    return tl.where(z > 0, m + tl.log(z), 0.0)


@triton.jit
def _logaddexp(a, b):
    return tl.maximum(a, b) + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def _terms(x, y, lse_x, lse_y, live, wp, wq, log_wp, log_wq, KIND: tl.constexpr):
    """Per entry: loss f, g = ∂f/∂log q, h = ∂f/∂log p (0 where dead), and the full q, p.

    The mixture is m = wp·p + wq·q with log weights log_wp, log_wq (jsd: β, 1−β; skl: α, 1−α; srkl: 1−α, α).
    """
    q = tl.exp(x - lse_x)
    p = tl.exp(y - lse_y)
    # Dead entries get log-probabilities 0 so that no −inf − (−inf) is ever formed; their terms are masked.
    log_q = tl.where(live, x - lse_x, 0.0)
    log_p = tl.where(live, y - lse_y, 0.0)
    q_live = tl.where(live, q, 0.0)
    p_live = tl.where(live, p, 0.0)
    if KIND == FKL:
        f = p_live * (log_p - log_q)
        g = -p_live
        h = f + p_live
    elif KIND == RKL:
        f = q_live * (log_q - log_p)
        g = f + q_live
        h = -q_live
    elif KIND == JSD:
        log_m = _logaddexp(log_p + log_wp, log_q + log_wq)
        g = wq * q_live * (log_q - log_m)
        h = wp * p_live * (log_p - log_m)
        f = g + h
    elif KIND == SKL:
        log_m = _logaddexp(log_p + log_wp, log_q + log_wq)
        f = p_live * (log_p - log_m)
        g = tl.where(live, -wq * tl.exp(log_p + log_q - log_m), 0.0)
        h = f + p_live - tl.where(live, wp * tl.exp(2.0 * log_p - log_m), 0.0)
    elif KIND == SRKL:
        log_m = _logaddexp(log_p + log_wp, log_q + log_wq)
        f = q_live * (log_q - log_m)
        g = f + q_live - tl.where(live, wq * tl.exp(2.0 * log_q - log_m), 0.0)
        h = tl.where(live, -wp * tl.exp(log_p + log_q - log_m), 0.0)
    elif KIND == TVD:
        d = p_live - q_live
        f = 0.5 * tl.abs(d)
        half_sign = tl.where(d > 0, 0.5, tl.where(d < 0, -0.5, 0.0))  # no gradient where p == q
        g = -half_sign * q_live
        h = half_sign * p_live
    else:
        f = tl.zeros_like(x)
        g = f
        h = f
    return f, g, h, q, p


@triton.jit
def _stats(s_row, t_row, V, inv_temp, KIND: tl.constexpr, GRAD_T: tl.constexpr, RAW: tl.constexpr,
           BLOCK: tl.constexpr):
    """Pass 1: log-normalizers of x = s/T, y = t/T (and of raw s), non-finite flags, and for fkl/rkl the
    gradient row sums Σg, Σh (0 for the kinds that need pass 2)."""
    m_x = float("-inf")
    z_x = 0.0
    z_live_x = 0.0
    a_x = 0.0
    m_y = float("-inf")
    z_y = 0.0
    z_live_y = 0.0
    a_y = 0.0
    m_r = float("-inf")
    z_r = 0.0
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inb = cols < V
        s = tl.load(s_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
        x = s * inv_temp
        y = t * inv_temp
        live = (x > float("-inf")) & (y > float("-inf"))
        m_x, d_x, e_x = _step(m_x, x)
        z_x = z_x * d_x + tl.sum(e_x, 0)
        m_y, d_y, e_y = _step(m_y, y)
        z_y = z_y * d_y + tl.sum(e_y, 0)
        # fkl/rkl: the live mass and Σ_live e·(y − x) give the gradient row sums without another pass.
        if KIND == RKL:
            z_live_x = z_live_x * d_x + tl.sum(tl.where(live, e_x, 0.0), 0)
            a_x = a_x * d_x + tl.sum(tl.where(live, e_x * (x - y), 0.0), 0)
        if KIND == FKL:
            z_live_y = z_live_y * d_y + tl.sum(tl.where(live, e_y, 0.0), 0)
            if GRAD_T:
                a_y = a_y * d_y + tl.sum(tl.where(live, e_y * (y - x), 0.0), 0)
        if RAW:
            m_r, d_r, e_r = _step(m_r, s)
            z_r = z_r * d_r + tl.sum(e_r, 0)
    # NaN or +inf anywhere in a row turns its sum-exp into NaN: the non-finite check costs no extra pass.
    # The flag bits are kdfast.ops.divergence.BAD_STUDENT (1) and BAD_TEACHER (2).
    bad = tl.where(z_x != z_x, 1, 0) + tl.where(z_y != z_y, 2, 0)
    lse_x = _lse(m_x, z_x)
    lse_y = _lse(m_y, z_y)
    lse_r = _lse(m_r, z_r) if RAW else lse_x
    sum_g = lse_x * 0.0
    sum_h = sum_g
    if KIND == FKL:
        p_live_mass = tl.where(z_y > 0, z_live_y / z_y, 0.0)
        sum_g = -p_live_mass
        sum_h = tl.where(z_y > 0, a_y / z_y, 0.0) - (lse_y - lse_x) * p_live_mass + p_live_mass
    if KIND == RKL:
        q_live_mass = tl.where(z_x > 0, z_live_x / z_x, 0.0)
        sum_g = tl.where(z_x > 0, a_x / z_x, 0.0) - (lse_x - lse_y) * q_live_mass + q_live_mass
        sum_h = -q_live_mass
    return lse_x, lse_y, lse_r, bad, sum_g, sum_h


@triton.jit
def _grad_sums(s_row, t_row, V, lse_x, lse_y, inv_temp, wp, wq, log_wp, log_wq, KIND: tl.constexpr,
               BLOCK: tl.constexpr):
    """Pass 2 (jsd, skl, srkl, tvd): Σ_live g and Σ_live h need both log-normalizers, hence a second read."""
    acc_g = tl.zeros([BLOCK], tl.float32)
    acc_h = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inb = cols < V
        x = tl.load(s_row + cols, mask=inb, other=float("-inf")).to(tl.float32) * inv_temp
        y = tl.load(t_row + cols, mask=inb, other=float("-inf")).to(tl.float32) * inv_temp
        live = (x > float("-inf")) & (y > float("-inf"))
        f, g, h, q, p = _terms(x, y, lse_x, lse_y, live, wp, wq, log_wp, log_wq, KIND)
        acc_g += g
        acc_h += h
    return tl.sum(acc_g, 0), tl.sum(acc_h, 0)


@triton.jit
def _row(s_row, t_row, gs_row, gt_row, loss_ptr, hard_ptr, bad_ptr, label, soft_scale, hard_scale, V,
         inv_temp, wp, wq, log_wp, log_wq,
         KIND: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, HARD: tl.constexpr,
         RAW: tl.constexpr, BLOCK: tl.constexpr):
    """One valid token: statistics, (row sums,) then loss and gradients written in the input dtype."""
    lse_x, lse_y, lse_r, bad, sum_g, sum_h = _stats(s_row, t_row, V, inv_temp, KIND, GRAD_T, RAW, BLOCK)
    if HARD:
        target = tl.load(s_row + label).to(tl.float32)  # before the last pass may overwrite the row
        tl.store(hard_ptr, lse_r - target)
    if KIND != FKL and KIND != RKL and KIND != ZERO and (GRAD_S or GRAD_T):
        sum_g, sum_h = _grad_sums(s_row, t_row, V, lse_x, lse_y, inv_temp, wp, wq, log_wp, log_wq, KIND, BLOCK)
    # The softmax Jacobian turns ∂f/∂log q into ∂f/∂x_j = g_j − q_j·Σg (and likewise for the teacher).
    acc_f = tl.zeros([BLOCK], tl.float32)
    soft_scale_x = soft_scale * inv_temp
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        inb = cols < V
        s = tl.load(s_row + cols, mask=inb, other=float("-inf")).to(tl.float32)
        x = s * inv_temp
        y = tl.load(t_row + cols, mask=inb, other=float("-inf")).to(tl.float32) * inv_temp
        live = (x > float("-inf")) & (y > float("-inf"))
        f, g, h, q, p = _terms(x, y, lse_x, lse_y, live, wp, wq, log_wp, log_wq, KIND)
        acc_f += f
        if GRAD_S:
            gs = (g - q * sum_g) * soft_scale_x
            if HARD:
                q_raw = tl.exp(s - lse_r) if RAW else q
                gs += hard_scale * (q_raw - tl.where(cols == label, 1.0, 0.0))
            tl.store(gs_row + cols, gs.to(gs_row.dtype.element_ty), mask=inb)
        if GRAD_T:
            gt = (h - p * sum_h) * soft_scale_x
            tl.store(gt_row + cols, gt.to(gt_row.dtype.element_ty), mask=inb)
    tl.store(loss_ptr, tl.sum(acc_f, 0))
    tl.store(bad_ptr, bad)


@triton.jit
def _zero_row(gs_row, gt_row, loss_ptr, hard_ptr, bad_ptr, V,
              GRAD_S: tl.constexpr, GRAD_T: tl.constexpr, HARD: tl.constexpr, BLOCK: tl.constexpr):
    """An ignored token: loss 0 and a zero gradient; its logits are never read (nor, in the sparse kernel, its ids).

    Also the sparse kernel's (GRAD_T False, gt_row unused): an inlined jit function, specialized on the flags.
    """
    if GRAD_S or GRAD_T:  # no loop at all for a loss-only launch
        zero = tl.zeros([BLOCK], tl.float32)
        for off in range(0, V, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            if GRAD_S:
                tl.store(gs_row + cols, zero.to(gs_row.dtype.element_ty), mask=cols < V)
            if GRAD_T:
                tl.store(gt_row + cols, zero.to(gt_row.dtype.element_ty), mask=cols < V)
    tl.store(loss_ptr, 0.0)
    if HARD:
        tl.store(hard_ptr, 0.0)
    tl.store(bad_ptr, 0)


@triton.jit
def divergence_kernel(S, T, GS, GT, LOSS, HARD_LOSS, BAD, LABELS, SCALES,
                      stride_s, stride_t, stride_gs, stride_gt, V, ignore_index,
                      inv_temp, wp, wq, log_wp, log_wq,
                      KIND: tl.constexpr, GRAD_S: tl.constexpr, GRAD_T: tl.constexpr,
                      HAS_LABELS: tl.constexpr, HARD: tl.constexpr, RAW: tl.constexpr, BLOCK: tl.constexpr):
    """One token row: S, T [N, V] logits (any float dtype) -> LOSS [N] fp32, GS/GT [N, V] gradients.

    SCALES holds (soft_scale, hard_scale): the gradient weights of the divergence and of the cross-entropy on LABELS.
    """
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    gs_row = GS + row * stride_gs
    gt_row = GT + row * stride_gt
    soft_scale = tl.load(SCALES)
    hard_scale = tl.load(SCALES + 1)
    if HAS_LABELS:
        label = tl.load(LABELS + row)
        if label != ignore_index:
            _row(s_row, t_row, gs_row, gt_row, LOSS + row, HARD_LOSS + row, BAD + row, label, soft_scale, hard_scale, V,
                 inv_temp, wp, wq, log_wp, log_wq, KIND, GRAD_S, GRAD_T, HARD, RAW, BLOCK)
        else:
            _zero_row(gs_row, gt_row, LOSS + row, HARD_LOSS + row, BAD + row, V, GRAD_S, GRAD_T, HARD, BLOCK)
    else:
        _row(s_row, t_row, gs_row, gt_row, LOSS + row, HARD_LOSS + row, BAD + row, 0, soft_scale, hard_scale, V,
             inv_temp, wp, wq, log_wp, log_wq, KIND, GRAD_S, GRAD_T, HARD, RAW, BLOCK)


def launch_config(V: int) -> tuple[int, int]:
    """(BLOCK, num_warps). On GPU 2048 x 4 warps: 16-byte loads, < 100 registers, several rows per SM in flight
    (the H200 sweep in benchmarks/results/tune-divergence-h200.md: within 2% of the best of six configs).

    The interpreter runs blocks as numpy arrays, so wider blocks there only mean fewer Python steps.
    KDFAST_DIVERGENCE_CONFIG="BLOCK,WARPS" overrides it (benchmarks/tune_divergence.py sweeps it).
    """
    override = os.environ.get("KDFAST_DIVERGENCE_CONFIG")
    if override:
        block, num_warps = (int(x) for x in override.split(","))
        return min(block, triton.next_power_of_2(V)), num_warps
    block = min(8192 if triton_interpreting() else 2048, triton.next_power_of_2(V))
    return block, 4


def launch(student: torch.Tensor, teacher: torch.Tensor, grad_s: torch.Tensor | None, grad_t: torch.Tensor | None,
           loss: torch.Tensor, hard_loss: torch.Tensor | None, bad: torch.Tensor, labels: torch.Tensor | None,
           scales: torch.Tensor, *, kind: str, ignore_index: int, temperature: float, mix: tuple[float, ...],
           raw_stats: bool) -> None:
    """Run divergence_kernel over student/teacher [N, V] (unit column stride); outputs are preallocated."""
    n, V = student.shape
    if n == 0:
        return
    block, num_warps = launch_config(V)
    wp, wq, log_wp, log_wq = mix
    # Unused pointers still need a tensor; the constexpr flags keep them untouched.
    divergence_kernel[(n,)](
        student, teacher, student if grad_s is None else grad_s, teacher if grad_t is None else grad_t,
        loss, loss if hard_loss is None else hard_loss, bad, loss if labels is None else labels, scales,
        student.stride(0), teacher.stride(0), 0 if grad_s is None else grad_s.stride(0),
        0 if grad_t is None else grad_t.stride(0), V, ignore_index,
        1.0 / temperature, wp, wq, log_wp, log_wq,
        KIND=KIND_CODES[kind], GRAD_S=grad_s is not None, GRAD_T=grad_t is not None,
        HAS_LABELS=labels is not None, HARD=hard_loss is not None, RAW=raw_stats, BLOCK=block,
        num_warps=num_warps,
    )
