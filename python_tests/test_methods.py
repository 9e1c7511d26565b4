"""Each method equals a plain-PyTorch reference of its official algorithm: same initial weights,
same batches, several SGD steps; losses, every parameter, EMA targets and the queue match.

The references below follow the official code: facebookresearch/moco (builder.py, single
process: momentum update of the key encoder before computing keys, queue.clone(), logits
[l_pos, l_neg]/T, enqueue with K % B == 0), facebookresearch/simsiam (stop-gradient symmetric
negative cosine), BYOL (EMA target updated after the optimizer step with the cosine momentum),
SimCLR (lightly's NTXentLoss formulation)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sslkernels.methods import BYOL, MoCoV2, SimCLR, SimSiam, SmallConvNet
from sslkernels.reference.info_nce import lightly_ntxent

STEPS = 4
BATCH = 8


def _batches(seed=0, steps=STEPS):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 3, 12, 12, generator=g), torch.randn(BATCH, 3, 12, 12, generator=g))
            for _ in range(steps)]


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)


def _assert_params_close(mods_a, mods_b):
    for ma, mb in zip(mods_a, mods_b):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-4, atol=2e-5, msg=key)


def _train(method, batches):
    opt = _sgd([p for p in method.parameters() if p.requires_grad])
    losses = []
    for step, views in enumerate(batches):
        loss = method.training_step(views)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_optimizer_step(step, len(batches))
        losses.append(loss.item())
    return losses


def test_simclr_matches_reference():
    torch.manual_seed(0)
    method = SimCLR(SmallConvNet(16), 16, proj_dim=8, temperature=0.5)
    ref_backbone = copy.deepcopy(method.backbone)
    ref_proj = copy.deepcopy(method.projector)
    batches = _batches()
    losses = _train(method, batches)

    opt = _sgd(list(ref_backbone.parameters()) + list(ref_proj.parameters()))
    ref_losses = []
    for x0, x1 in batches:
        loss = lightly_ntxent(ref_proj(ref_backbone(x0)), ref_proj(ref_backbone(x1)), 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    _assert_params_close([method.backbone, method.projector], [ref_backbone, ref_proj])


class OfficialMoCo:
    """facebookresearch/moco builder.MoCo, single process, without shuffle-BN."""

    def __init__(self, encoder_q, queue_rows, m, T):
        self.encoder_q = encoder_q
        self.encoder_k = copy.deepcopy(encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.queue = queue_rows.T.clone()  # (dim, K), as the official code stores it
        self.ptr = 0
        self.K, self.m, self.T = queue_rows.shape[0], m, T

    def forward(self, im_q, im_k):
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
                pk.data = pk.data * self.m + pq.data * (1.0 - self.m)
            k = F.normalize(self.encoder_k(im_k), dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        batch = k.shape[0]
        assert self.K % batch == 0
        self.queue[:, self.ptr:self.ptr + batch] = k.T
        self.ptr = (self.ptr + batch) % self.K
        return F.cross_entropy(logits, labels)


@pytest.mark.parametrize("loss_backend,head", [(None, "mlp"), ("reference", "mlp"),
                                                (None, "linear")])
def test_mocov2_matches_official(loss_backend, head):
    """head="linear" is MoCo v1's fc, the MLP ablation of MoCo v2."""
    torch.manual_seed(1)
    method = MoCoV2(SmallConvNet(16), 16, dim=8, mlp_hidden=16, queue_size=24, momentum=0.9,
                    temperature=0.2, loss_backend=loss_backend, head=head)
    assert len(method.projector) == (3 if head == "mlp" else 1)
    ref = OfficialMoCo(torch.nn.Sequential(copy.deepcopy(method.backbone),
                                           copy.deepcopy(method.projector)),
                       method.queue.buffer.clone(), m=0.9, T=0.2)
    batches = _batches(seed=1, steps=5)  # 5 x 8 keys wrap the 24-row queue
    losses = _train(method, batches)
    opt = _sgd(ref.encoder_q.parameters())
    ref_losses = []
    for x0, x1 in batches:
        loss = ref.forward(x0, x1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    _assert_params_close([method.backbone, method.projector], list(ref.encoder_q))
    _assert_params_close([method.key_backbone, method.key_projector], list(ref.encoder_k))
    torch.testing.assert_close(method.queue.buffer, ref.queue.T, rtol=1e-5, atol=1e-6)
    assert int(method.queue.ptr) == ref.ptr


def test_byol_matches_reference():
    torch.manual_seed(2)
    method = BYOL(SmallConvNet(16), 16, proj_hidden=32, proj_dim=8, pred_hidden=32,
                  base_momentum=0.9)
    online = torch.nn.Sequential(copy.deepcopy(method.backbone), copy.deepcopy(method.projector))
    predictor = copy.deepcopy(method.predictor)
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad = False
    batches = _batches(seed=2)
    losses = _train(method, batches)

    opt = _sgd(list(online.parameters()) + list(predictor.parameters()))
    ref_losses = []
    for step, (x0, x1) in enumerate(batches):
        p0, p1 = predictor(online(x0)), predictor(online(x1))
        with torch.no_grad():
            t0, t1 = target(x0), target(x1)
        loss = ((2 - 2 * F.cosine_similarity(p0, t1, dim=-1)) +
                (2 - 2 * F.cosine_similarity(p1, t0, dim=-1))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        m = 1 - (1 - 0.9) * (math.cos(math.pi * step / len(batches)) + 1) / 2
        with torch.no_grad():
            for pt, po in zip(target.parameters(), online.parameters()):
                pt.data = m * pt.data + (1 - m) * po.data
        ref_losses.append(loss.item())
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    _assert_params_close([method.backbone, method.projector, method.predictor],
                         list(online) + [predictor])
    _assert_params_close([method.target_backbone, method.target_projector], list(target))


def test_simsiam_matches_official():
    torch.manual_seed(3)
    method = SimSiam(SmallConvNet(16), 16, dim=32, pred_dim=8)
    encoder = torch.nn.Sequential(copy.deepcopy(method.backbone), copy.deepcopy(method.projector))
    predictor = copy.deepcopy(method.predictor)
    batches = _batches(seed=3)
    losses = _train(method, batches)

    opt = _sgd(list(encoder.parameters()) + list(predictor.parameters()))
    criterion = torch.nn.CosineSimilarity(dim=1)
    ref_losses = []
    for x1, x2 in batches:
        z1, z2 = encoder(x1), encoder(x2)
        p1, p2 = predictor(z1), predictor(z2)
        loss = -(criterion(p1, z2.detach()).mean() + criterion(p2, z1.detach()).mean()) * 0.5
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    _assert_params_close([method.backbone, method.projector, method.predictor],
                         list(encoder) + [predictor])


def test_simsiam_parameter_groups():
    method = SimSiam(SmallConvNet(16), 16, dim=32, pred_dim=8)
    groups = method.parameter_groups()
    assert [g["fix_lr"] for g in groups] == [False, True]
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(method.parameters()))


def test_paper_defaults():
    m = MoCoV2(SmallConvNet(16), 16)
    assert (m.queue.size, m.momentum, m.temperature) == (65536, 0.999, 0.2)
    b = BYOL(SmallConvNet(16), 16)
    assert b.base_momentum == 0.996 and b.projector[-1].out_features == 256
    assert b.projector[0].out_features == 4096
    s = SimCLR(SmallConvNet(16), 16, proj_layers=3)
    assert sum(isinstance(x, torch.nn.Linear) for x in s.projector) == 3


# ---------------------------------------------------------------------------------------------
# SimCLR v2, the ablation switches, and the head cut used by fine-tuning

def _dense_memory_ntxent(z0, z1, memory, t):
    """NT-Xent written out with the memory's rows as extra negatives: (2N, 2N + K) logits,
    self-similarity masked, the other view as the target."""
    n = z0.shape[0]
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    s = (z @ z.T / t).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    logits = torch.cat([s, z @ F.normalize(memory, dim=1).T / t], dim=1)
    return F.cross_entropy(logits, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))


