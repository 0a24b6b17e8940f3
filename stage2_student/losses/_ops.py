"""Small helpers shared by the loss modules (fp32 maths, diagonal CE, learnable scale, token-grid resampling)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_SCALE = 100.0  # CLIP's clamp on exp(logit_scale)
LOG_MAX_SCALE = math.log(MAX_SCALE)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in float32 (bf16 autocast must not touch the reductions)."""
    return F.normalize(x.float(), dim=-1)


def diag_ce(logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """CE(logits, y): row i's positive is column i, or with `rows` (a rank's anchors, --local-loss) the logits'
    row i is the batch's row rows[i]."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device) if rows is None else rows)


def anchors(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The rows a loss anchors on: all of them (global form), or a rank's own (local form)."""
    return x if rows is None else x[rows]


class LogitScale(nn.Module):
    """A learnable contrastive scale c = exp(min(param, log 100)), param initialised to log(1/0.07) (CLIP's init).

    The public CLIP-KD code used its ICL/AFD scale parameters raw (c = 2.66, temperature 0.38); here they are
    exponentiated and clamped like CLIP's own logit scale: in the forward, and in place after each optimizer
    step (`clamp_`), since a parameter left above log 100 would get a zero gradient forever.
    """

    def __init__(self):
        super().__init__()
        self.param = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self) -> torch.Tensor:
        param = self.param.float()
        # where, not clamp: at param = log 100, where `clamp_` leaves it, clamp's gradient is 0 and where's is 1
        return torch.where(param <= LOG_MAX_SCALE, param, torch.full_like(param, LOG_MAX_SCALE)).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """param <- min(param, log 100), as the student's own logit scale after each optimizer step."""
        self.param.clamp_(max=LOG_MAX_SCALE)


def _grid_side(n_patches: int) -> int:
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"cannot resample {n_patches} patch tokens: not a square grid (tokens must be CLS + g*g)")
    return side


def resample_tokens(x: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """(B, N, W) tokens, CLS first, to (B, n_tokens, W): bilinear on the sqrt(N-1) x sqrt(N-1) patch grid, CLS kept."""
    if x.shape[1] == n_tokens:
        return x
    side_in, side_out = _grid_side(x.shape[1] - 1), _grid_side(n_tokens - 1)
    cls, patches = x[:, :1], x[:, 1:]
    grid = patches.transpose(1, 2).reshape(x.shape[0], x.shape[2], side_in, side_in)
    grid = F.interpolate(grid, size=(side_out, side_out), mode="bilinear", align_corners=False)
    return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)
