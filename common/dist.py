"""torchrun integration: one process per rank, gloo on CPU, nccl on GPU. A plain `python` run is rank 0 of 1."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; return (rank, world_size)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
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
    slice (what torch.distributed.nn's deprecated all_gather did), with public collectives that gloo supports."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor (the same shape on every rank) across ranks along dim 0, keeping the autograd graph:
    every rank's gradient flows back to the rank that computed each part, as in CLIP's gather_features."""
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
