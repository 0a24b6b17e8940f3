"""kd-train's options as declared (one TrainOptions field each), and what open_clip_train users set with them: AdamW's
betas and epsilon per tower family, the learning-rate schedules, locked towers, forced patch dropout and the
student's own preprocessing. Short in-process runs of the tiny kd-test models."""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, fields, replace
from pathlib import Path

import click
import open_clip
import pytest
import torch
from safetensors.torch import load_file
from torchvision.transforms import InterpolationMode, Normalize, Resize

from common.models import create_clip, model_config
from stage1_teacher.build import BuildOptions, build_cache
from stage2_student.cli import main as kd_train
from stage2_student.optim import adamw_settings
from stage2_student.options import POLICIES, RESUMABLE, RESUMABLE_CHANGES, RUN, TRAJECTORY, TRAJECTORY_OPTIONS
from stage2_student.train import Trainer, TrainOptions
from tests.helpers import save_random_checkpoint

STUDENT, RN_STUDENT, TEACHER = "kd-test-student", "kd-test-rn", "kd-test-teacher"


def options(synth_corpus: Path, out: Path, **kw) -> TrainOptions:
    base = dict(data=str(synth_corpus / "train"), out=str(out), student=STUDENT, losses="task", batch_size=32,
                steps=2, warmup=0, workers=0, log_every=1, save_every=1)
    return TrainOptions(**base | kw)


def logged(out: Path, key: str) -> list:
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- item 8: each option declared once
def test_every_option_is_one_classified_field_and_the_cli_and_resume_lists_are_generated():
    by_field = {f.name: f for f in fields(TrainOptions)}
    assert all(f.metadata["policy"] in POLICIES for f in by_field.values())
    assert {n for n, f in by_field.items() if f.metadata["policy"] == RUN} == {"out", "resume", "overwrite"}
    assert TRAJECTORY_OPTIONS == tuple(n for n, f in by_field.items() if f.metadata["policy"] == TRAJECTORY)
    assert RESUMABLE_CHANGES == tuple(n for n, f in by_field.items() if f.metadata["policy"] == RESUMABLE)
    assert {"lr", "beta1", "beta2", "eps", "lr_scheduler", "lock_image", "image_mean", "force_patch_dropout"} <= set(
        TRAJECTORY_OPTIONS) and {"device", "workers", "save_every", "report_to"} <= set(RESUMABLE_CHANGES)

    params = [p for p in kd_train.params if p.name != "verbose"]  # -v is the CLI's log level, not a run's option
    assert [p.name for p in params] == list(by_field)  # in field order, as --help lists them
    for param in params:
        f = by_field[param.name]
        assert param.opts == ["--" + f.name.replace("_", "-")] and param.help == f.metadata["help"], f.name
        assert param.required == (f.default is MISSING), f.name
        # an option whose value may be left out (--resume [auto]): click's default None is the field's after its callback
        given = param.callback(None, param, param.default) if f.metadata["flag_value"] else param.default
        assert f.default is MISSING or given == f.default, f.name
        assert param.is_flag == f.metadata["flag"], f.name
        if f.metadata["choices"]:
            assert isinstance(param.type, click.Choice) and tuple(param.type.choices) == f.metadata["choices"]
    # the CLI's defaults are TrainOptions' own: a run from Python is the run from the command line
    ctx = kd_train.make_context("kd-train", ["--data", "d", "--out", "o", "--student", "s"])
    assert TrainOptions(**{k: v for k, v in ctx.params.items() if k != "verbose"}) == TrainOptions(
        data="d", out="o", student="s")


def test_options_that_only_apply_to_another_are_refused_naming_it(tmp_path):
    def refused(**kw) -> str:
        with pytest.raises(ValueError) as e:
            TrainOptions(data="d", out="o", student="s", **kw).check()
        return str(e.value)
    assert "--lock-text-unlocked-layers applies to a locked tower: add --lock-text" in refused(
        lock_text_unlocked_layers=2)
    assert "--lock-image-freeze-bn-stats applies to a locked tower: add --lock-image" in refused(
        lock_image_freeze_bn_stats=True)
    assert "give the cooldown's length as --epochs-cooldown N or --steps-cooldown N" in refused(
        lr_scheduler="const-cooldown")
    assert "--steps-cooldown is the cooldown of --lr-scheduler const-cooldown, not of cosine" in refused(
        steps_cooldown=3)
    assert "--lr-scheduler 'linear': choose cosine, const or const-cooldown" in refused(lr_scheduler="linear")


