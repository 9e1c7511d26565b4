"""In-place EMA (sslkernels.ema): the EMA object and the stateless ema_update_, bit-compatibility
with torch._foreach_lerp_, agreement with the official loops, buffers, rebuilding when a module
changes, flat buffers, torch.compile, the momentum schedule, opcheck and bad input."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sslkernels.ema import EMA, cosine_momentum, ema_update_, flatten_parameters_, is_flat
from sslkernels.reference import ema as ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]
MOMENTA = [0.0, 0.3, 0.5, 0.9, 0.996, 1.0]  # weight 1 - m on both sides of lerp's 0.5 switch
# (target dtype, online dtype)
COMBOS = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
          (torch.float32, torch.float16), (torch.float64, torch.float64),
          (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)]


# ---------------------------------------------------------------------------------------------
# A ResNet-like network: convolutions (one channels-last), BatchNorm with running stats and
# num_batches_tracked, a linear head, a 0-d and an empty parameter, odd sizes (vector tails) and
# one tensor larger than the CPU kernel's parallel grain (a thread boundary inside a tensor).

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                   nn.ReLU(), nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.empty = nn.Parameter(torch.empty(0, 4))
        self.odd = nn.Parameter(torch.randn(3, 37))
        self.big = nn.Parameter(torch.randn(70001) * 0.01)
        with torch.no_grad():
            w = self.block[3].weight
            self.block[3].weight.data = w.contiguous(memory_format=torch.channels_last)

    def forward(self, x):
        h = self.block(self.stem(x)).mean((2, 3))
        return self.fc(h) * self.scale + self.odd.mean() + self.big[:10].sum()


def make_pair(seed=0, device="cpu"):
    """(target, online): online perturbed and run once in train mode (BN stats move)."""
    torch.manual_seed(seed)
    online = Net().to(device)
    target = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(torch.randn(4, 3, 6, 6, device=device))
    return target, online


def snapshot(*objs):
    out = []
    for obj in objs:
        ts = obj.state_dict().values() if isinstance(obj, nn.Module) else obj
        out.append([t.detach().clone() for t in ts])
    return out


def assert_unchanged(before, *objs):
    for b, a in zip(before, snapshot(*objs)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def bits_equal(a, b):
    """Same dtype, shape and bit patterns (NaNs and signed zeros included)."""
    def bits(x):
        return x.detach().contiguous().view(-1).view(torch.uint8) if x.numel() else x
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


# ---------------------------------------------------------------------------------------------
# Bit-compatibility with torch._foreach_lerp_ and agreement with the official loops.

def typed_lists(tdt, odt, device, seed=0):
    target, online = make_pair(seed, device)
    tp = [p.detach().to(tdt) for p in target.parameters()]
    op = [p.detach().to(odt) for p in online.parameters()]
    # a few more odd shapes: 0-d, empty, a transposed (strided) pair, a tail of 15
    gen = torch.Generator().manual_seed(seed)
    extra = [(), (0,), (5, 0, 3), (15,), (33, 17)]
    for shape in extra:
        tp.append(torch.randn(shape, generator=gen).to(device, tdt))
        op.append(torch.randn(shape, generator=gen).to(device, odt))
    tp.append(torch.randn(9, 13, generator=gen).to(device, tdt).t())
    op.append(torch.randn(9, 13, generator=gen).to(device, odt).t())
    return tp, op


HOW = ["EMA", "ema_update_"]


def update(how, target, online, momentum, **kw):
    """One update the stateless way, or through an EMA object built for it."""
    if how == "ema_update_":
        ema_update_(target, online, momentum, **kw)
    else:
        EMA(target, online, momentum, **kw).update()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tdt,odt", COMBOS, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("how", HOW)
def test_bitwise_foreach_lerp(device, tdt, odt, momentum, how):
    tp, op = typed_lists(tdt, odt, device)
    expect = [t.clone() for t in tp]
    torch._foreach_lerp_(expect, [o.to(tdt) for o in op], 1.0 - momentum)
    update(how, tp, op, momentum)
    for i, (a, b) in enumerate(zip(tp, expect)):
        assert bits_equal(a, b), f"tensor {i} {tuple(a.shape)}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tdt,odt", COMBOS, ids=lambda d: str(d).split(".")[-1])
def test_matches_official_loops(device, tdt, odt):
    """Against the reference loop (t.mul_(m).add_(o, alpha=1-m)) and MoCo's update: all three
    are within a couple of roundings (in the target dtype) of the exact fp64 value."""
    momentum = 0.99
    tp, op = typed_lists(tdt, odt, device, seed=1)
    exact = [t.double() * momentum + o.double() * (1 - momentum) for t, o in zip(tp, op)]
    loop = [t.clone() for t in tp]
    ref.ema_loop_(loop, op, momentum)
    results = [loop]
    if tdt == odt:
        moco = [t.clone() for t in tp]
        ref.ema_moco_(moco, op, momentum)
        results.append(moco)
    EMA(tp, op, momentum).update()
    eps = torch.finfo(tdt).eps
    for i, x in enumerate(exact):
        tol = 2 * eps * (tp[i].double().abs() + op[i].double().abs() * (1 - momentum)) + 1e-300
        ours = (tp[i].double() - x).abs()
        assert (ours <= tol).all(), i
        for r in results:
            assert ((r[i].double() - x).abs() <= 2 * tol).all(), i
        for r in results:  # and close to each other
            torch.testing.assert_close(tp[i], r[i], rtol=4 * eps, atol=4 * eps)


@settings(max_examples=30, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3), min_size=1,
                       max_size=12),
       momenta=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=3),
       combo=st.sampled_from(COMBOS), seed=st.integers(0, 2**16))
def test_bitwise_random_shapes(shapes, momenta, combo, seed):
    """A held EMA object and ema_update_, step after step, against _foreach_lerp_."""
    tdt, odt = combo
    g = torch.Generator().manual_seed(seed)
    tp = [torch.randn(s, generator=g).to(tdt) for s in shapes]
    op = [torch.randn(s, generator=g).to(odt) for s in shapes]
    expect = [t.clone() for t in tp]
    stateless = [t.clone() for t in tp]
    ema = EMA(tp, op, 0.5)
    for m in momenta:
        torch._foreach_lerp_(expect, [o.to(tdt) for o in op], 1.0 - m)
        ema.update(m)
        ema_update_(stateless, op, m)
    assert all(bits_equal(a, b) for a, b in zip(tp, expect))
    assert all(bits_equal(a, b) for a, b in zip(stateless, expect))


def test_direct_op_and_reference_backend():
    tp, op = typed_lists(torch.float32, torch.float32, "cpu")
    a, b, c, d = ([t.clone() for t in tp] for _ in range(4))
    versions = [t._version for t in a]
    torch.ops.sslkernels.ema_lerp_(a, op, 0.25)
    assert all(t._version > v for t, v in zip(a, versions))
    ema_update_(b, op, 0.75, backend="reference")
    ema_update_(c, op, 0.75)
    EMA(d, op, 0.75, backend="reference").update()
    for x, y, z, w in zip(a, b, c, d):
        assert bits_equal(x, y) and bits_equal(x, z) and bits_equal(x, w)


@pytest.mark.parametrize("how", HOW)
def test_no_autograd_history_and_version_bump(how):
    target, online = make_pair()
    ema = EMA(target, online, 0.9)
    for _ in range(2):  # the second update is the prepared one
        versions = [p._version for p in target.parameters()]
        if how == "EMA":
            ema.update()
        else:
            ema_update_(target, online, 0.9)
        for p, v in zip(target.parameters(), versions):
            assert p.grad_fn is None and not p.requires_grad and p.grad is None
            assert p._version > v  # in-place writes are visible to autograd's saved-tensor checks
    # the online network may require grad; nothing of the update enters its graph
    assert all(p.requires_grad and p.grad is None for p in online.parameters())


def test_strided_pair_records_no_history():
    """A pair the kernels do not stream (a transposed target) goes through ATen's lerp: still no
    history, even with grad mode on and an online tensor that requires grad."""
    t = [torch.randn(9, 13).t(), torch.zeros(4)]
    o = [torch.randn(13, 9, requires_grad=True), torch.ones(4, requires_grad=True)]
    expect = [x.detach().clone() for x in t]
    torch._foreach_lerp_(expect, [x.detach() for x in o], 0.5)
    torch._foreach_lerp_(expect, [x.detach() for x in o], 0.5)
    ema = EMA(t, o, 0.5)
    ema.update()
    ema.update()
    assert all(x.grad_fn is None and not x.requires_grad for x in t)
    assert all(bits_equal(x, e) for x, e in zip(t, expect))


def test_version_check_catches_update_of_saved_target():
    """A target saved for backward and then updated: autograd refuses, as after any in-place op."""
    target, online = make_pair()
    ema = EMA(target, online, 0.9)
    ema.update()
    x = torch.randn(3, 16, requires_grad=True)
    y = (x @ target.fc.weight.t()).sum()  # saves fc.weight
    ema.update()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


# ---------------------------------------------------------------------------------------------
# Modules: buffers, a held object across changes of the modules.

@pytest.mark.parametrize("how", HOW)
def test_module_buffers_copy_ema_skip(how):
    for mode in ("copy", "ema", "skip"):
        target, online = make_pair()
        before_t = {k: v.clone() for k, v in target.state_dict().items()}
        update(how, target, online, 0.8, buffers=mode)
        for name, buf in target.named_buffers():
            o = dict(online.named_buffers())[name]
            if mode == "copy" or (mode == "ema" and not buf.is_floating_point()):
                assert torch.equal(buf, o), (mode, name)
            elif mode == "ema":
                exp = before_t[name].clone()
                torch._foreach_lerp_([exp], [o], 1 - 0.8)
                assert bits_equal(buf, exp), (mode, name)
            else:
                assert torch.equal(buf, before_t[name]), (mode, name)
        assert any(n.endswith("num_batches_tracked") for n, _ in target.named_buffers())


@pytest.mark.parametrize("mode", ["copy", "ema"])
def test_held_object_equals_stateless(mode):
    """Several steps of one EMA object, with online training in between, equal ema_update_."""
    t1, online = make_pair()
    t2 = copy.deepcopy(t1)
    ema = EMA(t1, online, 0.5, buffers=mode)
    for m in (0.5, 0.9, 0.999, 0.0):
        with torch.no_grad():
            for p in online.parameters():
                p.mul_(1.01)
        online(torch.randn(4, 3, 6, 6))  # BN statistics move
        ema.update(m)
        ema_update_(t2, online, m, buffers=mode)
    for (n, u), v in zip(t1.state_dict().items(), t2.state_dict().values()):
        assert bits_equal(u, v), n


def test_module_equals_list_update():
    target, online = make_pair()
    tl = [p.detach().clone() for p in target.parameters()]
    ol = [p.detach() for p in online.parameters()]
    e_mod, e_list = EMA(target, online, 0.5), EMA(tl, ol, 0.5)
    for m in (0.5, 0.9, 0.999):
        e_mod.update(m)
        e_list.update(m)
    for p, t in zip(target.parameters(), tl):
        assert bits_equal(p.detach(), t)


def test_list_sees_replaced_elements():
    t = [torch.zeros(1), torch.zeros(3)]
    o = [torch.ones(1), torch.ones(3)]
    ema = EMA(t, o, 0.5)
    ema.update()
    old = t[0]
    t[0] = torch.tensor([0.5])  # equal value, different tensor: must be the one updated now
    ema.update()
    assert old.item() == 0.5 and t[0].item() == 0.75 and torch.equal(t[1], torch.full((3,), 0.75))
    t.append(torch.zeros(2))  # a longer target list no longer pairs with online
    with pytest.raises(ValueError, match="same number"):
        ema.update()


@pytest.mark.parametrize("where", [0, 1100, 2399])
def test_long_list_change_seen_by_split_checks(where):
    """Lists long enough that a step splits its checks over the threads: a change in any block
    is seen (a tensor re-homed is the one updated; a target turned trainable is rejected with
    nothing written)."""
    g = torch.Generator().manual_seed(where)
    t = [torch.randn(5, generator=g) for _ in range(1200)]
    o = [torch.randn(5, generator=g) for _ in range(1200)]
    ema = EMA(t, o, 0.5)
    ema.update()
    k = where % 1200
    side = t if where < 1200 else o
    side[k].data = side[k].clone()  # same object, same values, new storage
    twin = [x.clone() for x in t]
    torch._foreach_lerp_(twin, o, 0.5)
    ema.update()
    assert all(bits_equal(a, b) for a, b in zip(t, twin))
    t[k].requires_grad_(True)
    before = snapshot(t, o)
    with pytest.raises(ValueError, match=rf"target\[{k}\].*requires_grad=False"):
        ema.update()
    assert_unchanged(before, t, o)


@pytest.mark.parametrize("where", ["first target", "last online"])
def test_big_module_tree_change_seen_by_split_checks(where):
    """A module tree with thousands of dicts, whose checks a step splits over the threads
    (a share of the dicts and of the tensors each): a parameter replaced in either end's
    share is the one averaged next, though every tensor the plan holds is unchanged."""
    torch.manual_seed(0)
    online = nn.Sequential(*[nn.Linear(2, 2) for _ in range(700)])
    target = copy.deepcopy(online).requires_grad_(False)
    ema = EMA(target, online, 0.5)
    ema.update()
    if where == "first target":
        target[0].weight = nn.Parameter(torch.randn(2, 2), requires_grad=False)
    else:
        online[-1].weight = nn.Parameter(torch.randn(2, 2))
    twin = [p.detach().clone() for p in target.parameters()]
    torch._foreach_lerp_(twin, [p.detach() for p in online.parameters()], 0.5)
    ema.update()
    assert all(bits_equal(a, b) for a, b in zip(target.parameters(), twin))


@pytest.mark.parametrize("tdt,odt", COMBOS, ids=lambda d: str(d).split(".")[-1])
def test_bitwise_around_prefetched_range(tdt, odt):
    """Tensors on both sides of the CPU kernel's 64 KB limit for software prefetch, and ones
    split into chunks on either side of it."""
    g = torch.Generator().manual_seed(3)
    limit = 65536 // torch.empty((), dtype=tdt).element_size()
    shapes = [(limit - 1,), (limit,), (limit + 1,), (2 * limit + 7,), (5 * limit + 3,), (100,)]
    tp = [torch.randn(s, generator=g).to(tdt) for s in shapes]
    op = [torch.randn(s, generator=g).to(odt) for s in shapes]
    expect = [t.clone() for t in tp]
    torch._foreach_lerp_(expect, [o.to(tdt) for o in op], 1.0 - 0.9)
    EMA(tp, op, 0.9).update()
    assert all(bits_equal(a, b) for a, b in zip(tp, expect))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_bitwise_when_threads_take_over_chunks(threads):
    """Lists of many of the CPU kernel's 65536-element chunks, with pairs across chunk ends, and
    module trees of many check chunks, on up to more threads than this machine has cores: a
    descheduled thread's chunks are taken over by another (balanced_for), and every element is
    still written exactly once, as foreach writes it (a chunk run twice or skipped would show in
    the bits after three steps)."""
    g = torch.Generator().manual_seed(5)
    sizes = torch.randint(1, 30000, (120,), generator=g).tolist()
    tp = [torch.randn(n, generator=g) for n in sizes]
    op = [torch.randn(n, generator=g) for n in sizes]
    online = nn.Sequential(*[nn.Linear(3, 3) for _ in range(400)])
    target = copy.deepcopy(online).requires_grad_(False)
    twins = [[t.clone() for t in tp], [p.detach().clone() for p in target.parameters()]]
    onlines = [op, [p.detach() for p in online.parameters()]]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lists, module = EMA(tp, op, 0.9), EMA(target, online, 0.9)
        for _ in range(3):
            lists.update()
            module.update()
            for twin, o in zip(twins, onlines):
                torch._foreach_lerp_(twin, o, 1.0 - 0.9)
    finally:
        torch.set_num_threads(before)
    assert all(bits_equal(a, b) for a, b in zip(tp, twins[0]))
    assert all(bits_equal(a, b) for a, b in zip(target.parameters(), twins[1]))


def test_default_momentum_and_state_dict():
    t, o = [torch.zeros(4)], [torch.ones(4)]
    ema = EMA(t, o, 0.75)
    ema.update()
    assert torch.equal(t[0], torch.full((4,), 0.25))
    state = ema.state_dict()
    assert state == {"momentum": 0.75}
    other = EMA([torch.zeros(4)], [torch.ones(4)], 0.1)
    other.load_state_dict(state)
    assert other.momentum == 0.75
    with pytest.raises(ValueError, match="momentum"):
        other.load_state_dict({"momentum": 2.0})
    with pytest.raises(ValueError, match="momentum"):
        other.load_state_dict({"m": 0.5})
    assert "momentum=0.75" in repr(other)


def _replace_param(target, online):
    target.fc.weight = nn.Parameter(torch.zeros_like(target.fc.weight), requires_grad=False)


def _replace_submodule(target, online):
    online.fc = nn.Linear(16, 10)


def _reassign_data(target, online):
    target.fc.bias.data = torch.zeros(10)


def _channels_last(target, online):
    target.to(memory_format=torch.channels_last)
    online.to(memory_format=torch.channels_last)


def _double(target, online):
    target.double(), online.double()


def _replace_buffer(target, online):
    online.stem[1].running_mean = torch.randn(8)


def _swap_double(target, online):
    """.to() under swap_module_params_on_conversion: same Parameter objects, new tensors inside;
    it fails if anything else holds a reference to the old tensors."""
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        target.double(), online.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)


def _add_to_leaf(target, online):
    """A leaf's empty buffer and submodule dicts gain entries (the step checks their size
    alone)."""
    for net, v in ((target, 0.0), (online, 1.0)):
        net.fc.register_buffer("extra", torch.full((3,), v))
        net.fc.head = nn.Linear(2, 2)
    target.fc.head.requires_grad_(False)


CHANGES = [_replace_param, _replace_submodule, _reassign_data, _channels_last, _double,
           _replace_buffer, _swap_double, _add_to_leaf]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.lstrip("_"))
def test_held_object_rebuilds_after_module_change(change):
    """A change of either module between updates is seen: the next update writes the tensors
    the modules hold now, exactly as a fresh ema_update_ does."""
    target, online = make_pair()
    ema = EMA(target, online, 0.5)
    ema.update()
    change(target, online)
    twin_t, twin_o = copy.deepcopy(target), copy.deepcopy(online)
    for m in (0.3, 0.9):
        ema.update(m)
        ema_update_(twin_t, twin_o, m)
    for (n, u), v in zip(target.state_dict().items(), twin_t.state_dict().values()):
        assert bits_equal(u, v) and u.stride() == v.stride(), n


def test_requires_grad_turned_on_is_rejected_by_held_object():
    target, online = make_pair()
    ema = EMA(target, online, 0.5)
    ema.update()
    target.fc.bias.requires_grad_(True)
    before = snapshot(target, online)
    with pytest.raises(ValueError, match=r"'fc\.bias'.*requires_grad=False"):
        ema.update()
    assert_unchanged(before, target, online)
    target.fc.bias.requires_grad_(False)
    ema.update()


def test_dispatch_mode_sees_the_op():
    """Under a dispatch mode (or a tensor subclass) the update goes through the op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    t, o = [torch.zeros(3)], [torch.ones(3)]
    ema = EMA(t, o, 0.5)
    ema.update()
    with Record():
        ema.update()
    assert torch.ops.sslkernels.ema_lerp_.default in seen
    assert torch.equal(t[0], torch.full((3,), 0.75))


