"""`kd-train`: train a student against cached teacher targets (live teacher as fallback), or plain CLIP.

The loop knows nothing of loss names: the LossSet says what the student must output and which teacher targets
it needs; the TargetProvider serves them; `stage2_student.step` takes each optimizer step (DDP, --local-loss,
--accum-freq, --precision amp) without reading anything back to the host; the loop reads on log steps only.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import signal
import shutil
import time
import uuid
from contextlib import ExitStack
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from common import dist
from common.cache import CAPTIONS, MAIN_TEACHER, CacheError, CacheStore, damage_in_cache, join_to_cache
from common.corpus import Corpus
from common.errors import Interrupted, NonFiniteError
from common.hub_folder import (HUB_FILES, TOKENIZER_FILES, WEIGHTS_FILE, save_config, save_tokenizer,
                               save_weights)
from common.lock import output_lock
from common.storage import atomic_write, basename, cache_dir, is_remote, join
from common.model_card import (CARD_FILE, CHECKPOINTS_DIR, EVAL_RESULTS_FILE, PROVENANCE_FILE, record_eval,
                               write_model_card)
from common.remote_folder import RemoteFolder
from common.models import (LEGACY_RUN_WEIGHTS, LoadedCLIP, clip_from_provenance, create_clip, model_config,
                           named_weights, weights_fingerprint)
from common.families import compile_towers, keep_attention_weights, set_grad_checkpointing
from stage2_student.data import (BatchOrder, CaptionPolicy, MicroBatchSampler, Renderer, TrainBatches, ViewPolicy)
from stage2_student.losses import LossSet, loss_classes, teacher_needs_of
from stage2_student.optim import adamw_settings, capped_warmup, cooldown_steps, lr_schedule, param_groups
from stage2_student.options import RESUMABLE_CHANGES, TRAJECTORY_OPTIONS, TrainOptions, flag
from stage2_student.prepare import create_student
from stage2_student.reporting import TENSORBOARD_DIR, Reporters, parse_report_to
from stage2_student.checkpoints import CheckpointHistory
from stage2_student.step import DistillModel, MicroBatch, OptimizerStep
from stage2_student.student import Student, check_models_serve_losses, loss_dims
from stage2_student.targets import TargetProvider, uncacheable

if TYPE_CHECKING:
    from stage2_student.validation import Validated, Validation

log = logging.getLogger("kd-train")
# what a run writes (and --overwrite removes): the open_clip hub folder, its card, and what resumes and records it;
# student.pt is the weights file of runs written before the hub layout (removed at a resumed run's first save)
RUN_FILES = (*HUB_FILES, *TOKENIZER_FILES, CARD_FILE, PROVENANCE_FILE, EVAL_RESULTS_FILE, "resume.pt",
             "metrics.jsonl", "options.json", "lost_samples.json", LEGACY_RUN_WEIGHTS)


def option_name(field: str) -> str:
    """How a person knows a compared option: its flag, or what the run derived it from."""
    derived = {"world": "the torchrun world size", "teacher_weights": "the live teachers' weights (fingerprints)"}
    return derived.get(field) or flag(field)


def upgrade_single_teacher_resume(state: dict, per_teacher_losses: frozenset[str]) -> dict:
    """Name a resume.pt written before ensembles (its options lack 'synthetic_captions') the way a one-teacher run
    names it now, so a run stopped before the upgrade continues: the projection proj_image/proj_text becomes
    teacher main's, per-teacher losses' parts move under `members.main`, the two counters become main's."""
    options = json.loads(state["options"])
    if "synthetic_captions" in options:
        return state

    def loss_key(key: str) -> str:  # losses.<loss>.<part> -> losses.<loss>.members.main.<part>
        _, loss, part = key.split(".", 2)
        return f"losses.{loss}.members.{MAIN_TEACHER}.{part}" if loss in per_teacher_losses else key

    return state | {
        "options": json.dumps(options | {"teachers": None, "synthetic_captions": 0.0}),
        "student": {re.sub(r"^proj_(image|text)\.", rf"projections.{MAIN_TEACHER}.\1.", key): value
                    for key, value in state["student"].items()},
        "losses": {loss_key(key): value for key, value in state["losses"].items()},
        # files older still had no counters: those restart
        "target_counts": {MAIN_TEACHER: [state.get("cache_hits", 0), state.get("live_batches", 0)]},
        "skipped_samples": state.get("skipped_samples", 0),
    }




def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": np.random.get_state()[1].tolist()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))


