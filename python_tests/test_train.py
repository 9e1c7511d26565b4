"""The trainer: every method trains and probes on the embedded dataset, checkpoints are atomic,
a resumed (or interrupted, or kill -9'd) run continues to exactly the losses and the log of an
uninterrupted one, and every bad argument is a one-line error (exit status 2) that writes
nothing."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from sslkernels import train as T
from sslkernels.augment import uint8_collate
from sslkernels.data import SHAPES, SyntheticShapes

TINY = ["--train-size", "64", "--batch-size", "16", "--image-size", "16", "--epochs", "2",
        "--queue-size", "64", "--quiet", "--seed", "3"]


def _args(tmp_path, method, *extra):
    return T.build_parser().parse_args(["--method", method, "--out", str(tmp_path / method),
                                        *TINY, *extra])


WALL_CLOCK = ("images_per_s", "seconds")


def _log(path):
    """metrics.jsonl without its wall-clock fields."""
    lines = [json.loads(line) for line in open(path)]
    return [{k: v for k, v in line.items() if k not in WALL_CLOCK} for line in lines]


@pytest.mark.parametrize("method", T.METHODS)
def test_every_method_trains_and_probes(tmp_path, method):
    result = T.train(_args(tmp_path, method))
    assert result["steps"] == 8 and all(map(lambda v: v == v, result["losses"]))
    out = tmp_path / method
    assert (out / "curves.png").stat().st_size > 1000
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["probe"]) == {"random", "trained"}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 9))
    assert {"loss", "lr", "images_per_s", "embedding_std", "seconds"} <= set(lines[0])
    # the collapse monitor: the std of normalized embeddings lies in (0, 1/sqrt(d)]-ish
    assert all(0 < line["embedding_std"] < 1 for line in lines)


@pytest.mark.parametrize("method", ["mocov2", "byol"])
def test_resume_continues_to_the_same_losses(tmp_path, method):
    full = T.train(_args(tmp_path / "a", method, "--no-probe"))
    first = T.train(_args(tmp_path / "b", method, "--no-probe", "--stop-after", "5",
                          "--checkpoint-every", "3"))
    assert first["steps"] == 5
    resumed = T.train(_args(tmp_path / "b", method, "--no-probe", "--resume"))
    assert resumed["steps"] == 8
    assert resumed["losses"] == full["losses"]  # bit for bit


def test_interrupt_saves_and_resumes(tmp_path, monkeypatch):
    full = T.train(_args(tmp_path / "a", "simclr", "--no-probe"))
    calls = {"n": 0}
    real = T.Views.__call__

    def flaky(self, images, step, device):
        if step == 4 and calls["n"] == 0:
            calls["n"] += 1
            raise KeyboardInterrupt
        return real(self, images, step, device)

    monkeypatch.setattr(T.Views, "__call__", flaky)
    args = _args(tmp_path / "b", "simclr", "--no-probe", "--checkpoint-every", "100")
    with pytest.raises(KeyboardInterrupt):
        T.train(args)
    state = torch.load(tmp_path / "b" / "simclr" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 4  # Ctrl-C lost nothing: the 4 finished steps are saved
    resumed = T.train(_args(tmp_path / "b", "simclr", "--no-probe", "--resume"))
    assert resumed["losses"] == full["losses"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    T.save_checkpoint(path, {"step": 1})

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        T.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"step": 1}


def test_cli_entry_point(tmp_path):
    from sslkernels.__main__ import main

    assert main(["train", "--method", "simsiam", "--out", str(tmp_path / "cli"), *TINY,
                 "--no-probe"]) == 0
    assert os.path.exists(tmp_path / "cli" / "checkpoint.pt")


def test_dataset_and_collate():
    ds = SyntheticShapes(30, 24, seed=1)
    im, label = ds[5]
    assert im.dtype == torch.uint8 and im.shape == (3, 24, 24) and 0 <= label < 10
    assert torch.equal(ds[5][0], SyntheticShapes(30, 24, seed=1)[5][0])  # deterministic
    assert not torch.equal(ds[5][0], SyntheticShapes(30, 24, seed=2)[5][0])
    batch, labels = uint8_collate([ds[i] for i in range(4)])
    assert batch.shape == (4, 3, 24, 24) and batch.dtype == torch.uint8
    mixed, _ = uint8_collate([ds[0], (torch.zeros(3, 10, 12, dtype=torch.uint8), 1)])
    assert isinstance(mixed, list)
    with pytest.raises(IndexError):
        ds[30]
    with pytest.raises(ValueError, match="size"):
        SyntheticShapes(10, 8)
    with pytest.raises(ValueError, match="length"):
        SyntheticShapes(0, 32)


def test_dataset_classes_are_shapes_not_colours():
    """The class must not be readable from colour: per-class mean colours are all alike, while
    each class's shape leaves a distinct mean edge pattern."""
    ds = SyntheticShapes(600, 32, seed=0)
    ims = torch.stack([ds[i][0] for i in range(len(ds))]).float() / 255
    labels = torch.tensor([ds[i][1] for i in range(len(ds))])
    assert set(labels.tolist()) == set(range(len(SHAPES)))
    colour = torch.stack([ims[labels == c].mean((0, 2, 3)) for c in range(len(SHAPES))])
    assert (colour.max(0).values - colour.min(0).values).max() < 0.15  # fill area differs
    # a nearest-class-mean classifier on mean colour is near chance
    per_image = ims.mean((2, 3))
    pred = torch.cdist(per_image, colour).argmin(1)
    assert (pred == labels).float().mean() < 0.25


