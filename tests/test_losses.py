"""Unit tests of the distillation losses, including one test per defect of the public CLIP-KD code (LOSSES.md)."""
from __future__ import annotations

import dataclasses
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

import common.models  # noqa: F401  (registers the kd-test-* configs)
from common.contrastive import clip_loss, clip_loss_grads, contrastive_loss_grads
from stage2_student.losses import (LOSSES, Dims, LossSet, LossSpecError, StudentOutputs, TeacherTargets,
                                   parse_loss_spec)
from stage2_student.losses.cka import linear_cka
from stage2_student.losses.clip_kd import anchored_grads
from stage2_student.losses.dlip import _align_attention, attention_kl, map_layers
from stage2_student.losses._ops import resample_tokens
from common.families import forward_features

B, DS, DT = 8, 32, 48  # batch, student / teacher embedding widths
WS, WT = 16, 24  # token widths
NS, NT, NTXT = 10, 17, 6  # vision tokens (CLS + 3x3 vs CLS + 4x4), text tokens
VOCAB = 50  # caption logits' vocabulary
LS, LT, HS, HT = 2, 4, 2, 3  # layers, heads

DIMS = Dims(DS, DT, WS, WT, student_vision_layers=(WS,) * LS, teacher_vision_layers=(WT,) * LT,
            student_text_layers=(WS,) * LS, teacher_text_layers=(WT,) * LT)


def leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).requires_grad_()


def attention_maps(layers: int, heads: int, tokens: int, grad: bool) -> list[torch.Tensor]:
    return [torch.randn(B, heads, tokens, tokens).softmax(-1).requires_grad_(grad) for _ in range(layers)]


def make_batch(seed: int = 0, ds: int = DS, sigmoid: bool = False) -> tuple[StudentOutputs, TeacherTargets]:
    """Every field filled; student tensors are leaves that require grad, teacher grads cached for this batch.
    `sigmoid`: both are SigLIP-style models (a learnable student bias, the teacher's bias and sigmoid grads)."""
    torch.manual_seed(seed)
    student = StudentOutputs(
        image_emb=leaf(B, ds), text_emb=leaf(B, ds), logit_scale=torch.tensor(1 / 0.07).requires_grad_(),
        image_emb_proj=leaf(B, DT), text_emb_proj=leaf(B, DT), masked_image_emb_proj=leaf(B, DT),
        image_tokens=leaf(B, NS, WS),
        hidden_states={"image": [leaf(B, NS, WS) for _ in range(LS)], "text": [leaf(B, NTXT, WS) for _ in range(LS)]},
        attentions={"image": attention_maps(LS, HS, NS, True), "text": attention_maps(LS, HS, NTXT, True)},
        caption_logits=leaf(B, NTXT - 1, VOCAB), caption_labels=torch.randint(VOCAB, (B, NTXT - 1)),
        logit_bias=torch.tensor(-10.0).requires_grad_() if sigmoid else None)
    image, text = F.normalize(torch.randn(B, DT), dim=1), F.normalize(torch.randn(B, DT), dim=1)
    bias = -10.0 if sigmoid else None
    image_grad, text_grad = contrastive_loss_grads(image, text, 100.0, bias)
    teacher = TeacherTargets(
        image_emb=image, text_emb=text, logit_scale=100.0, logit_bias=bias, image_grad=image_grad, text_grad=text_grad,
        image_tokens=torch.randn(B, NT, WT),
        hidden_states={"image": [torch.randn(B, NT, WT) for _ in range(LT)],
                       "text": [torch.randn(B, NTXT, WT) for _ in range(LT)]},
        attentions={"image": attention_maps(LT, HT, NT, False), "text": attention_maps(LT, HT, NTXT, False)})
    return student, teacher


