"""`kd-cache info` and `kd-cache verify`: what a store holds, and whether it is what the teacher computes."""
from __future__ import annotations

import numpy as np
import torch

from common.cache import CAPTIONS, MAIN_TEACHER, CacheError, CacheStore, dequantize, join_to_cache, provenance_diff, read_chunked
from common.contrastive import contrastive_loss_grads
from common.corpus import Corpus, CorpusError, as_spec
from common.models import clip_from_provenance, named_weights
from common.storage import filesystem
from common.views import CLEAN_VIEW, render, view_from_arrays

# cosine a recomputed embedding must reach against the stored one
MIN_COSINE = {"fp16": 0.999, "fp32": 0.99999, "int8": 0.99}
# largest |norm - 1| of a stored valid embedding row (fp16 rounding moves it by < 1e-3)
NORM_TOLERANCE = {"fp16": 1e-2, "fp32": 1e-4}
# largest relative error of stored (fp16, scaled) gradients against a recomputation
GRAD_TOLERANCE = 2e-3
PER_ROW = ("image_emb", "text_emb", "valid", "image_grad", "text_grad", "view_boxes", "view_flips")


def disk_bytes(url: str) -> tuple[int, int]:
    fs, path = filesystem(url)
    sizes = fs.du(path, total=False)
    return sum(sizes.values()), len(sizes)


def store_summary(path: str) -> dict:
    store = CacheStore(path)
    attrs, teacher = store.attrs, store.attrs["teacher"]
    size, files = disk_bytes(store.path)
    grads = store.group["grad_batches"] if store.has("grad_batches") else None
    return {
        "store": store.path,
        "rows": store.num_rows,
        "invalid rows": attrs.get("invalid_count", 0),
        "views stored": store.views,
        "embed dim": store.embed_dim,
        "dtype": store.dtype,
        "arrays": ", ".join(sorted(store.group.array_keys())),
        "teacher": teacher["model"],
        "pretrained": teacher["pretrained"],
        "weights fingerprint": teacher["fingerprint"][:16],
        "teacher logit scale": round(store.teacher_logit_scale, 4),
        "teacher logit bias": ("none (softmax CLIP loss)" if store.teacher_logit_bias is None
                               else f"{store.teacher_logit_bias:.4f} (sigmoid loss)"),
        "open_clip version": teacher["open_clip_version"],
        "shards": len(attrs["corpus"]["shards"]),
        "grad batches": f"{grads.shape[0]} slots x {attrs['build']['grad_batch']}" if grads is not None else "none",
        "chunk rows": attrs["build"]["chunk_rows"],
        "teachers": "; ".join(teacher_line(store, name, state) for name, state in store.teacher_status().items()),
        "synthetic captions": captions_line(store),
        "bytes on disk": size,
        "files": files,
        "bytes per sample": round(size / max(store.num_rows, 1), 1),
    }


def teacher_line(store: CacheStore, name: str, state: str) -> str:
    if state != "complete":
        return f"{name} (incomplete: re-run its kd-cache add-teacher)"
    view = store.teacher(name)
    teacher = view.attrs["teacher"]
    captions = ", captions embedded" if view.has("caption_text_emb") else ""
    return (f"{name} = {teacher['model']} {teacher['fingerprint'][:12]} (D {view.embed_dim}, "
            f"scale {view.teacher_logit_scale:.2f}"
            f"{'' if view.teacher_logit_bias is None else f', bias {view.teacher_logit_bias:.2f}'}{captions})")


def captions_line(store: CacheStore) -> str:
    if not store.has(CAPTIONS):
        return "none"
    attrs = dict(store.group[CAPTIONS].attrs)
    state = "" if attrs.get("complete") else " (incomplete: re-run kd-cache captions)"
    return f"{attrs['num']} per image by {attrs['captioner']['model']} {attrs['captioner']['fingerprint'][:12]}{state}"


def integrity_lines(store: CacheStore) -> tuple[bool, list[str]]:
    """Every chunk read (checksums verified), every chunk present, every valid embedding row of unit norm and
    every invalid one zero, the valid count equal to the attributes, every valid row in exactly one gradient batch."""
    lines, ok = [], True
    rows = store.attrs["build"]["chunk_rows"]
    valid = store.load("valid")
    invalid = int((~valid).sum())
    if invalid != store.attrs.get("invalid_count"):
        ok = False
        lines.append(f"valid flags: {invalid} invalid rows, the attributes say {store.attrs.get('invalid_count')}")
    for name in (n for n in PER_ROW if store.has(n) and n != "valid"):
        array, off = store.array(name), []
        for start in range(0, store.num_rows, rows):
            chunk = read_chunked(array, start, start + rows, f"cache {store.path}")
            if name.endswith("_emb"):
                norms = np.linalg.norm(chunk.astype(np.float32), axis=-1)
                norms = norms if norms.ndim == 1 else norms.max(axis=1) * (norms.min(axis=1) > 0)
                here = valid[start:start + rows]
                tol = NORM_TOLERANCE.get(store.dtype)
                wrong = (np.abs(norms - 1) > tol) if tol else (norms == 0)
                off += (start + np.flatnonzero((here & wrong) | (~here & (norms > 0)))).tolist()
        if off:
            ok = False
            lines.append(f"{name} norms: {len(off)} rows off (valid rows must have norm 1, invalid rows 0): "
                         f"row {', '.join(map(str, off[:5]))}{'...' if len(off) > 5 else ''}")
    if store.has("grad_batches"):
        batches = store.load("grad_batches")
        members = np.sort(batches[batches >= 0])
        if not np.array_equal(members, np.flatnonzero(valid)):
            ok = False
            lines.append("gradient batches: the valid rows are not each in exactly one gradient batch")
    store.index()
    lines.insert(0, f"integrity: every chunk of {len(list(store.group.array_keys()))} arrays read and checksummed, "
                    f"{store.num_rows} rows ({invalid} invalid)" + ("" if ok else ": PROBLEMS FOUND"))
    return ok, lines