# ---------------------------------------------------------------- item 5: optimiser and schedule
@pytest.fixture(scope="module")
def vit_run(synth_corpus, tmp_path_factory) -> tuple[Trainer, Path]:
    """A 2-step run of the ViT student with default AdamW settings, saved at each step (copy it to resume it)."""
    out = tmp_path_factory.mktemp("optim") / "vit"
    trainer = Trainer(options(synth_corpus, out))
    trainer.run()
    return trainer, out


def test_adamw_defaults_follow_the_students_tower_family(synth_corpus, vit_run, tmp_path):
    trainer, out = vit_run
    group = trainer.optimizer.param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.9, 0.98), 1e-6)  # a ViT: open_clip_train's ViT values
    recorded = json.loads((out / "options.json").read_text())
    assert (recorded["beta1"], recorded["beta2"], recorded["eps"], recorded["lr_scheduler"]) == (
        0.9, 0.98, 1e-6, "cosine")
    rn = Trainer(options(synth_corpus, tmp_path / "rn", student=RN_STUDENT, batch_size=16, beta1=0.8))
    group = rn.optimizer.param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.8, 0.999), 1e-8)  # a ResNet's defaults; the given beta1
    # timm towers by family, not by name: a timm ViT as a ViT, a ConvNeXt as a CNN
    for model, expected in (("kd-test-timm-vit", (0.9, 0.98, 1e-6)), ("kd-test-convnext", (0.9, 0.999, 1e-8))):
        assert adamw_settings(create_clip(model).info.image, None, None, None) == expected, model


@pytest.mark.parametrize("scheduler, extra, expected", [
    # the factor of --lr after each step k = 1..10 of a run with a 1-step warm-up, by open_clip_train's
    # cosine_lr, const_lr and const_lr_cooldown
    ("cosine", {}, [0.5 * (1 + math.cos(math.pi * (k - 1) / 9)) for k in range(1, 11)]),
    ("const", {}, [1.0] * 10),
    # a cooldown over the last 4 steps (from step 6 on), power 2, to 1e-4 = 0.1 of --lr
    ("const-cooldown", {"steps_cooldown": 4, "lr_cooldown_power": 2.0, "lr_cooldown_end": 1e-4},
     [1.0] * 5 + [(1 - e / 4) ** 2 * 0.9 + 0.1 for e in range(5)]),
])
def test_lr_curve_of_each_scheduler(synth_corpus, tmp_path, scheduler, extra, expected):
    out = tmp_path / "run"
    Trainer(options(synth_corpus, out, steps=10, warmup=1, lr=1e-3, lr_scheduler=scheduler, **extra)).run()
    # metrics.jsonl's lr after step k is the one step k + 1 takes (the first step took the warm-up's 1/1)
    assert logged(out, "lr") == pytest.approx([1e-3 * f for f in expected], abs=1e-12)
    assert json.loads((out / "options.json").read_text())["cooldown_steps"] == extra.get("steps_cooldown", 0)


def test_epochs_cooldown_counts_epochs_and_must_fit_after_the_warm_up(synth_corpus, tmp_path):
    trainer = Trainer(options(synth_corpus, tmp_path / "a", steps=None, epochs=3, warmup=1,
                              lr_scheduler="const-cooldown", epochs_cooldown=1))
    assert (trainer.steps_per_epoch, trainer.total_steps, trainer.cooldown) == (6, 18, 6)
    with pytest.raises(ValueError, match=r"--steps-cooldown 10 is longer than the 9 steps after the warm-up \(1\) "
                                         r"of this 10-step run: give a shorter cooldown"):
        Trainer(options(synth_corpus, tmp_path / "b", steps=10, warmup=1, lr_scheduler="const-cooldown",
                        steps_cooldown=10))