def student_tensors(student: StudentOutputs, fields) -> list[torch.Tensor]:
    out = []
    for f in fields:
        value = getattr(student, f)
        if value is None:  # optional: a softmax student has no logit_bias
            continue
        out += [t for ts in value.values() for t in ts] if isinstance(value, dict) else [value]
    return out


# ---------------------------------------------------------------- every loss, shared batch
@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_reads_only_what_it_declares_and_backpropagates(name, sigmoid):
    cls = LOSSES[name]
    if sigmoid and cls.teacher_needs and not cls.sigmoid_teacher:
        pytest.skip(f"{name} refuses a sigmoid teacher (tests/test_families.py checks the refusal)")
    student, teacher = make_batch(sigmoid=sigmoid)
    # fields the loss does not declare: optional ones dropped, required ones poisoned with NaN
    for f in dataclasses.fields(StudentOutputs):
        if f.name not in cls.student_needs:
            value = getattr(student, f.name)
            setattr(student, f.name, None if f.default is None else torch.full_like(value, math.nan))
    for f in dataclasses.fields(TeacherTargets):
        if f.name not in cls.teacher_needs | cls.teacher_optional:
            setattr(teacher, f.name, None)
    loss_fn = cls(DIMS)
    value = loss_fn(student, teacher)
    assert value.dim() == 0 and value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    grads = [t.grad for t in student_tensors(student, cls.student_needs) if t.is_floating_point()]  # not labels
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in loss_fn.parameters())


# ---------------------------------------------------------------- spec parsing and LossSet
@pytest.mark.parametrize("spec, bad", [("fd,nope", "nope"), ("fd:abc", "abc"), ("fd:", "fd"), ("fd:-1", "-1"),
                                       ("fd,icl,fd", "fd"), ("fd,,icl", "empty")])
def test_bad_specs_raise_with_the_offending_text(spec, bad):
    with pytest.raises(LossSpecError, match=bad):
        parse_loss_spec(spec)


def test_spec_weights_defaults_and_needs():
    assert parse_loss_spec("gd:1e8, fd") == [("gd", 1e8), ("fd", None)]  # the official `1e8.` style parses
    losses = LossSet("task,fd,icl:0.5,gd", DIMS)
    assert losses.weights == {"task": 1.0, "fd": 2000.0, "icl": 0.5, "gd": LOSSES["gd"].default_weight}
    assert losses.teacher_needs == {"image_emb", "text_emb", "logit_scale", "logit_bias"}
    assert losses.teacher_optional == {"image_grad", "text_grad"}
    assert losses.student_needs == {"image_emb", "text_emb", "logit_scale", "logit_bias", "image_emb_proj",
                                    "text_emb_proj"}
    assert not LossSet("task", DIMS).needs_teacher
    assert {p.numel() for p in losses.parameters()} == {1}  # icl's scale; no fusion layers unless afd is asked