def resolved_precision(precision: str, device: str) -> str:
    """--precision auto: bf16 autocast on a GPU that has it, else fp32; amp (fp16 autocast + GradScaler) only asked
    for (V100 / T4, which lack bf16)."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def prepare_out(out: Path, resume: bool | str, overwrite: bool, shown: str | None = None) -> bool:
    """Refuse to write over a run or into an unrelated non-empty directory unless told to, and --resume without a
    resume.pt; a run killed before its first save gets one answer, with or without --resume. Whether the run
    resumes: --resume auto continues a run with a resume.pt and starts in an empty or absent --out. `shown` is
    the --out the user gave (an object-store URL, where `out` is its local staging copy)."""
    shown = shown or str(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {shown} is a file: give a directory")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    holds_run, saved = bool(set(entries) & set(RUN_FILES)), "resume.pt" in entries
    if holds_run and not saved and not overwrite:
        raise ValueError(f"--out {shown} holds a run that stopped before its first save (no resume.pt), so there "
                         f"is nothing to resume: start it again with --overwrite, or choose another --out")
    if resume is True and not saved:
        raise ValueError(f"--resume: {shown} holds no run to continue (no resume.pt): start without --resume, "
                         f"or give --resume auto (continues a run, starts in an empty --out)")
    if resume and saved:
        return True
    if not entries:
        return False
    if not overwrite:
        what = "holds a run" if holds_run else "is a non-empty directory"
        raise ValueError(f"--out {shown} {what} ({', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}): "
                         f"--resume continues a run, --overwrite replaces it, or choose another --out")
    for name in RUN_FILES:  # only this tool's files: --overwrite never deletes what it did not write
        (out / name).unlink(missing_ok=True)
    for folder in (TENSORBOARD_DIR, CHECKPOINTS_DIR):  # the replaced run's curves and step folders
        shutil.rmtree(out / folder, ignore_errors=True)
    return False


class StopSignals:
    """SIGINT / SIGTERM only set a flag: the loop saves at the next step boundary and stops. A second signal
    acts at once (the default action)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, signal.SIG_DFL)

    def __enter__(self) -> "StopSignals":
        self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Trainer:
    def __init__(self, opts: TrainOptions):
        opts.check()
        self.opts = opts
        self.rank, self.world = dist.init_distributed(opts.device)
        if opts.batch_size % self.world:
            raise ValueError(f"--batch-size {opts.batch_size} is not divisible by the world size {self.world} "
                             f"(torchrun processes): give a multiple of {self.world}")
        self.device = dist.local_device(opts.device)
        if self.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as open_clip_train
        self.remote = RemoteFolder(opts.out) if is_remote(opts.out) else None  # trained into a local staging copy
        self.out = self.remote.local if self.remote else Path(opts.out)
        torch.manual_seed(opts.seed)  # the same on every rank until the models are built

        # everything that can be wrong is checked before any training work
        started = time.perf_counter()
        self.build_data()
        self.build_models()
        self.build_losses()
        self.build_targets()
        self.build_optimizer()
        self.validation, self.history = self.validation_and_history()
        # per-sample randomness (MFD masks, dropout) differs across ranks from here on
        torch.manual_seed(int(np.random.SeedSequence([opts.seed, self.rank]).generate_state(1)[0]))
        self.skipped_here = 0  # unreadable samples this rank left out since the run (re)started
        self.step = self.saved_step = 0
        self.lock = ExitStack()  # rank 0 holds the lock on --out until run() ends
        self.claim_out()
        log.info("rank %d ready in %.2f s (corpus index, cache join, targets, models; imports not counted)",
                 self.rank, time.perf_counter() - started)

    def build_data(self) -> None:
        """The corpus joined to the cache (its usable rows, sample digests, stored views) and the cache's teachers
        and synthetic captions."""
        opts = self.opts
        self.cache = CacheStore(opts.cache) if opts.cache else None
        self.corpus = Corpus.open(opts.data, on_error=opts.on_error, known=[self.cache.index()] if self.cache else [])
        self.skipped_samples = 0  # unreadable samples left out of their batches (all ranks) before this start
        self.stores = self.teacher_stores()  # teacher name -> the store seen from that teacher
        self.cache_rows = join_to_cache(self.corpus, self.cache) if self.cache else None
        self.usable = np.ones(self.corpus.num_samples, bool)
        self.lost = self.corpus.lost  # damaged shards (lost_samples.json); a cache counts their lost samples
        if self.cache is not None:
            self.usable = self.cache.load("valid")[self.cache_rows]
            self.lost, intact = self.counted_losses()
            self.usable &= intact
        self.skipped_invalid = int((~self.usable).sum())
        self.digests = None  # the store's sample digests: a sample read with other bytes is refused or skipped
        if self.cache is not None and self.cache.has("sample_crc32c"):
            self.digests = self.cache.load("sample_crc32c")
        elif self.cache is not None and self.rank == 0:
            log.warning("cache %s predates sample digests: a shard whose content changed under the same name, size "
                        "and keys goes unnoticed; rebuild the cache to get them", opts.cache)
        boxes = flips = None
        if self.cache is not None and self.cache.views and opts.augment:
            boxes, flips = self.cache.load("view_boxes"), self.cache.load("view_flips")
        self.views = ViewPolicy(opts.augment, opts.seed, boxes, flips)
        self.captions = self.caption_policy()

    def build_models(self) -> None:
        """The student (locked towers and preprocessing as the options say) and the live teachers the losses need."""
        opts = self.opts
        self.student_clip = create_student(opts, self.device)
        # teacher name -> its model config (from the store; without one, the live --teacher's)
        self.teacher_configs = ({name: store.attrs["teacher"]["config"] for name, store in self.stores.items()}
                                if self.cache else {MAIN_TEACHER: model_config(opts.teacher) if opts.teacher else None})
        classes = loss_classes(opts.losses)
        self.needs = teacher_needs_of(classes.values())
        self.optional = frozenset().union(*(cls.teacher_optional for cls in classes.values()))
        if self.needs and self.cache is None and not (opts.teacher and opts.teacher_targets == "live"):
            raise CacheError(f"--losses {opts.losses} needs teacher targets ({', '.join(sorted(self.needs))}): "
                             f"give --cache STORE (or --teacher-targets live with --teacher)")
        live_needed = self.needs and (opts.teacher_targets == "live" or bool(uncacheable(self.needs))
                                      or (opts.augment and not self.views.stored_views))
        if opts.teacher_targets == "cache" and live_needed:
            why = (f"losses need {sorted(uncacheable(self.needs))}, which a cache does not hold"
                   if uncacheable(self.needs)
                   else "--augment needs stored views, and the cache stores none (build it with --views K)")
            raise CacheError(f"--teacher-targets cache: {why}; use --teacher-targets auto to run the teacher live")
        self.teachers = self.live_teachers() if live_needed else {}

    def build_losses(self) -> None:
        """The losses and the student with its projections into each teacher's space (their learnable parts
        initialised in this order), checked to be served by every model."""
        opts = self.opts
        self.loss_set = LossSet(opts.losses, {
            name: loss_dims(self.student_clip, self.teachers.get(name), c["embed_dim"] if c else None)
            for name, c in self.teacher_configs.items()})
        sigmoid = ({name: store.teacher_logit_bias is not None for name, store in self.stores.items()} if self.cache
                   else {name: t.logit_bias is not None for name, t in self.teachers.items()})
        check_models_serve_losses(self.loss_set, self.student_clip, self.teachers, sigmoid)
        for name in (name for name, weight in self.loss_set.weights.items() if weight == 0):
            log.warning("--losses %s: %s has weight 0, so it adds nothing to the loss but is still computed (its "
                        "teacher targets read): drop it, or give it a weight", opts.losses, name)
        self.student = Student(self.student_clip, {name: c["embed_dim"] if c else None
                                                   for name, c in self.teacher_configs.items()}).to(self.device)
        self.loss_set.to(self.device)
        self.prepare_student()
        # the loss that reads the masked view says how much to mask
        mask_ratio = next((cls.mask_ratio for cls in self.loss_set.classes.values()
                           if "masked_image_emb_proj" in cls.student_needs), 0.0)
        self.model = DistillModel(self.student, self.loss_set, mask_ratio, opts.local_loss, opts.accum_freq)

    def build_targets(self) -> None:
        """One target provider per teacher: cached targets within --target-memory-gb, the live teacher otherwise."""
        opts = self.opts
        budget = (opts.target_memory_gb * 2**30 if opts.target_memory_gb is not None  # per node
                  else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
        self.targets = {name: TargetProvider(opts.teacher_targets, self.needs, self.optional, self.stores.get(name),
                                             self.teachers.get(name), grad_batches=opts.batching == "cache",
                                             memory_budget=int(budget) // len(self.teacher_configs), name=name,
                                             captions=bool(opts.synthetic_captions))
                        for name in self.teacher_configs}

    def build_optimizer(self) -> None:
        """The run's length (steps of --batch-size x --accum-freq), AdamW over the trainable parameters, the
        learning-rate schedule and the step that takes them (precision, scaler, accumulation)."""
        opts = self.opts
        self.order = BatchOrder(self.corpus, self.usable, opts.seed, opts.shuffle_buffer, opts.batch_size,
                                opts.accum_freq, self.replayed_batches())
        self.steps_per_epoch = self.order.steps_per_epoch()
        if self.steps_per_epoch == 0:
            raise ValueError(f"--batch-size {opts.batch_size} x --accum-freq {opts.accum_freq} is larger than the "
                             f"{int(self.usable.sum())} usable samples")
        self.total_steps = opts.steps or opts.epochs * self.steps_per_epoch
        self.warmup = capped_warmup(opts.warmup, self.total_steps)
        self.cooldown = cooldown_steps(opts.epochs_cooldown, opts.steps_cooldown, self.steps_per_epoch,
                                       self.total_steps, self.warmup)
        self.adamw = adamw_settings(self.student.info.image, opts.beta1, opts.beta2, opts.eps)  # beta1, beta2, eps
        # fused: the step counters stay on the device, and GradScaler's skip is decided there (no host read)
        self.optimizer = torch.optim.AdamW(param_groups([self.student, self.loss_set], opts.wd), lr=opts.lr,
                                           betas=self.adamw[:2], eps=self.adamw[2], fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(
            opts.lr_scheduler, self.warmup, self.total_steps, self.cooldown, opts.lr_cooldown_power,
            opts.lr_cooldown_end / opts.lr))
        self.precision = resolved_precision(opts.precision, self.device)
        self.optimizer_step = OptimizerStep(self.model, self.optimizer, self.scheduler, self.device, self.precision,
                                            opts.grad_clip, opts.accum_freq)

    def counted_losses(self) -> tuple[list[dict], np.ndarray]:
        """`damage_in_cache`, each damaged shard's exact loss warned about (rank 0)."""
        lost, intact = damage_in_cache(self.corpus, self.cache, self.cache_rows)
        for shard in (x for x in lost if x["samples_lost"] is not None and self.rank == 0):
            log.warning("shard %s: the cache holds %d samples of it, %d are intact before the damage: %d lost",
                        shard["shard"], shard["samples_before"] + shard["samples_lost"], shard["samples_before"],
                        shard["samples_lost"])
        return lost, intact

    def teacher_stores(self) -> dict[str, CacheStore]:
        """--teachers: the store's teachers to learn from (default its build's teacher; 'all': every one)."""
        spec = self.opts.teachers
        if self.cache is None:
            if spec:
                raise ValueError(f"--teachers {spec} picks teachers of a store: give --cache")
            return {}
        names = self.cache.teacher_names() if spec == "all" else [n.strip() for n in (spec or MAIN_TEACHER).split(",")]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError(f"--teachers {spec!r}: give distinct teacher names separated by commas, or 'all'")
        return {name: self.cache if name == MAIN_TEACHER else self.cache.teacher(name) for name in names}

    def caption_policy(self) -> CaptionPolicy:
        p = self.opts.synthetic_captions
        if not p:
            return CaptionPolicy(0.0, self.opts.seed)
        if self.cache is None or not self.cache.has(CAPTIONS) or not self.cache.group[CAPTIONS].attrs.get("complete"):
            raise CacheError(f"--synthetic-captions {p}: the cache {self.opts.cache} holds no finished synthetic "
                             f"captions: make them with `kd-cache captions`")
        current = self.cache.group[CAPTIONS].attrs["content_hash"]
        for name, store in self.stores.items():
            if store.teacher_group.attrs.get("captions") != current:
                raise CacheError(f"--synthetic-captions: teacher {name} of {self.opts.cache} has not embedded the "
                                 f"current captions: re-run `kd-cache captions` (it embeds them with every teacher)")
        return CaptionPolicy(p, self.opts.seed, self.cache.group[f"{CAPTIONS}/text"], self.opts.cache)

    def live_teachers(self) -> dict[str, LoadedCLIP]:
        """The live fallback: every teacher the run learns from, each checked against its provenance."""
        if self.cache is None:
            teachers = {MAIN_TEACHER: create_clip(self.opts.teacher, self.opts.teacher_pretrained, self.device)}
        else:
            weights = named_weights(self.opts.teacher_pretrained, next(iter(self.stores)))
            unknown = set(weights) - set(self.stores)
            if unknown:
                raise ValueError(f"--teacher-pretrained names {sorted(unknown)}, not among --teachers "
                                 f"({', '.join(self.stores)})")
            teachers = {name: clip_from_provenance(store.attrs["teacher"], weights.get(name), self.device)
                        for name, store in self.stores.items()}
        return teachers

    def validation_and_history(self) -> tuple[Validation | None, CheckpointHistory | None]:
        """--val-data / --zeroshot-data (splits opened now: a wrong one stops the run before training) and --keep /
        --keep-best (a METRIC the validation does not produce is refused)."""
        opts = self.opts
        self.validated: Validated | None = None  # the latest evaluation of the student (rank 0)
        validation = None
        if opts.val_data or opts.zeroshot_data:
            from stage2_student.validation import Validation  # evaluation's FAISS: imported by a run that evaluates

            validation = Validation(opts.val_data, opts.zeroshot_data, max(1, opts.batch_size // self.world),
                                    opts.batch_size, opts.workers, opts.on_error)
        if opts.keep_best and opts.keep_best not in validation.metric_names():
            raise ValueError(f"--keep-best {opts.keep_best}: the validation gives {', '.join(validation.metric_names())}")
        history = CheckpointHistory(self.out, opts.keep, opts.keep_best) if opts.keep or opts.keep_best else None
        return validation, history

    def claim_out(self) -> None:
        """Rank 0 locks --out (an object-store --out: its lease, then the local staging copy, pulled from it) and
        checks it may write there; every rank learns the verdict (no rank is left waiting in a collective for one
        that refused) and whether the run resumes (--resume auto)."""
        refusal, resuming = None, False
        if self.rank == 0:
            try:
                if self.remote:
                    self.lock.enter_context(self.remote.lease())
                self.lock.enter_context(output_lock(str(self.out)))
                if self.remote:
                    self.remote.pull()
                resuming = prepare_out(self.out, self.opts.resume, self.opts.overwrite, self.opts.out)
                if self.remote:
                    self.remote.push()  # what --overwrite removed goes from the object store too
            except (ValueError, RuntimeError, OSError) as e:
                self.lock.close()
                refusal = e
        refusal, resuming = dist.broadcast_object((refusal, resuming))
        if refusal is not None:
            raise refusal
        self.resume_auto, self.opts.resume = self.opts.resume == "auto", resuming  # --resume auto, resolved
        if self.remote and resuming and self.rank != 0 and os.environ.get("LOCAL_RANK", "0") == "0":
            self.remote.download("resume.pt")  # the other nodes' ranks read it from their own staging copy
        dist.barrier()

    # ---------------------------------------------------------------- models
    def prepare_student(self) -> None:
        """--grad-checkpointing and --torchcompile on the student's towers (open_clip's own switches)."""
        clip = self.student.clip
        if "attentions" in self.loss_set.student_needs:
            keep_attention_weights(clip)  # before compiling: a recompute must take the forward's attention path
        if self.opts.grad_checkpointing:
            missing = set_grad_checkpointing(clip)
            if missing and self.rank == 0:
                log.warning("--grad-checkpointing: the %s tower of %s has no activation checkpointing in open_clip: "
                            "it runs as without", " and ".join(missing), self.student_clip.name)
        if self.opts.torchcompile:
            compile_towers(clip)

    # ---------------------------------------------------------------- data
    def replayed_batches(self) -> np.ndarray | None:
        """--batching cache: the build's gradient batches as corpus rows (those whose every row is usable), else
        None."""
        if self.opts.batching != "cache":
            return None
        if self.cache is None:
            raise ValueError("--batching cache replays a cache's gradient batches: give --cache")
        grad_batches = self.cache.load("grad_batches")
        step_rows = self.opts.batch_size * self.opts.accum_freq
        if grad_batches.shape[1] != step_rows:
            raise ValueError(f"--batching cache: --batch-size x --accum-freq must equal the cache's --grad-batch "
                             f"({grad_batches.shape[1]}), got {self.opts.batch_size} x {self.opts.accum_freq}")
        corpus_row = np.full(self.cache.num_rows + 1, -1, dtype=np.int64)  # cache row -> corpus row; -1 -> -1
        corpus_row[self.cache_rows] = np.where(self.usable, np.arange(len(self.cache_rows)), -1)
        mapped = corpus_row[grad_batches]
        return mapped[(mapped >= 0).all(axis=1)]

    def loader(self, epoch: int, start_step: int) -> DataLoader:
        """Micro-batches from step `start_step` of `epoch` to the run's last step: one DataLoader for the run."""
        dataset = TrainBatches(self.corpus, self.order, self.cache_rows, self.rank, self.world,
                               Renderer.of(self.student_clip), {n: Renderer.of(t) for n, t in self.teachers.items()},
                               self.views, self.opts.on_error, self.captions, self.digests, self.opts.cache or "",
                               self.targets, grad_batches=self.opts.batching == "cache")
        a = self.opts.accum_freq
        sampler = MicroBatchSampler(epoch, start_step * a, self.steps_per_epoch * a, self.total_steps * a)
        # its own generator: creating the iterator must not draw from the global RNG (resume reproducibility)
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=self.opts.workers,
                          pin_memory=self.device.startswith("cuda"), persistent_workers=self.opts.workers > 0,
                          generator=torch.Generator().manual_seed(self.opts.seed + epoch),
                          worker_init_fn=dist.worker_dies_with_parent())

    def micro_batch(self, batch: dict) -> MicroBatch:
        """A loader item on the device, with its teachers' targets. Under --on-error skip the ranks first learn
        which samples the others left out (host memory, one small collective), so that every rank keeps the
        same rows of the cached targets."""
        sizes, cached = batch["planned"], batch["cached"]
        self.skipped_here += len(batch["skipped"])
        for skipped in batch["skipped"]:
            log.warning("step %d: skipped an unreadable sample (--on-error skip): %s", self.step + 1, skipped)
        if self.opts.on_error == "skip":
            kept = np.concatenate(dist.all_gather_objects(batch["kept"].numpy(), host=True))
            sizes = tuple(int(part.sum()) for part in np.split(kept, np.cumsum(sizes)[:-1]))
            if not kept.all():  # the build's gradients are those of the whole batch: GD recomputes them
                mask = torch.from_numpy(kept)
                cached = {name: {field: value[mask] for field, value in targets.items() if not field.endswith("_grad")}
                          for name, targets in cached.items()}
        teachers = {name: provider.targets(cached.get(name), batch["teacher_inputs"].get(name), self.device, sizes)
                    for name, provider in self.targets.items()}
        return MicroBatch(batch["student_images"].to(self.device, non_blocking=True),
                          batch["student_tokens"].to(self.device, non_blocking=True), teachers, tuple(sizes))

    def teacher_targets(self, batch: dict, name: str = MAIN_TEACHER):
        """One teacher's targets for a loader item, on the device (tests, benchmarks)."""
        return self.micro_batch(batch).teachers[name]

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one loader item as a whole batch, and its terms as numbers (tests, benchmarks: host reads)."""
        with self.optimizer_step.autocast():
            loss, terms = self.model(self.micro_batch(batch))
        return loss, {name: float(value) for name, value in terms.items()}

    # ---------------------------------------------------------------- one step
    def train_step(self, micro_batches: list[MicroBatch], log_step: bool = True) -> None:
        """One optimizer step from --accum-freq micro-batches (nothing read back: see `read_step`)."""
        self.student.train()
        self.optimizer_step(micro_batches, self.step + 1, log_step)

    def read_step(self) -> dict:
        """The last step's loss terms and gradient norm (a host read: log steps only); stops on a non-finite loss or
        gradient since the last read, naming the first such step."""
        terms, first_bad, amp_skipped = self.optimizer_step.read()
        if first_bad:
            losses = {name: value for name, value in terms.items() if name != "grad_norm"}
            bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
            self.stop_non_finite(first_bad, (f"loss term(s) {bad}" if bad else f"gradient norm {terms.get('grad_norm')} "
                                                                             f"(loss terms {losses})")
                                 if first_bad == self.step else
                                 f"loss or gradient (read at step {self.step}, whose terms are {terms})")
        return terms | ({"amp_skipped_steps": amp_skipped} if self.precision == "amp" else {})

    def stop_non_finite(self, step: int, what: str) -> None:
        raise NonFiniteError(f"step {step}: non-finite {what}; stopped without saving ({self.out} keeps "
                             f"step {self.saved_step}): lower --lr, set --grad-clip, or check --init and the data")

    def skipped_total(self) -> int:
        """Unreadable samples left out so far, over all ranks (a collective: log steps, saves and the end)."""
        return self.skipped_samples + sum(dist.all_gather_objects(self.skipped_here, host=True))

    # ---------------------------------------------------------------- checkpoints
    def save(self, epoch: int, step_in_epoch: int) -> None:
        if self.saved_step == self.step:
            return
        self.read_step()  # stops on a non-finite step since the last log: nothing non-finite is ever saved
        self.optimizer_step.sync_buffers()
        state = self.student.clip.state_dict()
        non_finite = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if non_finite:  # checked on every rank (their weights are equal), so that all stop
            self.stop_non_finite(self.step, f"student weights after the update ({', '.join(non_finite[:3])}, ...)")
        self.saved_step = self.step
        rng = dist.all_gather_objects(rng_state())  # every rank's streams (per-sample randomness differs by rank)
        skipped = self.skipped_total()
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_weights(state, self.out / WEIGHTS_FILE)
        resume = {
            "step": self.step, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "student": self.student.state_dict(), "losses": self.loss_set.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.optimizer_step.scaler.state_dict() if self.optimizer_step.scaler else None,
            "rng": rng, "options": json.dumps(self.resume_options()),
            "target_counts": {name: [p.cache_hits, p.live_batches] for name, p in self.targets.items()},
            "skipped_samples": skipped,
        }
        atomic_write(self.out / "resume.pt", lambda tmp: torch.save(resume, tmp))
        if (self.out / LEGACY_RUN_WEIGHTS).exists():
            log.info("removed %s: the run folder is now an open_clip hub folder (%s)", self.out / LEGACY_RUN_WEIGHTS,
                     WEIGHTS_FILE)
            (self.out / LEGACY_RUN_WEIGHTS).unlink()
        self.after_save(self.write_provenance(state))

    def after_save(self, fingerprint: str) -> None:
        """Rank 0, once the step's weights and resume.pt are written: its step folder (--keep), its validation
        results on the card (when it was evaluated at this step), the card, and the upload of an object-store --out."""
        validated = self.validated if self.validated is not None and self.validated.step == self.step else None
        if self.history is not None:
            self.history.add(self.step, validated.record if validated else {})
        for result in validated.results if validated else []:
            record_eval(self.out, result, fingerprint)
        write_model_card(self.out)
        if self.remote:
            self.remote.push()

    def validate_if_due(self, step_in_epoch: int, reporters: Reporters) -> None:
        """--val-data / --zeroshot-data at every step that is saved (--save-every, an epoch's end, the last step)
        and every --val-every steps: on rank 0, the other ranks waiting; logged to metrics.jsonl and the reporters
        as val/..., and kept for the card (`after_save`)."""
        if self.validation is None:
            return
        saved = (self.step % self.opts.save_every == 0 or step_in_epoch == self.steps_per_epoch
                 or self.step == self.total_steps)
        if not (saved or (self.opts.val_every and self.step % self.opts.val_every == 0)):
            return
        if self.rank == 0:
            self.validated = self.validation(self.student_clip, self.step, self.student_clip.name)
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(self.validated.record) + "\n")
            reporters.log(self.validated.record)
            log.info("step %d: %s", self.step, ", ".join(f"{k} {v:.4f}" for k, v in self.validated.record.items()
                                                         if k != "step"))
        dist.barrier()

    def write_provenance(self, state: dict) -> str:
        """provenance.json (what the model card shows): the student as saved, its teachers, store and data."""
        teachers = ({name: store.attrs["teacher"] for name, store in self.stores.items()} if self.cache
                    else {name: t.provenance() for name, t in self.teachers.items()})
        fingerprint = weights_fingerprint(self.student.clip)
        provenance = {
            "name": self.run_name,
            "student": {"model": self.student_clip.name, "init": self.opts.init, "step": self.step,
                        "parameters": sum(t.numel() for t in state.values()),
                        "preprocess": self.student_clip.preprocess_cfg, "fingerprint": fingerprint},
            "teachers": {name: {k: t.get(k) for k in ("model", "pretrained", "fingerprint", "open_clip_version")}
                         for name, t in teachers.items()},
            "store": {"url": self.opts.cache, "content_hash": self.cache.attrs["content_hash"],
                      "rows": self.cache.num_rows} if self.cache else None,
            "data": {"spec": self.opts.data, "shards": len(self.corpus.index.urls),
                     "samples": self.corpus.num_samples},
            "total_steps": self.total_steps,
        }
        (self.out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        return fingerprint

    @property
    def run_name(self) -> str:
        """The --out folder's name (an object-store URL's last part, not its staging copy's)."""
        return basename(self.remote.url) if self.remote else self.out.resolve().name

    def adamw_options(self) -> dict:
        """--beta1, --beta2, --eps as this run resolved them (given, or its student's defaults)."""
        return dict(zip(("beta1", "beta2", "eps"), self.adamw))

    def resume_options(self) -> dict:
        """What must not change across --resume: every option that shapes the run's numbers (the others, in
        RESUMABLE_CHANGES, may change and are recorded in options.json from the step they applied), in JSON's
        types (an --image-mean tuple as the list it is stored as)."""
        options = {k: getattr(self.opts, k) for k in TRAJECTORY_OPTIONS} | self.adamw_options() | {
            "precision": self.precision, "world": self.world,
            "teacher_weights": {name: t.fingerprint for name, t in self.teachers.items()}}
        return json.loads(json.dumps(options))

    def load_resume(self) -> tuple[int, int]:
        path = self.out / "resume.pt"
        state = upgrade_single_teacher_resume(torch.load(path, map_location="cpu", weights_only=True),
                                              self.loss_set.per_teacher_losses)
        stored, current = json.loads(state["options"]), self.resume_options()
        # a resume.pt written before an option existed ran as its default does, AdamW as its optimizer state says
        # (the precision is compared as resolved: not known from its default)
        adamw = state["optimizer"]["param_groups"][0]
        stored = {f.name: f.default for f in fields(TrainOptions) if f.name in TRAJECTORY_OPTIONS and
                  f.default is not MISSING and f.name != "precision"} | {
            "beta1": adamw["betas"][0], "beta2": adamw["betas"][1], "eps": adamw["eps"]} | stored
        unrecorded = [k for k in current if k not in stored]  # derived values written before they were compared
        if unrecorded:
            log.warning("--resume: %s does not record %s (written before they were compared): assuming they did "
                        "not change", path, ", ".join(option_name(k) for k in unrecorded))
        diff = [f"{option_name(k)} {stored[k]} -> {v}" for k, v in current.items() if k in stored and stored[k] != v]
        if diff:
            raise ValueError(f"--resume: {path} was written with other options ({'; '.join(diff)}): give the "
                             f"original ones, or start a new run in another --out")
        self.student.load_state_dict(state["student"])
        self.loss_set.load_state_dict(state["losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.optimizer_step.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]  # every rank's, or (written before per-rank streams) one for all
        set_rng_state(rng[self.rank] if isinstance(rng, list) else rng)
        for name, provider in self.targets.items():  # counters continue
            provider.cache_hits, provider.live_batches = state["target_counts"][name]
        self.skipped_samples = state["skipped_samples"]
        self.step = self.saved_step = state["step"]
        if self.rank == 0:
            CheckpointHistory(self.out, self.opts.keep, self.opts.keep_best).forget_after(self.step)
        return state["epoch"], state["step_in_epoch"]

    # ---------------------------------------------------------------- loop
    def run(self) -> dict:
        with self.lock, StopSignals() as signals:
            started, first_step = time.perf_counter(), self.step
            last = self.loop(signals)
            seconds = time.perf_counter() - started
            samples = (self.step - first_step) * self.opts.batch_size * self.opts.accum_freq
            skipped = self.skipped_total()
            loss = f", loss {last['loss']:.4f}" if "loss" in last else ""  # no step left: a finished run resumed
            damage = (f"; {len(self.lost)} damaged shard(s) lost {self.lost_count()} after the damage, "
                      f"{skipped} unreadable sample(s) skipped (lost_samples.json)" if self.lost else "")
            where = (f"{self.opts.out} (staged in {self.out}, an open_clip hub folder: local-dir:{self.out})"
                     if self.remote else f"{self.out} (an open_clip hub folder: local-dir:{self.out})")
            self.summary = (f"kd-train: wrote {where}: step "
                            f"{self.step} of {self.total_steps}{loss}; steps {first_step + 1}-{self.step}, {samples} "
                            f"samples in {seconds:.1f} s "
                            f"({samples / seconds if seconds else 0.0:.1f} samples/s){damage}; metrics.jsonl holds "
                            f"every logged step")
        return last

    def lost_count(self) -> str:
        """'31 samples' where the cache counted every damaged shard's loss, else 'their samples' (unknown)."""
        counts = [x.get("samples_lost") for x in self.lost]
        return "their samples" if None in counts else f"{sum(counts)} samples"

    def start_files(self) -> Path:
        """metrics.jsonl (without steps a resumed run redoes), options.json, and the student's open_clip config
        and tokenizer (the hub folder's files that do not change while it trains)."""
        metrics_path = self.out / "metrics.jsonl"
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            kept = [line for line in (metrics_path.read_text().splitlines() if self.opts.resume and
                                      metrics_path.exists() else []) if json.loads(line)["step"] <= self.step]
            metrics_path.write_text("".join(line + "\n" for line in kept))  # drop steps redone after a crash
            (self.out / "options.json").write_text(json.dumps(self.recorded_options(), indent=2))
            save_config(self.student.clip, self.student_clip.config, self.out)
            save_tokenizer(self.student_clip.tokenizer, self.out)
            lost_path = self.out / "lost_samples.json"
            if self.lost:
                lost_path.write_text(json.dumps(self.lost, indent=2))
            else:
                lost_path.unlink(missing_ok=True)
        return metrics_path

    def recorded_options(self) -> dict:
        """options.json: the options the run started with; a --resume that changes one of RESUMABLE_CHANGES
        appends {"from_step": N, option: value} to its "changes"."""
        options = asdict(self.opts) | self.adamw_options() | {"warmup_steps": self.warmup,
                                                              "cooldown_steps": self.cooldown}
        path = self.out / "options.json"
        if not (self.opts.resume and path.is_file()):
            return options | {"run_id": uuid.uuid4().hex[:12]}  # names the run for W&B across its resumes
        recorded = json.loads(path.read_text())
        recorded.setdefault("run_id", uuid.uuid4().hex[:12])  # a run started before it was recorded
        in_effect = recorded.copy()
        for change in recorded.get("changes", []):
            in_effect.update(change)
        changed = {k: options[k] for k in RESUMABLE_CHANGES if in_effect.get(k) != options[k]}
        if changed:
            recorded["changes"] = [*recorded.get("changes", []), {"from_step": self.step + 1, **changed}]
        return recorded

    def reporters(self):
        """--report-to's reporters, on rank 0 (the others report nothing)."""
        names = parse_report_to(self.opts.report_to) if self.rank == 0 else ()
        options = json.loads((self.out / "options.json").read_text()) if names else {"run_id": None}
        return Reporters(names, self.out, self.opts.name or self.run_name, self.opts.wandb_project_name,
                         options["run_id"], options, self.step)

    def loop(self, signals: StopSignals) -> dict:
        epoch, start = self.load_resume() if self.opts.resume else (0, 0)
        metrics_path = self.start_files()
        log.info("%d steps (global batch %d%s, warm-up %d), %d invalid cache rows skipped, cache targets: %.1f MB %s",
                 self.total_steps, self.opts.batch_size * self.opts.accum_freq,
                 f" = {self.opts.accum_freq} x {self.opts.batch_size}" if self.opts.accum_freq > 1 else "",
                 self.warmup, self.skipped_invalid,
                 sum(p.memory_bytes for p in self.targets.values()) / 2**20,
                 "of chunks read on demand (over --target-memory-gb)" if any(p.chunked for p in self.targets.values())
                 else f"memory-mapped from this node's copy in {cache_dir() / 'targets'}"
                 if any(p.node_local for p in self.targets.values()) else "in memory")
        last: dict = {}
        window_start, window_samples = time.perf_counter(), 0
        step_samples = self.opts.batch_size * self.opts.accum_freq
        # closed on an error too, so that the error starts on its own line
        with tqdm(total=self.total_steps, initial=self.step, unit="step", disable=self.rank != 0,
                  dynamic_ncols=True) as bar, self.reporters() as reporters:
            items = iter(self.loader(epoch, start))
            while self.step < self.total_steps:
                micro_batches = [self.micro_batch(next(items)) for _ in range(self.opts.accum_freq)]
                if dist.is_distributed() and self.optimizer_step.wrapped is self.model:  # the first step
                    self.distribute(micro_batches)
                log_step = self.step + 1 in (1, self.total_steps) or (self.step + 1) % self.opts.log_every == 0
                self.train_step(micro_batches, log_step)
                self.step += 1
                start += 1
                window_samples += step_samples
                bar.update(1)
                if log_step:
                    terms = self.read_step()
                    elapsed = time.perf_counter() - window_start
                    hits = sum(p.cache_hits for p in self.targets.values())
                    live = sum(p.live_batches for p in self.targets.values())
                    last = {"step": self.step, "epoch": epoch, "lr": self.scheduler.get_last_lr()[0], **terms,
                            "samples_per_s": window_samples / elapsed if elapsed else None,
                            "cache_hits": hits, "live_batches": live, "skipped_samples": self.skipped_total(),
                            "damaged_shards": len(self.corpus.lost),
                            "cache_hit_rate": hits / (hits + live) if hits + live else None}
                    window_start, window_samples = time.perf_counter(), 0
                    bar.set_postfix(loss=f"{terms['loss']:.4f}")
                    if self.rank == 0:
                        with metrics_path.open("a") as f:
                            f.write(json.dumps(last) + "\n")
                        reporters.log(last)
                self.validate_if_due(start, reporters)
                if start == self.steps_per_epoch:
                    epoch, start = epoch + 1, 0
                    self.save(epoch, start)
                if self.step % self.opts.save_every == 0:
                    self.save(epoch, start)
                if dist.any_rank(signals.received is not None):
                    self.stop_on_signal(signals.received or signal.SIGTERM, epoch, start)
        self.save(epoch, start)
        dist.barrier()
        return last

    def distribute(self, micro_batches: list[MicroBatch]) -> None:
        """Under torchrun: wrap the model in DDP (see `OptimizerStep.distribute`)."""
        frozen = self.optimizer_step.distribute(micro_batches)
        if frozen and self.rank == 0:
            log.info("%d parameter(s) that no chosen loss reaches get no gradient and stay as they are: %s%s",
                     len(frozen), ", ".join(frozen[:4]), ", ..." if len(frozen) > 4 else "")

    def stop_on_signal(self, signum: int, epoch: int, start: int) -> None:
        self.save(epoch, start)
        dist.barrier()
        again = "run the same command again" if self.resume_auto else "continue with the same command plus --resume"
        raise Interrupted(f"Stopped by {signal.Signals(signum).name} after step {self.step}: saved "
                          f"{join(self.opts.out, 'resume.pt') if self.remote else self.out / 'resume.pt'}; {again}",
                          signum)


def train(opts: TrainOptions) -> str:
    """Run kd-train; the run's one-line summary (its numbers are in metrics.jsonl)."""
    trainer = Trainer(opts)
    trainer.run()
    return trainer.summary