def test_deepcopy_and_pickle_follow_the_copy():
    import io
    target, online = make_pair()
    holder = nn.Module()
    holder.target, holder.online = target, online
    holder.ema = EMA(target, online, 0.5)
    holder.ema.update()
    buf = io.BytesIO()
    torch.save(holder, buf)
    buf.seek(0)
    for clone in (copy.deepcopy(holder), torch.load(buf, weights_only=False)):
        assert clone.ema.target is clone.target and clone.ema.online is clone.online
        before = snapshot(target)
        clone.ema.update(0.0)
        assert_unchanged(before, target)  # the original is not touched
        for p, q in zip(clone.target.parameters(), clone.online.parameters()):
            assert torch.equal(p, q)
    assert set(holder.state_dict()) == {f"{k}.{n}" for k in ("target", "online")
                                        for n in target.state_dict()}


@pytest.mark.parametrize("flat", [False, True])
def test_nothing_kept_alive(flat):
    """No module-level state: dropping the EMA object and the modules frees them."""
    import gc
    import weakref
    target, online = make_pair()
    if flat:
        flatten_parameters_(target)
        flatten_parameters_(online)
    ema = EMA(target, online, 0.9)
    ema.update()
    ema_update_(target, online, 0.9)
    refs = weakref.ref(target), weakref.ref(online), weakref.ref(target.fc.weight)
    del target, online, ema
    gc.collect()
    assert all(r() is None for r in refs)


