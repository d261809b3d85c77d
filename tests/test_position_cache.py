"""The position attention is built once per grid at inference and can never be stale (see also test_reliability.py)."""
import copy

import pytest
import torch

from .conftest import make_micro


def _fresh(model, x):
    """Reference output: the same weights, position attention recomputed from scratch (cache cleared)."""
    model.pos_attn.clear_cache()
    with torch.no_grad():
        return model(x)


def _cache_entries(model):
    return len(model.pos_attn._cache)


def test_cached_once_per_grid_and_reused():
    model = make_micro().eval()
    calls = []
    model.pos_attn.compute = (lambda f: (lambda *a, **k: calls.append(a[:2]) or f(*a, **k)))(model.pos_attn.compute)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out1 = model(x)
        out2 = model(x)
        model(torch.randn(1, 3, 64, 96))  # a second grid gets its own entry
        model(x)
    assert calls == [(4, 4), (4, 6)]
    assert torch.equal(out1, out2)
    assert _cache_entries(model) == 2


def test_cache_matches_recompute_and_training_bypasses_it():
    model = make_micro().eval()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        cached = model(x)
    torch.testing.assert_close(cached, _fresh(model, x), rtol=0, atol=0)
    model.train()
    model.pos_attn.clear_cache()
    out = model(x)  # training with grad: recomputed with gradients, nothing cached
    assert _cache_entries(model) == 0
    out.sum().backward()
    grads = {n: p.grad for n, p in model.pos_attn.named_parameters()}
    assert all(g is not None for g in grads.values())
    # biases feeding a GroupNorm get exactly zero gradient; every weight must get a real one
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith('weight'))
    model.eval()
    with torch.no_grad():
        reused = model(x)  # BatchNorm running stats moved in training: compare with a recompute, not `cached`
    torch.testing.assert_close(reused, _fresh(model, x), rtol=0, atol=0)
    assert not torch.equal(reused, cached)


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
    torch.testing.assert_close(after, _fresh(model, x), rtol=0, atol=0)


def test_not_stale_after_position_only_update_in_no_grad_training_mode():
    """Eval-style forward in train mode under no_grad caches too; an in-place edit of one position param invalidates."""
    model = make_micro().train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        assert _cache_entries(model) == 1
        model.pos_attn.blocks[5].norm2.bias.add_(3.0)
        after = model(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _fresh(model, x), rtol=0, atol=0)


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
        assert all(t.dtype == torch.float64 for e in model.pos_attn._cache.values() for t in e.tensors)
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
        torch.testing.assert_close(ema(x), _fresh(ema, x), rtol=0, atol=0)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            amp = model(x)
        assert {k[4] for k in model.pos_attn._cache} == {None, torch.bfloat16}
        torch.testing.assert_close(model(x), _fresh(model, x), rtol=0, atol=0)
    assert amp.dtype == torch.bfloat16


def test_cache_is_bounded_and_not_in_state_dict():
    model = make_micro(pos_cache_size=2).eval()
    with torch.no_grad():
        for size in (32, 48, 64, 80):
            model(torch.randn(1, 3, size, size))
    assert _cache_entries(model) == 2
    assert not any('cache' in k for k in model.state_dict())


@pytest.mark.parametrize('size', [(224, 224), (160, 96)])
def test_position_attention_is_a_distribution_over_keys_of_the_grid(size):
    model = make_micro()
    h, w = size[0] // 16, size[1] // 16
    phi = model.position_attention((h, w))
    assert phi.shape == (12, 2, h * w, h * w)
    assert torch.all(phi > 0) and torch.all(phi < 1)


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
