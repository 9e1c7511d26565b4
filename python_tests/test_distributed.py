"""Multi-process training on torch.distributed, checked with two gloo processes on CPU against
one process that sees the global batch (the concatenation of the ranks' batches).

One spawn runs every distributed check (processes are expensive on a 2-core machine); the
workers save what they computed and the tests below compare it with single-process runs done
here. The exact relations asserted, with W = 2 ranks:

* loss: the mean of the ranks' losses is the global-batch loss;
* gradients: each rank's inputs get W x the gradient of the global-batch loss, because the
  gather's backward sums the gradients of every rank's loss (each a mean over that rank's rows)
  and DDP then divides parameter gradients by W;
* methods under DDP: after two optimizer steps every parameter, EMA target and queue equals the
  single-process run, and the ranks' EMA targets and queues are bitwise identical.

The method models have no BatchNorm: per-rank BatchNorm statistics are not the statistics of
the global batch, so with BN the single-process run would legitimately differ (shuffle-BN
permutes which samples share statistics; it does not make them global). MoCo still runs its
shuffle-BN path, which with a BN-free key encoder must give exactly the unshuffled keys.
"""
import copy
import datetime
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from torch import nn

from sslkernels import fused_info_nce, fused_supcon
from sslkernels.distributed import (TrainingStep, batch_shuffle, batch_unshuffle, gather_no_grad,
                                    gather_with_grad, wrap_ddp)
from sslkernels.losses import NTXentLoss
from sslkernels.methods import BYOL, MoCoV2, SimCLR, SimSiam

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform != "linux",
                                reason="needs torch.distributed (gloo)")

WORLD = 2
N, D = 3, 5                  # pairs per rank and width of the loss checks
TEMPERATURE = 0.1
BATCH, STEPS = 4, 2          # images per rank and optimizer steps of the method checks
METHODS = ("simclr", "mocov2", "byol", "simsiam")


def _global_views(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(WORLD * N, D, generator=g, dtype=torch.float64).to(dtype)
            for _ in range(2)]


# SupCon: 4 rows per rank; label 0 on both ranks, label 1 across them, three singletons (no
# positive anywhere), so the ranks hold different numbers of rows with a positive (3 and 2).
SUPCON_LABELS = torch.tensor([0, 0, 1, 2, 1, 3, 4, 0])
SUPCON_ROWS = 4


def _global_supcon_rows(dtype):
    g = torch.Generator().manual_seed(5)
    return torch.randn(WORLD * SUPCON_ROWS, D, generator=g, dtype=torch.float64).to(dtype)


def _global_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(WORLD * BATCH, 3, 4, 4, generator=g),
             torch.randn(WORLD * BATCH, 3, 4, 4, generator=g)) for _ in range(STEPS)]


def _without_bn(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _without_bn(child)
    return module


def _method(name: str) -> nn.Module:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU())
    if name == "simclr":
        m = SimCLR(backbone, 16, proj_dim=8, temperature=0.2)
    elif name == "mocov2":
        # K = 12 is not a multiple of the global batch (8): the queue wraps mid-batch.
        m = MoCoV2(backbone, 16, dim=8, mlp_hidden=16, queue_size=12, momentum=0.9)
    elif name == "byol":
        m = BYOL(backbone, 16, proj_hidden=16, proj_dim=8, pred_hidden=16, base_momentum=0.9)
    else:
        m = SimSiam(backbone, 16, dim=8, pred_dim=4)
    return _without_bn(m)


def _train(step_fn, method, batches):
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1,
                          momentum=0.9)
    losses = []
    for step, views in enumerate(batches):
        loss = step_fn(views)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_optimizer_step(step, len(batches))
        losses.append(loss.detach())
    return torch.stack(losses)


# ---------------------------------------------------------------------------------------------
# What each rank runs.