@pytest.mark.parametrize("n,d,k,t", [(1, 3, 1, 0.5), (7, 5, 11, 0.1), (33, 17, 129, 0.2)])
def test_nt_xent_with_memory_matches_dense(n, d, k, t):
    from sslkernels.methods import nt_xent_with_memory

    g = torch.Generator().manual_seed(n)
    base = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2)]
    memory = torch.randn(k, d, generator=g, dtype=torch.float64)
    results = {}
    for dtype in (torch.float64, torch.float32):
        z0, z1 = (x.to(dtype).requires_grad_() for x in base)
        for name, fn in (("fused", lambda a, b: nt_xent_with_memory(a, b, memory.to(dtype),
                                                                    temperature=t)),
                         ("dense", lambda a, b: _dense_memory_ntxent(a, b, memory.to(dtype), t))):
            loss = fn(z0, z1)
            results[dtype, name] = (loss.detach().double(),
                                    [x.double() for x in torch.autograd.grad(loss, (z0, z1))])
    exact_loss, exact_grads = results[torch.float64, "dense"]
    torch.testing.assert_close(results[torch.float64, "fused"][0], exact_loss, rtol=1e-12,
                               atol=1e-12)
    ref_err = (results[torch.float32, "dense"][0] - exact_loss).abs().item()
    err = (results[torch.float32, "fused"][0] - exact_loss).abs().item()
    assert err <= 4 * ref_err + 1e-6
    for got, want, ref in zip(results[torch.float32, "fused"][1], exact_grads,
                              results[torch.float32, "dense"][1]):
        assert (got - want).abs().max() <= 4 * (ref - want).abs().max() + 1e-6
    for got, want in zip(results[torch.float64, "fused"][1], exact_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_simclrv2_with_memory_matches_reference():
    """SimCLR v2 with the memory network: in-batch + memory negatives, the memory network an EMA
    of backbone + projector updated after each optimizer step, its outputs for both views
    enqueued after the loss (3 steps x 16 keys wrap the 24-row memory twice). More steps at this
    learning rate make the run chaotic: rounding differences of 1e-7 grow to 1e-3 by step 5."""
    from sslkernels.methods import SimCLRv2

    torch.manual_seed(4)
    method = SimCLRv2(SmallConvNet(16), 16, proj_hidden=24, proj_dim=8, temperature=0.3,
                      memory_size=24, momentum=0.8)
    assert sum(isinstance(m, torch.nn.Linear) for m in method.projector) == 3
    online = torch.nn.Sequential(copy.deepcopy(method.backbone), copy.deepcopy(method.projector))
    target = copy.deepcopy(online)
    memory = method.memory.buffer.clone()
    ptr = 0
    batches = _batches(seed=4, steps=3)
    losses = _train(method, batches)

    opt = _sgd(online.parameters())
    ref_losses = []
    for x0, x1 in batches:
        z0, z1 = online(x0), online(x1)
        loss = _dense_memory_ntxent(z0, z1, memory, 0.3)
        with torch.no_grad():
            keys = F.normalize(torch.cat([target(x0), target(x1)]), dim=1)
        for row in keys:  # the ring buffer, key by key
            memory[ptr] = row
            ptr = (ptr + 1) % memory.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pt, po in zip(target.parameters(), online.parameters()):
                pt.mul_(0.8).add_(po, alpha=0.2)
        ref_losses.append(loss.item())
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    _assert_params_close([method.backbone, method.projector], list(online))
    _assert_params_close([method.memory_backbone, method.memory_projector], list(target))
    # keys pass through the final BatchNorm of 8 rows, which amplifies rounding differences
    torch.testing.assert_close(method.memory.buffer, memory, rtol=1e-3, atol=1e-4)


def test_simclrv2_without_memory_is_ntxent_with_the_deeper_head():
    from sslkernels.methods import SimCLRv2

    torch.manual_seed(5)
    method = SimCLRv2(SmallConvNet(16), 16, proj_dim=8, temperature=0.5)
    assert not hasattr(method, "memory")
    x0, x1 = _batches(seed=5, steps=1)[0]
    want = lightly_ntxent(method.projector(method.backbone(x0)),
                          method.projector(method.backbone(x1)), 0.5)
    assert method.training_step((x0, x1)).item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="memory_size"):
        SimCLRv2(SmallConvNet(16), 16, memory_size=-1)