def test_no_warnings_in_steady_state():
    target, online = make_pair()
    ema = EMA(target, online, 0.99)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            ema.update()
            ema_update_(target, online, 0.99)


# ---------------------------------------------------------------------------------------------
# Flat buffers.

def test_flatten_keeps_module_working():
    torch.manual_seed(0)
    a, _ = make_pair()
    a.requires_grad_(True)
    b = copy.deepcopy(a)
    x = torch.randn(5, 3, 6, 6)
    sd_before = {k: v.clone() for k, v in b.state_dict().items()}
    ids = [id(p) for p in b.parameters()]
    assert not is_flat(b)
    flatten_parameters_(b, buffers=True)
    assert is_flat(b) and [id(p) for p in b.parameters()] == ids
    sd_after = b.state_dict()
    assert list(sd_after) == list(sd_before)
    for k in sd_before:
        assert bits_equal(sd_after[k], sd_before[k]) and sd_after[k].stride() == sd_before[k].stride()
    assert b.block[3].weight.is_contiguous(memory_format=torch.channels_last)
    a.train(), b.train()
    assert bits_equal(a(x), b(x))
    # keeps training exactly like the unflattened twin, optimizer state included
    oa = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for m, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert bits_equal(p.detach(), q.detach()), n
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or bits_equal(p.grad, q.grad))
    for (n, u), v in zip(a.state_dict().items(), b.state_dict().values()):
        assert bits_equal(u, v), n
    assert is_flat(b)  # still in the flat buffer after training
    b.load_state_dict(sd_before)
    assert is_flat(b) and bits_equal(b.fc.weight.detach(), sd_before["fc.weight"])
    assert not is_flat(copy.deepcopy(b))


