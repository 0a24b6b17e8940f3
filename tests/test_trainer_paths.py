"""The GPU trainer's paths, each proven on CPU (gloo) by equivalence with the plain run: DDP (torchrun and
srun-style SLURM ranks), --local-loss, --accum-freq (feature caching and plain accumulation), --grad-checkpointing,
--torchcompile, --precision amp with skipped steps, and no host read on a step that is not logged."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import dist
from stage1_teacher.build import BuildOptions, build_cache
from stage2_student.train import Trainer, TrainOptions
from tests.helpers import REPO, save_random_checkpoint

TEACHER, STUDENT = "kd-test-teacher", "kd-test-student"
KD = "task,fd,icl,crd"  # the CLIP-KD default


@pytest.fixture(scope="module")
def cache(synth_corpus, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("paths")
    ckpt = save_random_checkpoint(TEACHER, root / "teacher.pt", seed=5)
    out = root / "cache.zarr"
    build_cache(BuildOptions(teacher=TEACHER, pretrained=str(ckpt), data=str(synth_corpus / "train"), out=str(out),
                             batch_size=32, grad_batch=64, chunk_rows=64, workers=0))
    return out


def options(corpus: Path, out: Path, **kw) -> dict:
    return {**dict(data=str(corpus / "train"), out=str(out), student=STUDENT, losses=KD, batch_size=32, steps=3,
                   warmup=1, workers=0, log_every=1, save_every=1000, lr=1e-3), **kw}


def run_in_process(**kw) -> Trainer:
    trainer = Trainer(TrainOptions(**kw))
    trainer.run()
    return trainer


def one_step_grads(**kw) -> tuple[dict[str, torch.Tensor], dict]:
    """The gradients of the first step (left on the parameters by the step) and its logged terms."""
    trainer = Trainer(TrainOptions(**{**kw, "steps": 1}))
    last = trainer.run()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}, last


def assert_grads_close(a: dict, b: dict, rtol=1e-4, atol=1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict, b: dict) -> None:
    """Weights equal to float tolerance. Adam's early steps are ~lr * sign(g), so a gradient that is ~0 up to
    summation order may step either way: all but a sliver of the entries must agree."""
    assert a.keys() == b.keys()
    differing = sum(int(((a[k] - b[k]).abs() > 1e-5).sum()) for k in a)
    assert differing <= 1e-3 * sum(v.numel() for v in a.values()), differing


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_slurm_style(spec: Path, ranks: int = 2) -> None:
    """`srun -n 2 python tests/rank_runs.py` without srun: each process gets SLURM's variables (no torchrun ones),
    and MASTER_ADDR / MASTER_PORT as a job script exports them."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "SLURM_NTASKS": str(ranks),
            "SLURM_NTASKS_PER_NODE": str(ranks), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "rank_runs.py"), str(spec)], cwd=REPO,
                              env=env | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(ranks)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def two_rank_runs(synth_corpus, cache, tmp_path_factory) -> dict[str, Path]:
    """Four 2-rank runs in one srun-style launch: plain DDP, --local-loss, --accum-freq 2 at half the batch, and a
    ModifiedResNet student (BatchNorm buffers)."""
    root = tmp_path_factory.mktemp("ranks")
    runs = {"ddp": {}, "local": {"local_loss": True}, "accum": {"batch_size": 16, "accum_freq": 2},
            "resnet": {"student": "kd-test-rn", "losses": "task,fd", "steps": 2}}
    spec = [options(synth_corpus, root / name, cache=str(cache), **kw) for name, kw in runs.items()]
    (root / "runs.json").write_text(json.dumps(spec))
    launch_slurm_style(root / "runs.json")
    return {name: root / name for name in runs}


@pytest.fixture(scope="module")
def one_process(synth_corpus, cache, tmp_path_factory) -> Trainer:
    return run_in_process(**options(synth_corpus, tmp_path_factory.mktemp("one") / "run", cache=str(cache)))


def ranks(out: Path) -> dict:
    return torch.load(out / "ranks.pt", weights_only=True)