def test_bad_arguments_in_python(tmp_path):
    """train() itself (not only the CLI) raises UsageError, a ValueError, before writing."""
    with pytest.raises(ValueError, match="batch-size"):
        T.train(T.build_parser().parse_args(["--method", "simclr", "--train-size", "8",
                                             "--batch-size", "16", "--out", str(tmp_path / "x")]))
    with pytest.raises(ValueError, match="min-scale"):
        T.Views("simclr", 16, 0, min_scale=0.0)
    with pytest.raises(ValueError, match="no checkpoint"):
        T.train(_args(tmp_path / "none", "simclr", "--resume"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "none").exists()


def test_views_are_the_library_augmentation_seeded_by_step():
    """The trainer's views are sslkernels.augment's op with the recipe's configs and a generator
    seeded by (seed, step): the same step replays exactly, another step draws anew."""
    from sslkernels import augment as A

    images = torch.stack([SyntheticShapes(4, 32, seed=0)[i][0] for i in range(4)])
    views = T.Views("byol", 32, seed=5, min_scale=T.default_min_scale(32))
    assert [c.scale for c in views.configs] == [(0.4, 1.0)] * 2
    assert (views.configs[0].blur_p, views.configs[1].solarize_p) == (1.0, 0.2)  # BYOL's views
    a0, a1 = views(images, 7, torch.device("cpu"))
    want = A.TwoViews(*views.configs)(images, generator=torch.Generator().manual_seed(
        5 * 1_000_003 + 7))
    assert torch.equal(a0, want.view1) and torch.equal(a1, want.view2)
    b0, _ = views(images, 8, torch.device("cpu"))
    assert not torch.equal(a0, b0)
    assert T.default_min_scale(224) is None
    assert T.Views("simclr", 224, 0).configs[0].scale == (0.08, 1.0)  # the recipe's own


# ---------------------------------------------------------------------------------------------
# Crash safety: kill -9, then --resume, gives the uninterrupted run's log step for step.

_HANGING_TRAINER = """
import os, sys, time
from sslkernels import train as T
real = T.Views.__call__
def views(self, images, step, device):
    if step == {hang_at}:
        open({sentinel!r}, "w").close()
        time.sleep(600)
    return real(self, images, step, device)
T.Views.__call__ = views
sys.exit(T.main({argv!r}))
"""


def test_kill_9_then_resume_gives_the_uninterrupted_log(tmp_path):
    extra = ["--no-probe", "--checkpoint-every", "3"]
    full = T.train(_args(tmp_path / "a", "mocov2", *extra))
    out = tmp_path / "b" / "mocov2"
    sentinel = tmp_path / "hung"
    argv = ["--method", "mocov2", "--out", str(out), *TINY, *extra]
    # steps 1-5 done, checkpoint at step 3; the process is killed inside step 6
    code = _HANGING_TRAINER.format(hang_at=5, sentinel=str(sentinel), argv=argv)
    # same thread count as this process: the losses are compared bit for bit
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path),
               OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not sentinel.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the trainer did not reach step 6"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 3
    # the log survived the kill, and holds steps beyond the checkpoint (4 and 5)
    assert [line["step"] for line in _log(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    resumed = T.train(_args(tmp_path / "b", "mocov2", *extra, "--resume"))
    assert resumed["losses"] == full["losses"]
    assert _log(out / "metrics.jsonl") == _log(tmp_path / "a" / "mocov2" / "metrics.jsonl")


def test_log_is_durable_at_every_checkpoint(tmp_path, monkeypatch):
    """Each checkpoint records a log length that was fsynced before it was written."""
    synced, seen = [], []
    real_fsync = os.fsync

    def fsync(fd):
        real_fsync(fd)
        synced.append(os.fstat(fd).st_size)

    real_save = T.save_checkpoint

    def save(path, state):
        assert state["log_bytes"] in synced  # the log was made durable first
        seen.append((state["step"], state["log_bytes"]))
        real_save(path, state)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(T, "save_checkpoint", save)
    T.train(_args(tmp_path, "simclr", "--no-probe", "--checkpoint-every", "3"))
    lines = (tmp_path / "simclr" / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    assert seen == [(s, len(b"".join(lines[:s]))) for s in (3, 6, 8)]


# ---------------------------------------------------------------------------------------------
# Bad input: one line "error: ...", exit status 2, nothing written.

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished mocov2 run (8 steps), copied by the tests that need a run in OUT."""
    root = tmp_path_factory.mktemp("finished")
    T.train(_args(root, "mocov2", "--no-probe"))
    return root / "mocov2"


def _snapshot(path):
    if not os.path.exists(path):
        return None
    return {p: open(os.path.join(path, p), "rb").read() for p in sorted(os.listdir(path))}


def _cli_error(capsys, argv):
    from sslkernels.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m sslkernels train: error: "), err
    return lines[0]


BAD_OPTIONS = [
    (["--batch-size", "0"], "--batch-size: must be >= 2"),
    (["--batch-size", "x"], "--batch-size: expected an integer, got 'x'"),
    (["--batch-size", "128"], "--batch-size 128 is larger than the training set (64 images)"),
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--width", "30"], "--width: must be a positive multiple of 4"),
    (["--lr", "0"], "--lr: must be > 0"),
    (["--lr", "nan"], "--lr: expected a finite number"),
    (["--weight-decay", "-1"], "--weight-decay: must be >= 0"),
    (["--image-size", "8"], "--image-size: must be >= 16"),
    (["--seed", "-1"], "--seed: must be in [0, 2^31)"),
    (["--device", "tpu"], "--device: not a torch device"),
    (["--min-scale", "0"], "--min-scale: must be in (0, 1]"),
    (["--queue-size", "-1"], "--queue-size: must be >= 0"),
    (["--queue-size", "0"], "--queue-size must be >= 1 for mocov2"),
    (["--train-size", "0"], "--train-size: must be >= 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every: must be >= 1"),
    (["--no-stop-grad"], "--no-stop-grad applies to --method simsiam, not mocov2"),
    (["--schedule", "linear"], "--schedule: invalid choice"),
    (["--resume", "--overwrite"], "pick one"),
    (["--resume"], "--resume: no checkpoint at"),
    (["--data", "/nonexistent/images"], "--data /nonexistent/images: no such directory"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append((["--device", "cuda"], "CUDA is not available"))


@pytest.mark.parametrize("extra,message", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_error_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    line = _cli_error(capsys, ["train", "--method", "mocov2", "--out", str(out), *TINY, *extra])
    assert message in line
    assert not out.exists()


def test_bad_method_and_flag_combinations(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--out", out, *TINY]
    assert "invalid choice: 'swav'" in _cli_error(capsys, base + ["--method", "swav"])
    assert "--no-mlp applies to --method mocov2" in _cli_error(
        capsys, base + ["--method", "simclr", "--no-mlp"])
    assert "--temperature applies to the contrastive methods" in _cli_error(
        capsys, base + ["--method", "byol", "--temperature", "0.1"])
    assert "--momentum applies to the methods with an EMA network" in _cli_error(
        capsys, base + ["--method", "simsiam", "--momentum", "0.9"])
    assert "--momentum: must be in [0, 1]" in _cli_error(
        capsys, base + ["--method", "byol", "--momentum", "1.5"])
    (tmp_path / "empty").mkdir()
    assert "not an image folder" in _cli_error(
        capsys, base + ["--method", "simclr", "--data", str(tmp_path / "empty")])
    (tmp_path / "file").write_text("x")
    assert "exists and is not a directory" in _cli_error(
        capsys, ["train", "--method", "simclr", "--out", str(tmp_path / "file"), *TINY])
    assert not os.path.exists(out)


def _copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst, _snapshot(dst)


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys, finished_run):
    out, before = _copy_run(finished_run, tmp_path / "run")
    line = _cli_error(capsys, ["train", "--method", "mocov2", "--out", str(out), *TINY])
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert _snapshot(out) == before
    T.train(_args(tmp_path, "mocov2", "--no-probe", "--out", str(out), "--overwrite"))
    assert len(_log(out / "metrics.jsonl")) == 8  # replaced, not appended to


def test_resume_with_other_options_says_what_differs(tmp_path, capsys, finished_run):
    out, before = _copy_run(finished_run, tmp_path / "run")
    line = _cli_error(capsys, ["train", "--method", "simclr", "--out", str(out), *TINY,
                               "--resume", "--width", "32"])
    assert "--method mocov2 (checkpoint) vs simclr (now)" in line
    assert "--width 64 (checkpoint) vs 32 (now)" in line
    assert "--queue-size 64 (checkpoint) vs None (now)" in line
    assert _snapshot(out) == before
    # options that do not define the run may change
    T.train(_args(tmp_path, "mocov2", "--out", str(out), "--resume", "--no-probe",
                  "--checkpoint-every", "7", "--workers", "0"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not a checkpoint"])
def test_unreadable_checkpoint_is_named_with_what_to_do(tmp_path, capsys, finished_run, damage):
    out, _ = _copy_run(finished_run, tmp_path / "run")
    ckpt = out / "checkpoint.pt"
    if damage == "truncated":
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        ckpt.write_bytes(os.urandom(4096))
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    before = _snapshot(out)
    line = _cli_error(capsys, ["train", "--method", "mocov2", "--out", str(out), *TINY,
                               "--resume"])
    assert str(ckpt) in line and "--overwrite" in line
    assert ("truncated or corrupt" in line) == (damage != "not a checkpoint")
    assert "zip" not in line.split("(torch.load")[0]
    assert _snapshot(out) == before


def test_resume_with_a_lost_log_is_refused(tmp_path, capsys, finished_run):
    out, _ = _copy_run(finished_run, tmp_path / "run")
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:3]))
    line = _cli_error(capsys, ["train", "--method", "mocov2", "--out", str(out), *TINY,
                               "--resume"])
    assert "metrics.jsonl has" in line and "steps 1-8" in line


def test_cli_error_from_a_subprocess_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-m", "sslkernels", "train", "--method", "simclr",
                           "--batch-size", "0", "--out", str(tmp_path / "r")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "python -m sslkernels train: error: argument --batch-size: must be >= 2 (BatchNorm "
        "needs 2 samples), got 0 (see --help)"]
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# Progress, log, schedule

class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_a_line_per_epoch_otherwise():
    from sslkernels.progress import Progress

    plain = io.StringIO()
    p = Progress(10, 4, stream=plain)
    for step in range(1, 11):
        p.update(step, 1.0 / step, 32)
    p.close()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in plain.getvalue()
    assert lines[0].startswith("epoch 1/3  step 4/10") and "img/s" in lines[0]
    assert lines[2].startswith("epoch 3/3  step 10/10")
    tty = _Tty()
    p = Progress(10, 4, stream=tty, initial=2)
    for step in range(3, 11):
        p.update(step, 0.5, 32)
    p.close()
    assert "\r" in tty.getvalue() and "10/10" in tty.getvalue() and "img/s" in tty.getvalue()
    quiet = io.StringIO()
    p = Progress(10, 4, stream=quiet, enabled=False)
    p.update(4, 1.0, 32)
    assert quiet.getvalue() == ""


def test_metrics_log_truncates_to_the_checkpoint(tmp_path):
    from sslkernels._cli import UsageError
    from sslkernels.metrics_log import MetricsLog, check_resumable

    path = str(tmp_path / "m.jsonl")
    log = MetricsLog(path)
    for s in (1, 2):
        log.write({"step": s})
    n = log.sync()
    log.write({"step": 3})
    log.close()
    check_resumable(path, n, 2)
    with pytest.raises(UsageError, match="is not step 1"):
        check_resumable(path, n, 1)
    log = MetricsLog(path, truncate_to=n)
    log.write({"step": 3, "again": True})
    log.close()
    assert [json.loads(x) for x in open(path)] == [{"step": 1}, {"step": 2},
                                                   {"step": 3, "again": True}]
    os.remove(path)
    with pytest.raises(UsageError, match="is missing"):
        check_resumable(path, n, 2)


def test_step_schedule_is_moco_v1s():
    f = [T.lr_factor(s, 0, 100, "step") for s in (0, 59, 60, 79, 80, 99)]
    assert f == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert T.lr_factor(0, 10, 100, "step") == pytest.approx(0.1)  # warm-up first
    assert T.lr_factor(55, 10, 100) == pytest.approx(0.5)


def test_ablation_switches_reach_the_model(tmp_path):
    moco = T.build_method(T.resolve(_args(tmp_path, "mocov2", "--no-mlp")))
    assert [type(m) for m in moco.projector] == [torch.nn.Linear]
    siam = T.build_method(T.resolve(_args(tmp_path, "simsiam", "--no-stop-grad")))
    assert siam.stop_gradient is False
    cfg = T.resolve(_args(tmp_path, "mocov2", "--recipe", "moco_v1", "--schedule", "step"))
    assert (cfg["recipe"], cfg["schedule"]) == ("moco_v1", "step")
    v1 = T.Views(cfg["recipe"], 16, 0).configs[0]
    assert (v1.blur_p, v1.jitter, v1.jitter_p) == (0.0, (0.4, 0.4, 0.4, 0.4), 1.0)
    v2 = T.build_method(T.resolve(_args(tmp_path, "simclrv2")))
    assert v2.memory.size == 64 and sum(isinstance(m, torch.nn.Linear)
                                        for m in v2.projector) == 3
    assert not hasattr(T.build_method(T.resolve(_args(tmp_path, "simclrv2", "--queue-size",
                                                      "0"))), "memory")
