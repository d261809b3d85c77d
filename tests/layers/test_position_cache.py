"""The position attention is built once per grid at inference and can never be stale (see also test_reliability.py)."""
import copy

import pytest
import torch

from tests.conftest import make_micro


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


def test_grid_larger_than_the_cache_is_built_block_by_block_and_said_once(caplog):
    """A grid whose position attention does not fit ``pos_cache_bytes`` is built one block at a time as the blocks
    use it (peak: one block, not the whole model's), with one logged warning naming the grid, the bytes and the
    setting; the result equals the cached model's."""
    from timm_pervit.layers.position import PositionConvNet
    roomy, tight = make_micro().eval(), make_micro(pos_cache_bytes=1).eval()
    tight.load_state_dict(roomy.state_dict())
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ref_pos = roomy.pos_attn(4, 5)
    calls = []
    original = PositionConvNet.forward_offsets
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PositionConvNet, 'forward_offsets', lambda self, *a: calls.append(self) or original(self, *a))
        with torch.no_grad(), caplog.at_level('WARNING', logger='timm_pervit'):
            pos = tight.pos_attn(4, 5)
            assert len(pos) == len(tight.blocks) and calls == []  # nothing built before a block asks for it
            assert torch.equal(pos[3], ref_pos[3]) and calls == [tight.pos_attn.blocks[3]]
            outs = [tight(x) for _ in range(2)]
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


def test_a_forked_child_does_not_inherit_a_held_cache_lock():
    """A fork while another thread holds the cache lock (a background inference thread plus DataLoader fork
    workers): the child gets a lock and a cache of its own and runs."""
    import multiprocessing
    import threading
    model = make_micro().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    held, release = threading.Event(), threading.Event()

    def hold():
        with model.pos_attn._lock():  # what a thread inside the cache's bookkeeping holds
            held.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    try:
        ctx = multiprocessing.get_context('fork')
        queue = ctx.Queue()
        child = ctx.Process(target=_child_inference, args=(model, x, queue))
        child.start()
        child.join(60)
        alive = child.is_alive()
        if alive:
            child.kill()
    finally:
        release.set()
        thread.join()
    assert not alive, 'the forked child blocked on the cache lock'
    assert child.exitcode == 0
    torch.testing.assert_close(torch.tensor(queue.get(timeout=10)), ref, rtol=0, atol=0)


def _child_inference(model, x, queue):
    torch.set_num_threads(1)  # as DataLoader workers do: torch's thread pool does not survive a fork
    with torch.no_grad():
        queue.put(model(x).tolist())  # plain numbers: a shared tensor would die with the child
