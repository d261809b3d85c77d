"""The PerViT variants as timm models: registration, configs, sizes, and the checks timm applies to its own models."""
import math
import re

import pytest
import timm
import timm.optim
import torch
import torch.nn as nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from timm_pervit.layers import gates
from timm_pervit.layers.attention import _HAS_CPU_FLASH
from timm_pervit.tools.flops import count_gmacs, flop_counter_mode

import timm_pervit

from .conftest import make_micro

VARIANTS = ['pervit_tiny', 'pervit_small', 'pervit_medium']
PARAMS = {'pervit_tiny': 7_591_000, 'pervit_small': 21_317_672, 'pervit_medium': 43_723_936}
GMACS = {'pervit_tiny': 1.745, 'pervit_small': 4.750, 'pervit_medium': 9.441}


def test_registered_with_timm():
    assert timm.list_models('pervit*') == sorted(VARIANTS)
    assert timm.list_pretrained('pervit*') == sorted(f'{v}.in1k' for v in VARIANTS)
    for name in VARIANTS:
        assert timm.is_model(name)


@pytest.mark.parametrize('name', VARIANTS)
def test_variant_param_count_and_gmacs(name):
    model = timm.create_model(name).eval()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert round(count_gmacs(model, (3, 224, 224)), 3) == GMACS[name]
    # shapes only (the converter counts this way): no cached position attention, and it must not be counted either
    with torch.device('meta'):
        shapes_only = timm.create_model(name)
    assert round(count_gmacs(shapes_only, (3, 224, 224)), 3) == GMACS[name]


def test_gmacs_count_the_attention_matmuls():
    """count_gmacs counts the fused attention kernel as the explicit attention's two matmuls, per image."""
    model = make_micro().eval()
    input_size, batch = (3, 64, 80), 2
    seen = []
    for blk in model.blocks:
        blk.attn.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    fused = count_gmacs(model, input_size, batch_size=batch)
    # q k^T and attn v: N x N x C multiply-accumulates each per image, for the (B, N, C) tokens every block attended
    attn_macs = sum(2 * n * n * c for _, n, c in seen[-len(model.blocks):]) / 1e9
    x = torch.randn(batch, *input_size)
    with torch.no_grad():
        with flop_counter_mode() as ours:
            model(x)
        with FlopCounterMode(display=False) as plain:  # torch's own formulas only
            model(x)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    explicit = count_gmacs(model, input_size, batch_size=batch)
    with torch.no_grad(), FlopCounterMode(display=False) as plain_explicit:
        model(x)

    def per_image_gmacs(flops):
        return flops / 2 / batch / 1e9

    # the token-shape formula is what torch counts for the explicit attention's batched matmuls, and count_gmacs
    # reports torch's count per image
    assert per_image_gmacs(plain_explicit.get_flop_counts()['Global'][torch.ops.aten.bmm]) == pytest.approx(attn_macs)
    assert explicit == pytest.approx(per_image_gmacs(plain_explicit.get_total_flops()), rel=1e-9)
    assert fused == pytest.approx(explicit, rel=1e-9)
    # a plain FlopCounterMode misses the CPU flash kernel where torch has no formula for it (flops.py's reason)
    kernel = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)
    dispatched = kernel is not None and kernel in ours.get_flop_counts()['Global']
    missed = attn_macs if dispatched and kernel not in getattr(flop_counter, 'flop_registry', {}) else 0.
    assert per_image_gmacs(plain.get_total_flops()) == pytest.approx(fused - missed, rel=1e-9)


@pytest.mark.parametrize('name', VARIANTS)
def test_pretrained_cfg(name):
    cfg = timm.create_model(name).pretrained_cfg
    assert cfg['input_size'] == (3, 224, 224)
    assert cfg['crop_pct'] == 0.875
    assert cfg['interpolation'] == 'bicubic'
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD
    assert cfg['pool_size'] == (14, 14)
    assert cfg['first_conv'] == 'stem.0.conv' and cfg['classifier'] == 'head'
    assert cfg['tag'] == 'in1k' and cfg['hf_hub_id'] == f'{timm_pervit.HF_HUB_NAMESPACE}/{name}.in1k'


# --- the checks of timm's tests/test_models.py, for a standard spatial model ---------------------------------------

@pytest.mark.parametrize('name', VARIANTS)
def test_model_forward(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *model.pretrained_cfg['input_size']))
    assert out.shape == (2, model.num_classes) and not torch.isnan(out).any()