def check_corpus(store: CacheStore, corpus: Corpus) -> list[str]:
    """Differences between the store's corpus and these shards (names, sizes, counts, keys)."""
    diffs = provenance_diff(store.attrs, {"corpus": corpus.description()}, keys=("corpus",))
    if not diffs:
        try:
            join_to_cache(corpus, store)
        except CacheError as e:
            diffs = [str(e)]
    return diffs


def verify_store(path: str, data: str | None, sample: int, pretrained: str | None, device: str, seed: int) -> dict:
    """Integrity and recomputation of every teacher of the store (each line prefixed by the teacher's name when
    the store has several)."""
    store = CacheStore(path)
    recorded = data is None
    data = as_spec(store.index().urls) if recorded else data  # the shards as they were named at the build
    try:
        corpus = Corpus.open(data, on_error="skip", known=[store.index()])
    except CorpusError as e:
        if not recorded:
            raise
        raise CacheError(f"store {path} was built from --data {data!r}, which cannot be read from here ({e}): "
                         f"pass --data with where those shards are now") from e
    diffs = check_corpus(store, corpus)
    if diffs:
        raise CacheError(f"store {path} was not built from {data}:\n  " + "\n  ".join(diffs))
    weights = named_weights(pretrained, MAIN_TEACHER)
    names = store.teacher_names()
    ok, lines = True, [f"keys: {corpus.num_samples} rows match the shards"]
    for name in names:
        view = store if name == MAIN_TEACHER else store.teacher(name)
        good, part = integrity_lines(view)
        more = verify_teacher(view, corpus, sample, weights.get(name), device, seed)
        ok &= good and more["ok"]
        lines += [f"[{name}] {line}" if len(names) > 1 else line for line in part + more["lines"]]
    return {"ok": ok, "lines": lines}


def verify_teacher(store: CacheStore, corpus: Corpus, sample: int, pretrained: str | None, device: str,
                   seed: int) -> dict:
    ok, lines = True, []
    teacher = clip_from_provenance(store.attrs["teacher"], pretrained, device)
    lines.append(f"teacher: {teacher.name}, fingerprint {teacher.fingerprint[:12]} matches")
    valid = store.load("valid")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(np.flatnonzero(valid), size=min(sample, int(valid.sum())), replace=False))
    samples = corpus.read_rows(rows, on_error="raise")
    boxes = store.rows("view_boxes", rows) if store.views else None
    flips = store.rows("view_flips", rows) if store.views else None
    views = [[CLEAN_VIEW] + [view_from_arrays(boxes[i, v], flips[i, v]) for v in range(store.views)]
             for i in range(len(rows))]
    images = torch.stack([torch.stack([render(s.image, v, teacher.preprocess) for v in vs])
                          for s, vs in zip(samples, views)])
    fresh_image = teacher.embed_images(images.flatten(0, 1)).view(len(rows), 1 + store.views, -1)
    fresh_text = teacher.embed_texts(teacher.tokenizer([s.caption for s in samples]))
    stored_image = torch.from_numpy(dequantize(store.rows("image_emb", rows)))
    stored_image = stored_image.view(len(rows), 1 + store.views, -1)
    stored_text = torch.from_numpy(dequantize(store.rows("text_emb", rows)))
    threshold = MIN_COSINE[store.dtype]
    for name, fresh, stored in (("image", fresh_image, stored_image), ("text", fresh_text, stored_text)):
        cos = torch.nn.functional.cosine_similarity(fresh, stored, dim=-1)
        good = bool(cos.min() >= threshold)
        ok &= good
        lines.append(f"{name} embeddings: {len(rows)} rows, min cosine {cos.min():.6f} "
                     f"({'>=' if good else 'BELOW'} {threshold})")

    if not store.has("grad_batches"):
        lines.append("gradients: not stored (built with --no-grads)")
        return {"ok": ok, "lines": lines}
    batches = store.load("grad_batches")
    full = batches[(batches >= 0).any(axis=1)]
    batch = full[rng.integers(len(full))]
    batch = batch[batch >= 0]
    image = dequantize(store.rows("image_emb", batch))
    image = torch.from_numpy(image[:, 0] if store.views else image)
    text = torch.from_numpy(dequantize(store.rows("text_emb", batch)))
    g_img, g_txt = contrastive_loss_grads(image, text, store.teacher_logit_scale, store.teacher_logit_bias)
    for name, fresh in (("image_grad", g_img), ("text_grad", g_txt)):
        stored = torch.from_numpy(store.to_float(name, store.rows(name, batch)))
        err = float((fresh - stored).abs().max() / fresh.abs().max().clamp_min(1e-12))
        good = err < GRAD_TOLERANCE
        ok &= good
        lines.append(f"{name}: one gradient batch of {len(batch)} rows recomputed, max relative error {err:.2e} "
                     f"({'<' if good else 'NOT BELOW'} {GRAD_TOLERANCE})")
    return {"ok": ok, "lines": lines}
