"""SimCLR in PyTorch Lightning with sslkernels as a drop-in.

A lightly-style LightningModule builds its criterion with ``lightly.loss.NTXentLoss(...)``; here
the same line builds :class:`sslkernels.losses.NTXentLoss`, which takes the same constructor
arguments (``temperature``, ``memory_bank_size``, ``gather_distributed``) and returns the same
value, with the fused kernel's O(N*D) memory. The views come from the library's batched
augmentation (:class:`sslkernels.augment.TwoViews`) in ``on_after_batch_transfer``, so data
loader workers only decode images and the augmentation runs where the batch lives.

Run (needs ``pip install lightning``; a few minutes on 2 CPU cores)::

    python examples/lightning_simclr.py --epochs 5
"""
from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn

from sslkernels.augment import TwoViews, uint8_collate
from sslkernels.data import SyntheticShapes
from sslkernels.losses import NTXentLoss
from sslkernels.methods import SmallConvNet


class SimCLRModule(L.LightningModule):
    """Backbone + projection head trained with NT-Xent.

    Args:
        backbone: images (B, 3, H, W) -> features (B, feature_dim).
        feature_dim: backbone output width.
        proj_dim: embedding width.
        temperature: NT-Xent temperature (> 0).
        lr: SGD learning rate (> 0).
        augment: makes the two views from a uint8 batch ``(images, labels)``; ``None``: batches
            are already ``(view0, view1)``.
        seed: seeds the augmentation's generator, so a run is reproducible.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, proj_dim: int = 128,
                 temperature: float = 0.5, lr: float = 0.06, augment: TwoViews | None = None,
                 seed: int = 0):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be an int >= 1, got {feature_dim!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if augment is not None and not isinstance(augment, TwoViews):
            raise TypeError(f"augment must be a TwoViews or None, got {type(augment).__name__}")
        self.backbone = backbone
        self.projection_head = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(),
                                             nn.Linear(feature_dim, proj_dim))
        self.criterion = NTXentLoss(temperature=temperature)  # was: lightly.loss.NTXentLoss
        self.lr = lr
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.augment is None:
            return batch
        images, _ = batch
        views = self.augment(images, generator=self.generator)
        return views.view1, views.view2

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x0, x1 = batch
        loss = self.criterion(self(x0), self(x1))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def main(argv: list[str] | None = None) -> SimCLRModule:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-steps", type=int, default=-1)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = SyntheticShapes(args.images, args.image_size, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, collate_fn=uint8_collate)
    backbone = SmallConvNet(64)
    model = SimCLRModule(backbone, backbone.width, augment=TwoViews("simclr", size=args.image_size))
    trainer = L.Trainer(max_epochs=args.epochs, max_steps=args.max_steps, accelerator="auto",
                        devices=1, logger=False, enable_checkpointing=False)
    trainer.fit(model, loader)
    return model


if __name__ == "__main__":
    main()
