"""Teacher–student alignment of paired embeddings: mean cosine (same space only) and linear CKA."""
from __future__ import annotations

import numpy as np
import torch


def _as_float64(x, name: str) -> np.ndarray:
    """Validate an (N, D) finite, non-empty embedding matrix and return it as float64."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (N, D) array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return x


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Both matrices as float64, checked to describe the same N items."""
    a, b = _as_float64(a, "a"), _as_float64(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired embeddings need the same number of rows, got {len(a)} and {len(b)}")
    return a, b


def mean_paired_cosine(a, b) -> float | None:
    """Mean cosine between row i of `a` (N, D_a) and row i of `b` (N, D_b); None when D_a != D_b, since
    embeddings of different widths live in different spaces (project the student first to compare)."""
    a, b = _paired(a, b)
    if a.shape[1] != b.shape[1]:
        return None
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    if (norms == 0).any():
        raise ValueError("cosine is undefined for all-zero rows")
    return float(np.mean(np.einsum("ij,ij->i", a, b) / norms))


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al. 2019) between (N, D_x) and (N, D_y), column-centred, in float64:
    ||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F). Invariant to rotations and isotropic scaling; 1 = same geometry."""
    x, y = _paired(x, y)
    if len(x) < 2:
        raise ValueError(f"CKA needs at least 2 paired rows, got {len(x)}")
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    if denominator == 0:
        raise ValueError("CKA is undefined when one side has zero variance (all rows identical)")
    return float(np.linalg.norm(y.T @ x) ** 2 / denominator)


def alignment_metrics(student, teacher) -> dict[str, float | None]:
    """`paired_cosine` (None across different widths) and `linear_cka` of student vs teacher embeddings."""
    return {"paired_cosine": mean_paired_cosine(student, teacher), "linear_cka": linear_cka(student, teacher)}
