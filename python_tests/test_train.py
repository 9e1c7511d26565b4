"""The trainer: every method trains and probes on the embedded dataset, checkpoints are atomic,
and a resumed (or interrupted) run continues to exactly the losses of an uninterrupted one."""
import json
import os

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


@pytest.mark.parametrize("method", T.METHODS)
def test_every_method_trains_and_probes(tmp_path, method):
    result = T.train(_args(tmp_path, method))
    assert result["steps"] == 8 and all(map(lambda v: v == v, result["losses"]))
    out = tmp_path / method
    assert (out / "curves.png").stat().st_size > 1000
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["probe"]) == {"random", "trained"}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 and "images_per_s" in json.loads(lines[0])


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


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        T.build_parser().parse_args(["--method", "swav"])
    with pytest.raises(ValueError, match="batch-size"):
        T.train(T.build_parser().parse_args(["--method", "simclr", "--train-size", "8",
                                             "--batch-size", "16", "--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="min-scale"):
        T.Views("simclr", 16, 0, min_scale=0.0)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        T.train(_args(tmp_path / "none", "simclr", "--resume"))


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