@pytest.mark.parametrize('name', VARIANTS)
def test_model_backward(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, 3, 128, 128))
    out.mean().backward()
    # a per-channel bias ahead of a per-channel GroupNorm is subtracted out again: its gradient is zero in exact
    # arithmetic, so only rounding noise (or an exact zero) reaches it. Those are held to "tiny", the rest to "nonzero"
    normalized_away = re.compile(r'pos_attn\.(dist_proj\.bias|blocks\.\d+\.conv[12]\.bias)$')
    grads = {n: p.grad for n, p in model.named_parameters()}
    bad = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert not bad, f'missing or non-finite gradients: {bad}'
    zero = [n for n, g in grads.items() if not normalized_away.match(n) and not g.any()]
    assert not zero, f'zero gradients: {zero}'
    largest = max(g.abs().max().item() for g in grads.values())
    noise = {n: g.abs().max().item() for n, g in grads.items() if normalized_away.match(n)}
    assert len(noise) == 2 * len(model.pos_attn.blocks) + 1
    assert max(noise.values()) < 1e-5 * largest, noise
    assert out.shape[-1] == 42


@pytest.mark.parametrize('name', VARIANTS)
def test_model_default_cfgs(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    assert model.output_fmt == 'NHWC'
    x = torch.randn(2, *cfg['input_size'])
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape == (2, *cfg['pool_size'], model.num_features)
        assert pre.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        out = model(x)
        assert out.shape == pre.shape
        torch.testing.assert_close(out, pre)
        model.reset_classifier(0, '')
        out = model(x)
        assert out.shape == (2, *cfg['pool_size'], model.num_features)
    state_dict = model.state_dict()
    assert cfg['first_conv'] + '.weight' in state_dict
    classifier = timm.create_model(name).state_dict()
    assert cfg['classifier'] + '.weight' in classifier and cfg['classifier'] + '.bias' in classifier


@pytest.mark.parametrize('name', VARIANTS)
def test_model_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    channels = model.feature_info.channels()
    reductions = model.feature_info.reduction()
    arch = timm_pervit.PERVIT_VARIANTS[name]['embed_dims']
    assert channels == [arch[1], arch[2], arch[3], arch[3]]  # block outputs at the stage ends (1, 3, 9, 11)
    assert reductions == [16] * 4
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 96, 96))
    assert len(outs) == 4
    for c, r, o in zip(channels, reductions, outs):
        assert o.shape == (2, c, math.ceil(96 / r), math.ceil(96 / r)) and not torch.isnan(o).any()


def test_features_only_out_indices_and_values_match_forward_intermediates():
    model = timm.create_model('pervit_tiny').eval()
    feat = timm.create_model('pervit_tiny', features_only=True, out_indices=(0, 5, 11)).eval()
    feat.model.load_state_dict(model.state_dict(), strict=False)  # the getter wraps the pruned model
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        outs = feat(x)
        ref = model.forward_intermediates(x, indices=[0, 5, 11], intermediates_only=True)
    assert [o.shape[1] for o in outs] == [128, 224, 280]
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r)


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


@pytest.mark.slow
def test_torchscript():
    with timm.layers.set_layer_config(scriptable=True):
        model = timm.create_model('pervit_tiny').eval()
    x = torch.randn(2, 3, 128, 128)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


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


@pytest.mark.slow
def test_torch_compile_fullgraph():
    model = make_micro().eval()
    x = torch.randn(2, 3, 64, 96)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_dynamic_token_grid():
    """Inductor with symbolic token-grid sizes, as after a recompile for a new input size (automatic dynamic shapes):
    the position attention, which a fullgraph=True graph recomputes in every call, compiled once with symbolic sizes,
    matches eager at two grids. torch 2.4 emitted C++ for its GroupNorms that did not build (``max(double, long)``)."""
    pos = make_micro().eval().pos_attn
    compiled = torch.compile(pos.compute, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for h, w in [(4, 6), (3, 5)]:
            for got, ref in zip(compiled(h, w), pos.compute(h, w)):
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_export():
    model = make_micro().eval()
    x = torch.randn(2, 3, 64, 96)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


# --- the rest of the timm API ----------------------------------------------------------------------------------------

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


def test_in_chans_and_input_errors():
    model = make_micro(in_chans=1).eval()
    assert model(torch.randn(1, 1, 40, 72)).shape == (1, 10)
    with pytest.raises(ValueError, match=r'built for 1 input channels but got 3.*in_chans=3'):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r'at least 32x32 px.*got 31x64'):
        model(torch.randn(1, 1, 31, 64))
    with pytest.raises(ValueError, match='4-D image batch'):
        model(torch.randn(1, 64, 64))


