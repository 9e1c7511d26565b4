"""examples/lightning_simclr.py: NTXentLoss dropped into a Lightning module trains exactly like
the plain-PyTorch NT-Xent formula (same losses step by step). Skipped without lightning."""
import copy
import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "lightning_simclr.py"


def _load():
    spec = importlib.util.spec_from_file_location("lightning_simclr", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def plain_ntxent(z0, z1, temperature):
    """SimCLR's NT-Xent written out: 2N x 2N cosine similarities, self-similarity excluded, the
    other view as the target."""
    n = z0.shape[0]
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


class _Record(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def _views(steps=3, n=12, size=10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    # the same images each step, lightly perturbed: a loss that then falls shows learning
    return [(x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g))
            for _ in range(steps)]


def test_lightning_module_matches_plain_ntxent():
    ex = _load()
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    module = ex.SimCLRModule(backbone, 8, proj_dim=6, temperature=0.3, lr=0.5)
    plain = copy.deepcopy(torch.nn.Sequential(module.backbone, module.projection_head))
    initial = [p.detach().clone() for p in plain.parameters()]
    views = _views()
    record = _Record()
    trainer = L.Trainer(max_steps=len(views), accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[record])
    trainer.fit(module, torch.utils.data.DataLoader(views, batch_size=None))

    opt = torch.optim.SGD(plain.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    want = []
    for x0, x1 in views:
        loss = plain_ntxent(plain(x0), plain(x1), 0.3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        want.append(loss.item())
    assert len(record.losses) == len(views)
    assert want[-1] < want[0] - 1e-3  # it learned, so later steps depend on the updates
    assert record.losses == pytest.approx(want, rel=1e-5)
    trained = list(module.backbone.parameters()) + list(module.projection_head.parameters())
    for a, b, p0 in zip(trained, plain.parameters(), initial):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert not torch.equal(a, p0)


def test_lightning_example_runs_with_batched_augmentation():
    ex = _load()
    model = ex.main(["--images", "32", "--image-size", "16", "--batch-size", "16",
                     "--max-steps", "2", "--epochs", "1"])
    assert model.generator.initial_seed() == 0
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    v0, v1 = model.on_after_batch_transfer((x, torch.zeros(4)), 0)
    assert v0.shape == v1.shape == (4, 3, 16, 16) and not torch.equal(v0, v1)


def test_bad_arguments():
    ex = _load()
    with pytest.raises(TypeError, match="backbone"):
        ex.SimCLRModule("resnet", 8)
    with pytest.raises(ValueError, match="feature_dim"):
        ex.SimCLRModule(torch.nn.Identity(), 0)
    with pytest.raises(ValueError, match="lr"):
        ex.SimCLRModule(torch.nn.Identity(), 8, lr=0)
