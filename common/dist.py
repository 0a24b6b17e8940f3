"""torchrun integration: one process per rank, gloo on CPU, nccl on GPU. A plain `python` run is rank 0 of 1.
Also the processes' DataLoader workers, which die with the process that started them."""
from __future__ import annotations

import ctypes
import datetime
import functools
import os
import signal

import numpy as np
import torch
import torch.distributed as dist


def _launcher_env() -> dict[str, str]:
    """torchrun's variables, or SLURM's when `srun` started the processes without torchrun (as open_clip_train reads
    them: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS; MASTER_ADDR / MASTER_PORT come from the job script)."""
    if "WORLD_SIZE" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", 1)) < 2:
        return {}
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ValueError(f"SLURM started {os.environ['SLURM_NTASKS']} tasks but MASTER_ADDR / MASTER_PORT are not "
                           f"set: export them in the job script before srun (e.g. MASTER_ADDR=$(scontrol show "
                           f"hostnames $SLURM_JOB_NODELIST | head -n1) MASTER_PORT=29500), or launch with torchrun")
    return {"RANK": os.environ["SLURM_PROCID"], "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
            "WORLD_SIZE": os.environ["SLURM_NTASKS"],
            "LOCAL_WORLD_SIZE": os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]}


def init_distributed(device: str) -> tuple[int, int]:
    """Join the process group when launched by torchrun or srun; return (rank, world_size). A CUDA rank is bound to
    its local GPU first (`torch.cuda.set_device`), so that NCCL and every `cuda` tensor use that GPU, not cuda:0."""
    os.environ.update(_launcher_env())
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(local_device(device)))
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        # No phase keeps the other ranks waiting long (index scans, windows and gradients are spread over ranks);
        # the timeout is explicit so that one slow start on object storage does not trip NCCL's 10-minute default.
        timeout = datetime.timedelta(seconds=float(os.environ.get("KD_DIST_TIMEOUT_S", 3600)))
        dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def local_device(device: str) -> str:
    """'cuda' under torchrun or srun means this rank's GPU."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj, host: bool = False) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] when not distributed. `host`: over the gloo group of `any_rank`,
    so that it never waits for a GPU stream (nccl's object collectives go through device tensors)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=host_group() if host else None)
    return out


class _GatherCat(torch.autograd.Function):
    """all_gather + cat whose backward sums every rank's gradient of the gathered tensor and returns this rank's
    slice (what torch.distributed.nn's deprecated all_gather did), with public collectives that gloo supports.
    `sizes`: every rank's number of rows. Known (the planned batch split), the gather is one collective with no host
    read; None (a batch that lost an unreadable sample), the sizes are exchanged first (a host read) and the parts
    padded to the largest for the collective and cut back."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: tuple[int, ...] | None) -> torch.Tensor:
        if sizes is None:
            found = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
            dist.all_gather(found, torch.tensor([tensor.shape[0]], device=tensor.device))
            sizes = tuple(int(n) for n in found)
        ctx.rank, ctx.sizes = dist.get_rank(), sizes
        if len(set(sizes)) == 1:
            out = torch.empty((sizes[0] * len(sizes),) + tuple(tensor.shape[1:]), dtype=tensor.dtype,
                              device=tensor.device)
            dist.all_gather_into_tensor(out, tensor.contiguous())
            return out
        padded = torch.zeros((max(sizes),) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def gather_cat(tensor: torch.Tensor, sizes: tuple[int, ...] | None = None) -> torch.Tensor:
    """Concatenate a tensor across ranks along dim 0, keeping the autograd graph: every rank's gradient flows back
    to the rank that computed each part, as in CLIP's gather_features with --gather-with-grad. `sizes`: each rank's
    rows when known (no host read), else None."""
    if not is_distributed():
        return tensor
    return _GatherCat.apply(tensor, sizes)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean over ranks (for logged values, on log steps only)."""
    if is_distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


_host_group = None


def host_group():
    """A gloo group over every rank, for collectives in host memory: the default group on CPU, a second one beside
    nccl (made at the first call, which every rank makes in the same order)."""
    global _host_group
    if _host_group is None:
        _host_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _host_group


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on one (ranks must agree on when to stop). Reduced in host memory over
    `host_group`, so it never waits for a GPU stream: called every step, it is no device sync."""
    if not is_distributed():
        return flag
    box = np.array([int(flag)], dtype=np.int64)  # read through numpy: the tensor shares its memory
    dist.all_reduce(torch.from_numpy(box), op=dist.ReduceOp.MAX, group=host_group())
    return bool(box[0])


def rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent: int, worker_id: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "prctl"):  # Linux; elsewhere torch's own watchdog ends orphaned workers within seconds
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(0)


def worker_dies_with_parent():
    """A DataLoader `worker_init_fn`: the kernel kills the worker as soon as the process that started it dies (even
    by SIGKILL), so no worker outlives a killed run or prints tracebacks about the queues it lost."""
    return functools.partial(_die_with, os.getpid())