@pytest.mark.parametrize('size', [(32, 32), (33, 47), (64, 160), (224, 96)])
def test_any_input_size(size):
    model = make_micro().eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, *size))
    assert feats.shape[1:3] == tuple(math.ceil(s / 16) for s in size)


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


def test_peripheral_initialization():
    model = make_micro()
    pos = model.pos_attn
    assert torch.all(pos.dist_proj.weight == -0.02) and torch.all(pos.dist_proj.bias == 0)
    for i, blk in enumerate(pos.blocks):
        assert torch.all(blk.conv1.weight == 0.02) and torch.all(blk.conv2.weight == 0.02)
        assert torch.all(blk.conv1.bias == 0) and torch.all(blk.conv2.bias == 0)
        assert torch.all(blk.norm1.weight == 1) and torch.all(blk.norm1.bias == 0)
        assert blk.norm2.bias[0].item() == pytest.approx(torch.linspace(-5, 4, 12)[i].item())
        assert blk.norm2.weight[0].item() == pytest.approx(torch.linspace(3, 0.01, 12)[i].item())
    big = timm.create_model('pervit_small')
    qkv = torch.cat([b.attn.qkv.weight.flatten() for b in big.blocks])
    assert qkv.std().item() == pytest.approx(0.02, rel=0.15) and qkv.mean().abs() < 1e-3
    assert torch.all(big.blocks[0].mlp.fc1.bias == 0) and torch.all(big.norm.weight == 1)
    # deeper blocks start out more global: the initial position attention spreads further
    phi = model.position_attention(6)
    dist = model.pos_attn.distances(6, 6)[:, 0, 2:-2, 2:-2].reshape(36, 36)
    spread = [((p * dist).sum(-1) / p.sum(-1)).mean().item() for p in phi]
    assert spread[-1] > spread[0]


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


def test_group_matcher_and_no_weight_decay():
    from timm.models import group_parameters
    model = make_micro()
    groups = group_parameters(model, model.group_matcher())
    names = [n for n, _ in model.named_parameters()]
    assert sorted(sum(groups.values(), [])) == sorted(names)  # every parameter in a group
    group_of = {n: g for g, ns in groups.items() for n in ns}
    for i in range(12):  # a block and its position encoder share one layer-decay group
        assert group_of[f'blocks.{i}.attn.qkv.weight'] == group_of[f'pos_attn.blocks.{i}.conv2.weight']
    assert group_of['stem.0.conv.weight'] == group_of['pos_attn.dist_proj.weight'] == 0
    assert 0 < group_of['blocks.0.norm1.weight'] < group_of['blocks.11.norm1.weight'] <= group_of['norm.weight']
    nwd = model.no_weight_decay()
    assert nwd and nwd <= set(names)
    opt = timm.optim.create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert len(opt.param_groups) > 12


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


def _autograd_node_names(tensor):
    """Names of every node in the autograd graph behind ``tensor``."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_cpu_training_attention_matches_explicit_formula(dtype):
    """The fused training path on CPU (flash kernel + custom backward) gives the explicit formula's outputs and the
    gradients of every parameter, the position network's included."""
    torch.manual_seed(0)
    fused = make_micro(dtype=dtype).train()
    explicit = make_micro(dtype=dtype).train()
    explicit.load_state_dict(fused.state_dict())
    for blk in explicit.blocks:
        blk.attn.fused_attn = False
    x = torch.randn(3, 3, 48, 64, dtype=dtype)
    target = torch.randint(0, 10, (3,))
    outs = []
    for model in (fused, explicit):
        out = model(x)
        nn.functional.cross_entropy(out, target).backward()
        outs.append(out)
    # without the CPU flash op (torch < 2.3) the fused path is SDPA under checkpointing: same results, more compute
    assert ('PeripheralSdpaCpuBackward' in _autograd_node_names(outs[0])) == _HAS_CPU_FLASH
    assert 'PeripheralSdpaCpuBackward' not in _autograd_node_names(outs[1])
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    grads = dict(explicit.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[name].grad, **tol, msg=lambda m: f'{name}: {m}')