def test_simsiam_without_stop_gradient_matches_reference():
    torch.manual_seed(6)
    method = SimSiam(SmallConvNet(16), 16, dim=32, pred_dim=8, stop_gradient=False)
    encoder = torch.nn.Sequential(copy.deepcopy(method.backbone), copy.deepcopy(method.projector))
    predictor = copy.deepcopy(method.predictor)
    batches = _batches(seed=6)
    losses = _train(method, batches)
    opt = _sgd(list(encoder.parameters()) + list(predictor.parameters()))
    ref_losses = []
    for x1, x2 in batches:
        z1, z2 = encoder(x1), encoder(x2)
        loss = -(F.cosine_similarity(predictor(z1), z2).mean() +
                 F.cosine_similarity(predictor(z2), z1).mean()) * 0.5  # no detach
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    _assert_params_close([method.backbone, method.projector], list(encoder))


def test_mocov2_head_must_be_mlp_or_linear():
    with pytest.raises(ValueError, match="head"):
        MoCoV2(SmallConvNet(16), 16, head="mlp3")


def test_head_blocks_cut_after_each_linear():
    from sslkernels.methods import head_blocks

    s = SimCLR(SmallConvNet(16), 16, proj_hidden=12, proj_dim=8, proj_layers=3).projector
    blocks = head_blocks(s)
    assert [[type(m).__name__ for m in b] for b in blocks] == [
        ["Linear", "BatchNorm1d", "ReLU"], ["Linear", "BatchNorm1d", "ReLU"], ["Linear"]]
    x = torch.randn(5, 16)
    s.eval()
    torch.testing.assert_close(torch.nn.Sequential(*blocks)(x), s(x))
    assert all(a is b for a, b in zip([m for b in blocks for m in b], s))  # shared, not copied
    with pytest.raises(TypeError, match="Sequential"):
        head_blocks(torch.nn.Linear(2, 2))