@pytest.mark.parametrize("changed, said", [
    ({"beta2": 0.99}, "--beta2 0.98 -> 0.99"),
    ({"eps": 1e-8}, "--eps 1e-06 -> 1e-08"),
    ({"lr_scheduler": "const"}, "--lr-scheduler cosine -> const"),
    ({"lock_image": True}, "--lock-image False -> True"),
    ({"force_patch_dropout": 0.5}, "--force-patch-dropout None -> 0.5"),
    ({"image_mean": (0.5, 0.5, 0.5)}, "--image-mean None -> [0.5, 0.5, 0.5]"),
])
def test_resume_refuses_changed_optimiser_schedule_and_student_options(synth_corpus, vit_run, tmp_path, changed,
                                                                        said):
    _, out = vit_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "resume.pt").write_bytes((out / "resume.pt").read_bytes())
    trainer = Trainer(options(synth_corpus, run, resume=True, **changed))
    with pytest.raises(ValueError, match="give the original ones") as refused:
        trainer.run()
    assert said in str(refused.value)


def test_a_resume_pt_from_before_these_options_resumes_as_their_defaults(synth_corpus, vit_run, tmp_path, caplog):
    _, out = vit_run
    run = tmp_path / "run"
    run.mkdir()
    state = torch.load(out / "resume.pt", weights_only=True)
    new = ("beta1", "beta2", "eps", "lr_scheduler", "lock_image", "lock_text", "image_mean", "force_patch_dropout")
    old = {k: v for k, v in json.loads(state["options"]).items() if k not in new}
    torch.save(state | {"options": json.dumps(old)}, run / "resume.pt")
    resumed = Trainer(options(synth_corpus, run, resume=True))
    resumed.run()  # the finished run: nothing left to train, nothing refused
    assert resumed.step == 2 and "does not record" not in caplog.text  # AdamW's settings from its optimizer state
    with pytest.raises(ValueError, match="--lock-text False -> True"):  # the old run did not lock
        Trainer(options(synth_corpus, run, resume=True, lock_text=True, lock_text_freeze_layer_norm=True)).run()


# ---------------------------------------------------------------- item 4: tower locking
def test_locked_towers_stay_bit_identical_and_get_no_optimizer_state(synth_corpus, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(options(synth_corpus, out, steps=3, lr=1e-2, lock_image=True, lock_text=True,
                              lock_text_unlocked_layers=1, lock_text_freeze_layer_norm=True))
    model = trainer.student.clip
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    # open_clip's lock_text_tower with 1 unlocked group leaves the projection trainable, and the logit scale stays
    assert {name for name in before if name not in frozen} == {"text_projection", "logit_scale"}
    assert {name for name in frozen if name.startswith("visual.")} == {n for n in before if n.startswith("visual.")}
    trainer.run()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in frozen)
    assert not torch.equal(before["text_projection"], after["text_projection"])  # what is unlocked trains
    state_of = {id(p) for p in trainer.optimizer.state}
    assert state_of and not any(id(after[name]) in state_of for name in frozen)
    saved = load_file(out / "open_clip_model.safetensors")
    assert all(torch.equal(saved[name], before[name]) for name in frozen)
    card = (out / "README.md").read_text()
    assert "**Image tower locked** (LiT)" in card and "**Text tower locked** (LiT) but its last 1 layer group(s), " \
                                                      "LayerNorms frozen too" in card