def test_ddp_two_ranks_equal_one_process(two_rank_runs, one_process):
    state = ranks(two_rank_runs["ddp"])
    for name, value in state["params"][0].items():
        assert torch.equal(value, state["params"][1][name]), name  # DDP: the ranks step alike, bit for bit
    expected = {n: p.detach() for n, p in one_process.model.named_parameters()}
    assert_same_weights(state["params"][0], expected)
    for a, b in zip(metrics(two_rank_runs["ddp"]), metrics(one_process.out)):
        for key in ("loss", *KD.split(",")):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


def test_local_loss_equals_the_global_form(two_rank_runs, one_process):
    state = ranks(two_rank_runs["local"])
    assert_same_weights(state["params"][0], {n: p.detach() for n, p in one_process.model.named_parameters()})
    for a, b in zip(metrics(two_rank_runs["local"]), metrics(one_process.out)):
        for key in ("loss", *KD.split(","), "grad_norm"):  # logged: the mean over ranks, i.e. the global values
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


def test_two_rank_accumulation_equals_the_big_batch(two_rank_runs, one_process):
    state = ranks(two_rank_runs["accum"])  # 2 ranks x 2 micro-batches of 8: no_sync, then one all-reduce
    assert_same_weights(state["params"][0], {n: p.detach() for n, p in one_process.model.named_parameters()})
    for a, b in zip(metrics(two_rank_runs["accum"]), metrics(one_process.out)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_resnet_student_keeps_its_ranks_equal(two_rank_runs):
    state = ranks(two_rank_runs["resnet"])
    assert any("running_mean" in name for name in state["buffers"][0])
    for key in ("params", "buffers"):  # BatchNorm statistics: rank 0's everywhere (DDP's broadcast)
        for name, value in state[key][0].items():
            assert torch.equal(value, state[key][1][name]), name


def test_accumulation_gives_the_big_batch_gradient(synth_corpus, cache, tmp_path):
    """--accum-freq 2 --batch-size 32 = --batch-size 64 for the pooled CLIP-KD losses (open_clip's feature caching:
    the projections', ICL's scale and the logit scale's gradients too), and for a token loss (plain accumulation
    of a per-sample mean)."""
    for losses, extra in ((KD, {}), ("task,tokenfd", {"teacher_targets": "auto"})):
        big, big_terms = one_step_grads(**options(synth_corpus, tmp_path / f"big-{losses}", cache=str(cache),
                                                  losses=losses, batch_size=64, **extra))
        acc, acc_terms = one_step_grads(**options(synth_corpus, tmp_path / f"acc-{losses}", cache=str(cache),
                                                  losses=losses, batch_size=32, accum_freq=2, **extra))
        assert_grads_close(acc, big)
        for name in ("loss", *losses.split(",")):
            assert acc_terms[name] == pytest.approx(big_terms[name], rel=1e-5), (losses, name)


def test_batching_cache_replays_the_build_batches_under_accumulation(synth_corpus, cache, tmp_path):
    """The build's gradient batches (64 rows) as one step of 2 x 32: GD uses the stored gradients of that batch."""
    args = options(synth_corpus, tmp_path / "a", cache=str(cache), losses="task,gd", batching="cache")
    big, _ = one_step_grads(**{**args, "batch_size": 64})
    acc, _ = one_step_grads(**{**args, "out": str(tmp_path / "b"), "batch_size": 32, "accum_freq": 2})
    assert_grads_close(acc, big)
    with pytest.raises(ValueError, match=r"--batch-size x --accum-freq must equal the cache's --grad-batch \(64\)"):
        Trainer(TrainOptions(**{**args, "out": str(tmp_path / "c"), "accum_freq": 3}))


def test_grad_checkpointing_gives_the_same_gradients(synth_corpus, cache, tmp_path):
    """Recomputed blocks give the same gradients, also for the attention maps DLIP reads (the weights are asked
    for in the recompute too) and the masked view's token dropout (the recompute draws the same mask)."""
    for losses in (KD + ",mfd", "task,dlip_attn"):
        plain, _ = one_step_grads(**options(synth_corpus, tmp_path / f"p-{losses}", cache=str(cache), losses=losses))
        ckpt, _ = one_step_grads(**options(synth_corpus, tmp_path / f"c-{losses}", cache=str(cache), losses=losses,
                                           grad_checkpointing=True))
        assert_grads_close(ckpt, plain, rtol=1e-5, atol=1e-7)


def test_torchcompile_equals_eager(synth_corpus, cache, tmp_path):
    eager = run_in_process(**options(synth_corpus, tmp_path / "eager", cache=str(cache), steps=2))
    compiled = run_in_process(**options(synth_corpus, tmp_path / "compiled", cache=str(cache), steps=2,
                                        torchcompile=True))
    assert type(compiled.student.clip.visual).__name__ == type(eager.student.clip.visual).__name__  # in place
    assert compiled.student.clip.visual._compiled_call_impl is not None
    for a, b in zip(metrics(compiled.out), metrics(eager.out)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert_same_weights({n: p.detach() for n, p in compiled.model.named_parameters()},
                        {n: p.detach() for n, p in eager.model.named_parameters()})


def test_amp_trains_and_a_skipped_step_is_counted_not_fatal(synth_corpus, cache, tmp_path):
    trainer = Trainer(TrainOptions(**options(synth_corpus, tmp_path / "amp", cache=str(cache), precision="amp",
                                             steps=3)))
    # a scale no fp16 gradient survives: the first step overflows and is skipped, the scaler backs off to 2^10
    trainer.optimizer_step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60, backoff_factor=2.0 ** -50)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    records = metrics(trainer.out)
    assert records[0]["amp_skipped_steps"] == 1 and records[-1]["step"] == 3
    assert records[-1]["amp_skipped_steps"] < 3  # the later steps were taken
    assert all(abs(r["loss"]) < float("inf") for r in records)
    assert trainer.optimizer_step.scaler.get_scale() <= 2.0 ** 10
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())
    assert json.loads((trainer.out / "options.json").read_text())["precision"] == "amp"


