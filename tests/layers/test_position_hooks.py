"""What users attach to the position modules is honoured: pruning, forward hooks (per module and global), weight
norm (hook and parametrization), and torch's FlopCounterMode counts the path training really runs."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune

from timm_pervit.tools.reference import official_position_attention

from tests.conftest import make_micro
from tests.conftest import served_phi


def _reference_log_phi(model, h, w):
    with torch.no_grad():
        return torch.stack(official_position_attention(model, h, w)).log()


def test_conv1_pruned_to_zero_changes_the_position_attention():
    model = make_micro(dtype=torch.float64).eval()
    blk = model.pos_attn.blocks[4]
    with torch.no_grad():
        for p in model.pos_attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    before = served_phi(model, 4, 6)
    prune.l1_unstructured(blk.conv1, 'weight', amount=1.0)
    after = served_phi(model, 4, 6)
    assert not torch.allclose(after[4], before[4])
    torch.testing.assert_close(after, _reference_log_phi(model, 4, 6), rtol=0, atol=1e-10)
    prune.remove(blk.conv1, 'weight')
    torch.testing.assert_close(served_phi(model, 4, 6), after, rtol=0, atol=1e-10)  # folded again: rounding


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
    served = served_phi(model, 5, 4)
    torch.testing.assert_close(served, _reference_log_phi(model, 5, 4), rtol=0, atol=1e-10)
    assert len(calls) == 2  # the hook ran in the model's build and in the reference
    served_phi(model, 5, 4)
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
    torch.testing.assert_close(served_phi(model, 4, 4), _reference_log_phi(model, 4, 4), rtol=0, atol=1e-10)
    with torch.no_grad():  # move the magnitudes: the position attention must follow
        for m in modules:
            g = m.weight_g if kind == 'hook' else m.parametrizations.weight.original0
            g.mul_(3.0)
    served = served_phi(model, 4, 4)
    torch.testing.assert_close(served, _reference_log_phi(model, 4, 4), rtol=0, atol=1e-10)
    model.train()  # and train: every magnitude gets a gradient through the hooks, two steps in a row
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(2, 3, 64, 64, dtype=torch.float64)).square().mean().backward()
        opt.step()
        g = modules[0].weight_g if kind == 'hook' else modules[0].parametrizations.weight.original0
        assert g.grad is not None and g.grad.abs().sum() > 0


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