@pytest.mark.parametrize("flat_buffers", [False, True])
@pytest.mark.parametrize("mode", ["copy", "ema", "skip"])
def test_flat_update_equals_per_tensor(flat_buffers, mode):
    t1, o1 = make_pair(3)
    t2, o2 = copy.deepcopy(t1), copy.deepcopy(o1)
    flatten_parameters_(t2, buffers=flat_buffers)
    flatten_parameters_(o2, buffers=flat_buffers)
    e1, e2 = EMA(t1, o1, 0.5, buffers=mode), EMA(t2, o2, 0.5, buffers=mode)
    for m in (0.0, 0.6, 0.99, 1.0):
        e1.update(m)
        e2.update(m)
    assert is_flat(t2)
    for (n, u), v in zip(t1.state_dict().items(), t2.state_dict().values()):
        assert bits_equal(u, v), n


def test_flat_modules_take_one_pass_per_run():
    """Parameters back to back in both flat buffers are one kernel pair; the gaps the 32-element
    alignment leaves (after a size that is not a multiple of 32) split the runs, and are never
    written."""
    sizes = [64, 4096, 32, 7, 96, 1]  # runs: [64, 4096, 32, 7] [96, 1]
    mt = nn.ParameterList([nn.Parameter(torch.randn(n), requires_grad=False) for n in sizes])
    mo = nn.ParameterList([nn.Parameter(torch.randn(n)) for n in sizes])
    expect = [p.detach().clone() for p in mt]
    torch._foreach_lerp_(expect, [p.detach() for p in mo], 0.25)
    flatten_parameters_(mt)
    flatten_parameters_(mo)
    flat = torch.empty(0).set_(mt[0].untyped_storage())  # the whole buffer, gaps included
    gap = slice(mt[3].storage_offset() + 7, mt[4].storage_offset())
    assert gap.stop - gap.start == 25
    flat[gap] = 7.0
    ema = EMA(mt, mo, 0.75)
    assert ema._plan.num_pairs == 2
    ema.update()
    assert all(bits_equal(p.detach(), e) for p, e in zip(mt, expect))
    assert (flat[gap] == 7.0).all()
    unflat = EMA(list(mt), [p.detach().clone() for p in mo], 0.75)
    assert unflat._plan.num_pairs == len(sizes)


