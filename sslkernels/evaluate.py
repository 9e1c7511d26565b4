"""Held-out evaluation shared by the commands: frozen features, the linear probe (softmax
regression on standardized features, full-batch L-BFGS), the kNN probe, and a classifier's
accuracy. Images go through the evaluation transform (resize, centre crop, normalize)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def eval_batches(ds, size: int, device, batch: int = 256, indices=None):
    """Yields ``(images, labels)``: float (B, 3, size, size) normalized images on ``device``
    and int64 labels, over ``ds`` (or its ``indices``) in order."""
    from torchvision.transforms import v2

    prep = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    idx = list(range(len(ds))) if indices is None else list(indices)
    for i in range(0, len(idx), batch):
        items = [ds[j] for j in idx[i:i + batch]]
        ims = [im for im, _ in items]
        # one call for a batch of equal-sized images: tiny per-image ops are slow on a busy CPU
        x = (prep(torch.stack(ims)) if all(im.shape == ims[0].shape for im in ims)
             else torch.stack([prep(im) for im in ims]))
        yield x.to(device), torch.tensor([l for _, l in items])


@torch.no_grad()
def features(model: nn.Module, ds, size: int, device, indices=None):
    """``model``'s outputs (eval mode) on ``ds`` and the labels, both on the CPU."""
    was = model.training
    model.eval()
    feats, labels = [], []
    for x, y in eval_batches(ds, size, device, indices=indices):
        feats.append(model(x).float().cpu())
        labels.append(y)
    model.train(was)
    return torch.cat(feats), torch.cat(labels)


def linear_probe(train_x, train_y, test_x, test_y, classes: int, epochs: int = 100) -> float:
    """Accuracy of a softmax classifier on standardized frozen features (full-batch L-BFGS)."""
    mu = train_x.mean(0)
    sd = (train_x.std(0) if len(train_x) > 1 else torch.ones_like(mu)).clamp_min(1e-6)
    tx, vx = (train_x - mu) / sd, (test_x - mu) / sd
    torch.manual_seed(0)
    clf = nn.Linear(tx.shape[1], classes)
    opt = torch.optim.LBFGS(clf.parameters(), lr=0.5, max_iter=epochs, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(tx), train_y) + 1e-4 * clf.weight.square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return (clf(vx).argmax(1) == test_y).float().mean().item()


def knn_accuracy(train_x, train_y, test_x, test_y, k: int = 20) -> float:
    a, b = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    idx = (b @ a.T).topk(min(k, len(a)), dim=1).indices
    votes = train_y[idx]
    pred = torch.mode(votes, dim=1).values
    return (pred == test_y).float().mean().item()


def probe(backbone, train_ds, held_out_ds, classes: int, size: int, device,
          train_indices=None) -> dict:
    """Linear and kNN probe accuracies of a frozen ``backbone`` on the held-out set, fitted on
    ``train_ds`` (or its ``train_indices``: a labelled fraction)."""
    tx, ty = features(backbone, train_ds, size, device, train_indices)
    vx, vy = features(backbone, held_out_ds, size, device)
    return {"linear": linear_probe(tx, ty, vx, vy, classes), "knn": knn_accuracy(tx, ty, vx, vy)}


@torch.no_grad()
def accuracy(model: nn.Module, ds, size: int, device) -> float:
    """Top-1 accuracy of a classifier (logits out) on ``ds``, in eval mode."""
    logits, labels = features(model, ds, size, device)
    return (logits.argmax(1) == labels).float().mean().item()
