"""One optimizer step of kd-train, taken the way open_clip_train takes it on GPUs.

`DistillModel` is the one module DDP wraps: the student's forward on this rank's micro-batch, its pooled features
gathered across ranks (the gather's backward sends every rank's gradient to the rank that computed the rows:
open_clip's --gather-with-grad), the cached features of the accumulated batch's other micro-batches around them,
the projections into each teacher's space, and the `LossSet`. Each rank's loss is the global-batch loss (or, with
--local-loss, its rows' share of it), so DDP's mean of the ranks' gradients is the gradient of the global loss.

`OptimizerStep` takes a step from `--accum-freq` micro-batches: open_clip's feature caching for the losses on
pooled features (features of every micro-batch first, without grad; then each micro-batch again with grad against
the others' cached features, so the summed gradient is the big batch's exactly), plain accumulation for the
losses on per-sample maps. Nothing in a step reads a device value back to the host: the loss terms, the
non-finite check, the gradient norm and the scaler's skipped steps stay on the device until `read` (log steps).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import nn

from common import dist
from stage2_student.losses import LossSet, StudentOutputs, TeacherTargets
from stage2_student.student import Student

# pooled fields: gathered across ranks and concatenated across micro-batches (the rest stay per rank and micro-batch)
POOLED_STUDENT = ("image_emb", "text_emb", "masked_image_emb")
POOLED_TEACHER = ("image_emb", "text_emb", "image_grad", "text_grad")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "amp": torch.float16}  # autocast dtype of each --precision


@dataclass
class MicroBatch:
    """This rank's part of one micro-batch, on the device. `teachers`: per teacher, the pooled targets of the whole
    global micro-batch (gathered order) and the per-sample maps of this rank's rows; `sizes`: every rank's rows."""
    images: torch.Tensor
    tokens: torch.Tensor
    teachers: dict[str, TeacherTargets]
    sizes: tuple[int, ...]


def concat(parts: list, names: tuple[str, ...], base=None):
    """`base` (default: the first part) with its pooled fields `names` replaced by the parts' concatenated (None
    where a part lacks one)."""
    joined = {name: (torch.cat([getattr(p, name) for p in parts])
                     if all(getattr(p, name) is not None for p in parts) else None) for name in names}
    return replace(parts[0] if base is None else base, **joined)


def local_rows(sizes: list[tuple[int, ...]], rank: int, device) -> torch.Tensor:
    """Indices of this rank's rows in the concatenation of the gathered micro-batches (each in rank order)."""
    parts, offset = [], 0
    for micro in sizes:
        start = offset + sum(micro[:rank])
        parts.append(torch.arange(start, start + micro[rank], device=device))
        offset += sum(micro)
    return torch.cat(parts)


@dataclass
class FeatureCache:
    """The accumulated batch seen from micro-batch `position`: every micro-batch's gathered pooled features
    (detached, computed without grad), its teachers' pooled targets, and each micro-batch's rank sizes."""
    features: list[StudentOutputs]
    teachers: dict[str, TeacherTargets]
    sizes: list[tuple[int, ...]]
    position: int = 0