def test_a_locked_resnet_with_frozen_bn_stats_keeps_its_buffers_and_loads_in_open_clip(synth_corpus, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(options(synth_corpus, out, student=RN_STUDENT, batch_size=16, lr=1e-2, lock_image=True,
                              lock_image_freeze_bn_stats=True))
    visual = trainer.student.clip.visual
    before = {name: t.detach().clone() for name, t in visual.state_dict().items()}
    assert any("running_mean" in name for name in before)
    trainer.run()
    assert all(torch.equal(t, visual.state_dict()[name]) for name, t in before.items())
    loaded = open_clip.create_model(f"local-dir:{out}")  # BatchNorm's counters are not part of a frozen norm
    assert all(torch.equal(loaded.visual.state_dict()[name], t) for name, t in before.items())


@pytest.mark.parametrize("student, kw, said", [
    (RN_STUDENT, {"lock_image": True, "lock_image_unlocked_groups": 1},
     "--lock-image: open_clip cannot lock the image tower of kd-test-rn (open_clip ModifiedResNet): partial locking "
     "not currently supported for this model; --lock-image-unlocked-groups 0 locks it whole"),
    (STUDENT, {"lock_text": True},
     "--lock-text: open_clip cannot lock the text tower of kd-test-student (open_clip TextTransformer): Unfreezing "
     "LayerNorm is not supported. LayerNorm treated like other weights; add --lock-text-freeze-layer-norm"),
    ("kd-test-coca", {"lock_text": True, "lock_text_freeze_layer_norm": True},
     "open_clip cannot lock the text tower of kd-test-coca"),
])
def test_a_tower_open_clip_cannot_lock_so_is_refused_naming_it(synth_corpus, tmp_path, student, kw, said):
    with pytest.raises(ValueError) as refused:
        Trainer(options(synth_corpus, tmp_path / "run", student=student, **kw))
    assert said in str(refused.value)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- item 6: patch dropout and preprocessing
def test_force_patch_dropout_drops_tokens_while_training_only(synth_corpus, tmp_path):
    trainer = Trainer(options(synth_corpus, tmp_path / "run", force_patch_dropout=0.5))
    model, images = trainer.student.clip, torch.rand(4, 3, 24, 24)
    with torch.no_grad():
        model.train()
        trained = [model.encode_image(images) for _ in range(2)]
        model.eval()
        evaluated = [model.encode_image(images) for _ in range(2)]
    assert not torch.equal(*trained) and torch.equal(*evaluated)
    trainer.run()
    saved = json.loads((tmp_path / "run" / "open_clip_config.json").read_text())["model_cfg"]
    assert saved == model_config(STUDENT)  # its config keeps its own patch dropout: the override is the run's
    assert "**Patch dropout while training:** 0.5" in (tmp_path / "run" / "README.md").read_text()
    with pytest.raises(ValueError, match=r"--force-patch-dropout 0.5: the student kd-test-rn's image tower \(open_clip "
                                         r"ModifiedResNet\) has no patch tokens to drop"):
        Trainer(options(synth_corpus, tmp_path / "rn", student=RN_STUDENT, force_patch_dropout=0.5))


@pytest.fixture(scope="module")
def val_store(synth_corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("optim_store")
    ckpt = save_random_checkpoint(TEACHER, root / "teacher.pt", seed=3)
    build_cache(BuildOptions(teacher=TEACHER, pretrained=str(ckpt), data=str(synth_corpus / "val"),
                             out=str(root / "s.zarr"), batch_size=16, grad_batch=16, chunk_rows=16, workers=0))
    return root / "s.zarr"


def test_student_preprocessing_is_its_own_recorded_and_leaves_the_cached_targets(synth_corpus, val_store, tmp_path):
    out = tmp_path / "run"
    preprocess = dict(image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.25, 0.3), image_interpolation="bilinear",
                      image_resize_mode="squash")
    trainer = Trainer(replace(options(synth_corpus, out, data=str(synth_corpus / "val"), cache=str(val_store),
                                      losses="task,fd", batch_size=16, teacher_targets="cache"), **preprocess))
    last = trainer.run()
    assert (last["cache_hits"], last["live_batches"]) == (2, 0)  # the teacher's targets: the cache's, as built
    expected = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear", "resize_mode": "squash"}
    config = json.loads((out / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert {k: config[k] for k in expected} == expected
    provenance = json.loads((out / "provenance.json").read_text())["student"]["preprocess"]
    assert {k: provenance[k] for k in expected} == expected
    assert "mean `[0.5, 0.4, 0.3]`, std `[0.2, 0.25, 0.3]`, interpolation `bilinear`, resize mode `squash`" in (
        out / "README.md").read_text()
    # what trained is what plain open_clip loads: its eval transform normalises and resizes as the student saw
    for transform in (trainer.student_clip.preprocess, open_clip.create_model_and_transforms(f"local-dir:{out}")[2]):
        normalize = next(t for t in transform.transforms if isinstance(t, Normalize))
        resize = next(t for t in transform.transforms if isinstance(t, Resize))
        assert (list(normalize.mean), list(normalize.std)) == (expected["mean"], expected["std"])
        assert resize.interpolation == InterpolationMode.BILINEAR and resize.size == (24, 24)  # squash: both sides
