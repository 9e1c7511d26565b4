"""SimCLR v2's second and third stages: fine-tuning from a layer of the projection head on a
class-balanced labelled fraction, the supervised baseline from the same random initialization,
and distillation of the fine-tuned teacher into a student on unlabelled images."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from sslkernels import distill as D
from sslkernels import finetune as FT
from sslkernels import train as T

TINY = ["--train-size", "96", "--batch-size", "16", "--image-size", "16", "--epochs", "1",
        "--queue-size", "32", "--width", "16", "--quiet", "--no-probe", "--seed", "2"]
FAST = ["--steps", "4", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    T.train(T.build_parser().parse_args(["--method", "simclrv2", "--out", str(root / "v2"),
                                         *TINY]))
    return root / "v2"


def _finetune(*argv):
    return FT.finetune(FT.build_parser().parse_args(list(argv)))


def test_balanced_subset_is_class_balanced_and_seeded():
    labels = torch.arange(10).repeat_interleave(torch.tensor([30, 30, 30, 30, 30, 30, 30, 30,
                                                              30, 1]))
    sub = FT.balanced_subset(labels, 0.1, seed=1)
    assert len(sub) == round(0.1 * len(labels)) == len(set(sub))
    counts = torch.bincount(labels[sub], minlength=10).tolist()
    assert counts[9] == 1 and max(counts[:9]) - min(counts[:9]) <= 1  # small class: all of it
    assert sub == FT.balanced_subset(labels, 0.1, seed=1)
    assert sub != FT.balanced_subset(labels, 0.1, seed=2)
    assert len(FT.balanced_subset(labels, 0.001, seed=0)) == 10  # one per class at least


def test_finetune_from_layer_0_and_1(pretrained, tmp_path):
    r1 = _finetune("--from", str(pretrained), "--labels", "0.25", "--head-layer", "1",
                   "--out", str(tmp_path / "l1"), *FAST)
    r0 = _finetune("--from", str(pretrained), "--labels", "0.25", "--head-layer", "0",
                   "--out", str(tmp_path / "l0"), *FAST)
    for r in (r0, r1):
        assert r["labelled_images"] == 24 and 0 <= r["accuracy"] <= 1
        assert 0 <= r["linear_probe"] <= 1
    assert r0["linear_probe"] == r1["linear_probe"]  # the frozen encoder, before fine-tuning
    saved = json.loads((tmp_path / "l1" / "results.json").read_text())
    assert saved["head_layer"] == 1 and saved["accuracy"] == r1["accuracy"]
    assert len((tmp_path / "l1" / "metrics.jsonl").read_text().splitlines()) == 4
    # the classifier is encoder -> first projection layer (Linear-BN-ReLU) -> linear
    state = torch.load(pretrained / "checkpoint.pt", weights_only=True)
    model = FT.pretrained_classifier(state, 1, 10)
    assert [type(m).__name__ for m in model.head] == ["Linear", "BatchNorm1d", "ReLU"]
    assert model.fc.in_features == 512
    torch.testing.assert_close(model.head[0].weight, state["model"]["projector.0.weight"])
    assert FT.pretrained_classifier(state, 0, 10).fc.in_features == 16


def test_supervised_baseline_starts_from_the_runs_random_init(pretrained, tmp_path):
    state = torch.load(pretrained / "checkpoint.pt", weights_only=True)
    random = FT.pretrained_classifier(state, 0, 10, pretrained=False)
    for k, v in random.backbone.state_dict().items():
        torch.testing.assert_close(v, state["random_backbone"][k])
    r = _finetune("--from", str(pretrained), "--labels", "0.25", "--head-layer", "0",
                  "--random-init", *FAST)
    assert "linear_probe" not in r and os.path.isdir(pretrained / "supervised_25pct_layer0")


def test_finetune_bad_input(pretrained, tmp_path, capsys):
    from sslkernels.__main__ import main

    def error(*argv):
        with pytest.raises(SystemExit) as e:
            main(["finetune", *argv])
        assert e.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("python -m sslkernels finetune: error:")
        return lines[0]

    out = str(tmp_path / "o")
    assert "--head-layer must be in [0, 3]" in error("--from", str(pretrained), "--labels",
                                                      "0.1", "--head-layer", "4", "--out", out)
    assert "--labels: must be in (0, 1]" in error("--from", str(pretrained), "--labels", "0")
    assert "no checkpoint at" in error("--from", str(tmp_path / "nothing"), "--labels", "0.1")
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not really")
    assert "truncated or corrupt" in error("--from", str(tmp_path / "bad.pt"), "--labels", "0.1")
    assert not os.path.exists(out)


def test_distillation_loss_is_tempered_cross_entropy():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, generator=g, dtype=torch.float64)
    for tau in (1.0, 2.0):
        want = sum(-(F.softmax(t[i] / tau, 0) * F.log_softmax(s[i] / tau, 0)).sum()
                   for i in range(5)) / 5
        got = D.distillation_loss(s, t, tau)
        torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    # minimized (gradient 0) where the student's tempered predictions equal the teacher's
    s0 = t.clone().requires_grad_()
    D.distillation_loss(s0, t, 2.0).backward()
    assert s0.grad.abs().max() < 1e-6
    with pytest.raises(ValueError, match="logits"):
        D.distillation_loss(torch.randn(3, 4), torch.randn(3, 5))


def test_distill_trains_a_student_without_labels(pretrained, tmp_path, monkeypatch):
    teacher_dir = tmp_path / "teacher"
    _finetune("--from", str(pretrained), "--labels", "0.25", "--out", str(teacher_dir), *FAST)
    seen_labels = []
    real = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: seen_labels.append(1) or real(*a, **k))
    r = D.distill(D.build_parser().parse_args(["--teacher", str(teacher_dir), "--epochs", "1",
                                               "--batch-size", "32", "--student-width", "8",
                                               "--quiet"]))
    assert seen_labels == []  # no label-based loss anywhere in distillation
    assert r["steps"] == 3 and r["student_width"] == 8 and 0 <= r["accuracy"] <= 1
    out = teacher_dir / "distill_w8"
    assert json.loads((out / "results.json").read_text())["accuracy"] == r["accuracy"]
    student = torch.load(out / "model.pt", weights_only=True)
    assert student["kind"] == "distill" and student["model"]["fc.weight"].shape == (10, 512)
    with pytest.raises(ValueError, match="not one written by 'finetune'"):
        D.distill(D.build_parser().parse_args(["--teacher", str(pretrained / "checkpoint.pt")]))


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29
def test_all_three_stages_on_an_image_folder(tmp_path):
    """--data: an ImageFolder tree (PNG files of two sizes) through train, finetune, distill."""
    from torchvision.io import write_png

    from sslkernels.data import SyntheticShapes

    shapes = SyntheticShapes(40, 24, seed=9)
    for i in range(len(shapes)):
        image, label = shapes[i]
        if i % 3 == 0:  # mixed sizes: the list path of the augmentation and the probe
            image = torch.nn.functional.interpolate(image[None].float(), size=(28, 20)).to(
                torch.uint8)[0]
        folder = tmp_path / "images" / f"class_{label % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        write_png(image, str(folder / f"{i}.png"))
    run = tmp_path / "v2"
    T.train(T.build_parser().parse_args([
        "--method", "simclrv2", "--data", str(tmp_path / "images"), "--out", str(run),
        "--image-size", "16", "--batch-size", "8", "--epochs", "1", "--width", "8", "--quiet"]))
    assert json.loads((run / "results.json").read_text())["probe"]["trained"]["linear"] >= 0
    r = _finetune("--from", str(run), "--labels", "0.5", *FAST)
    assert r["labelled_images"] == 16  # half of the 32 training images (a fifth is held out)
    d = D.distill(D.build_parser().parse_args(["--teacher", str(run / "finetune_50pct_layer1"),
                                               "--epochs", "1", "--batch-size", "8",
                                               "--quiet"]))
    assert d["steps"] == 4 and 0 <= d["accuracy"] <= 1