def test_flat_mixed_precision_online():
    t1, o1 = make_pair(4)
    o1 = o1.to(torch.bfloat16)
    t2, o2 = copy.deepcopy(t1), copy.deepcopy(o1)
    flatten_parameters_(t2)
    flatten_parameters_(o2)
    EMA(t1, o1, 0.9, buffers="skip").update()
    ema = EMA(t2, o2, 0.9, buffers="skip")
    assert ema._plan.num_pairs < len(list(t2.parameters()))
    ema.update()
    for u, v in zip(t1.parameters(), t2.parameters()):
        assert bits_equal(u, v)


@pytest.mark.parametrize("mode", ["copy", "ema"])
def test_flat_option_flattens_and_reflattens(mode):
    """EMA(flat=True) moves both sides into flat buffers (one kernel pair per run), equals the
    per-tensor update bit for bit, and moves them back in after a .to() took them out."""
    t1, o1 = make_pair(7)
    t2, o2 = copy.deepcopy(t1), copy.deepcopy(o1)
    plain, flat = EMA(t1, o1, 0.5, buffers=mode), EMA(t2, o2, 0.5, buffers=mode, flat=True)
    assert is_flat(t2) and is_flat(o2) and not is_flat(t1)
    # runs break only after sizes that are not multiples of 32 (most of this test's odd ones)
    assert flat._plan.num_pairs < plain._plan.num_pairs
    for step, m in enumerate((0.6, 0.99, 0.0)):
        if step == 1:
            for module in (t1, o1, t2, o2):
                module.to(torch.float64, memory_format=torch.channels_last)
            assert not is_flat(t2)
        plain.update(m)
        flat.update(m)
        assert is_flat(t2) and is_flat(o2)
    assert t2.block[3].weight.is_contiguous(memory_format=torch.channels_last)
    for (n, u), v in zip(t1.state_dict().items(), t2.state_dict().values()):
        assert bits_equal(u, v) and u.stride() == v.stride(), n
    aligned = [torch.randn(n, 64) for n in (1, 3, 64, 5)]
    flat_lists = EMA(aligned, [torch.randn_like(x) for x in aligned], 0.5, flat=True)
    assert flat_lists._plan.num_pairs == 1


