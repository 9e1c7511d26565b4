"""The drop-in loss modules: NTXentLoss equals lightly's formulation (with and without a memory
bank), InfoNCELoss equals the MoCo builder's loss, and both train like the originals."""
import pytest
import torch
import torch.nn.functional as F

from sslkernels.losses import InfoNCELoss, NTXentLoss
from sslkernels.reference import info_nce as ref


def _pair(n=40, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_ntxent_equals_lightly(temperature):
    z0, z1 = _pair()
    a, b = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    a2, b2 = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    ours = NTXentLoss(temperature=temperature)(a, b)
    theirs = ref.lightly_ntxent(a2, b2, temperature)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-7)


def test_ntxent_memory_bank_matches_lightly_semantics():
    """lightly with a bank: logits [out0.out1, out0.bank] / T with label 0, then out1
    (normalized) replaces the oldest bank rows."""
    size, d = 24, 16
    loss_fn = NTXentLoss(temperature=0.2, memory_bank_size=(size, d))
    bank = loss_fn.bank.buffer.clone()  # starts as random unit rows, like lightly's
    ptr = 0
    for step in range(5):
        z0, z1 = _pair(n=10, d=d, seed=step)
        got = loss_fn(z0, z1)
        want = ref.info_nce_negatives_rows(z0, z1, bank, 0.2).mean()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for row in F.normalize(z1, dim=1):
            bank[ptr] = row
            ptr = (ptr + 1) % size
        torch.testing.assert_close(loss_fn.bank.buffer, bank)


def test_ntxent_bank_width_from_first_batch():
    loss_fn = NTXentLoss(memory_bank_size=8)
    z0, z1 = _pair(n=4, d=6)
    assert torch.isfinite(loss_fn(z0, z1))
    assert loss_fn.bank.buffer.shape == (8, 6)


def test_infonce_equals_builder():
    q, k = _pair(n=12, d=8, seed=3)
    neg = F.normalize(torch.randn(50, 8), dim=1)
    qa = q.clone().requires_grad_()
    qb = q.clone().requires_grad_()
    ours = InfoNCELoss(temperature=0.2)(qa, k, neg)
    theirs = ref.info_nce_negatives_rows(qb, k, neg, 0.2).mean()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(qa.grad, qb.grad, rtol=1e-4, atol=1e-7)


def test_dropin_in_a_lightly_style_training_loop():
    """A lightly-style SimCLR loop: only the loss object changes, the losses stay the same."""
    def train(loss_fn):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 16))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for step in range(4):
            x0, x1 = _pair(n=32, d=8, seed=10 + step)
            loss = loss_fn(model(x0), model(x1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ours = train(NTXentLoss(temperature=0.5))
    theirs = train(lambda a, b: ref.lightly_ntxent(a, b, 0.5))
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0)
    with pytest.raises(ValueError, match="memory_bank_size"):
        NTXentLoss(memory_bank_size=-1)
    with pytest.raises(ValueError, match="reduction"):
        InfoNCELoss(reduction="avg")