def _loss_checks(rank):
    out = {}
    rows = slice(rank * N, (rank + 1) * N)
    for dtype in (torch.float64, torch.float32):
        z0, z1 = (v[rows].clone().requires_grad_() for v in _global_views(dtype))
        for backend in ("cpu", "reference"):
            loss = fused_info_nce(z0, z1, temperature=TEMPERATURE, backend=backend,
                                  gather_distributed=True)
            g0, g1 = torch.autograd.grad(loss, (z0, z1))
            per_row = fused_info_nce(z0, z1, temperature=TEMPERATURE, backend=backend,
                                     gather_distributed=True, reduction="none")
            out[(dtype, backend)] = (loss.detach(), g0, g1, per_row.detach())
        loss = NTXentLoss(temperature=TEMPERATURE, gather_distributed=True)(z0, z1)
        out[(dtype, "NTXentLoss")] = (loss.detach(), *torch.autograd.grad(loss, (z0, z1)))
        mine = slice(rank * SUPCON_ROWS, (rank + 1) * SUPCON_ROWS)
        z = _global_supcon_rows(dtype)[mine].clone().requires_grad_()
        y = SUPCON_LABELS[mine]
        for backend in ("cpu", "reference"):
            loss = fused_supcon(z, y, temperature=TEMPERATURE, backend=backend,
                                gather_distributed=True)
            (g,) = torch.autograd.grad(loss, z)
            per_row = fused_supcon(z, y, temperature=TEMPERATURE, backend=backend,
                                   gather_distributed=True, reduction="none")
            out[(dtype, "supcon", backend)] = (loss.detach(), g, per_row.detach())
    out["bank"] = _bank_run(*(v[rows] for v in _global_views(torch.float64)), True)
    return out


def _bank_run(z0, z1, gather):
    """Two training calls of NTXentLoss with a memory bank (the MoCo form): losses and the bank.
    The outputs require a gradient, so each call feeds the bank (lightly's update rule)."""
    torch.manual_seed(2)
    crit = NTXentLoss(temperature=TEMPERATURE, memory_bank_size=(10, D), gather_distributed=gather)
    z0, z1 = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    losses = torch.stack([crit(z0, z1), crit(z1, z0)]).detach()
    return losses, crit.bank.state_dict()


def _shuffle_checks(rank):
    x = torch.arange(BATCH * 2, dtype=torch.float32).view(BATCH, 2) + 100 * rank
    shuffled, unshuffle = batch_shuffle(x)
    back = batch_unshuffle(shuffled * 2, unshuffle)
    return {"x": x, "shuffled": shuffled, "unshuffle": unshuffle, "back": back}


def _method_checks(rank):
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    local = [(a[rows], b[rows]) for a, b in _global_batches()]
    out = {}
    for name in METHODS:
        method = _method(name)
        ddp = wrap_ddp(method)
        losses = _train(ddp, method, local)
        out[name] = {"losses": losses, "state": copy.deepcopy(method.state_dict())}
    return out


TRAIN = ["--method", "mocov2", "--train-size", "32", "--batch-size", "8", "--image-size", "16",
         "--epochs", "1", "--queue-size", "12", "--no-probe", "--quiet", "--seed", "5"]


def _trainer_checks(rank, out_dir):
    """What torchrun does, inside the already joined group: MoCo v2 with a BatchNorm backbone
    (shuffle-BN live), an uninterrupted run and one stopped after 2 steps and resumed."""
    from sslkernels import train as T

    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank))
    run = lambda sub, *extra: T.train(T.build_parser().parse_args(  # noqa: E731
        TRAIN + ["--out", os.path.join(out_dir, sub), *extra]))
    full = run("full")
    first = run("resumed", "--stop-after", "2")
    torch.distributed.barrier()  # rank 0's checkpoint is on disk before anyone resumes
    resumed = run("resumed", "--resume")
    return {"full": full["losses"], "first": first["losses"], "resumed": resumed["losses"]}


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)  # two ranks share two busy cores
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60))
    try:
        result = {"loss": _loss_checks(rank), "shuffle": _shuffle_checks(rank),
                  "methods": _method_checks(rank), "trainer": _trainer_checks(rank, out_dir)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    import torch.multiprocessing as mp

    # spawn, not fork: the parent may have started OpenMP threads, which a forked child cannot
    # use safely. A rank that raises makes join() raise (and terminate the other rank) at once;
    # the deadline only guards against a hang inside a collective.
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_worker, args=(WORLD, os.path.join(tmp, "init"), tmp),
                                 nprocs=WORLD, join=False, start_method="spawn")
        deadline = time.monotonic() + 120
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    pytest.fail("gloo workers did not finish within 120 s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
                   for r in range(WORLD)]
        for r in results:
            r["metrics"] = _read_lines(os.path.join(tmp, "full", "metrics.jsonl"))
            r["files"] = sorted(os.listdir(os.path.join(tmp, "full")))
        return results


