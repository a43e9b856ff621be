"""MiniLLM: reverse KL by policy gradient on rollouts from the mixture (1 − α)q + αp, with PPO clipping, the
single-step regularizer and an optional loss on pretraining text."""
from __future__ import annotations

import math

import torch
from torch import nn

from kdfast.distill.buffer import pack_sequences, unpack_sequences
from kdfast.distill.config import DistillError
from kdfast.distill.data import count_targets, prompt_of, with_response
from kdfast.distill.mixed_sampling import sample_mixture
from kdfast.distill.objective import divergence_sum, forward_rows, token_nll, valid
from kdfast.distill.techniques.base import MicroBatch, Technique

_ARRAYS = ("old_logp", "weight", "advantage")


class MiniLLM(Technique):
    """Per collection, num_rollouts prompts (over all processes) get responses sampled from (1 − α)q + αp
    (α = mix_alpha = 0.2) with both models stepped together. Per response token t, with log q from the student at
    collection time and log p from the teacher:

    - reward r_t = clip((log p − log q) / reward_scaling, ±reward_clip);
    - return R_t = Σ_{t' ≥ t} γ^{t'−t} r_t' (γ = 0.95), divided by the tokens left from t (length_norm), then
      whitened over the collection's tokens (the reference code whitens each PPO batch, padding included);
    - importance weight w_t = q(y_t) / ((1 − α)q(y_t) + αp(y_t)).

    The rollouts are then used for ppo_epochs (4) shuffled passes; each micro-batch minimizes, per token,
    max(−A·ρ, −A·clip(ρ, 1 ± clip_range)) with ρ = exp(log q_θ − log q_old)·w, plus the single-step term
    KL(q_θ ‖ p) at the sampled positions (kind = loss, "rkl"), plus lm_coef·[0.5·KD + 0.5·CE] on lm_records.
    The logged "objective" is the single-step reverse KL.
    """

    name = "minillm"

    def __init__(self, ctx):
        super().__init__(ctx)
        per_batch = self.cfg.batch_size * ctx.world
        if self.cfg.num_rollouts % per_batch:
            raise DistillError(f"num_rollouts={self.cfg.num_rollouts} must be a multiple of batch_size × processes "
                               f"= {per_batch}, so every PPO micro-batch is full")
        self.rollouts = []
        self.arrays: dict[str, list[torch.Tensor]] = {k: [] for k in _ARRAYS}
        self.queue: list[list[int]] = []
        self.collection: dict[str, float] = {}

    @property
    def passes(self) -> int:
        return self.cfg.ppo_epochs

    def micro_batch(self, step: int, micro: int) -> MicroBatch:
        if not self.queue:
            self._collect(step, micro)
        idx = self.queue.pop(0)
        extra = {k: torch.cat([self.arrays[k][i] for i in idx]) for k in _ARRAYS}
        return MicroBatch([self.rollouts[i] for i in idx], self.ctx.take_lm(self.cfg.batch_size), True, extra)

    def _collect(self, step: int, micro: int) -> None:
        ctx, cfg = self.ctx, self.cfg
        examples = []
        while len(examples) < cfg.num_rollouts // ctx.world:
            examples += ctx.take(cfg.batch_size)
        prompts = [prompt_of(e) for e in examples]
        with ctx.sampling_student() as student:
            new = sample_mixture(student, ctx.teacher, prompts, ctx.max_new_tokens(prompts), alpha=cfg.mix_alpha,
                                 pad_id=ctx.pad_id, eos_id=ctx.eos_id, temperature=cfg.gen_temperature,
                                 batch_size=cfg.gen_batch_size or cfg.batch_size, seed=ctx.seed("rollout", step, micro))
            self.rollouts = [with_response(e, r, cfg.max_len) for e, r in zip(examples, new)]
            log_q, log_p = self._score(student)
        self._set_arrays(log_q, log_p)
        order = list(range(len(self.rollouts)))
        self.queue = []
        for epoch in range(cfg.ppo_epochs):
            ctx.rng("ppo", step, micro, epoch).shuffle(order)
            self.queue += [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]

    @torch.no_grad()
    def _score(self, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-rollout log q (student now) and log p (teacher) of the sampled response tokens, fp32 on the CPU."""
        log_q, log_p = [], []
        for start in range(0, len(self.rollouts), self.cfg.batch_size):
            chunk = self.rollouts[start: start + self.cfg.batch_size]
            batch = self.ctx.collate(chunk)
            targets = batch["targets"][valid(batch)]
            sizes = [count_targets([s]) for s in chunk]
            q = -token_nll(forward_rows(student, batch, self.cfg.fused), targets)
            p = -token_nll(self.ctx.teacher_rows(batch), targets)
            log_q += list(q.cpu().split(sizes))
            log_p += list(p.cpu().split(sizes))
        return log_q, log_p

    def _set_arrays(self, log_q: list[torch.Tensor], log_p: list[torch.Tensor]) -> None:
        cfg, alpha = self.cfg, self.cfg.mix_alpha
        weights, returns, rewards = [], [], []
        for q, p in zip(log_q, log_p):
            r = ((p - q) / cfg.reward_scaling).clamp(-cfg.reward_clip, cfg.reward_clip)
            rewards.append(r)
            weights.append(_importance_weight(q, p, alpha))
            returns.append(_returns(r, cfg.gamma, cfg.length_norm))
        flat = torch.cat(returns)
        if cfg.whiten and flat.numel() > 1:
            mean, std = flat.mean(), flat.std(unbiased=False)
            returns = [(a - mean) / (std + 1e-8) for a in returns]
        self.arrays = {"old_logp": log_q, "weight": weights, "advantage": returns}
        self.collection = {"reward": float(torch.cat(rewards).mean()),
                           "rev_kl": float(torch.stack([(q - p).mean() for q, p in zip(log_q, log_p)]).mean()),
                           "response_len": float(sum(len(q) for q in log_q) / len(log_q))}

    def loss(self, model: nn.Module, mb: MicroBatch, totals: dict[str, float]) -> tuple[torch.Tensor, dict]:
        cfg, ctx = self.cfg, self.ctx
        batch = ctx.collate(mb.seqs)
        targets = batch["targets"][valid(batch)]
        old, weight, advantage = (mb.extra[k].to(ctx.device) for k in _ARRAYS)
        student = forward_rows(model, batch, cfg.fused)
        ratio = torch.exp(-token_nll(student, targets) - old) * weight
        clipped = ratio.clamp(1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
        n = max(totals["tokens"], 1.0)
        pg = torch.max(-advantage * ratio, -advantage * clipped).sum() / n
        teacher = ctx.teacher_rows(batch)
        with torch.set_grad_enabled(cfg.single_step_reg and torch.is_grad_enabled()):
            reg = divergence_sum(student, teacher, targets, kind=cfg.loss, soft_weight=1.0, hard_weight=0.0,
                                 beta=cfg.beta, alpha=cfg.skew_alpha, temperature=cfg.temperature, vocab=cfg.vocab,
                                 chunk_size=cfg.chunk_size) / n
        loss = pg + reg if cfg.single_step_reg else pg
        return self.add_lm_loss(model, mb.lm, totals, loss, {"pg": pg.detach(), "objective": reg.detach()})

    def status(self) -> dict[str, float]:
        return dict(self.collection)

    def state_dict(self) -> dict:
        return {"queue": self.queue, "collection": self.collection}

    def load_state_dict(self, state: dict) -> None:
        self.queue, self.collection = state["queue"], state["collection"]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = pack_sequences(self.rollouts, "rollouts")
        out.update({f"rollouts.{k}": torch.cat(v) if v else torch.zeros(0) for k, v in self.arrays.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.rollouts = unpack_sequences(tensors, "rollouts")
        sizes = [count_targets([s]) for s in self.rollouts]
        self.arrays = {k: list(tensors[f"rollouts.{k}"].split(sizes)) if sizes else [] for k in _ARRAYS}


def _importance_weight(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float) -> torch.Tensor:
    """q / ((1 − α)q + αp) per token, in log space."""
    if alpha == 0.0:
        return torch.ones_like(log_q)
    if alpha == 1.0:
        return (log_q - log_p).exp()
    log_mix = torch.logaddexp(log_q + math.log1p(-alpha), log_p + math.log(alpha))
    return (log_q - log_mix).exp()


def _returns(rewards: torch.Tensor, gamma: float, length_norm: bool) -> torch.Tensor:
    """Discounted reward-to-go of one response [R]; divided by the tokens left (R − t) with length_norm."""
    out = torch.empty_like(rewards)
    running = 0.0
    for t in range(rewards.numel() - 1, -1, -1):
        running = float(rewards[t]) + gamma * running
        out[t] = running
    if length_norm:
        out = out / torch.arange(rewards.numel(), 0, -1, dtype=out.dtype)
    return out
