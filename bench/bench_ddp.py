"""Stage two as a multi-rank trainer: host reads per step, and the 2-rank gloo step time, of this tree and of
another checkout (--compare DIR, e.g. a `git worktree` of an older commit), interleaved.

1. host reads: in one process, a cached CLIP-KD `Trainer(...).run()` of --steps steps and of 2 steps, each logging
   only its first and last step, counting the Tensor methods that read a value back to the host (item, tolist,
   cpu, numpy, __bool__, __int__, __float__, __index__, __array__; on a GPU each waits for the stream). (reads of
   the long run - reads of the short one) / (--steps - 2) = reads per step that is not logged.
2. step time: `torchrun --nproc_per_node 2 -m stage2_student.cli` (gloo, 1 thread per rank), --steps steps
   logged every --steps // 2: the samples/s of the second half (steady state), --repeats rounds, trees
   alternating within each round.

Both run the trees' own code through the CLI / `Trainer` they share, on one corpus and store built here.

    python bench/bench_ddp.py --compare /tmp/old-checkout --steps 20 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C  # noqa: N812 - also puts the repo on sys.path
from stage1_teacher.build import BuildOptions, build_cache

KD_LOSSES = "task,fd,icl,crd"
TINY = {"student": "kd-test-student", "teacher": "kd-test-teacher", "batch_size": 16, "samples": 96,
        "image_size": 32, "steps": 4, "repeats": 1}
# run in the tree under test (its own Trainer), printing the count as JSON
COUNT_READS = r'''
import json, sys, torch
from stage2_student.train import Trainer, TrainOptions
methods = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__")
calls = []
def wrap(name, original):
    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)
    return counted
options = json.loads(sys.argv[1])
trainer = Trainer(TrainOptions(**options))
for name in methods:
    setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
trainer.run()
print(json.dumps({"reads": len(calls), "by_method": {m: calls.count(m) for m in methods if m in calls}}))
'''


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", metavar="DIR", help="another checkout of this repository, measured alike")
    p.add_argument("--student", default="kd-demo-student")
    p.add_argument("--teacher", default="kd-demo-teacher")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (both ranks)")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the 2-rank runs")
    C.add_common_args(p)
    return C.parse_args(p, TINY)


def train_options(args, data: Path, store: Path, out: Path, steps: int) -> dict:
    return dict(data=str(data), cache=str(store), out=str(out), student=args.student, losses=KD_LOSSES,
                batch_size=args.batch_size, steps=steps, warmup=1, workers=1, log_every=steps,
                save_every=10**6, device=args.device)


def host_reads(tree: Path, args, data: Path, store: Path, tmp: Path) -> dict:
    """Reads per non-logged step of `tree`'s trainer (see the module docstring)."""
    counts = {}
    for steps in (args.steps, 2):
        opts = train_options(args, data, store, tmp / f"reads-{tree.name}-{steps}", steps)
        result = subprocess.run([sys.executable, "-c", COUNT_READS, json.dumps(opts)], cwd=tree, text=True,
                                capture_output=True, env={**os.environ, "PYTHONPATH": str(tree)})
        if result.returncode:
            raise RuntimeError(f"counting host reads in {tree} failed:\n{result.stderr[-3000:]}")
        counts[steps] = json.loads(result.stdout.strip().splitlines()[-1])
    per_step = (counts[args.steps]["reads"] - counts[2]["reads"]) / (args.steps - 2)
    return {"per_step": per_step, "runs": counts}


def two_rank_samples_per_s(tree: Path, args, data: Path, store: Path, out: Path) -> float:
    opts = train_options(args, data, store, out, args.steps) | {"log_every": max(1, args.steps // 2)}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", "stage2_student.cli", *flags], cwd=tree, text=True, capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise RuntimeError(f"2-rank kd-train in {tree} failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["samples_per_s"]


def main() -> None:
    args = parse_args()
    if args.steps < 3:
        raise SystemExit("--steps must be >= 3: the host reads are counted on the steps between the logged ones")
    results = C.start("stage two on two ranks: host reads per step and step time", args)
    trees = {"this tree": C.REPO} | ({"--compare": Path(args.compare).resolve()} if args.compare else {})
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        tmp = Path(tmp)
        data = C.make_corpus(tmp / "corpus", args.samples, args.image_size)
        with C.quiet_stderr():
            build_cache(BuildOptions(teacher=args.teacher, data=str(data), out=str(tmp / "store.zarr"),
                                     batch_size=args.batch_size, device=args.device, workers=0))
        reads = {name: host_reads(tree, args, data, tmp / "store.zarr", tmp) for name, tree in trees.items()}
        rates = {name: [] for name in trees}
        for r in range(args.repeats):
            for name, tree in trees.items():
                out = tmp / f"run-{r}-{tree.name}"
                rates[name].append(two_rank_samples_per_s(tree, args, data, tmp / "store.zarr", out))
    C.print_table(["tree", "host reads / step", "2-rank samples/s (median)", "rounds"],
                  [[name, reads[name]["per_step"], C.median(rates[name]), " ".join(f"{x:.1f}" for x in rates[name])]
                   for name in trees],
                  f"{args.student} from a {args.teacher} store, {KD_LOSSES}, global batch {args.batch_size}, "
                  f"{args.steps} steps")
    results.update({"config": vars(args) | {"trees": {k: str(v) for k, v in trees.items()}}, "host_reads": reads,
                    "two_rank_samples_per_s": rates})
    C.write_json(args.json, results)


if __name__ == "__main__":
    main()
