"""The run folder's model card, `README.md`, in the Hugging Face hub's format (YAML header + markdown).

The card is a view of the run folder, rendered again whenever what it shows changes: `kd-train` at every save
(`provenance.json`: the student, its teachers and store, the data; `options.json`: losses, steps, batch, lr;
`metrics.jsonl`: where training stands; `checkpoints/history.json`: the step folders kept and the best one; the
`--val-data` / `--zeroshot-data` results of the saved weights) and `kd-eval ... --update-card RUN`
(`eval_results.json`: the latest result of each task and split). The header is built with huggingface_hub's `ModelCardData`, so the eval numbers
are also the hub's `model-index` and `distillation:` holds the provenance machine-readably. Its `license:` is left
for the user: a value set there is kept when the card is rendered again.
"""
from __future__ import annotations

import json
from pathlib import Path

from common.storage import atomic_write

PROVENANCE_FILE = "provenance.json"
EVAL_RESULTS_FILE = "eval_results.json"
CARD_FILE = "README.md"
CHECKPOINTS_DIR = "checkpoints"  # kd-train --keep: a hub folder per kept step
HISTORY_FILE = f"{CHECKPOINTS_DIR}/history.json"
LICENSE_HINT = "license:  # yours to choose: a Hugging Face license id (mit, apache-2.0, ...) before publishing"
# CLIP_benchmark's task names -> the hub's task types
HUB_TASKS = {"zeroshot_classification": "zero-shot-image-classification", "zeroshot_retrieval": "image-text-retrieval"}


def _read_json(path: Path, default):
    return json.loads(path.read_text()) if path.is_file() else default


def user_license(folder: Path) -> str | None:
    """The license the user wrote into the card's header, if any."""
    from huggingface_hub import ModelCard
    path = folder / CARD_FILE
    if not path.is_file():
        return None
    try:
        return ModelCard.load(path).data.to_dict().get("license")
    except Exception:  # noqa: BLE001 - a card the user broke by hand: it is rendered again, without their license
        return None


def record_eval(folder: Path, result: dict, fingerprint: str) -> Path:
    """Keep `result` (CLIP_benchmark's JSON shape) of the model with weights `fingerprint` as the latest of its task
    and split, and render the card; refused for any model but the run's student as last saved."""
    folder = Path(folder)
    student = _read_json(folder / PROVENANCE_FILE, {}).get("student")
    if student is None:
        raise FileNotFoundError(f"--update-card {folder}: it holds no {PROVENANCE_FILE}, so it is not a kd-train run "
                                f"folder (or one written before model cards): give the run folder of the model")
    if student["fingerprint"] != fingerprint:
        raise ValueError(f"--update-card {folder}: the evaluated model (weights {fingerprint[:12]}) is not that run's "
                         f"student as last saved ({student['fingerprint'][:12]}, step {student['step']}): evaluate "
                         f"--model local-dir:{folder}")
    path = folder / EVAL_RESULTS_FILE
    results = _read_json(path, {})
    results[f"{result['task']} {result['dataset']}"] = result | {"weights": fingerprint}
    path.write_text(json.dumps(results, indent=2) + "\n")
    return write_model_card(folder)


def _card_data(name: str, provenance: dict, evals: dict, license: str | None, history: dict | None):
    from huggingface_hub import EvalResult, ModelCardData
    eval_results = [EvalResult(task_type=HUB_TASKS.get(r["task"], r["task"]), dataset_type="webdataset",
                               dataset_name=r["dataset"], metric_type=metric, metric_name=metric,
                               metric_value=value)
                    for r in evals.values() for metric, value in r["metrics"].items() if value is not None]
    return ModelCardData(
        library_name="open_clip", license=license, pipeline_tag="zero-shot-image-classification",
        tags=["clip", "open_clip", "knowledge-distillation", "clip-kd-cache"], model_name=name,
        eval_results=eval_results or None,
        distillation={"teachers": provenance.get("teachers", {}), "store": provenance.get("store"),
                      "data": provenance.get("data"), "student": provenance.get("student"),
                      "best_checkpoint": history.get("best") if history else None})


def _teacher_lines(teachers: dict) -> list[str]:
    return [f"- **{name}**: `{t['model']}`" + (f" (weights `{t['pretrained']}`)" if t.get("pretrained") else "")
            + f", fingerprint `{t['fingerprint']}`" for name, t in teachers.items()]


def _preprocess_line(preprocess: dict | None) -> str:
    if not preprocess:
        return "not recorded"
    return ", ".join(f"{key.replace('_', ' ')} `{preprocess[key]}`" for key in
                     ("size", "mean", "std", "interpolation", "resize_mode") if key in preprocess)


def _locked_lines(options: dict) -> list[str]:
    """The towers the run locked (open_clip's lock_image_tower / lock_text_tower), and its forced patch dropout."""
    lines = []
    for tower, unlocked, norms in (("image", "lock_image_unlocked_groups", "lock_image_freeze_bn_stats"),
                                   ("text", "lock_text_unlocked_layers", "lock_text_freeze_layer_norm")):
        if options.get(f"lock_{tower}"):
            lines.append(f"- **{tower.capitalize()} tower locked** (LiT)"
                         + (f" but its last {options[unlocked]} layer group(s)" if options.get(unlocked) else "")
                         + (f", {'BatchNorm statistics' if tower == 'image' else 'LayerNorms'} frozen too"
                            if options.get(norms) else ""))
    if options.get("force_patch_dropout") is not None:
        lines.append(f"- **Patch dropout while training:** {options['force_patch_dropout']}")
    return lines