@pytest.mark.parametrize("change", [_double, _reassign_data], ids=["cast", "data"])
def test_flat_broken_is_noticed(change):
    t1, o1 = make_pair(5)
    t2, o2 = copy.deepcopy(t1), copy.deepcopy(o1)
    flatten_parameters_(t2)
    flatten_parameters_(o2)
    e1, e2 = EMA(t1, o1, 0.5), EMA(t2, o2, 0.5)
    e1.update()
    e2.update()
    change(t1, o1)
    change(t2, o2)
    assert not is_flat(t2)
    for _ in range(2):
        e1.update()
        e2.update()
    for (n, u), v in zip(t1.state_dict().items(), t2.state_dict().values()):
        assert torch.equal(u, v), n


# ---------------------------------------------------------------------------------------------
# torch.compile: the object's update and the op trace with fullgraph=True (aot_eager: the fake
# kernel and the functionalization of the mutated lists, without inductor's codegen time).

def test_torch_compile_op_fullgraph():
    def step(t, o):
        torch.ops.sslkernels.ema_lerp_(t, o, 0.25)
        return t[0] * 2

    g = torch.Generator().manual_seed(0)
    t = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    o = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g).bfloat16()]
    expect = [x.clone() for x in t]
    torch._foreach_lerp_(expect, [x.float() for x in o], 0.25)
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(t, o)
    assert all(bits_equal(a, b) for a, b in zip(t, expect))
    assert torch.equal(out, expect[0] * 2)