class DistillModel(nn.Module):
    """student -> gather -> (cached features around it) -> projections -> LossSet: the module DDP wraps."""

    def __init__(self, student: Student, loss_set: LossSet, mask_ratio: float, local_loss: bool, accum_freq: int):
        super().__init__()
        self.student, self.loss_set = student, loss_set
        self.mask_ratio, self.local_loss, self.accum_freq = mask_ratio, local_loss, accum_freq
        self.needs = loss_set.student_needs
        self.per_micro = loss_set.per_micro_batch
        self.pooled = frozenset(loss_set.classes) - self.per_micro

    def features(self, micro: MicroBatch) -> StudentOutputs:
        """The student's outputs on this rank's rows, its pooled features gathered over ranks."""
        out = self.student(micro.images, micro.tokens, self.needs, self.mask_ratio)
        return replace(out, **{name: dist.gather_cat(getattr(out, name), micro.sizes)
                               for name in POOLED_STUDENT if getattr(out, name) is not None})

    def forward(self, micro: MicroBatch, cache: FeatureCache | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss to back-propagate and the terms to log. Without `cache`: the micro-batch is the whole batch.
        With it: the pooled losses on the accumulated batch, this micro-batch's features in their place, plus the
        per-map losses on this micro-batch divided by --accum-freq; the logged terms are divided by --accum-freq
        too, so that their sum over the micro-batches is the step's value."""
        fresh = self.features(micro)
        if cache is None:
            full, teachers, sizes = fresh, micro.teachers, [micro.sizes]
        else:
            around = list(cache.features)
            around[cache.position] = fresh
            # the other fields (logit scale and bias) are this micro-batch's, with their graph
            full, teachers, sizes = concat(around, POOLED_STUDENT, fresh), cache.teachers, cache.sizes
        rank = dist.rank_world()[0]
        rows = local_rows(sizes, rank, fresh.image_emb.device) if self.local_loss else None
        students = {name: replace(self.student.project(full, name), rows=rows) for name in teachers}
        if cache is None:
            loss, terms = self.loss_set(students, teachers)
            return loss, {"loss": loss.detach(), **terms}
        pooled, terms = self.loss_set(students, teachers, names=self.pooled)
        per_micro = 0.0
        if self.per_micro:
            mine = {name: self.student.project(fresh, name) for name in teachers}
            per_micro, micro_terms = self.loss_set(mine, micro.teachers, names=self.per_micro)
            terms |= micro_terms
        a = self.accum_freq
        return pooled + per_micro / a, {"loss": (pooled + per_micro).detach() / a,
                                        **{name: value / a for name, value in terms.items()}}


def batch_level_parameters(model: DistillModel) -> list[nn.Parameter]:
    """Parameters that each micro-batch's backward reaches through the whole accumulated batch (projections,
    the pooled losses' own parameters, the student's logit scale and bias): the same full gradient every time."""
    student = model.student
    own = [getattr(student.clip, name) for name in ("logit_scale", "logit_bias")
           if isinstance(getattr(student.clip, name, None), nn.Parameter)]
    pooled = [p for name in model.pooled for p in model.loss_set.losses[name].parameters()]
    return [p for p in [*own, *student.projections.parameters(), *pooled] if p.requires_grad]


@contextlib.contextmanager
def preserved(model: nn.Module, device: str):
    """Run something on `model` and put back its buffers (BatchNorm statistics) and the RNG streams."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    cuda = device.startswith("cuda")
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else [], device_type="cuda" if cuda else "cpu"):
        yield
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])


class OptimizerStep:
    """Forward, backward (DDP, accumulation), unscale and clip, AdamW, schedule: one step, no host reads."""

    def __init__(self, model: DistillModel, optimizer: torch.optim.Optimizer, scheduler, device: str,
                 precision: str, grad_clip: float | None, accum_freq: int):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.grad_clip, self.accum_freq = device, grad_clip, accum_freq
        self.autocast_dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(device.split(":")[0]) if precision == "amp" else None
        self.wrapped: nn.Module = model  # DDP-wrapped by `distribute`
        if accum_freq > 1:
            for p in batch_level_parameters(model):
                p.register_hook(lambda grad: grad / accum_freq)
        # device-side records, read on log steps
        self.first_bad_step = torch.zeros((), dtype=torch.long, device=device)  # 0: none so far
        self.skipped_steps = torch.zeros((), dtype=torch.long, device=device)  # the scaler's (amp)
        self.terms: dict[str, torch.Tensor] = {}
        self.grad_norm: torch.Tensor | None = None

    def autocast(self):
        return torch.autocast(self.device.split(":")[0], dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def distribute(self, first: list[MicroBatch]) -> list[str]:
        """Wrap the model in DDP (a multi-rank run). Parameters that none of the chosen losses reaches (a CoCa's
        decoder without the caption loss, a logit scale no loss reads) are found by one forward and backward of
        the first micro-batch and frozen, as they would get no gradient anyway: DDP then needs neither
        find_unused_parameters (a graph search every step) nor static_graph (whose first step cannot be a
        no_sync one). The probe leaves no trace (buffers and RNG restored, gradients dropped). Returns their
        names."""
        with preserved(self.model, self.device):
            with self.autocast():
                loss, _ = self.model(first[0])
            loss.backward()
        unused = dist.broadcast_object([name for name, p in self.model.named_parameters()
                                        if p.requires_grad and p.grad is None])  # the same on every rank
        for name, p in self.model.named_parameters():
            p.grad = None
            if name in unused:
                p.requires_grad_(False)
        device_ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
        self.wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        return unused

    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP gives them at each forward: at a save, so
        that every rank holds what is saved."""
        if dist.is_distributed():
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, 0)

    def __call__(self, micro_batches: list[MicroBatch], step: int, log: bool) -> None:
        """Step number `step` (1-based) from its micro-batches; `log`: keep the gradient norm for the log."""
        model = self.model
        cache = None
        if len(micro_batches) > 1:
            states, features = [], []
            with torch.no_grad(), self.autocast():
                for micro in micro_batches:
                    states.append(rng_states(self.device))
                    features.append(model.features(micro))
            after = rng_states(self.device)
            cache = FeatureCache(features, {name: concat([m.teachers[name] for m in micro_batches], POOLED_TEACHER)
                                            for name in micro_batches[0].teachers},
                                 [m.sizes for m in micro_batches])
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, torch.Tensor] = {}
        for j, micro in enumerate(micro_batches):
            last = j == len(micro_batches) - 1
            if cache is not None:
                set_rng_states(states[j], self.device)  # the same masks and dropout as the cached forward
            sync = contextlib.nullcontext() if last or self.wrapped is model else self.wrapped.no_sync()
            with sync:
                with self.autocast():
                    loss, micro_terms = self.wrapped(micro, None if cache is None else replace(cache, position=j))
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            terms = {k: terms.get(k, 0) + v for k, v in micro_terms.items()}
        if cache is not None:
            set_rng_states(after, self.device)
        self.finish(terms, step, log)

    def finish(self, terms: dict[str, torch.Tensor], step: int, log: bool) -> None:
        params = self.parameters()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = None
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        elif log or self.scaler:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        bad = ~torch.isfinite(terms["loss"])
        if self.scaler:  # non-finite gradients: the scaler skips the step and lowers its scale; counted, no failure
            self.skipped_steps += (~torch.isfinite(norm)).long()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if norm is not None:
                bad |= ~torch.isfinite(norm)
            self.optimizer.step()
        self.first_bad_step.copy_(torch.where((self.first_bad_step == 0) & bad, step, self.first_bad_step))
        self.scheduler.step()
        self.model.student.clamp_logit_scale()
        self.model.loss_set.after_step()  # the losses' own learnable scales, clamped like the student's
        self.terms, self.grad_norm = terms, norm

    def read(self) -> tuple[dict[str, float], int, int]:
        """On a log step (every rank): the last step's terms (their mean over ranks, i.e. the global values under
        --local-loss) with its gradient norm, the first step whose loss or gradient was non-finite (0: none), and
        the scaler's skipped steps. One host read."""
        names = list(self.terms)
        values = [self.terms[n].float().reshape(()) for n in names]
        if self.grad_norm is not None:
            values.append(self.grad_norm.float().reshape(()))
        stacked = dist.all_reduce_mean(torch.stack(values))
        flags = torch.stack([self.first_bad_step, self.skipped_steps]).tolist()
        read = stacked.tolist()
        terms = dict(zip(names, read))
        if self.grad_norm is not None:
            terms["grad_norm"] = read[-1]
        return terms, int(flags[0]), int(flags[1])


def rng_states(device: str) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.startswith("cuda") else None)


def set_rng_states(states: tuple, device: str) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)