def _read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


# ---------------------------------------------------------------------------------------------
# The checks.

def _global_loss_and_grads(dtype):
    z0, z1 = (v.clone().requires_grad_() for v in _global_views(dtype))
    rows = fused_info_nce(z0, z1, temperature=TEMPERATURE, backend="reference",
                          reduction="none")
    g0, g1 = torch.autograd.grad(rows.mean(), (z0, z1))
    return rows.detach(), g0, g1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["cpu", "reference", "NTXentLoss"])
def test_gathered_loss_and_gradients_equal_the_global_batch(ranks, dtype, backend):
    truth_rows, truth_g0, truth_g1 = _global_loss_and_grads(torch.float64)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    losses = torch.stack([r["loss"][(dtype, backend)][0] for r in ranks])
    torch.testing.assert_close(losses.double().mean(), truth_rows.mean(), **tol)
    for rank, res in enumerate(ranks):
        _, g0, g1, *per_row = res["loss"][(dtype, backend)]
        mine = slice(rank * N, (rank + 1) * N)
        # W x: the gradient of the sum of the ranks' means; DDP's averaging divides it out.
        torch.testing.assert_close(g0.double(), WORLD * truth_g0[mine], **tol)
        torch.testing.assert_close(g1.double(), WORLD * truth_g1[mine], **tol)
        if per_row:
            # This rank's rows of the global loss, [view 0; view 1].
            want = torch.cat([truth_rows[mine], truth_rows[WORLD * N:][mine]])
            torch.testing.assert_close(per_row[0].double(), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gathered_supcon_equals_the_global_batch(ranks, dtype, backend):
    """Each rank's rows against every rank's rows and labels: the mean of the ranks' losses is
    the global-batch mean over the rows with a positive (the ranks hold 3 and 2 of them), and
    each rank's rows get W x the gradient of that global loss."""
    z = _global_supcon_rows(torch.float64).requires_grad_()
    truth_rows = fused_supcon(z, SUPCON_LABELS, temperature=TEMPERATURE, backend="reference",
                              reduction="none")
    truth = fused_supcon(z, SUPCON_LABELS, temperature=TEMPERATURE, backend="reference")
    (truth_g,) = torch.autograd.grad(truth, z)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    losses = torch.stack([r["loss"][(dtype, "supcon", backend)][0] for r in ranks])
    torch.testing.assert_close(losses.double().mean(), truth.detach(), **tol)
    for rank, res in enumerate(ranks):
        _, g, rows = res["loss"][(dtype, "supcon", backend)]
        mine = slice(rank * SUPCON_ROWS, (rank + 1) * SUPCON_ROWS)
        torch.testing.assert_close(g.double(), WORLD * truth_g[mine], **tol)
        torch.testing.assert_close(rows.double(), truth_rows.detach()[mine], **tol)


def test_memory_bank_is_fed_every_rank_and_matches_one_process(ranks):
    losses, bank = _bank_run(*_global_views(torch.float64), False)
    assert int(bank["ptr"]) == (2 * WORLD * N) % 10  # fed twice with the global batch
    rank_losses = torch.stack([r["loss"]["bank"][0] for r in ranks])
    torch.testing.assert_close(rank_losses.mean(0), losses)
    for r in ranks:
        for key, value in bank.items():
            torch.testing.assert_close(r["loss"]["bank"][1][key], value, rtol=1e-6, atol=1e-7)


def test_batch_shuffle_is_one_shared_permutation_and_unshuffle_inverts_it(ranks):
    shuffle = [r["shuffle"] for r in ranks]
    everyone = torch.cat([s["x"] for s in shuffle])
    assert torch.equal(shuffle[0]["unshuffle"], shuffle[1]["unshuffle"])
    perm = torch.argsort(shuffle[0]["unshuffle"])
    assert not torch.equal(perm, torch.arange(len(perm))), "the batch was not shuffled"
    for rank, s in enumerate(shuffle):
        assert torch.equal(s["shuffled"], everyone[perm[rank * BATCH:(rank + 1) * BATCH]])
        assert torch.equal(s["back"], 2 * s["x"])


@pytest.mark.parametrize("name", METHODS)
def test_two_ddp_steps_equal_one_process_on_the_global_batch(ranks, name):
    method = _method(name)
    losses = _train(method.training_step, method, _global_batches())
    want = method.state_dict()
    rank_losses = torch.stack([r["methods"][name]["losses"] for r in ranks])
    torch.testing.assert_close(rank_losses.mean(0), losses, rtol=1e-5, atol=1e-6)
    for rank, res in enumerate(ranks):
        state = res["methods"][name]["state"]
        assert state.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(state[key], want[key], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"rank {rank}, {key}: {m}")


@pytest.mark.parametrize("name", ["mocov2", "byol"])
def test_ema_targets_and_queue_identical_across_ranks(ranks, name):
    states = [r["methods"][name]["state"] for r in ranks]
    targets = [k for k in states[0] if k.startswith(("key_", "target_", "queue."))]
    assert targets
    for key in targets:
        assert torch.equal(states[0][key], states[1][key]), key


def test_queue_wrapped_and_holds_keys_of_both_ranks(ranks):
    # Together with the method test (the whole queue state equals the single-process run fed the
    # concatenated batches) this is the gathered enqueue; test_queue.py checks it key by key.
    state = ranks[0]["methods"]["mocov2"]["state"]
    assert int(state["queue.fill"]) == 12
    assert int(state["queue.ptr"]) == (STEPS * WORLD * BATCH) % 12


def test_trainer_under_ddp_resumes_to_the_same_losses_and_only_rank0_writes(ranks):
    runs = [r["trainer"] for r in ranks]
    assert len(runs[0]["full"]) == 4 and all(v == v for v in runs[0]["full"])
    assert runs[0] == runs[1]  # the logged loss is the mean over ranks
    assert runs[0]["first"] == runs[0]["full"][:2]
    assert runs[0]["resumed"] == runs[0]["full"]  # bit for bit
    assert len(ranks[0]["metrics"]) == 4  # one line per step, not one per rank
    assert ranks[0]["files"] == ["checkpoint.pt", "metrics.jsonl", "results.json"]


@pytest.mark.slow
def test_torchrun_command_line(tmp_path):
    """The README's command, as typed (2 ranks, a few steps)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sslkernels", "train", "--method", "simclr",
           "--train-size", "16", "--batch-size", "8", "--image-size", "16", "--epochs", "1",
           "--no-probe", "--quiet", "--out", str(tmp_path / "run")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_single_process_fallbacks_and_bad_input():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x and gather_no_grad(x) is x
    assert batch_shuffle(x) == (x, None) and batch_unshuffle(x, None) is x
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        gather_with_grad([1.0])
    with pytest.raises(ValueError, match="x must have at least one dimension and one row"):
        gather_no_grad(torch.randn(0, 2))
    with pytest.raises(TypeError, match="training_step"):
        TrainingStep(nn.Linear(2, 2))