@pytest.mark.skipif(not _HAS_CPU_FLASH, reason=f'torch {torch.__version__} has no CPU flash-attention op with a mask')
def test_cpu_training_attention_function_gradcheck():
    """The custom CPU attention function passes gradcheck (a packed qkv (B, N, 3, H, D), also non-contiguous, and a
    broadcast mask), agrees with SDPA on the unpacked q, k, v, and gives float32 gradients under bfloat16 autocast
    close to the float32 ones."""
    from timm_pervit.layers.attention import PeripheralSdpaCpu
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    qkv = torch.randn(2, 3, 3, 5, 4, **f64).transpose(1, 3).requires_grad_()  # (B=2, N=5, 3, H=3, D=4), strided
    mask = torch.randn(1, 3, 5, 5, **f64, requires_grad=True)
    assert not qkv.is_contiguous()
    assert torch.autograd.gradcheck(lambda *a: PeripheralSdpaCpu.apply(*a, 0.7), (qkv, mask))
    # the backward works through the batch in chunks (one sample here, 3 samples in a chunk, an uneven tail)
    qkv7 = torch.randn(7, 5, 3, 3, 4, **f64, requires_grad=True)
    for chunk_bytes in (1, 3 * 3 * 5 * 5 * 8):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(PeripheralSdpaCpu, 'chunk_bytes', chunk_bytes)
            assert torch.autograd.gradcheck(lambda *a: PeripheralSdpaCpu.apply(*a, 0.7), (qkv7, mask))
    # only the mask needs a gradient (a frozen qkv projection)
    assert torch.autograd.gradcheck(lambda m: PeripheralSdpaCpu.apply(qkv7.detach(), m, 0.7), (mask,))

    def sdpa(packed, m):
        q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.7)

    grad_out = torch.randn(7, 3, 5, 4, **f64)
    out, grads = torch.autograd.functional.vjp(lambda *a: PeripheralSdpaCpu.apply(*a, 0.7), (qkv7, mask), grad_out)
    out_ref, grads_ref = torch.autograd.functional.vjp(sdpa, (qkv7, mask), grad_out)
    torch.testing.assert_close(out, out_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)

    inputs = [t.detach().float().requires_grad_() for t in (qkv, mask)]
    PeripheralSdpaCpu.apply(*inputs, 0.7).sum().backward()
    ref = [t.grad for t in inputs]
    inputs = [t.detach().float().requires_grad_() for t in (qkv, mask)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = PeripheralSdpaCpu.apply(*(t.to(torch.bfloat16) for t in inputs), 0.7)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
    for t, r in zip(inputs, ref):
        assert t.grad.dtype == torch.float32
        torch.testing.assert_close(t.grad, r, rtol=0, atol=0.1)


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
        # a model-level check: the eval stem has no BatchNorm op left, and matches the modules called one by one
        model = make_micro().eval()
        image = torch.randn(2, 3, 64, 64)
        assert not any('batch_norm' in op for op in _aten_ops(lambda: model._stem(image)))
        torch.testing.assert_close(model._stem(image), model.stem(image).permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
        model.stem[0].bn.track_running_stats = False
        model.stem[0].bn.running_mean = model.stem[0].bn.running_var = None
        assert any('batch_norm' in op for op in _aten_ops(lambda: model._stem(image)))


def test_inference_mlp_runs_in_place():
    """At inference without autograd each block runs GELU in place over fc1's output and adds the residual into fc2's
    output: bit for bit what the modules called one by one compute. With autograd on, an active dropout, or a hook on
    a part that could keep a reference to those tensors, the modules run as they are."""
    from timm_pervit.pervit import PerViTBlock
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


def test_offset_grid_build_passes_gradcheck():
    """The training build of the position attention (an autograd Function with a hand-written backward) passes
    gradcheck for every position parameter, with one query per chunk and with all queries in one chunk. (On torch 2.1
    a strided gradient handed to the GroupNorm backward kernel gave wrong gradients without any error.)"""
    from torch.func import functional_call
    torch.manual_seed(0)
    pos = make_micro(dtype=torch.float64).pos_attn
    h, w = 3, 4
    names = [k for k, _ in pos.named_parameters()]
    params = [(p.detach() + 0.1 * torch.randn_like(p)).requires_grad_() for _, p in pos.named_parameters()]
    assert gates.use_offset_build(pos, len(pos.blocks))
    for chunk_bytes in (1, 1 << 22):
        pos.chunk_bytes = chunk_bytes
        assert torch.autograd.gradcheck(
            lambda *a: torch.stack(functional_call(pos, dict(zip(names, a)), (h, w))), params, eps=1e-6, atol=1e-5)
