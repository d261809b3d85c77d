"""The inference cache of the position attention (PeripheralPosition): built once per grid and reused, never stale
whatever changes a value, bounded by entries and bytes with least-recently-used eviction, never saved.

Everything is observed through the public API: outputs, ``pos_attn.cache_info()`` (entries, bytes, bounds, grids,
hits / misses / builds) and ``pos_attn.clear_cache()``.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize

from tests.conftest import builds
from tests.conftest import fresh_eval
from tests.conftest import fresh_phi
from tests.conftest import make_micro
from tests.conftest import served_phi


def test_cached_once_per_grid_and_reused():
    model = make_micro().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out1 = model(x)
        out2 = model(x)
        model(torch.randn(1, 3, 64, 96))  # a second grid gets its own entry
        model(x)
    info = model.pos_attn.cache_info()
    assert info['builds'] == 2 * len(model.blocks) and (info['hits'], info['misses']) == (2, 2)
    assert [g[:2] for g in info['grids']] == [(4, 6), (4, 4)]  # least recently used first
    assert torch.equal(out1, out2)


def test_cache_matches_recompute_and_training_bypasses_it():
    model = make_micro().eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        cached = model(x)
    torch.testing.assert_close(cached, fresh_eval(model, x), rtol=0, atol=0)
    model.train()
    model.pos_attn.clear_cache()
    out = model(x)  # training with grad: recomputed with gradients, nothing cached
    assert model.pos_attn.cache_info()['entries'] == 0
    out.sum().backward()
    grads = {n: p.grad for n, p in model.pos_attn.named_parameters()}
    assert all(g is not None for g in grads.values())
    # biases feeding a GroupNorm get exactly zero gradient; every weight must get a real one
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith('weight'))
    model.eval()
    with torch.no_grad():
        reused = model(x)  # BatchNorm running stats moved in training: compare with a recompute, not `cached`
    torch.testing.assert_close(reused, fresh_eval(model, x), rtol=0, atol=0)
    assert not torch.equal(reused, cached)


def test_inference_mode_entries_do_not_leak_into_grad_mode():
    """A cache built under torch.inference_mode() is not reused where autograd must record the forward."""
    model = make_micro().eval()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    with torch.inference_mode():
        ref = model(x.detach())
    out = model(x)  # eval mode with grad enabled: input gradients (saliency) must work
    out[0, 3].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=0)


def test_inference_mode_and_no_grad_share_entries():
    model = make_micro().eval()
    xs = [torch.randn(1, 3, s, s) for s in (32, 48, 64)]
    for _ in range(3):
        for x in xs:
            with torch.no_grad():
                model(x)
            with torch.inference_mode():
                model(x)
    info = model.pos_attn.cache_info()
    assert info['builds'] == 3 * len(model.blocks) and (info['hits'], info['misses']) == (15, 3)


def test_not_stale_after_optimizer_step():
    model = make_micro().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, fresh_eval(model, x), rtol=0, atol=0)


def test_not_stale_after_position_only_update_in_no_grad_training_mode():
    """Eval-style forward in train mode under no_grad caches too; an in-place edit of one position param invalidates."""
    model = make_micro().train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        assert model.pos_attn.cache_info()['entries'] == 1
        model.pos_attn.blocks[5].norm2.bias.add_(3.0)
        after = model(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, fresh_eval(model, x), rtol=0, atol=0)


def test_not_stale_after_load_state_dict():
    model = make_micro().eval()
    other = make_micro().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x), other(x), rtol=0, atol=0)


def test_not_stale_after_dtype_and_device_moves():
    model = make_micro().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref32 = model(x)
        model.double()
        out64 = model(x.double())
        assert [g[2] for g in model.pos_attn.cache_info()['grids']] == [torch.float64]  # the float32 one is stale
        model.float()
        out32 = model(x)
        model.to('meta')
        assert model(x.to('meta')).device.type == 'meta'
    torch.testing.assert_close(out64.float(), ref32, rtol=0, atol=1e-5)
    torch.testing.assert_close(out32, ref32, rtol=0, atol=1e-6)


def test_not_stale_in_deep_copies_and_with_autocast():
    """EMA copies own separate parameters; an autocast forward does not reuse a float32 entry or vice versa."""
    model = make_micro().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        ema = copy.deepcopy(model)
        with torch.no_grad():
            for p in ema.pos_attn.parameters():
                p.mul_(0.5)
        torch.testing.assert_close(ema(x), fresh_eval(ema, x), rtol=0, atol=0)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            amp = model(x)
        assert {g[3] for g in model.pos_attn.cache_info()['grids']} == {None, torch.bfloat16}
        torch.testing.assert_close(model(x), fresh_eval(model, x), rtol=0, atol=0)
    assert amp.dtype == torch.bfloat16


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
    torch.testing.assert_close(served_phi(teacher, 4, 4), fresh_phi(teacher, 4, 4), rtol=0, atol=0)
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
    torch.testing.assert_close(served_phi(model, 4, 4), fresh_phi(model, 4, 4), rtol=0, atol=0)
    conv = model.pos_attn.blocks[3].conv2
    conv.bias.data = torch.randn_like(conv.bias)  # a new tensor under the same Parameter
    torch.testing.assert_close(served_phi(model, 4, 4), fresh_phi(model, 4, 4), rtol=0, atol=0)


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
    served = served_phi(model, 4, 5)
    torch.testing.assert_close(served, fresh_phi(model, 4, 5), rtol=0, atol=0)
    param.scale.data.fill_(2.0)  # buffer edited through .data
    changed = served_phi(model, 4, 5)
    assert not torch.equal(changed, served)
    torch.testing.assert_close(changed, fresh_phi(model, 4, 5), rtol=0, atol=0)
    param.power = 3.0  # a plain Python attribute
    torch.testing.assert_close(served_phi(model, 4, 5), fresh_phi(model, 4, 5), rtol=0, atol=0)
    assert not torch.equal(served_phi(model, 4, 5), changed)


def test_cache_bound_is_enforced_least_recently_used_first_and_never_saved(tmp_path):
    """``pos_cache_size=2``: after four grids the cache holds the two most recently used (``grids`` lists them least
    recently used first; a hit moves its grid to the end, a miss evicts the first), within its byte bound. The state
    dict of the cached model holds exactly its parameters and buffers, and a torch.save / torch.load round trip into
    a fresh model gives the same outputs from an empty cache."""
    model = make_micro(pos_cache_size=2).eval()
    inputs = {g: torch.randn(1, 3, 16 * g[0], 16 * g[1]) for g in [(2, 2), (3, 2), (2, 4), (4, 3)]}
    with torch.no_grad():
        outs = {g: model(x) for g, x in inputs.items()}

    def held():
        return [grid[:2] for grid in model.pos_attn.cache_info()['grids']]

    info = model.pos_attn.cache_info()
    assert info['entries'] == info['max_entries'] == 2 and held() == [(2, 4), (4, 3)]
    assert 0 < info['bytes'] <= info['max_bytes']
    assert [grid[2:] for grid in info['grids']] == [(torch.float32, None)] * 2
    with torch.no_grad():
        model(inputs[(2, 4)])  # a hit: now the most recently used
        assert held() == [(4, 3), (2, 4)]
        model(inputs[(2, 2)])  # a miss: the least recently used goes
        assert held() == [(2, 4), (2, 2)]
    info = model.pos_attn.cache_info()
    assert (info['hits'], info['misses'], info['builds']) == (1, 5, 5 * len(model.blocks))

    state = model.state_dict()
    tensors = dict(model.named_parameters())
    assert set(tensors) <= set(state)
    tensors.update(model.named_buffers())
    assert set(state) <= set(tensors)
    for name, t in state.items():
        assert torch.equal(t, tensors[name]), name
    path = tmp_path / 'cached.pth'
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == list(state)
    other = make_micro(pos_cache_size=2).eval()
    other.load_state_dict(loaded, strict=True)
    assert other.pos_attn.cache_info()['entries'] == 0
    with torch.no_grad():
        for g, x in inputs.items():
            torch.testing.assert_close(other(x), outs[g], rtol=0, atol=0)


def test_cache_evicts_least_recently_used():
    model = make_micro(pos_cache_size=2).eval()
    a, b, c = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 48, 48), torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for x in (a, b, a, c, a, c, a):  # a stays in use: b must go when c arrives, a never rebuilds
            model(x)
    info = model.pos_attn.cache_info()
    assert info['builds'] == 3 * len(model.blocks) and [g[:2] for g in info['grids']] == [(4, 4), (2, 2)]


def test_cache_is_bounded_by_bytes():
    one = sum(t.numel() * t.element_size() for t in make_micro().pos_attn.compute(4, 4))
    model = make_micro(pos_cache_bytes=int(2.5 * one)).eval()
    with torch.no_grad():
        for s in (64, 48, 32, 64, 56, 40):
            model(torch.randn(1, 3, s, s))
            info = model.pos_attn.cache_info()
            assert info['max_bytes'] == int(2.5 * one) and one <= info['bytes'] <= info['max_bytes']
    assert 1 <= model.pos_attn.cache_info()['entries'] <= 2
    big = make_micro(pos_cache_bytes=one - 1).eval()
    with torch.no_grad():
        big(torch.randn(1, 3, 64, 64))
        big(torch.randn(1, 3, 64, 64))
    # too big to keep: rebuilt on every call, one block at a time, still correct
    info = big.pos_attn.cache_info()
    assert info['entries'] == 0 and info['builds'] == 2 * len(big.blocks) and info['misses'] == 2


@pytest.mark.parametrize('kwargs', [dict(pos_cache_size=0), dict(pos_cache_bytes=0)])
def test_cache_size_zero_disables_it(kwargs):
    model = make_micro(**kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = [model(x) for _ in range(3)]
    info = model.pos_attn.cache_info()
    assert info['entries'] == 0 and info['builds'] == 3 * len(model.blocks)
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=0)


def test_grid_larger_than_the_cache_is_built_block_by_block_and_said_once(caplog):
    """A grid whose position attention does not fit ``pos_cache_bytes`` is built one block at a time as the blocks
    use it (peak: one block, not the whole model's), with one logged warning naming the grid, the bytes and the
    setting; the result equals the cached model's."""
    roomy, tight = make_micro().eval(), make_micro(pos_cache_bytes=1).eval()
    tight.load_state_dict(roomy.state_dict())
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ref_pos = roomy.pos_attn(4, 5)
    with torch.no_grad(), caplog.at_level('WARNING', logger='timm_pervit'):
        pos = tight.pos_attn(4, 5)
        assert len(pos) == len(tight.blocks) and builds(tight) == 0  # nothing built before a block asks for it
        assert torch.equal(pos[3], ref_pos[3]) and builds(tight) == 1  # that block alone
        outs = [tight(x) for _ in range(2)]
    assert builds(tight) == 1 + 2 * len(tight.blocks)
    warnings = [r.getMessage() for r in caplog.records if 'cache bound' in r.getMessage()]
    assert len(warnings) == 1 and '4x5 token grid' in warnings[0] and 'pos_cache_bytes' in warnings[0]
    assert tight.pos_attn.cache_info()['entries'] == 0
    with torch.no_grad():
        ref = roomy(x)
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_an_input_beyond_the_block_bound_is_refused_before_allocating(mode):
    """A 3008 x 3008 image: one block's position attention alone would take 9.8 GB, over the default 8 GiB bound;
    the error names the grid, the bytes and the setting, and comes before the position attention is built."""
    from timm_pervit.layers import PositionMemoryError
    model = make_micro()
    getattr(model, mode)()
    x = torch.randn(1, 3, 3008, 3008)
    with pytest.raises(PositionMemoryError, match=r'188x188 token grid.*9\.3 GiB.*pos_max_block_bytes'):
        with torch.no_grad():
            model(x)
    small = make_micro(pos_max_block_bytes=1000).eval()
    with pytest.raises(PositionMemoryError, match='pos_max_block_bytes=1000'):
        small(torch.randn(1, 3, 64, 64))
