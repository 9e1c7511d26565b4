"""The drop-in loss modules: NTXentLoss equals lightly's formulation (with and without a memory
bank), raises what lightly's constructor raises, and in float32 is at least as accurate as
lightly's formulation against float64 (degenerate batches included); InfoNCELoss equals the
MoCo builder's loss; both train like the originals."""
import math
import statistics
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

from sslkernels.losses import InfoNCELoss, NTXentLoss
from sslkernels.reference import info_nce as ref


def lightly_bank_ntxent(out0, out1, bank, temperature):
    """lightly.loss.NTXentLoss with a memory bank, formulation for formulation (lightly keeps the
    bank as (dim, K) and multiplies with einsum "nc,ck->nk"; the rows are used as stored)."""
    out0 = F.normalize(out0, dim=1)
    out1 = F.normalize(out1, dim=1)
    negatives = bank.T
    sim_pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)
    sim_neg = torch.einsum("nc,ck->nk", out0, negatives)
    logits = torch.cat([sim_pos, sim_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    return F.cross_entropy(logits, labels)


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
    """lightly with a bank: logits [out0.out1, out0.bank] / T with label 0, the bank rows used as
    stored, then out1 (normalized) replaces the oldest bank rows - only when out0 requires a
    gradient. Here the bank is a ring: the batch that reaches the end wraps to the start."""
    size, d = 24, 16
    loss_fn = NTXentLoss(temperature=0.2, memory_bank_size=(size, d))
    bank = loss_fn.bank.buffer.clone()  # starts as random unit rows, like lightly's
    ptr = 0
    for step in range(5):
        z0, z1 = _pair(n=10, d=d, seed=step)
        got = loss_fn(z0.requires_grad_(), z1)
        want = lightly_bank_ntxent(z0, z1, bank, 0.2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for row in F.normalize(z1, dim=1):
            bank[ptr] = row
            ptr = (ptr + 1) % size
        assert torch.equal(loss_fn.bank.buffer, bank)  # stored as F.normalize gave them
    # Evaluation (out0 without gradient) leaves the bank alone, as lightly's update=False.
    z0, z1 = _pair(n=10, d=d, seed=9)
    with torch.no_grad():
        loss_fn(z0, z1)
    loss_fn(z0, z1)
    assert torch.equal(loss_fn.bank.buffer, bank)


def test_ntxent_bank_width_from_first_batch():
    with pytest.warns(UserWarning, match="does not give the embedding width"):
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


# lightly.loss.NTXentLoss's constructor (lightly/loss/ntx_ent_loss.py and
# lightly/models/modules/memory_bank.py): the bank size is checked first (negative entries:
# ValueError; what is not an int or a sequence of ints fails with TypeError), then
# abs(temperature) < 1e-8 (ValueError; a non-number fails in abs(): TypeError), then
# gather_distributed without torch.distributed (ValueError).
LIGHTLY_ERRORS = [
    (dict(temperature=0.0), ValueError),
    (dict(temperature=1e-9), ValueError),
    (dict(temperature="0.5"), TypeError),
    (dict(temperature=None), TypeError),
    (dict(memory_bank_size=-1), ValueError),
    (dict(memory_bank_size=(10, -2)), ValueError),
    (dict(memory_bank_size=2.5), TypeError),
    (dict(memory_bank_size="8"), TypeError),
    (dict(memory_bank_size=None), TypeError),
    (dict(memory_bank_size=(10, 2.5)), TypeError),
    (dict(memory_bank_size=-1, temperature=0.0), ValueError),     # the bank is checked first
    (dict(memory_bank_size=2.5, temperature=0.0), TypeError),
]


@pytest.mark.parametrize("kwargs,error", LIGHTLY_ERRORS)
def test_ntxent_constructor_raises_what_lightly_raises(kwargs, error):
    with pytest.raises(error):
        NTXentLoss(**kwargs)


@pytest.mark.parametrize("temperature", [-0.5, float("nan"), float("inf")])
def test_ntxent_refuses_nonsense_temperatures(temperature):
    """Deliberate difference (documented): lightly accepts these and trains on nonsense."""
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        NTXentLoss(temperature=temperature)


def test_ntxent_gather_distributed_without_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch.distributed"):
        NTXentLoss(gather_distributed=True)
    NTXentLoss(gather_distributed=False)  # fine without it


def test_ntxent_bank_size_forms():
    with pytest.warns(UserWarning, match="does not give the embedding width"):
        assert NTXentLoss(memory_bank_size=8).bank is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert NTXentLoss(memory_bank_size=(8, 4)).bank.buffer.shape == (8, 4)
        assert NTXentLoss(memory_bank_size=[0, 4]).bank is None
        assert NTXentLoss(memory_bank_size=0).bank is None
    with pytest.raises(ValueError, match="memory_bank_size"):
        NTXentLoss(memory_bank_size=(8, 4, 2))


# ---------------------------------------------------------------------------------------------
# float32 accuracy against float64, next to lightly's formulation in float32.

def _sweep_inputs(kind, n, d, k, g):
    v = torch.randn(1, d, generator=g)
    if kind in ("collinear", "collinear_tiny"):  # power-of-two multiples of one row: exactly
        v = v * 1e-6 if kind == "collinear_tiny" else v  # collinear in float32
        z0 = v * 2.0 ** torch.randint(-3, 4, (n, 1), generator=g).float()
        z1 = v * 2.0 ** torch.randint(-3, 4, (n, 1), generator=g).float()
        bank = F.normalize(v, dim=1).expand(k, d).contiguous()
    elif kind == "collinear_scaled":
        z0 = v * (torch.rand(n, 1, generator=g) + 0.1)
        z1 = v * (torch.rand(n, 1, generator=g) + 0.1)
        bank = F.normalize(v * (torch.rand(k, 1, generator=g) + 0.1), dim=1)
    elif kind == "duplicates":
        base = torch.randn(max(1, n // 3), d, generator=g)
        z0 = base[torch.randint(0, len(base), (n,), generator=g)]
        z1 = base[torch.randint(0, len(base), (n,), generator=g)]
        bank = F.normalize(base[torch.randint(0, len(base), (k,), generator=g)], dim=1)
    else:
        z0, z1 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        bank = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return z0, z1, (bank if k else None)


def _lightly(z0, z1, bank, t):
    return ref.lightly_ntxent(z0, z1, t) if bank is None else lightly_bank_ntxent(z0, z1, bank, t)


def _ours(z0, z1, bank, t):
    if bank is None:
        return NTXentLoss(temperature=t)(z0, z1)
    loss_fn = NTXentLoss(temperature=t, memory_bank_size=bank.shape)
    loss_fn.bank.buffer.copy_(bank)
    return loss_fn(z0, z1)


SWEEP_SHAPES = [(1, 8), (2, 3), (8, 16), (33, 128), (300, 64)]
SWEEP_BANKS = [0, 1, 3, 64]  # 1 and 3 are smaller than most batches; 64 a full bank
SWEEP_TEMPS = [0.01, 0.07, 0.5, 2.0, 10.0]


@pytest.mark.parametrize("kind", ["collinear", "collinear_tiny", "collinear_scaled", "duplicates",
                                  "random"])
def test_ntxent_float32_at_least_as_accurate_as_lightly(kind):
    """Relative error of the float32 loss against the float64 value of lightly's formulation,
    over a seeded sweep of temperatures 0.01-10, batch sizes, widths and banks (none, smaller
    than the batch, full): ours is no worse than lightly's in float32, by the largest and by the
    mean error over the sweep."""
    ours_err, lightly_err = [], []
    for t in SWEEP_TEMPS:
        for k in SWEEP_BANKS:
            for n, d in SWEEP_SHAPES:
                if k == 0 and n == 1:
                    continue  # no negatives at all
                for seed in range(2):
                    g = torch.Generator().manual_seed(zlib.crc32(repr((kind, t, k, n, seed))
                                                                 .encode()))
                    z0, z1, bank = _sweep_inputs(kind, n, d, k, g)
                    b64 = None if bank is None else bank.double()
                    truth = _lightly(z0.double(), z1.double(), b64, t).item()
                    den = max(abs(truth), 1e-12)
                    ours_err.append(abs(_ours(z0, z1, bank, t).item() - truth) / den)
                    lightly_err.append(abs(_lightly(z0, z1, bank, t).item() - truth) / den)
    assert max(ours_err) <= max(lightly_err), (max(ours_err), max(lightly_err))
    assert statistics.mean(ours_err) <= statistics.mean(lightly_err), (
        statistics.mean(ours_err), statistics.mean(lightly_err))


def _ulp(x: float) -> float:
    """The spacing of float32 numbers at x."""
    t = torch.tensor(x, dtype=torch.float32)
    return (torch.nextafter(t, torch.tensor(math.inf)) - t).item()


@pytest.mark.parametrize("n", [1, 2, 7, 16, 33, 300])
@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0, 10.0])
def test_ntxent_collinear_batch_is_exactly_log_count(n, temperature):
    """Every embedding along one direction: all logits are equal and the loss is log(2N - 1)
    without a bank, log(K + 1) with a full bank of K (within an ulp of float32)."""
    g = torch.Generator().manual_seed(n)
    d = 33
    v = torch.randn(1, d, generator=g)
    z0 = v * 2.0 ** torch.randint(-4, 5, (n, 1), generator=g).float()
    z1 = v * 2.0 ** torch.randint(-4, 5, (n, 1), generator=g).float()
    if n > 1:
        got = NTXentLoss(temperature=temperature)(z0, z1).item()
        assert abs(got - math.log(2 * n - 1)) <= _ulp(math.log(2 * n - 1))
    for k in (1, 5, 40):
        bank = F.normalize(v, dim=1).expand(k, d)
        got = _ours(z0, z1, bank, temperature).item()
        assert abs(got - math.log(k + 1)) <= _ulp(math.log(k + 1)), (k, got)