def test_lossset_total_is_weighted_sum_and_fp32_under_bf16_autocast():
    student, teacher = make_batch()
    losses = LossSet("task,crd,fd,icl,gd,afd,cka", DIMS)
    total, terms = losses(student, teacher)
    assert total.item() == pytest.approx(sum(losses.weights[n] * v for n, v in terms.items()), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total_amp, terms_amp = losses(student, teacher)
    assert total_amp.dtype == torch.float32
    assert terms_amp == pytest.approx(terms, rel=1e-6)  # bf16 matmuls would be off by 1e-5 to 3e-3


@pytest.mark.parametrize("sigmoid", [False, True], ids=["softmax", "sigmoid"])
def test_local_forms_add_up_to_the_global_loss_and_gradient(sigmoid):
    """--local-loss: each rank's rows against the whole batch, weighted by its share. Over a split of the batch
    into two "ranks" of unequal size (as after a skipped sample), the weighted local values add up to the global
    value and gradient of every loss that has a local form (one process: a rank's weight is b / B; under torchrun
    W b / B, whose mean over ranks is the same sum)."""
    local = sorted(name for name, cls in LOSSES.items() if cls.local_form)
    assert local == ["afd", "crd", "fd", "icl", "mfd", "task"]
    student, teacher = make_batch(sigmoid=sigmoid)
    losses = LossSet(",".join(local), DIMS)
    inputs = [t for t in student_tensors(student, losses.student_needs) if t.requires_grad]
    total, terms = losses(student, teacher)
    expected = torch.autograd.grad(total, inputs)
    parts = [losses(dataclasses.replace(student, rows=rows), teacher) for rows in (torch.arange(3), torch.arange(3, B))]
    summed = parts[0][0] + parts[1][0]
    for name in local:
        assert (parts[0][1][name] + parts[1][1][name]).item() == pytest.approx(terms[name].item(), rel=1e-5), name
    for got, want in zip(torch.autograd.grad(summed, inputs), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    no_local = LossSet("gd,cka", DIMS)  # these keep the global form on every rank
    assert no_local(dataclasses.replace(student, rows=torch.arange(3)), teacher)[0].item() == pytest.approx(
        no_local(student, teacher)[0].item(), rel=1e-6)


# ---------------------------------------------------------------- task, CRD, FD, MFD
def test_task_is_the_clip_loss_of_the_normalised_student():
    student, _ = make_batch()
    expected = clip_loss(F.normalize(student.image_emb, dim=1), F.normalize(student.text_emb, dim=1), 1 / 0.07)
    assert LOSSES["task"](DIMS)(student, TeacherTargets()).item() == pytest.approx(expected.item(), rel=1e-6)


def test_crd_matches_hand_computed_kl_on_2x2():
    eye = torch.eye(2)
    student = StudentOutputs(eye, eye, torch.tensor(1.0), eye * math.nan, eye * math.nan)
    teacher = TeacherTargets(image_emb=eye, text_emb=eye, logit_scale=2.0)
    p_t = [math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]  # softmax([2, 0])
    p_s = [math.e / (math.e + 1), 1 / (math.e + 1)]  # softmax([1, 0])
    kl_row = sum(t * math.log(t / s) for t, s in zip(p_t, p_s))  # every row, both directions, is the same
    assert LOSSES["crd"](Dims(2, 2))(student, teacher).item() == pytest.approx(kl_row, rel=1e-5)


def test_crd_zero_when_student_logits_equal_teacher_logits():
    student, teacher = make_batch(ds=DT)
    student.image_emb, student.text_emb = 5 * teacher.image_emb, 3 * teacher.text_emb  # same after norm
    student.logit_scale = torch.tensor(teacher.logit_scale)
    student.image_emb_proj = student.text_emb_proj = torch.full((B, DT), math.nan)  # unprojected ones are used
    assert LOSSES["crd"](DIMS)(student, teacher).item() == pytest.approx(0.0, abs=1e-5)


def test_fd_value_and_zero_at_the_target():
    student, teacher = make_batch()
    fd = LOSSES["fd"](DIMS)
    expected = (F.mse_loss(F.normalize(student.image_emb_proj, dim=1), teacher.image_emb)
                + F.mse_loss(F.normalize(student.text_emb_proj, dim=1), teacher.text_emb))
    assert fd(student, teacher).item() == pytest.approx(expected.item(), rel=1e-6)
    student.image_emb_proj, student.text_emb_proj = 4 * teacher.image_emb, 0.5 * teacher.text_emb
    assert fd(student, teacher).item() == pytest.approx(0.0, abs=1e-12)


def test_mfd_uses_the_masked_view_not_the_full_image():
    student, teacher = make_batch()
    mfd = LOSSES["mfd"](DIMS)
    assert mfd.mask_ratio == 0.75
    value = mfd(student, teacher)
    full = LOSSES["fd"](DIMS)(student, teacher)
    student.image_emb_proj = torch.full((B, DT), math.nan)  # the public code's full-image embedding: never read
    assert mfd(student, teacher).item() == pytest.approx(value.item())
    assert value.item() != pytest.approx(full.item())
    student.masked_image_emb_proj = torch.randn(B, DT)  # another masked view
    assert mfd(student, teacher).item() != pytest.approx(value.item())
    student.masked_image_emb_proj = teacher.image_emb  # equals FD evaluated on the masked embedding
    assert mfd(student, teacher).item() == pytest.approx(
        F.mse_loss(F.normalize(student.text_emb_proj, dim=1), teacher.text_emb).item(), rel=1e-6)


# ---------------------------------------------------------------- GD
@pytest.mark.parametrize("scale", [2.0, 50.0])
def test_gd_student_grads_equal_autograd_of_clip_loss(scale):
    """Teacher grads := autograd of clip_loss at the student's own point: GD must be 0 at any scale (a gradient
    divided by the scale instead of multiplied would be off by scale^2)."""
    student, teacher = make_batch()
    student.logit_scale = torch.tensor(scale)
    image = F.normalize(student.image_emb_proj.detach(), dim=1).requires_grad_()
    text = F.normalize(student.text_emb_proj.detach(), dim=1).requires_grad_()
    teacher.image_grad, teacher.text_grad = torch.autograd.grad(clip_loss(image, text, scale), (image, text))
    gd = LOSSES["gd"](DIMS)
    mean_sq = float(teacher.image_grad.square().mean() + teacher.text_grad.square().mean())
    assert gd(student, teacher).item() < 1e-8 * mean_sq
    student.logit_scale = torch.tensor(scale * 2)  # a wrong scale is clearly detected
    assert gd(student, teacher).item() > 0.1 * mean_sq


def test_gd_cached_and_recomputed_teacher_grads_agree():
    student, teacher = make_batch()
    gd = LOSSES["gd"](DIMS)
    cached = gd(student, teacher)
    recomputed = gd(student, dataclasses.replace(teacher, image_grad=None, text_grad=None))
    assert cached.item() == pytest.approx(recomputed.item(), rel=1e-6)
    zeros = dataclasses.replace(teacher, image_grad=torch.zeros(B, DT), text_grad=torch.zeros(B, DT))
    assert gd(student, zeros).item() != pytest.approx(cached.item())  # the cache is really read


def test_gd4_anchored_grads_are_autograd_and_sum_to_the_symmetric_grads():
    p, k = F.normalize(torch.randn(B, DT), dim=1), F.normalize(torch.randn(B, DT), dim=1)
    pp, kk = p.clone().requires_grad_(), k.clone().requires_grad_()
    F.cross_entropy(7.0 * pp @ kk.t(), torch.arange(B)).backward()
    g_p, g_k = anchored_grads(p, k, 7.0)
    torch.testing.assert_close(g_p, pp.grad)
    torch.testing.assert_close(g_k, kk.grad)
    g_img, g_txt = clip_loss_grads(p, k, 7.0)
    torch.testing.assert_close(g_img, 0.5 * (g_p + anchored_grads(k, p, 7.0)[1]))
    torch.testing.assert_close(g_txt, 0.5 * (g_k + anchored_grads(k, p, 7.0)[0]))


def test_gd4_zero_when_student_matches_teacher():
    student, teacher = make_batch()
    student.image_emb_proj, student.text_emb_proj = 2 * teacher.image_emb, teacher.text_emb
    student.logit_scale = torch.tensor(teacher.logit_scale)
    assert LOSSES["gd4"](DIMS)(student, teacher).item() < 1e-8 * float(teacher.image_grad.square().mean())


# ---------------------------------------------------------------- ICL, AFD
def test_icl_scale_is_exponentiated_and_clamped():
    student, teacher = make_batch()
    icl = LOSSES["icl"](DIMS)
    assert icl.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        icl.scale.param.fill_(10.0)  # raw use would give 10, exp without clamp e^10
    assert icl.scale().item() == pytest.approx(100.0)
    image, text = F.normalize(student.image_emb_proj, dim=1), F.normalize(student.text_emb_proj, dim=1)
    y = torch.arange(B)
    expected = 0.5 * (F.cross_entropy(100 * image @ teacher.text_emb.t(), y)
                      + F.cross_entropy(100 * text @ teacher.image_emb.t(), y))
    assert icl(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)


def test_afd_works_with_different_widths_and_trains_its_fusion():
    student, teacher = make_batch()
    afd = LOSSES["afd"](Dims(student_embed=32, teacher_embed=48))
    assert afd.image_fusion.weight.shape == (48, 96)
    afd(student, teacher).backward()
    for p in (afd.image_fusion.weight, afd.text_fusion.weight, afd.scale.param):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert student.image_emb_proj.grad.abs().sum() > 0


# ---------------------------------------------------------------- CKA
def test_cka_is_centred_rotation_invariant_and_bounded():
    torch.manual_seed(0)
    x, y = torch.randn(B * 4, 16), torch.randn(B * 4, 24)
    value = linear_cka(x, y)
    assert linear_cka(x + 5.0, y - 3.0).item() == pytest.approx(value.item(), rel=1e-4)

    def uncentred(a, b):  # the authors' version: offsets push it towards 1
        return (b.t() @ a).square().sum() / ((a.t() @ a).norm() * (b.t() @ b).norm())
    assert uncentred(x + 5.0, y - 3.0).item() > uncentred(x, y).item() + 0.5
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert linear_cka(x, x @ q).item() == pytest.approx(1.0, rel=1e-5)
    assert 0.0 <= value.item() <= 1.0


def test_cka_loss_bounds_and_zero_at_teacher():
    student, teacher = make_batch()
    cka = LOSSES["cka"](DIMS)
    assert 0.0 < cka(student, teacher).item() <= 3.0  # three terms, each in [0, 1]
    same = dataclasses.replace(student, image_emb=3 * teacher.image_emb, text_emb=teacher.text_emb)
    assert cka(same, teacher).item() == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------- token FD
def test_tokenfd_whitens_the_teacher_tokens():
    student, teacher = make_batch()
    tokenfd = LOSSES["tokenfd"](DIMS)
    value = tokenfd(student, teacher).item()
    scaled = dataclasses.replace(teacher, image_tokens=10 * teacher.image_tokens + 3.0)
    assert tokenfd(student, scaled).item() == pytest.approx(value, rel=1e-4)


def test_resample_tokens_keeps_cls_and_resamples_the_grid():
    x = torch.randn(2, NS, 5)
    out = resample_tokens(x, NT)
    assert out.shape == (2, NT, 5)
    torch.testing.assert_close(out[:, 0], x[:, 0])
    constant = torch.cat([x[:, :1], torch.ones(2, NS - 1, 5)], dim=1)
    torch.testing.assert_close(resample_tokens(constant, NT)[:, 1:], torch.ones(2, NT - 1, 5))
    with pytest.raises(ValueError, match="square"):
        resample_tokens(torch.randn(2, 7, 5), NT)


def test_tokenfd_smooth_l1_beta_2_hand_value():
    tokenfd = LOSSES["tokenfd"](Dims(DS, DT, student_vision_width=WT, teacher_vision_width=WT))
    with torch.no_grad():
        tokenfd.proj.weight.copy_(torch.eye(WT))
        tokenfd.proj.bias.zero_()
    target = F.layer_norm(torch.randn(B, NT, WT), (WT,))  # already whitened: whitening leaves it (almost) as is
    delta = torch.ones(B, NT, WT)
    delta[..., WT // 2:] = 3.0  # |d| = 1 < beta: 0.5 d^2 / 2 = 0.25; |d| = 3 >= beta: |d| - 1 = 2
    student = dataclasses.replace(make_batch()[0], image_tokens=target + delta)
    assert tokenfd(student, TeacherTargets(image_tokens=target)).item() == pytest.approx(1.125, rel=1e-4)


# ---------------------------------------------------------------- DLIP
def test_map_layers():
    assert map_layers(3, 12) == [3, 7, 11]
    assert map_layers(12, 12) == list(range(12))
    assert map_layers(4, 6) == [1, 2, 4, 5]  # halves round up (Python's round() would give [1, 2, 3, 5])
    with pytest.raises(ValueError):
        map_layers(0, 12)


def test_dlip_representation_is_differentiable_and_zero_at_the_target():
    student, teacher = make_batch()
    dlip = LOSSES["dlip"](DIMS)
    assert dlip.layer_map == {"image": [1, 3], "text": [1, 3]}
    dlip(student, teacher).backward()
    assert all(h.grad.abs().sum() > 0 for h in student.hidden_states["image"] + student.hidden_states["text"])
    assert all(lin.weight.grad is not None for lins in dlip.proj.values() for lin in lins)
    square = Dims(DS, DT, WT, WT, (WT, WT), (WT, WT), (WT, WT), (WT, WT))
    dlip = LOSSES["dlip"](square)
    with torch.no_grad():
        for lin in (lin for lins in dlip.proj.values() for lin in lins):
            lin.weight.copy_(torch.eye(WT))
            lin.bias.zero_()
    hidden = {"image": [torch.randn(B, NT, WT) for _ in range(2)], "text": [torch.randn(B, NTXT, WT) for _ in range(2)]}
    outputs = dataclasses.replace(student, hidden_states=hidden)
    assert dlip(outputs, TeacherTargets(hidden_states=hidden)).item() == pytest.approx(0.0, abs=1e-12)


def test_attention_kl_zero_for_identical_maps_and_resampling_keeps_distributions():
    a = attention_maps(1, HT, NT, False)[0]
    assert attention_kl(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_kl(attention_maps(1, HT, NT, False)[0], a).item() > 0
    resampled = _align_attention("image", attention_maps(1, HS, NS, False)[0], NT)
    assert resampled.shape == (B, HS, NT, NT)
    torch.testing.assert_close(resampled.sum(-1), torch.ones(B, HS, NT))
    student, teacher = make_batch()
    # teacher: other head count (HT), same head-averaged maps -> zero through the head-averaging path
    teacher.attentions = {t: [a.mean(1, keepdim=True).repeat(1, HT, 1, 1).detach() for a in maps]
                          for t, maps in student.attentions.items()}
    assert LOSSES["dlip_attn"](DIMS)(student, teacher).item() == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------- real inputs from tiny open_clip models
def _forward_with_internals(model, image, text) -> dict:
    """The training loop's own capture (common.families), reshaped for this test."""
    f = forward_features(model, image, text, frozenset({"image_emb", "text_emb", "image_tokens", "hidden_states",
                                                        "attentions"}))
    return {"image_emb": f["image_emb"], "text_emb": f["text_emb"], "tokens": f["image_tokens"],
            "image": f["hidden_states"]["image"], "text": f["hidden_states"]["text"],
            "attn_image": f["attentions"]["image"], "attn_text": f["attentions"]["text"]}


def test_all_losses_on_tiny_open_clip_models():
    """Every loss but `caption` (its student must be a CoCa: tests/test_captions.py)."""
    torch.manual_seed(0)
    teacher_model, student_model = (open_clip.create_model(n) for n in ("kd-test-teacher", "kd-test-student"))
    texts = open_clip.get_tokenizer("kd-test-student")([f"a photo of thing {i}" for i in range(4)])
    image = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        t = _forward_with_internals(teacher_model.eval(), image, texts)
    s = _forward_with_internals(student_model, F.interpolate(image, size=24, mode="bilinear"), texts)
    masked = student_model.encode_image(F.interpolate(image, size=24) * (torch.rand(4, 1, 24, 24) > 0.75))
    proj_v, proj_t = torch.nn.Linear(32, 48), torch.nn.Linear(32, 48)
    student = StudentOutputs(
        image_emb=s["image_emb"], text_emb=s["text_emb"], logit_scale=student_model.logit_scale.exp().clamp(max=100),
        image_emb_proj=proj_v(s["image_emb"]), text_emb_proj=proj_t(s["text_emb"]),
        masked_image_emb_proj=proj_v(masked), image_tokens=s["tokens"],
        hidden_states={"image": s["image"], "text": s["text"]},
        attentions={"image": s["attn_image"], "text": s["attn_text"]})
    teacher = TeacherTargets(
        image_emb=F.normalize(t["image_emb"], dim=1), text_emb=F.normalize(t["text_emb"], dim=1),
        logit_scale=teacher_model.logit_scale.exp().item(), image_tokens=t["tokens"],
        hidden_states={"image": t["image"], "text": t["text"]},
        attentions={"image": t["attn_image"], "text": t["attn_text"]})
    assert student.image_tokens.shape == (4, 10, 32) and teacher.image_tokens.shape == (4, 17, 48)
    assert student.attentions["image"][0].shape == (4, 2, 10, 10) and teacher.attentions["image"][0].shape[1] == 3
    dims = Dims(32, 48, 32, 48, (32, 32), (48, 48), (32, 32), (48, 48))
    names = sorted(set(LOSSES) - {"caption"})
    losses = LossSet(",".join(names), dims)
    total, terms = losses(student, teacher)
    assert torch.isfinite(total) and set(terms) == set(names) and all(math.isfinite(v) for v in terms.values())
    total.backward()
    for p in (student_model.visual.conv1.weight, student_model.token_embedding.weight, student_model.logit_scale,
              proj_v.weight, proj_t.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_attention_kl_gradient_matches_float64_where_student_attention_is_tiny():
    """At attention-logit std 6 many A_s fall below 1e-8; clamping there zeroed -A_t / A_s and so the gradient."""
    torch.manual_seed(0)
    n = NT
    logits = (6 * torch.randn(B, HS, n, n, dtype=torch.float64)).requires_grad_()
    causal = torch.ones(n, n).triu(1).bool()  # masked entries: A_s = A_t = 0, as in the text tower
    a_t = torch.randn(B, HS, n, n, dtype=torch.float64).masked_fill(causal, float("-inf")).softmax(-1)
    masked_logits = lambda z: z.masked_fill(causal, float("-inf"))  # noqa: E731
    log_a_s = masked_logits(logits).log_softmax(-1).nan_to_num(neginf=0.0)  # 0 log 0 = 0 where masked
    reference = (torch.xlogy(a_t, a_t) - a_t * log_a_s).sum(-1).mean()
    (expected,) = torch.autograd.grad(reference, logits)
    a_s = masked_logits(logits.float()).softmax(-1)
    assert (a_s[..., ~causal] < 1e-8).float().mean() > 0.05  # the regime the clamp got wrong
    (grad,) = torch.autograd.grad(attention_kl(a_s, a_t.float()), logits)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-7)


def test_learnable_scales_are_clamped_in_place_after_a_step_and_keep_their_gradient():
    """ICL's and AFD's scales: once exp(param) passed 100 the forward clamp zeroed their gradient forever."""
    student, teacher = make_batch()
    losses = LossSet("icl,afd,fd", DIMS)
    scales = [losses.losses[name].members["main"].scale.param for name in ("icl", "afd")]
    with torch.no_grad():
        for param in scales:
            param.fill_(6.0)  # exp(6) = 403: what an optimizer step may leave
    losses.after_step()
    for param in scales:
        assert param.item() == pytest.approx(math.log(100.0))
    total, _ = losses(student, teacher)
    total.backward()
    for param in scales:
        assert param.grad is not None and param.grad.item() != 0.0
