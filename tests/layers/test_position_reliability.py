"""Reliability of the position encoder and the model inputs (issue 11).

The cached position attention is never stale (whatever changes a parameter's value), hooks and parametrizations on
the position modules are honoured, one eval model serves many threads, models build on the meta device, the cache is
bounded by bytes with least-recently-used eviction, and wrong inputs get an error that names the fix.
"""
import copy
import io
import sys
import threading
import time
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch.nn.utils import prune

import timm_pervit  # noqa: F401
from timm_pervit.tools.reference import official_position_attention

from tests.conftest import make_micro


def _fresh_phi(model, h, w):
    """log(phi_p) of every block recomputed from the current weights (no cache involved)."""
    with torch.no_grad():
        return torch.stack(model.pos_attn.compute(h, w))


def _served_phi(model, h, w):
    """log(phi_p) the model uses at inference (through the cache)."""
    with torch.no_grad():
        return torch.stack(model.pos_attn(h, w))


def _count_builds(model):
    """Wrap ``pos_attn.compute`` to count position builds; returns the list the grids are appended to."""
    calls = []
    compute = model.pos_attn.compute
    model.pos_attn.compute = lambda h, w, *a, **k: calls.append((h, w)) or compute(h, w, *a, **k)
    return calls


# ---- 11.2: never stale, whatever changes a parameter -----------------------------------------------------------------

def test_not_stale_after_ema_update_through_data():
    """A DINO/MoCo-style EMA teacher update edits ``.data`` in place, which bumps no version counter."""
    student, teacher = make_micro().eval(), make_micro().eval()
    teacher.load_state_dict(student.state_dict())
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        teacher(x)  # the teacher's position attention is now cached
    m = 0.9
    for pk, pq in zip(teacher.parameters(), student.parameters()):
        pk.data.mul_(m).add_((1 - m) * pq.data)
    torch.testing.assert_close(_served_phi(teacher, 4, 4), _fresh_phi(teacher, 4, 4), rtol=0, atol=0)
    with torch.no_grad():
        out = teacher(x)
    teacher.pos_attn.clear_cache()
    with torch.no_grad():
        torch.testing.assert_close(out, teacher(x), rtol=0, atol=0)


def test_not_stale_after_loader_copying_into_data():
    model, other = make_micro().eval(), make_micro(drop_rate=0.).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        model(x)  # smoke-test forward before loading
    sd = other.state_dict()
    for name, p in model.named_parameters():
        p.data.copy_(sd[name])
    for name, b in model.named_buffers():
        b.data.copy_(sd[name])
    with torch.no_grad():
        torch.testing.assert_close(model(x), other(x), rtol=0, atol=0)


def test_not_stale_after_apply_normal_and_data_assignment():
    model = make_micro().eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    model.apply(lambda m: m.weight.data.normal_() if isinstance(m, (nn.Conv2d, nn.Linear)) else None)
    torch.testing.assert_close(_served_phi(model, 4, 4), _fresh_phi(model, 4, 4), rtol=0, atol=0)
    conv = model.pos_attn.blocks[3].conv2
    conv.bias.data = torch.randn_like(conv.bias)  # a new tensor under the same Parameter
    torch.testing.assert_close(_served_phi(model, 4, 4), _fresh_phi(model, 4, 4), rtol=0, atol=0)


