"""What a technique sees of a run: config, models, devices, data streams, seeded randomness and shared helpers."""
from __future__ import annotations

import contextlib
import random

import torch
from torch import nn

from kdfast.data import Encoded
from kdfast.distill.config import DistillConfig
from kdfast.distill.data import DataStream, collate, prompt_of, with_response
from kdfast.distill.objective import Rows, forward_rows
from kdfast.generation import eval_mode, generate, pad_token_id
from kdfast.models import output_head
from kdfast.store import seed_from


def run_seed(seed: int, rank: int, *key) -> int:
    """The trainer's seed named by key on process `rank` (RunContext.seed; also SeqKD's capture outside a run)."""
    return seed_from(seed, rank, *key, bits=56)  # 56 bits: the width the trainer first drew


def new_token_limit(prompts: list[list[int]], max_len: int, max_new_tokens: int | None) -> int:
    """New tokens a generation over `prompts` may take: the room under max_len, capped by max_new_tokens."""
    room = max_len - max(len(p) for p in prompts)
    return max(1, min(room, max_new_tokens or room))


class RunContext:
    """Shared state of one training run; techniques read it and call its helpers, the loop owns it.

    student is the plain HF model (unwrapped); `wrapped` is what accelerate prepared (DDP/FSDP around it).
    """

    def __init__(self, cfg: DistillConfig, student: nn.Module, teacher: nn.Module | None, tokenizer, accelerator,
                 device: torch.device, teacher_device: torch.device | None, amp_dtype: torch.dtype | None,
                 train: list[Encoded], lm: list[Encoded] | None = None, out=None):
        self.cfg, self.student, self.teacher, self.tokenizer = cfg, student, teacher, tokenizer
        self.accelerator, self.device, self.teacher_device = accelerator, device, teacher_device
        self.amp_dtype = amp_dtype
        self.train, self.lm, self.out = train, lm, out
        self.pad_id = pad_token_id(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.stream = DataStream(len(train), cfg.seed, self.rank, self.world)
        self.lm_stream = DataStream(len(lm), cfg.seed + 1, self.rank, self.world) if lm else None
        # set by the loop once the technique and the optimizer exist
        self.technique = None
        self.steps_per_epoch, self.total_steps = 1.0, 1
        self.wrapped: nn.Module = student
        self.optimizer = self.scheduler = self.scaler = None
        self._teacher_head = None
        self.cross = None  # a kdfast.distill.cross.CrossTokenizer when the teacher has another tokenizer

    # data
    def take(self, k: int) -> list[Encoded]:
        """The next k training examples of this process."""
        return [self.train[i] for i in self.stream.take(k)]

    def take_lm(self, k: int) -> list[Encoded] | None:
        """The next k pretraining-text examples of this process, or None without lm_records."""
        return None if self.lm_stream is None else [self.lm[i] for i in self.lm_stream.take(k)]

    def collate(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        return collate(items, self.pad_id, self.device)

    # randomness: derived from (seed, key) so a resumed run draws exactly what an uninterrupted one draws
    def seed(self, *key) -> int:
        return run_seed(self.cfg.seed, self.rank, *key)

    def rng(self, *key) -> random.Random:
        return random.Random(self.seed(*key))

    # precision
    def autocast(self):
        enabled = self.amp_dtype is not None
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=enabled)

    # models
    def teacher_rows(self, batch: dict[str, torch.Tensor], fused: bool | None = None) -> Rows:
        """The teacher's outputs (no grad) at the batch's valid target positions, on the student's device."""
        fused = self.cfg.fused if fused is None else fused
        inputs = {k: v.to(self.teacher_device) for k, v in batch.items()}
        with torch.no_grad():
            rows = forward_rows(self.teacher, inputs, fused)
        if not fused:
            return Rows(rows.values.to(self.device))
        if self._teacher_head is None:
            weight, bias = output_head(self.teacher)
            bias = None if bias is None else bias.detach().to(self.device)
            self._teacher_head = (weight.detach().to(self.device), bias)
        return Rows(rows.values.to(self.device), self._teacher_head)

    @contextlib.contextmanager
    def sampling_student(self):
        """The student ready to generate: eval mode (no dropout), full parameters under FSDP, autocast."""
        gather = contextlib.nullcontext()
        if self.accelerator.distributed_type.name == "FSDP":
            from torch.distributed.fsdp import FullyShardedDataParallel

            gather = FullyShardedDataParallel.summon_full_params(self.wrapped, writeback=False)
        with eval_mode(self.student), gather, self.autocast():
            yield self.student

    def max_new_tokens(self, prompts: list[list[int]]) -> int:
        return new_token_limit(prompts, self.cfg.max_len, self.cfg.max_new_tokens)

    def generate_student(self, examples: list[Encoded], seed: int) -> list[Encoded]:
        """The examples' prompts with responses sampled from the student (labels = the sampled tokens)."""
        prompts = [prompt_of(e) for e in examples]
        cfg = self.cfg
        with self.sampling_student() as model:
            new = generate(model, prompts, self.max_new_tokens(prompts), pad_id=self.pad_id, eos_id=self.eos_id,
                           do_sample=True, temperature=cfg.gen_temperature, top_k=cfg.gen_top_k, top_p=cfg.gen_top_p,
                           batch_size=cfg.gen_batch_size or cfg.batch_size, seed=seed)
        return [with_response(e, r, cfg.max_len) for e, r in zip(examples, new)]

    def all_sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum of each value over the processes (one collective for the whole dict)."""
        if self.world == 1:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        t = self.accelerator.reduce(t, reduction="sum")
        return dict(zip(keys, t.tolist()))
