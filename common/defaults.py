"""Choices and defaults the CLIs' options show, in a module that imports nothing: `--help` and option errors then
answer without loading torch, open_clip or zarr. The modules that use these values import them from here."""

CHUNK_ROWS = 2048  # rows per Zarr chunk of a store
DTYPES = {"fp16": "float16", "fp32": "float32", "int8": "int8"}  # --dtype: how a store keeps its embeddings
# The build's teacher ("main") has its arrays at a store's root; teachers added later have their own names.
MAIN_TEACHER = "main"
ON_ERROR_CHOICES = ("raise", "skip")  # --on-error: what an unreadable sample does
MODES = ("auto", "cache", "live")  # kd-train --teacher-targets
PRECISION_CHOICES = ("auto", "fp32", "bf16", "amp")  # kd-train --precision (amp: fp16 autocast + GradScaler)
DEFAULT_LOSSES = "task,fd,icl,crd"  # CLIP-KD: task + FD (2000) + ICL (1) + CRD (1), the paper's weights
HUB_SCHEMAS = ("hf-hub:", "local-dir:")  # a model named so brings its own weights


def is_hub_model(name: str) -> bool:
    return str(name).startswith(HUB_SCHEMAS)
