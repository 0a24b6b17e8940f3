"""Several kd-train runs in one multi-process launch (torchrun, or srun-style SLURM variables), one after the other,
so that a test pays the interpreters' start-up once. Each run's every-rank state (student, losses, buffers) is
gathered and written by rank 0 to <out>/ranks.pt: {"params": [per rank], "buffers": [per rank]}.

    python tests/rank_runs.py RUNS.json      # RUNS.json: a list of TrainOptions keyword dicts
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import dist  # noqa: E402
from stage2_student.train import Trainer, TrainOptions  # noqa: E402


def main() -> None:
    for kwargs in json.loads(Path(sys.argv[1]).read_text()):
        trainer = Trainer(TrainOptions(**kwargs))
        trainer.run()
        model = trainer.model
        state = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                 "buffers": {n: b.detach().clone() for n, b in model.named_buffers()}}
        states = dist.all_gather_objects(state)
        if trainer.rank == 0:
            torch.save({key: [s[key] for s in states] for key in state}, Path(kwargs["out"]) / "ranks.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
