"""The timm model API on the micro PerViT: intermediates, pruning, head and pooling, FX, drop rates, gradient
checkpointing, factory kwargs, low precision."""
import pytest
import timm
import torch
import torch.nn as nn

from tests.conftest import make_micro


def test_forward_intermediates():
    model = make_micro().eval()
    assert len(model.feature_info) == 12
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert len(inter) == 12
        assert [t.shape[1] for t in inter] == [f['num_chs'] for f in model.feature_info]
        assert all(t.shape[2:] == (4, 3) for t in inter)
        torch.testing.assert_close(final, model.forward_features(x))
        torch.testing.assert_close(model.forward_head(final), model(x))
        last2 = model.forward_intermediates(x, indices=2, output_fmt='NHWC', intermediates_only=True)
        torch.testing.assert_close(last2[1], inter[-1].permute(0, 2, 3, 1))
        normed = model.forward_intermediates(x, indices=[11], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0].permute(0, 2, 3, 1), final)
        early = model.forward_intermediates(x, indices=[3], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[3])


def test_prune_intermediate_layers():
    model = make_micro().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    kept = model.prune_intermediate_layers([1, 3])
    assert kept == [1, 3]
    assert len(model.blocks) == 4 and len(model.pos_attn.blocks) == 4
    assert isinstance(model.head, nn.Identity)
    with torch.no_grad():
        out = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        pooled = model(x)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    assert pooled.dim() == 4  # head pruned with pooling disabled: the spatial map


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_fx_feature_extraction(train):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    model = make_micro().train(train)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    model.train(train)  # get_graph_node_names toggles the mode
    fx_model = create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    out = list(fx_model(x).values())[0]
    torch.manual_seed(1)
    ref = model(x)
    if train:
        torch.testing.assert_close(out, ref)
    else:
        # timm's own test_model_forward_fx asks for equality in eval mode: the traced graph computes what the eager
        # model does, the stem's BatchNorm fold included, and reads the statistics at run time (not traced constants)
        assert torch.equal(out, ref)
        with torch.no_grad():
            model.stem[0].bn.running_mean.add_(0.5)
            model.stem[0].bn.running_var.mul_(2.)
            assert torch.equal(list(fx_model(x).values())[0], model(x))
            assert not torch.equal(model(x), ref)
        torch.jit.script(fx_model)  # timm scripts its FX graphs too (test_model_forward_fx_torchscript)
    if train:
        out.mean().backward()
        assert all(p.grad is not None for p in fx_model.parameters())


def test_head_api_and_pooling():
    model = make_micro().eval()
    assert model.get_classifier() is model.head and model.head.out_features == 10
    model.reset_classifier(5)
    assert model.num_classes == 5 and model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    model.reset_classifier(0, '')
    assert model.global_pool == '' and model(torch.randn(1, 3, 32, 48)).shape == (1, 2, 3, 40)
    with pytest.raises(AssertionError, match='global_pool'):
        model.reset_classifier(0, 'token')
    headless = timm.create_model('pervit_tiny', num_classes=0)
    assert isinstance(headless.head, nn.Identity) and headless(torch.randn(1, 3, 64, 64)).shape == (1, 280)


def test_drop_rates_and_drop_path_schedule():
    model = make_micro(drop_rate=0.3, proj_drop_rate=0.1, drop_path_rate=0.2)
    rates = [getattr(b.drop_path1, 'drop_prob', 0.) for b in model.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.2, 12).tolist())
    assert model.head_drop.p == 0.3 and model.blocks[0].attn.proj_drop.p == 0.1
    model.train()
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(model(x), model(x))  # stochastic in training
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_grad_checkpointing_identical():
    model = make_micro(dtype=torch.float64).train()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2 = model(x)
    out2.sum().backward()
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=1e-12)


def test_device_dtype_factory_kwargs():
    model = timm.create_model('pervit_tiny', device='meta', dtype=torch.bfloat16)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == 'meta' for t in tensors)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model = make_micro(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def _cpu_autocast_supports(dtype):
    try:
        with torch.autocast('cpu', dtype=dtype):
            return True
    except RuntimeError:  # torch 2.1: CPU autocast is bfloat16 only
        return False


@pytest.mark.parametrize('dtype', [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.skipif(
    not _cpu_autocast_supports(torch.float16), reason=f'torch {torch.__version__} has no float16 CPU autocast'))])
def test_low_precision_and_autocast(dtype):
    model = make_micro().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=dtype):
            amp = model(x)
        low = model.to(dtype)(x.to(dtype))
    assert amp.dtype == dtype and low.dtype == dtype
    tol = 0.05 if dtype == torch.bfloat16 else 0.01
    torch.testing.assert_close(amp.float(), ref, rtol=0, atol=tol)
    torch.testing.assert_close(low.float(), ref, rtol=0, atol=tol)