def test_embedding_std_monitor():
    from sslkernels.monitor import CollapseMonitor, embedding_std

    g = torch.Generator().manual_seed(0)
    d = 64
    healthy = embedding_std(torch.randn(4096, d, generator=g))
    assert healthy.item() == pytest.approx(d ** -0.5, rel=0.02)
    collapsed = embedding_std(torch.ones(4096, d) + 1e-4 * torch.randn(4096, d, generator=g))
    assert collapsed.item() < 1e-3
    head = torch.nn.Linear(8, d)
    mon = CollapseMonitor(head)
    x = torch.randn(32, 8, generator=g)
    head(x), head(x + 1)
    got = mon.value()  # the mean over the two calls since the last reset
    want = (embedding_std(head(x)) + embedding_std(head(x + 1))) / 2
    assert got == pytest.approx(want.item())
    mon.reset()
    head.eval()
    head(x)
    assert mon.value() is None  # evaluation forwards are not training embeddings
    mon.remove()
    with pytest.raises(ValueError, match="B >= 2"):
        embedding_std(torch.randn(1, 4))


# ---------------------------------------------------------------------------------------------
# The EMA object the methods hold, and torch.compile of every training step.

def _small(name):
    torch.manual_seed(4)
    if name == "simclr":
        return SimCLR(SmallConvNet(16), 16, proj_dim=8, temperature=0.5)
    if name == "mocov2":
        return MoCoV2(SmallConvNet(16), 16, dim=8, mlp_hidden=16, queue_size=24, momentum=0.9)
    if name == "byol":
        return BYOL(SmallConvNet(16), 16, proj_hidden=16, proj_dim=8, pred_hidden=16,
                    base_momentum=0.9)
    if name == "simclrv2":
        from sslkernels.methods import SimCLRv2
        return SimCLRv2(SmallConvNet(16), 16, proj_hidden=16, proj_dim=8, memory_size=20,
                        momentum=0.9)
    return SimSiam(SmallConvNet(16), 16, dim=16, pred_dim=8)


