"""Gradients at two bytes: the stored fp16 (scaled) teacher gradients against exact fp32 ones, and GD training with
each (same student init, same batches: the build's gradient batches, `--batching cache`).

    python bench/bench_grad_precision.py --steps 40 --json bench/results/grad_precision.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import _common as C  # noqa: N812 - also puts the repo on sys.path
from common.cache import CacheStore, dequantize
from common.contrastive import clip_loss_grads
from common.synth import generate_corpus
from stage1_teacher.build import BuildOptions, build_cache
from stage2_student.train import Trainer, TrainOptions
from tests.helpers import save_random_checkpoint

GRAD_BATCH = 64
# --tiny: 4 gradient batches, 4 steps
TINY = {"samples": 4 * GRAD_BATCH, "steps": 4}


class RecomputedGradients:
    """A target provider that recomputes GD's teacher gradients in fp32 from the cached embeddings on every batch."""

    def __init__(self, provider):
        self.provider = provider

    def __call__(self, batch, is_cached_grad_batch):
        return self.provider(batch, False)

    def __getattr__(self, name):
        return getattr(self.provider, name)


class ExactGradientTrainer(Trainer):
    """The same run, with exact instead of stored gradients."""

    def __init__(self, opts):
        super().__init__(opts)
        self.targets = {name: RecomputedGradients(p) for name, p in self.targets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--samples", type=int, default=1024, help=f"corpus size (gradient batches of {GRAD_BATCH})")
    C.add_common_args(parser)
    parser.set_defaults(threads=1)
    args = C.parse_args(parser, TINY)
    header = C.start("fp16 stored gradients vs exact fp32 ones, and GD training with each", args)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_corpus(root / "corpus", {"train": args.samples}, shard_size={"train": 256}, seed=0, image_size=32)
        ckpt = save_random_checkpoint("kd-test-teacher", root / "t.pt", seed=0)
        store = root / "s.zarr"
        build_cache(BuildOptions(teacher="kd-test-teacher", pretrained=str(ckpt), data=str(root / "corpus/train"),
                                 out=str(store), batch_size=128, grad_batch=GRAD_BATCH, workers=0,
                                 device=args.device))
        # 1. per-entry error of the stored gradients, over every gradient batch
        cache = CacheStore(str(store))
        batches = cache.load("grad_batches")
        image, text = dequantize(cache.load("image_emb")), dequantize(cache.load("text_emb"))
        stored = cache.to_float("image_grad", cache.load("image_grad"))
        errors = []
        for batch in batches[(batches >= 0).any(axis=1)]:
            idx = batch[batch >= 0]
            exact, _ = clip_loss_grads(torch.from_numpy(image[idx]), torch.from_numpy(text[idx]),
                                       cache.teacher_logit_scale)
            errors.append(float((torch.from_numpy(stored[idx]) - exact).abs().max() / exact.abs().max()))
        # 2. GD training with stored vs exact gradients
        runs = {}
        for name, cls in (("stored_fp16", Trainer), ("exact_fp32", ExactGradientTrainer)):
            opts = TrainOptions(data=str(root / "corpus/train"), out=str(root / name), student="kd-test-student",
                                cache=str(store), losses="task,gd", batching="cache", batch_size=GRAD_BATCH,
                                steps=args.steps, warmup=5, workers=0, log_every=1, seed=0, device=args.device)
            cls(opts).run()
            runs[name] = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        gd = {name: np.array([m["gd"] for m in metrics]) for name, metrics in runs.items()}
        rel = np.abs(gd["stored_fp16"] - gd["exact_fp32"]) / np.abs(gd["exact_fp32"])
    result = {**header, "grad_max_rel_error_per_batch": {"max": max(errors),
                                                                           "median": float(np.median(errors))},
              "gd_loss_first_last": {k: [float(v[0]), float(v[-1])] for k, v in gd.items()},
              "gd_loss_max_rel_diff_over_run": float(rel.max()), "steps": args.steps}
    print(json.dumps({k: v for k, v in result.items() if k not in header}, indent=1))
    C.write_json(args.json, result)


if __name__ == "__main__":
    main()