class _Scale(nn.Module):
    """A parametrization whose state lives in a buffer and in a plain attribute."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer('scale', torch.ones(n, 1, 1, 1))
        self.power = 1.0

    def forward(self, w):
        return w * self.scale ** self.power


def test_not_stale_with_parametrization_state_in_buffer_or_attribute():
    model = make_micro().eval()
    conv = model.pos_attn.blocks[2].conv2
    with torch.no_grad():
        conv.weight.normal_()
    param = _Scale(conv.out_channels)
    parametrize.register_parametrization(conv, 'weight', param)
    served = _served_phi(model, 4, 5)
    torch.testing.assert_close(served, _fresh_phi(model, 4, 5), rtol=0, atol=0)
    param.scale.data.fill_(2.0)  # buffer edited through .data
    changed = _served_phi(model, 4, 5)
    assert not torch.equal(changed, served)
    torch.testing.assert_close(changed, _fresh_phi(model, 4, 5), rtol=0, atol=0)
    param.power = 3.0  # a plain Python attribute
    torch.testing.assert_close(_served_phi(model, 4, 5), _fresh_phi(model, 4, 5), rtol=0, atol=0)
    assert not torch.equal(_served_phi(model, 4, 5), changed)


# ---- 11.3: hooks, pruning and weight norm on the position modules ----------------------------------------------------

def _reference_log_phi(model, h, w):
    with torch.no_grad():
        return torch.stack(official_position_attention(model, h, w)).log()


def test_conv1_pruned_to_zero_changes_the_position_attention():
    model = make_micro(dtype=torch.float64).eval()
    blk = model.pos_attn.blocks[4]
    with torch.no_grad():
        for p in model.pos_attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = _served_phi(model, 4, 6)
    prune.l1_unstructured(blk.conv1, 'weight', amount=1.0)
    after = _served_phi(model, 4, 6)
    assert not torch.allclose(after[4], before[4])
    torch.testing.assert_close(after, _reference_log_phi(model, 4, 6), rtol=0, atol=1e-10)
    prune.remove(blk.conv1, 'weight')
    torch.testing.assert_close(_served_phi(model, 4, 6), after, rtol=0, atol=1e-10)  # folded again: rounding


def test_global_pruning_of_every_conv_trains_for_two_steps():
    model = make_micro().train()
    convs = [(m, 'weight') for m in model.modules() if isinstance(m, nn.Conv2d)]
    prune.global_unstructured(convs, pruning_method=prune.L1Unstructured, amount=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([1, 2])
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    orig = model.pos_attn.blocks[0].conv1.weight_orig
    assert orig.grad is not None and orig.grad.abs().sum() > 0
    mask = model.pos_attn.blocks[0].conv1.weight_mask
    assert torch.all(orig.grad[mask == 0] == 0)  # pruned weights get no gradient


def test_forward_hooks_on_position_modules_are_honoured():
    model = make_micro(dtype=torch.float64).eval()
    pos = model.pos_attn
    calls = []
    pos.blocks[1].conv1.register_forward_hook(lambda m, i, o: o * 0.5)
    pos.dist_proj.register_forward_pre_hook(lambda m, i: (i[0] * 2.0,))
    pos.blocks[5].norm1.register_forward_hook(lambda m, i, o: calls.append(1))
    served = _served_phi(model, 5, 4)
    torch.testing.assert_close(served, _reference_log_phi(model, 5, 4), rtol=0, atol=1e-10)
    assert len(calls) == 2  # the hook ran in the model's build and in the reference
    _served_phi(model, 5, 4)
    assert len(calls) == 3  # a module with an arbitrary hook is rebuilt on every call: the hook sees each one


@pytest.mark.parametrize('kind', ['hook', 'parametrization'])
def test_weight_norm_on_position_modules(kind):
    model = make_micro(dtype=torch.float64).eval()
    pos = model.pos_attn
    with torch.no_grad():
        for p in pos.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    wn = torch.nn.utils.weight_norm if kind == 'hook' else torch.nn.utils.parametrizations.weight_norm
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # the hook-based one is deprecated (still in use)
        modules = [wn(pos.blocks[2].conv1), wn(pos.dist_proj)]
    torch.testing.assert_close(_served_phi(model, 4, 4), _reference_log_phi(model, 4, 4), rtol=0, atol=1e-10)
    with torch.no_grad():  # move the magnitudes: the position attention must follow
        for m in modules:
            g = m.weight_g if kind == 'hook' else m.parametrizations.weight.original0
            g.mul_(3.0)
    served = _served_phi(model, 4, 4)
    torch.testing.assert_close(served, _reference_log_phi(model, 4, 4), rtol=0, atol=1e-10)
    model.train()  # and train: every magnitude gets a gradient through the hooks, two steps in a row
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 3, 64, 64, dtype=torch.float64)).square().mean().backward()
        opt.step()
        g = modules[0].weight_g if kind == 'hook' else modules[0].parametrizations.weight.original0
        assert g.grad is not None and g.grad.abs().sum() > 0


# ---- 11.4: one eval model, many threads ------------------------------------------------------------------------------

def test_concurrent_inference_from_many_threads():
    model = make_micro(pos_cache_size=2).eval()
    sizes = [(32, 32), (48, 32), (32, 64), (64, 48), (48, 48)]
    inputs = {s: torch.randn(1, 3, *s) for s in sizes}
    with torch.no_grad():
        expected = {s: model(x) for s, x in inputs.items()}
    errors, mismatches = [], []
    n_threads, n_calls = 8, 100

    def work(i):
        try:
            for j in range(n_calls):
                s = sizes[(i + j) % len(sizes)]
                with torch.no_grad():
                    out = model(inputs[s])
                if not torch.equal(out, expected[s]):
                    mismatches.append(s)
        except Exception as e:  # noqa: BLE001 - every failure is collected and reported
            errors.append(repr(e))

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old_interval)
    assert errors == [] and mismatches == [], (errors[:3], len(errors), len(mismatches))
    assert len(model.pos_attn._cache) <= 2


class _YieldingDict(OrderedDict):
    """A cache dict whose iteration hands the GIL to other threads between items: the worst-case schedule."""

    def __iter__(self):
        for key in super().__iter__():
            time.sleep(0)
            yield key


def test_cache_bookkeeping_is_atomic_under_adversarial_scheduling():
    """Threads that iterate the cache while others insert and evict never see it change under them."""
    model = make_micro(pos_cache_size=2).eval()
    model.pos_attn._cache = _YieldingDict()
    grids = [(2, 2), (2, 3), (3, 2), (3, 3), (2, 4)]
    with torch.no_grad():
        expected = {g: model.pos_attn.compute(*g) for g in grids}
    errors, mismatches = [], []

    def work(i):
        try:
            for j in range(30):
                g = grids[(i + j) % len(grids)]
                with torch.no_grad():
                    out = model.pos_attn(*g)
                if not all(torch.equal(a, b) for a, b in zip(out, expected[g])):
                    mismatches.append(g)
        except Exception as e:  # noqa: BLE001 - every failure is collected and reported
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and mismatches == [], (errors[:3], len(errors), len(mismatches))


def test_deepcopy_and_pickling_with_the_cache_lock():
    model = make_micro().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # the test's own freshly saved module
    for m in (clone, loaded):
        with torch.no_grad():
            torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
        assert m.pos_attn._cache_lock is not model.pos_attn._cache_lock


# ---- 11.5: meta-device construction ----------------------------------------------------------------------------------

@pytest.mark.parametrize('how', ['context', 'kwarg'])
def test_meta_device_construction_then_load(how):
    ref = timm.create_model('pervit_tiny').eval()
    if how == 'context':
        with torch.device('meta'):
            model = timm.create_model('pervit_tiny')
    else:
        model = timm.create_model('pervit_tiny', device='meta')
    assert all(t.device.type == 'meta' for t in list(model.parameters()) + list(model.buffers()))
    model.to_empty(device='cpu')
    model.load_state_dict(ref.state_dict())
    model.eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


# ---- 11.6: the cache is bounded by bytes, least recently used goes first -------------------------------------------

def test_cache_evicts_least_recently_used():
    model = make_micro(pos_cache_size=2).eval()
    calls = _count_builds(model)
    a, b, c = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 48, 48), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for x in (a, b, a, c, a, c, a):  # a stays in use: b must go when c arrives, a never rebuilds
            model(x)
    assert calls == [(2, 2), (3, 3), (4, 4)]


def test_inference_mode_and_no_grad_share_entries():
    model = make_micro().eval()
    calls = _count_builds(model)
    xs = [torch.randn(1, 3, s, s) for s in (32, 48, 64)]
    for _ in range(3):
        for x in xs:
            with torch.no_grad():
                model(x)
            with torch.inference_mode():
                model(x)
    assert calls == [(2, 2), (3, 3), (4, 4)]


def _entry_bytes(model, h, w):
    return sum(t.numel() * t.element_size() for t in model.pos_attn.compute(h, w))


def test_cache_is_bounded_by_bytes():
    one = _entry_bytes(make_micro(), 4, 4)
    model = make_micro(pos_cache_bytes=int(2.5 * one)).eval()
    with torch.no_grad():
        for s in (64, 48, 32, 64, 56, 40):
            model(torch.randn(1, 3, s, s))
            held = sum(t.numel() * t.element_size() for e in model.pos_attn._cache.values() for t in e.tensors)
            assert held <= 2.5 * one
    assert 1 <= len(model.pos_attn._cache) <= 4
    big = make_micro(pos_cache_bytes=one - 1).eval()
    calls = _count_builds(big)
    with torch.no_grad():
        big(torch.randn(1, 3, 64, 64))
        big(torch.randn(1, 3, 64, 64))
    # too big to keep: rebuilt on every call, one block at a time, still correct
    assert len(big.pos_attn._cache) == 0 and calls == [(4, 4)] * (2 * len(big.blocks))


@pytest.mark.parametrize('kwargs', [dict(pos_cache_size=0), dict(pos_cache_bytes=0)])
def test_cache_size_zero_disables_it(kwargs):
    model = make_micro(**kwargs).eval()
    calls = _count_builds(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = [model(x) for _ in range(3)]
    assert len(model.pos_attn._cache) == 0 and len(calls) == 3
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=0)


# ---- 11.7: inputs the model cannot take get an error that names the fix ---------------------------------------------

def test_integer_images_name_the_conversion():
    model = make_micro().eval()
    x = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    with pytest.raises(TypeError, match=r'torch\.uint8.*x\.float\(\) / 255.*normalize'):
        model(x)


def test_dtype_mismatch_names_the_cast_but_autocast_and_half_models_work():
    model = make_micro().eval()
    with pytest.raises(TypeError, match=r'torch\.float64.*float32.*x\.to\(torch\.float32\)'):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert model(x).dtype == torch.bfloat16  # float32 input under autocast: fine
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert bf16(x).dtype == torch.bfloat16  # float32 input into a bfloat16 model under autocast: fine
        assert bf16(x.to(torch.bfloat16)).dtype == torch.bfloat16  # a bfloat16 model with bfloat16 input: fine
        try:  # torch 2.1 has no float16 convolution on the CPU
            F.conv2d(torch.zeros(1, 1, 3, 3, dtype=torch.float16), torch.zeros(1, 1, 1, 1, dtype=torch.float16))
            cpu_half = True
        except RuntimeError:
            cpu_half = False
        if cpu_half:
            assert model.half()(x.half()).dtype == torch.float16  # a .half() model with float16 input: fine


def test_numpy_and_empty_inputs_name_the_problem():
    model = make_micro().eval()
    with pytest.raises(TypeError, match=r'numpy.*torch\.from_numpy'):
        model(np.zeros((1, 3, 64, 64), dtype=np.float32))
    with pytest.raises(ValueError, match=r'empty.*0 channels'):
        model(torch.randn(1, 0, 64, 64))


def test_global_hooks_see_the_position_modules_and_flop_counting_sees_the_trained_path(monkeypatch):
    """A hook registered for all modules sees every position conv run; torch's FlopCounterMode (whose module tracker
    is such a hook) counts the formulation training really runs, not the one-call-per-module fallback."""
    from torch.utils.flop_counter import FlopCounterMode
    from timm_pervit.layers.position import PositionConvNet
    model = make_micro().train()
    offset_calls = []
    original = PositionConvNet.forward_offsets

    def spy(self, *args):
        offset_calls.append(args)
        return original(self, *args)

    monkeypatch.setattr(PositionConvNet, 'forward_offsets', spy)

    class _Builds:  # one offset-grid build runs forward_offsets once per block
        def __len__(self):
            return len(offset_calls) // len(model.blocks)

    offset_builds = _Builds()
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    assert len(offset_builds) == 1  # the training formulation without any hooks

    seen = []
    handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: seen.append(mod))
    try:
        model(x).sum().backward()
    finally:
        handle.remove()
    assert len(offset_builds) == 1
    assert model.pos_attn.blocks[0].conv1 in seen and model.pos_attn.dist_proj in seen

    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    assert len(offset_builds) == 2 and counter.get_total_flops() > 0
