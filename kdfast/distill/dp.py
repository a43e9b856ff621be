"""DP-SGD fine-tuning through Opacus: a causal LM trained on instruction records to a target (ε, δ), the ε spent."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.data import IGNORE_INDEX, next_token_targets, pad_batch
from kdfast.distill.config import DistillError
from kdfast.distill.data import encode_training
from kdfast.generation import pad_token_id
from kdfast.lora import apply_lora, merge_lora
from kdfast.models import transformer_blocks

ACCOUNTANTS = ("rdp", "prv")


@dataclass
class DPConfig:
    """The privacy target of DP-SGD and how the per-sample gradients are held in memory."""

    epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # per-sample clipping norm C
    accountant: str = "rdp"  # Opacus accountant: rdp or prv
    # records whose per-sample gradients are held at once (the logical batch is batch_size)
    physical_batch_size: int = 4
    # train the blocks and norms only: per-sample gradients of a [V, D] table are V·D each
    freeze_embeddings: bool = True
    # > 0: DP-LoRA (Yu et al., 2022): DP-SGD trains LoRA adapters of this rank on the attention projections, the
    # base frozen, merged into the saved model; per-sample gradients of the adapters only
    lora_rank: int = 0
    lr: float | None = None  # the DP fine-tuning's learning rate (None: the teacher's); adapters want a larger one

    def check(self, where: str = "teacher.dp") -> None:
        if not self.epsilon > 0 or not 0 < self.delta < 1:
            raise DistillError(f"{where}: epsilon must be > 0 and delta in (0, 1), got {self.epsilon}, {self.delta}")
        if not self.max_grad_norm > 0:
            raise DistillError(f"{where}.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise DistillError(f"{where}.accountant: unknown {self.accountant!r}; choose from {', '.join(ACCOUNTANTS)}")
        if self.lr is not None and not self.lr > 0:
            raise DistillError(f"{where}.lr must be > 0 (or unset: the teacher's), got {self.lr}")
        if self.lora_rank < 0:
            raise DistillError(f"{where}.lora_rank must be 0 (off) or a LoRA rank, got {self.lora_rank}")
        if self.physical_batch_size < 1:
            raise DistillError(f"{where}.physical_batch_size must be at least 1, got {self.physical_batch_size}")


@dataclass
class DPSummary:
    """What DP-SGD spent: ε at δ after `steps` steps of the subsampled Gaussian mechanism, and the losses."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    accountant: str
    losses: list[float] = field(default_factory=list)  # mean loss of each logical step

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
                                              "max_grad_norm", "accountant", "losses")}


def _check_model(model: nn.Module) -> None:
    if type(model).__name__.startswith("OPT"):
        raise DistillError("teacher.dp: Opacus cannot take per-sample gradients through OPT's learned positional "
                           "embedding (its forward takes an int); use a LLaMA- or GPT-2-family teacher for DP-SGD")
    transformer_blocks(model)  # a model whose blocks kdfast cannot find fails here, before any work


def _per_record_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] mean next-token cross-entropy of each record's response tokens (0 for a record with none)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).logits
    ce = F.cross_entropy(logits.float().transpose(1, 2), batch["targets"], ignore_index=IGNORE_INDEX, reduction="none")
    count = (batch["targets"] != IGNORE_INDEX).sum(1)
    return ce.sum(1) / count.clamp(min=1)


def train_dp(model: nn.Module, tokenizer, records: list[dict], dp: DPConfig, *, epochs: float, lr: float,
             batch_size: int, max_len: int, max_prompt_len: int | None, seed: int = 0,
             device: str | torch.device = "cpu") -> DPSummary:
    """Fine-tune `model` in place with DP-SGD (Opacus, Poisson sampling) on `records` to (dp.epsilon, dp.delta).

    The noise multiplier is the smallest that keeps ε ≤ dp.epsilon after ceil(epochs · N / batch_size) steps at
    sample rate batch_size / N; each step clips every record's gradient to dp.max_grad_norm. Per-sample gradients
    come from Opacus's hooks, and from functorch for layers without a grad sampler (RMSNorm, GPT-2's Conv1D).
    The returned ε is the accountant's after the steps taken. Training runs in float32 (AdamW). With dp.lora_rank
    only LoRA adapters train (DP-LoRA), merged into `model` at the end: the adapters' few parameters make the
    per-sample gradients cheap, and by post-processing the merged model keeps the ε.
    """
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    dp.check()
    _check_model(model)
    encoded = encode_training(tokenizer, records, max_len, max_prompt_len, long_prompts="drop", what="teacher")
    if batch_size > len(encoded):
        raise DistillError(f"teacher.batch_size {batch_size} exceeds the {len(encoded)} private records")
    padded = pad_batch(encoded, pad_token_id(tokenizer), side="right")
    targets = next_token_targets(padded["labels"])
    dataset = torch.utils.data.TensorDataset(padded["input_ids"], padded["attention_mask"], padded["position_ids"],
                                             targets)
    sample_rate = batch_size / len(encoded)
    steps = max(1, math.ceil(epochs * len(encoded) / batch_size))
    sigma = get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=dp.delta, sample_rate=sample_rate,
                                 steps=steps, accountant=dp.accountant)
    torch.manual_seed(seed)
    model.to(device).float().train()
    model.config.use_cache = False
    if dp.lora_rank:
        apply_lora(model, dp.lora_rank)
    elif dp.freeze_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    engine = PrivacyEngine(accountant=dp.accountant, secure_mode=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        private, optimizer, loader = engine.make_private(
            module=model, optimizer=torch.optim.AdamW(params, lr=lr, weight_decay=0.0), data_loader=loader,
            noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm, poisson_sampling=True,
            noise_generator=torch.Generator(device=device).manual_seed(seed))
    losses, taken = [], 0
    while taken < steps:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=dp.physical_batch_size,
                                optimizer=optimizer) as physical:
            step_loss, step_n = 0.0, 0
            for ids, mask, pos, tgt in physical:
                batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "targets": tgt}
                batch = {k: v.to(device) for k, v in batch.items()}
                if len(ids) == 0:  # an empty Poisson batch still takes its step: noise only, as DP-SGD analyses it
                    batch = {k: v[:0].new_zeros((1, v.shape[1])) for k, v in batch.items()}
                    batch["targets"].fill_(IGNORE_INDEX)
                per_record = _per_record_loss(private, batch)
                per_record.mean().backward()
                step_loss += float(per_record.detach().sum()) if len(ids) else 0.0
                step_n += len(ids)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if not optimizer._is_last_step_skipped:
                    losses.append(step_loss / max(step_n, 1))
                    step_loss, step_n, taken = 0.0, 0, taken + 1
                    if taken >= steps:
                        break
    private._close()
    if dp.lora_rank:
        merge_lora(model)
    model.requires_grad_(True).eval()
    return DPSummary(epsilon=float(engine.get_epsilon(dp.delta)), delta=dp.delta, noise_multiplier=float(sigma),
                     sample_rate=sample_rate, steps=taken, max_grad_norm=dp.max_grad_norm, accountant=dp.accountant,
                     losses=losses)
