"""torchrun integration: one process per rank, gloo on CPU, nccl on GPU. A plain `python` run is rank 0 of 1.
Also the processes' DataLoader workers, which die with the process that started them."""
from __future__ import annotations

import ctypes
import datetime
import functools
import os
import signal

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; return (rank, world_size)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        # No phase keeps the other ranks waiting long (index scans, windows and gradients are spread over ranks);
        # the timeout is explicit so that one slow start on object storage does not trip NCCL's 10-minute default.
        timeout = datetime.timedelta(seconds=float(os.environ.get("KD_DIST_TIMEOUT_S", 3600)))
        dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def local_device(device: str) -> str:
    """'cuda' under torchrun means this rank's GPU."""
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


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] when not distributed."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _GatherCat(torch.autograd.Function):
    """all_gather + cat whose backward sums every rank's gradient of the gathered tensor and returns this rank's
    slice (what torch.distributed.nn's deprecated all_gather did), with public collectives that gloo supports.
    Ranks may hold different numbers of rows (a batch that lost an unreadable sample): parts are padded to the
    largest for the collective and cut back."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
        sizes = [int(n) for n in sizes]
        padded = torch.zeros((max(sizes),) + tuple(tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.rank, ctx.sizes = dist.get_rank(), sizes
        return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor across ranks along dim 0, keeping the autograd graph: every rank's gradient flows back
    to the rank that computed each part, as in CLIP's gather_features."""
    if not is_distributed():
        return tensor
    return _GatherCat.apply(tensor)


def any_rank(flag: bool, device: str = "cpu") -> bool:
    """True on every rank when it is True on one (ranks must agree on when to stop). `device`: this rank's
    device (nccl reduces only CUDA tensors)."""
    if not is_distributed():
        return flag
    box = torch.tensor([int(flag)], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


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
