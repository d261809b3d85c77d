"""The three PerViT variants as registered timm models: names, sizes, configs, outputs, gradients, features."""
import math
import re

import pytest
import timm
import torch

import timm_pervit
from timm_pervit.tools.flops import count_gmacs
from timm_pervit.tools.reference import OfficialFormula


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


@pytest.mark.parametrize('name', VARIANTS)
def test_variant_logits_equal_the_official_formula(name):
    """Each variant at its pretrained input size (the official 14 x 14 token grid) gives the logits the official
    explicit formula (``timm_pervit.tools.reference``) computes from the same weights: a check of the values, not only
    the shape."""
    model = timm.create_model(name).eval()
    x = torch.randn(2, *model.pretrained_cfg['input_size'])
    with torch.no_grad():
        out = model(x)
        ref = OfficialFormula(model).eval()(x)
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 1e-4, f'relative error {err:.3g}'
    assert not torch.allclose(out[0], out[1])  # the two images are told apart


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
def test_features_only_default_stages_and_chosen_blocks_equal_forward_intermediates(name):
    """features_only: by default the block outputs at the stage ends (1, 3, 9, 11) at stride 16, and with out_indices
    the chosen blocks; both hold the values forward_intermediates gives on the same weights (not only the shapes)."""
    model = timm.create_model(name).eval()
    arch = timm_pervit.PERVIT_VARIANTS[name]['embed_dims']
    x = torch.randn(1, 3, 64, 80)
    cases = [(None, [1, 3, 9, 11], [arch[1], arch[2], arch[3], arch[3]]),
             ((0, 5, 11), [0, 5, 11], [arch[0], arch[2], arch[3]])]
    for out_indices, blocks, channels in cases:
        kwargs = {} if out_indices is None else dict(out_indices=out_indices)
        feat = timm.create_model(name, features_only=True, **kwargs).eval()
        assert feat.feature_info.reduction() == [16] * len(blocks)
        assert feat.feature_info.channels() == channels
        feat.model.load_state_dict(model.state_dict(), strict=False)  # the getter wraps the pruned model
        with torch.no_grad():
            outs = feat(x)
            ref = model.forward_intermediates(x, indices=blocks, intermediates_only=True)
        assert len(outs) == len(blocks)
        assert [o.shape[1] for o in outs] == feat.feature_info.channels()
        for o, r in zip(outs, ref):
            assert o.shape[-2:] == (4, 5)
            torch.testing.assert_close(o, r, rtol=0, atol=0)
