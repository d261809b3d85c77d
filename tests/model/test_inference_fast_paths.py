"""The inference fast paths of the model's own modules: the stem's BatchNorm folded into its convs, the MLP's GELU
and residual run in place (docs/benchmarks.md names these tests)."""
import pytest
import torch

from timm_pervit.pervit import PerViTBlock

from tests.conftest import make_micro


def _aten_ops(fn):
    """Run ``fn`` and return the names of the aten ops it dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    seen = []
    with Record():
        fn()
    return seen


def test_stem_batchnorm_folded_into_the_conv_in_eval_mode():
    """In eval mode each stem layer runs conv(x; W * s, (b - mean) * s + beta) with s = gamma / sqrt(var + eps): no
    BatchNorm pass, the same outputs and gradients (eval with gradients: frozen-BN fine-tuning, saliency) as conv -> BN.
    A hook on either module, train mode, and a BatchNorm without running statistics keep the modules as they are."""
    torch.manual_seed(0)
    layer = make_micro().stem[1]
    with torch.no_grad():
        layer.bn.running_mean.normal_(0, .5)
        layer.bn.running_var.uniform_(.5, 2.)
        layer.bn.weight.normal_(1, .3)
        layer.bn.bias.normal_(0, .3)
    layer.eval()
    x = torch.randn(2, layer.conv.in_channels, 16, 16, requires_grad=True)
    params = [x, layer.conv.weight, layer.conv.bias, layer.bn.weight, layer.bn.bias]

    def run(f):
        out = f(x)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), params)
        return out, grads

    folded, folded_grads = run(layer)
    plain, plain_grads = run(lambda t: layer.act(layer.bn(layer.conv(t))))
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-5)
    for g, r in zip(folded_grads, plain_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not any('batch_norm' in op for op in _aten_ops(lambda: layer(x)))
        calls = []
        handle = layer.bn.register_forward_hook(lambda *args: calls.append(1))
        assert any('batch_norm' in op for op in _aten_ops(lambda: layer(x))) and calls == [1]
        handle.remove()
        layer.train()
        assert any('batch_norm' in op for op in _aten_ops(lambda: layer(x)))
        layer.eval()
        # a model-level check: an eval forward runs no BatchNorm op at all (the stem's are PerViT's only BatchNorms),
        # and gives the plain path's features (every fast path off: conv -> BN -> ReLU called one by one)
        model = make_micro().eval()
        image = torch.randn(2, 3, 64, 64)
        assert not any('batch_norm' in op for op in _aten_ops(lambda: model.forward_features(image)))
        folded_features = model.forward_features(image)
        model.set_fast_paths(False)
        assert any('batch_norm' in op for op in _aten_ops(lambda: model.forward_features(image)))
        torch.testing.assert_close(folded_features, model.forward_features(image), rtol=1e-5, atol=1e-5)
        model.set_fast_paths(True)
        model.stem[0].bn.track_running_stats = False
        model.stem[0].bn.running_mean = model.stem[0].bn.running_var = None
        assert any('batch_norm' in op for op in _aten_ops(lambda: model.forward_features(image)))


def test_inference_mlp_runs_in_place():
    """At inference without autograd each block runs GELU in place over fc1's output and adds the residual into fc2's
    output: bit for bit what the modules called one by one compute. With autograd on, an active dropout, or a hook on
    a part that could keep a reference to those tensors, the modules run as they are."""
    model = make_micro().eval()
    x = torch.randn(2, 3, 64, 96)

    def in_place_gelus(fn):
        return sum(op.startswith('gelu_.') for op in _aten_ops(fn))

    with torch.no_grad():
        assert in_place_gelus(lambda: model(x)) == len(model.blocks)
        fast = model(x)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(PerViTBlock, '_mlp_in_place', lambda self, x: False)
            assert in_place_gelus(lambda: model(x)) == 0
            assert torch.equal(fast, model(x))
        kept = []
        handle = model.blocks[0].mlp.fc1.register_forward_hook(lambda m, a, out: kept.append((out, out.clone())))
        assert in_place_gelus(lambda: model(x)) == len(model.blocks) - 1
        handle.remove()
        assert torch.equal(*kept[0]), "a hook's reference to fc1's output was overwritten"
        model.train()  # train mode without autograd: the skipped dropouts (p=0) are identities, in place is exact
        assert in_place_gelus(lambda: model(x)) == len(model.blocks)
        model.eval()
        # Monte Carlo dropout: an eval model with the MLP's dropout switched back on keeps it in that block
        mc = make_micro(proj_drop_rate=0.5).eval()
        mc.blocks[0].mlp.drop1.train()
        assert in_place_gelus(lambda: mc(x)) == len(mc.blocks) - 1
    assert in_place_gelus(lambda: model(x).sum().backward()) == 0