class HostReads:
    """Counts the Tensor methods that read a value back to the host (on a GPU each waits for the stream)."""
    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__")

    def __init__(self):
        self.counting, self.calls = False, []

    def __enter__(self):
        self.saved = {m: getattr(torch.Tensor, m) for m in self.METHODS}
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, self.wrap(name, original))
        return self

    def wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            if self.counting:
                self.calls.append(name)
            return original(tensor, *args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


def test_no_host_read_on_a_step_that_is_not_logged(synth_corpus, cache, tmp_path):
    """A cached CLIP-KD run, log steps 1 and 4: steps 2 and 3 (their data's way to the device, forward, backward,
    clip, AdamW, schedule) read nothing back. The loader's worker process does the host work (reading, decoding,
    the cached targets' lookup)."""
    trainer = Trainer(TrainOptions(**options(synth_corpus, tmp_path, cache=str(cache), steps=4, log_every=100,
                                             workers=1, grad_clip=1.0)))
    reads = HostReads()
    per_step: dict[int, list[str]] = {}
    micro_batch, train_step = trainer.micro_batch, trainer.train_step

    def counted_micro_batch(batch):
        reads.counting, reads.calls = trainer.step + 1 not in (1, 4), []
        return micro_batch(batch)

    def counted_train_step(micro_batches, log_step=True):
        train_step(micro_batches, log_step)
        per_step[trainer.step + 1] = list(reads.calls)
        reads.counting = False

    trainer.micro_batch, trainer.train_step = counted_micro_batch, counted_train_step
    with reads:
        trainer.run()
    assert per_step[2] == [] and per_step[3] == [], per_step
    assert len(metrics(trainer.out)) == 2  # steps 1 and 4 were logged (and read)
    with reads:  # the counter sees a read
        reads.counting = True
        float(torch.ones(()))
    assert reads.calls == ["__float__"]


def test_slurm_variables_without_master_address_are_refused(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert dist.init_distributed("cpu") == (0, 1)  # one task: a plain run
    monkeypatch.setenv("SLURM_NTASKS", "4")
    with pytest.raises(ValueError, match="SLURM started 4 tasks but MASTER_ADDR / MASTER_PORT are not set"):
        dist.init_distributed("cpu")