@pytest.mark.parametrize("kind", ["modules", "lists"])
def test_torch_compile_ema_update_fullgraph(kind):
    torch._dynamo.reset()
    target, online = make_pair()
    twin = copy.deepcopy(target)
    if kind == "modules":
        eager, compiled = EMA(twin, online, 0.5, buffers="ema"), EMA(target, online, 0.5,
                                                                      buffers="ema")
    else:
        ol = list(online.parameters())
        eager = EMA(list(twin.parameters()), ol, 0.5)
        compiled = EMA(list(target.parameters()), ol, 0.5)
    step = torch.compile(compiled.update, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        eager.update(0.9)
        step(0.9)
    for (n, u), v in zip(target.state_dict().items(), twin.state_dict().values()):
        assert bits_equal(u, v), n


def test_torch_compile_rejects_what_eager_rejects():
    torch._dynamo.reset()
    target, online = make_pair()
    ema = EMA(target, online, 0.5)
    target.fc.bias.requires_grad_(True)
    with pytest.raises(Exception, match="requires_grad=False"):
        torch.compile(ema.update, fullgraph=True, backend="aot_eager")()


# ---------------------------------------------------------------------------------------------
# Op registration.

def test_opcheck():
    g = torch.Generator().manual_seed(0)
    tp = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g), torch.randn((), generator=g)]
    op = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g).bfloat16(),
          torch.randn((), generator=g)]
    torch.library.opcheck(torch.ops.sslkernels.ema_lerp_.default, (tp, op, 0.3))


# ---------------------------------------------------------------------------------------------
# cosine_momentum.

def test_cosine_momentum():
    base, total = 0.996, 1000
    for k in (0, 1, 250, 500, 999, 1000):
        expect = 1 - (1 - base) * (math.cos(math.pi * k / total) + 1) / 2
        assert cosine_momentum(k, total, base) == pytest.approx(expect, abs=1e-15)
    assert cosine_momentum(0, total, base) == pytest.approx(base)
    assert cosine_momentum(total, total, base) == 1.0
    assert cosine_momentum(5, 10, 0.9, final=0.99) == pytest.approx(0.945)
    assert cosine_momentum(5, 10, 0.9, final=0.99) == ref.cosine_momentum(5, 10, 0.9, 0.99)
    with pytest.raises(ValueError, match="step"):
        cosine_momentum(11, 10, 0.9)
    with pytest.raises(ValueError, match="step"):
        cosine_momentum(-1, 10, 0.9)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_momentum(0, 0, 0.9)
    with pytest.raises(TypeError, match="step"):
        cosine_momentum(1.5, 10, 0.9)
    with pytest.raises(ValueError, match="base"):
        cosine_momentum(1, 10, 1.5)
    with pytest.raises(ValueError, match="final"):
        cosine_momentum(1, 10, 0.9, final=-0.1)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, and nothing written (by ema_update_, by EMA's
# construction, and by a held EMA whose pairs turned bad).

def lists():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g), torch.randn(6, generator=g)]
    o = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g), torch.randn(6, generator=g)]
    return t, o


BAD_LISTS = {
    "length": (lambda t, o: (t, o[:2]), ValueError, "same number"),
    "shape": (lambda t, o: (t, o[:1] + [torch.randn(6)] + o[2:]), ValueError, r"target\[1\].*shape"),
    "dtype": (lambda t, o: (t, o[:2] + [o[2].double()]), TypeError, r"target\[2\].*cannot be combined"),
    "reduced target": (lambda t, o: (t[:1] + [t[1].half()] + t[2:], o), TypeError, "cannot be combined"),
    "integer": (lambda t, o: (t[:2] + [t[2].long()], o[:2] + [o[2].long()]), TypeError, "cannot be combined"),
    "device": (lambda t, o: (t, o[:2] + [o[2].to("meta")]), ValueError, r"online\[2\].*device|must be on"),
    "requires grad": (lambda t, o: (t[:2] + [t[2].requires_grad_()], o), ValueError,
                      "requires_grad=False"),
    "duplicate target": (lambda t, o: (t[:2] + [t[0]], o[:2] + [o[0]]), ValueError, "share memory"),
    "overlapping views": (lambda t, o: (t[:2] + [t[0].view(-1)[2:8]], o[:2] + [o[2]]), ValueError,
                          "share memory"),
    "not a tensor": (lambda t, o: (t, o[:2] + [3.0]), TypeError, r"online\[2\]"),
}


def _real(xs):  # the tensors whose values can be compared (not meta, not the non-tensor)
    return [x for x in xs if isinstance(x, torch.Tensor) and x.device.type != "meta"]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("case", list(BAD_LISTS))
def test_bad_lists_write_nothing(case, how):
    make, exc, match = BAD_LISTS[case]
    t, o = lists()
    t, o = make(t, o)
    before = snapshot(_real(t), _real(o))
    with pytest.raises(exc, match=match):
        update(how, t, o, 0.5)
    assert_unchanged(before, _real(t), _real(o))


@pytest.mark.parametrize("case", [c for c in BAD_LISTS if c != "length"])
def test_held_object_rejects_lists_turned_bad(case):
    """The lists of a held object are replaced element by element with a bad pair: the next
    update checks again, raises, and writes nothing."""
    make, exc, match = BAD_LISTS[case]
    t, o = lists()
    ema = EMA(t, o, 0.5)
    ema.update()
    bad_t, bad_o = make(*lists())
    t[:], o[:] = bad_t, bad_o
    before = snapshot(_real(t), _real(o))
    with pytest.raises(exc, match=match):
        ema.update()
    assert_unchanged(before, _real(t), _real(o))


