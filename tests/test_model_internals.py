"""Only common/families.py reads open_clip's (and timm's) model internals: everything else asks its functions.

A syntax-tree grep of the source tree (not of the tests, which check what families reports against the models):
attribute reads of tower submodules and private methods, `getattr`-style reads of the same names, reads of the
model config's tower sections and imports of open_clip's tower modules. open_clip's public model API stays free
to use anywhere: `encode_image` / `encode_text`, `logit_scale` / `logit_bias`, `lock_image_tower` /
`lock_text_tower`, `set_grad_checkpointing`, `open_clip.get_model_preprocess_cfg` and the factory functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("common", "stage1_teacher", "stage2_student", "evaluation", "bench", "scripts")
# the one module allowed to read them, and why
ALLOWED = {"common/families.py": "the families module: what each tower type exposes, read in one place"}

# submodules, private methods and attributes of open_clip's towers (and of timm's, inside TimmModel)
INTERNAL_ATTRIBUTES = frozenset({
    "visual", "trunk", "transformer", "resblocks", "ln_final", "ln_post", "attnpool", "text_decoder",
    "text_projection", "positional_embedding", "token_embedding", "patch_dropout", "patch_drop", "_encode_image",
    "_encode_text", "pad_id", "context_length"})
TOWER_CONFIG_KEYS = frozenset({"vision_cfg", "text_cfg", "multimodal_cfg"})  # read through the built model instead
INTERNAL_MODULES = frozenset({"open_clip.transformer", "open_clip.modified_resnet", "open_clip.timm_model",
                              "open_clip.hf_model", "open_clip.coca_model", "open_clip.model"})


def _string(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def internal_reads(source: str) -> list[str]:
    """'line: what' for each read of a model internal in Python `source`."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        what = None
        if isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRIBUTES:
            what = f".{node.attr}"
        elif isinstance(node, ast.Subscript) and _string(node.slice) in TOWER_CONFIG_KEYS:
            what = f"[{_string(node.slice)!r}]"
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "get" and _string(node.args[0]) in TOWER_CONFIG_KEYS:
                what = f".get({_string(node.args[0])!r})"
            elif (isinstance(func, ast.Name) and func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1
                  and _string(node.args[1]) in INTERNAL_ATTRIBUTES):
                what = f"{func.id}(..., {_string(node.args[1])!r})"
        elif isinstance(node, ast.ImportFrom) and node.module in INTERNAL_MODULES:
            what = f"from {node.module} import"
        elif isinstance(node, ast.Import):
            what = next((f"import {a.name}" for a in node.names if a.name in INTERNAL_MODULES), None)
        if what:
            hits.append((node.lineno, what))
    return [f"{line}: {what}" for line, what in sorted(hits)]


def source_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))


def test_only_families_reads_model_internals():
    found = {str(p.relative_to(REPO)): internal_reads(p.read_text()) for p in source_files()}
    outside = {path: hits for path, hits in found.items() if hits and path not in ALLOWED}
    assert not outside, (f"open_clip model internals read outside common/families.py (add a function there and "
                         f"call it): {outside}")
    assert found["common/families.py"], "the families module reads none of the listed internals: the list is stale"


def test_the_grep_finds_each_kind_of_read():
    source = ("from open_clip.transformer import VisionTransformer\nimport open_clip.coca_model\n"
              "size = model.visual.image_size\ngetattr(model, 'text_decoder')\nconfig['vision_cfg']\n"
              "config.get('text_cfg', {})\nmodel.encode_image(x)\nmodel.logit_scale\nstore['embed_dim']\n")
    assert internal_reads(source) == ["1: from open_clip.transformer import", "2: import open_clip.coca_model",
                                      "3: .visual", "4: getattr(..., 'text_decoder')", "5: ['vision_cfg']",
                                      "6: .get('text_cfg')"]