def _checkpoint_lines(student: dict, history: dict | None) -> list[str]:
    lines = ["## Checkpoints", "", f"The weights in this folder are step {student.get('step')}'s, the latest saved."]
    if history is None:
        return lines + [""]
    kept = ", ".join(f"`{CHECKPOINTS_DIR}/step_{int(s):06d}`" for s in history["steps"])
    lines.append(f"Kept step folders (each an open_clip hub folder): {kept or 'none'}.")
    best = history.get("best")
    if best:
        lines.append(f"Best by `{best['metric']}`: step {best['step']} ({best['value']:.4f}), in "
                     f"`{CHECKPOINTS_DIR}/step_{best['step']:06d}`.")
    return lines + [""]


def _body(name: str, provenance: dict, options: dict, last: dict, evals: dict, history: dict | None) -> str:
    student, store, data = provenance.get("student", {}), provenance.get("store"), provenance.get("data", {})
    teachers = provenance.get("teachers", {})
    lines = [f"# {name}", "",
             f"A CLIP student (`{student.get('model')}`, {student.get('parameters', 0) / 1e6:.1f} M parameters) "
             + ("distilled by clip-kd-cache from the teacher(s) below." if teachers
                else "trained by clip-kd-cache with the CLIP loss alone (no teacher)."), ""]
    if teachers:
        lines += ["## Teachers", "", *_teacher_lines(teachers), ""]
    if store:
        lines += [f"Targets from the store `{store['url']}` (content hash `{store['content_hash']}`, "
                  f"{store['rows']} rows).", ""]
    lines += ["## Training", "",
              f"- **Data:** `{data.get('spec')}`: {data.get('shards')} shard(s), {data.get('samples')} samples",
              f"- **Losses (name:weight):** `{options.get('losses')}`",
              f"- **Steps:** {last.get('step', 0)} of {provenance.get('total_steps')}, global batch "
              f"{options.get('batch_size')}, lr {options.get('lr')}, weight decay {options.get('wd')}, "
              f"warm-up {options.get('warmup_steps')}, seed {options.get('seed')}",
              f"- **Optimiser:** AdamW (betas {options.get('beta1')}, {options.get('beta2')}, eps "
              f"{options.get('eps')}), learning-rate schedule `{options.get('lr_scheduler', 'cosine')}`",
              *_locked_lines(options),
              f"- **Initial weights:** `{options.get('init') or 'random (seeded)'}`",
              f"- **Student preprocessing (as trained):** {_preprocess_line(student.get('preprocess'))}", ""]
    if last:
        lines += [f"Last logged step {last['step']}: loss {last['loss']:.4f}.", ""]
    if evals:
        lines += ["## Evaluation", "", "| task | split | metric | value |", "|---|---|---|---|"]
        lines += [f"| {r['task']} | `{r['dataset']}` | {metric} | {value:.4f} |"
                  for r in evals.values() for metric, value in r["metrics"].items() if value is not None]
        lines += ["", "Of the weights in this folder; written by `kd-train --val-data / --zeroshot-data` at each "
                  "save and by `kd-eval ... --update-card`.", ""]
    lines += _checkpoint_lines(student, history)
    lines += ["## Use", "", "```python", "import open_clip",
              'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH/TO/THIS/FOLDER")',
              'tokenizer = open_clip.get_tokenizer("local-dir:PATH/TO/THIS/FOLDER")', "```", "",
              "Published with `hf upload ORG/REPO PATH/TO/THIS/FOLDER . --exclude resume.pt` it loads as "
              "`hf-hub:ORG/REPO`.", ""]
    return "\n".join(lines)


def write_model_card(folder: Path) -> Path:
    """Render README.md from what the run folder holds now."""
    folder = Path(folder)
    provenance = _read_json(folder / PROVENANCE_FILE, None)
    if provenance is None:
        raise FileNotFoundError(f"{folder} holds no {PROVENANCE_FILE}: it is not a kd-train run folder")
    options = _read_json(folder / "options.json", {})
    # results of earlier weights (the run was resumed and saved since) are not this student's: left off the card
    evals = {key: r for key, r in _read_json(folder / EVAL_RESULTS_FILE, {}).items()
             if r.get("weights") == provenance["student"]["fingerprint"]}
    metrics = folder / "metrics.jsonl"
    logged = metrics.read_text().splitlines() if metrics.is_file() else []
    trained = [record for record in map(json.loads, logged) if "loss" in record]  # not the val/ records
    last = trained[-1] if trained else {}
    history = _read_json(folder / HISTORY_FILE, None)
    name = provenance.get("name") or folder.resolve().name  # a run staged for object storage: the URL's
    license = user_license(folder)
    header = _card_data(name, provenance, evals, license, history).to_yaml()
    if license is None:
        header += "\n" + LICENSE_HINT
    card = f"---\n{header}\n---\n\n{_body(name, provenance, options, last, evals, history)}"
    path = folder / CARD_FILE
    atomic_write(path, lambda tmp: tmp.write_text(card))
    return path