@pytest.mark.parametrize("name", ["simclr", "simclrv2", "mocov2", "byol", "simsiam"])
def test_training_step_compiles_fullgraph(name):
    """torch.compile(training_step, fullgraph=True) (MoCo's includes its momentum update and
    enqueue) gives eager's losses, parameters, targets and queue, step after step."""
    torch._dynamo.reset()
    eager = _small(name)
    compiled = copy.deepcopy(eager)
    step = torch.compile(compiled.training_step, fullgraph=True, backend="aot_eager")
    for views in _batches(seed=5, steps=3):
        losses = []
        for method, fn in ((eager, eager.training_step), (compiled, step)):
            loss = fn(views)
            loss.backward()
            with torch.no_grad():
                for p in method.parameters():
                    if p.grad is not None:
                        p.sub_(0.1 * p.grad)
                        p.grad = None
            method.after_optimizer_step(0, 3)
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    _assert_params_close([eager], [compiled])


@pytest.mark.parametrize("name", ["mocov2", "byol", "simclrv2"])
def test_method_ema_survives_to(name):
    """The trainer moves a method after building it (.to(dtype, channels_last)): the EMA object
    built in __init__ notices and updates the moved tensors, as a fresh ema_update_ does."""
    from sslkernels.ema import ema_update_
    method = _small(name)
    assert not isinstance(method.ema, torch.nn.Module)
    keys = set(method.state_dict())
    method.to(torch.float64, memory_format=torch.channels_last)
    assert set(method.state_dict()) == keys  # the EMA object adds nothing to checkpoints
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    target = {"mocov2": "key_backbone", "byol": "target_backbone",
              "simclrv2": "memory_backbone"}
    target = getattr(method, target[name])
    twin = copy.deepcopy(target)
    if name == "mocov2":
        method.momentum_update()
        m = method.momentum
    elif name == "simclrv2":
        method.after_optimizer_step(1, 4)
        m = method.momentum
    else:
        method.after_optimizer_step(1, 4)
        m = method.current_momentum
    ema_update_(twin, method.backbone, m, buffers="skip")
    for (n, u), v in zip(target.named_parameters(), twin.parameters()):
        assert u.dtype == torch.float64 and torch.equal(u, v), n
    assert target.features[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["mocov2", "byol", "simclrv2"])
@pytest.mark.parametrize("first", ["prepared", "rebuilt"])
def test_ema_hook_in_grad_mode_records_no_history(name, first):
    """The EMA hooks run in grad mode (no torch.no_grad() around them): the targets get the
    foreach values, stay requires_grad=False leaves without grad_fn, and backward through the
    online network afterwards is unaffected; also on the step that rebuilds the plan."""
    method = _small(name)
    target = getattr(method, {"mocov2": "key_backbone", "byol": "target_backbone",
                              "simclrv2": "memory_backbone"}[name])
    if first == "rebuilt":
        method.to(torch.float64)
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(0.5)
    twin = [p.detach().clone() for p in target.parameters()]
    assert torch.is_grad_enabled()
    if name == "mocov2":
        m = method.momentum
        method.momentum_update()
    else:
        method.after_optimizer_step(1, 4)
        m = method.current_momentum if name == "byol" else method.momentum
    torch._foreach_lerp_(twin, [p.detach() for p in method.backbone.parameters()], 1.0 - m)
    for p, q in zip(target.parameters(), twin):
        assert p.grad_fn is None and not p.requires_grad and p.is_leaf
        assert torch.equal(p, q)
    x = torch.randn(2, 3, 16, 16, dtype=next(method.backbone.parameters()).dtype)
    method.backbone(x).sum().backward()
    assert all(p.grad is not None for p in method.backbone.parameters())