@pytest.mark.parametrize("momentum,exc", [(1.5, ValueError), (-0.1, ValueError),
                                          (float("nan"), ValueError), ("0.9", TypeError),
                                          (None, TypeError)])
def test_bad_momentum(momentum, exc):
    t, o = lists()
    before = snapshot(t)
    with pytest.raises(exc, match="momentum"):
        ema_update_(t, o, momentum)
    ema = EMA(t, o, 0.5)
    with pytest.raises(exc, match="momentum"):
        ema.update(momentum if momentum is not None else "x")
    if momentum is not None:
        with pytest.raises(exc, match="momentum"):
            EMA(t, o, momentum)
    assert_unchanged(before, t)


def test_bad_options_and_types():
    target, online = make_pair()
    before = snapshot(target, online)
    for call in (ema_update_, lambda *a, **k: EMA(*a, **k).update()):
        with pytest.raises(ValueError, match="buffers"):
            call(target, online, 0.5, buffers="average")
        with pytest.raises(ValueError, match="backend"):
            call(target, online, 0.5, backend="triton")
        with pytest.raises(TypeError, match="nn.Modules or both be"):
            call(target, list(online.parameters()), 0.5)
        with pytest.raises(TypeError, match="nn.Modules or both be"):
            call(torch.zeros(3), torch.zeros(3), 0.5)
    with pytest.raises(TypeError, match="lists or tuples"):
        EMA(iter([torch.zeros(3)]), iter([torch.zeros(3)]), 0.5)
    with pytest.raises(TypeError, match="module"):
        flatten_parameters_([torch.zeros(3)])
    with pytest.raises(TypeError, match="module"):
        is_flat([torch.zeros(3)])
    assert_unchanged(before, target, online)


@pytest.mark.parametrize("how", HOW)
def test_bad_modules_write_nothing(how):
    target, online = make_pair()
    # a target parameter that requires grad, named in the message
    target.fc.bias.requires_grad_(True)
    before = snapshot(target, online)
    with pytest.raises(ValueError, match=r"'fc\.bias'.*requires_grad=False"):
        update(how, target, online, 0.5)
    assert_unchanged(before, target, online)
    target.fc.bias.requires_grad_(False)
    # a shape mismatch named by parameter, after an earlier successful call
    ema = EMA(target, online, 0.5)
    ema.update()
    online.fc = nn.Linear(16, 11)
    before = snapshot(target, online)
    with pytest.raises(ValueError, match=r"'fc\.weight'.*same shape"):
        update(how, target, online, 0.5)
    with pytest.raises(ValueError, match=r"'fc\.weight'.*same shape"):
        ema.update()
    assert_unchanged(before, target, online)
    # different parameter counts
    online.extra = nn.Parameter(torch.zeros(2))
    before = snapshot(target, online)
    with pytest.raises(ValueError, match="parameters"):
        update(how, target, online, 0.5)
    with pytest.raises(ValueError, match="parameters"):
        ema.update()
    assert_unchanged(before, target, online)


@pytest.mark.parametrize("how", HOW)
def test_bad_buffers_write_nothing(how):
    target, online = make_pair()
    ema = EMA(target, online, 0.5)
    online.stem[1].running_mean = torch.zeros(9)  # wrong shape: checked before any parameter
    before = snapshot(target, online)
    with pytest.raises(ValueError, match=r"buffer target\[0\] \('stem\.1\.running_mean'\).*shape"):
        update(how, target, online, 0.5)
    with pytest.raises(ValueError, match=r"'stem\.1\.running_mean'.*shape"):
        ema.update()
    assert_unchanged(before, target, online)
    with pytest.raises(ValueError, match=r"'stem\.1\.running_mean'.*shape"):
        update(how, target, online, 0.5, buffers="ema")
    assert_unchanged(before, target, online)
    update(how, target, online, 0.5, buffers="skip")  # buffers left alone: fine
    online.stem[1].running_mean = torch.zeros(8)
    online.stem[1].running_var = torch.zeros(8, dtype=torch.int64)
    before = snapshot(target, online)
    with pytest.raises(TypeError, match=r"'stem\.1\.running_var'.*dtypes"):
        update(how, target, online, 0.5)
    assert_unchanged(before, target, online)
    online.stem[1].running_var = torch.ones(8)
    del online.block[1].num_batches_tracked
    online.block[1].register_buffer("num_batches_tracked", None)
    before = snapshot(target, online)
    with pytest.raises(ValueError, match="buffers"):
        update(how, target, online, 0.5)
    with pytest.raises(ValueError, match="buffers"):
        ema.update()
    assert_unchanged(before, target, online)


def test_flat_requires_grad_rejected():
    target, online = make_pair()
    flatten_parameters_(target)
    flatten_parameters_(online)
    target.odd.requires_grad_(True)
    before = snapshot(target, online)
    with pytest.raises(ValueError, match=r"'odd'.*requires_grad=False"):
        EMA(target, online, 0.5)
    assert_unchanged(before, target, online)
