"""Parity with the official PerViT: the fixture in tests/fixtures was produced by the official code in float64.

Loads the official-layout micro checkpoint through ``checkpoint_filter_fn`` and matches eval logits, pre-logit
features, train-mode logits, the loss and every parameter's gradient, on the fused and the explicit attention path.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from timm_pervit import checkpoint_filter_fn
from timm_pervit.keys import official_to_timm

from tests.conftest import FIXTURES, make_micro


def _load_fixture():
    with open(os.path.join(FIXTURES, 'micro_config.json')) as f:
        cfg = json.load(f)
    official = load_file(os.path.join(FIXTURES, 'micro_official_state_dict.safetensors'))
    expected = load_file(os.path.join(FIXTURES, 'micro_expected.safetensors'))
    return cfg, official, expected


def _build(cfg, official, dtype, fused):
    model = make_micro(dtype=dtype)  # conftest reads the micro architecture from this same micro_config.json
    assert model.in_chans == cfg['convstem_dims'][0]
    model.load_state_dict(checkpoint_filter_fn(official, model), strict=True)
    for blk in model.blocks:
        blk.attn.fused_attn = fused
    return model


@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'explicit'])
def test_parity_float64_outputs_loss_and_gradients(fused):
    cfg, official, expected = _load_fixture()
    model = _build(cfg, official, torch.float64, fused)
    x = expected['input'].to(torch.float64)

    model.eval()
    with torch.no_grad():
        logits = model(x)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(logits, expected['logits_eval'], rtol=0, atol=1e-8)
    torch.testing.assert_close(pooled, expected['pooled_features_eval'], rtol=0, atol=1e-8)

    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits, expected['labels'])
    loss.backward()
    torch.testing.assert_close(logits, expected['logits_train'], rtol=0, atol=1e-8)
    torch.testing.assert_close(loss.reshape(1), expected['loss_train'], rtol=0, atol=1e-10)

    # every parameter's gradient, mapped back to the official names through the converter
    official_to_ours = dict(zip(official.keys(), official_to_timm(official).keys()))
    params = dict(model.named_parameters())
    grads = {k[len('grad.'):]: v for k, v in expected.items() if k.startswith('grad.')}
    assert len(grads) == len(params), 'the fixture has a gradient for every parameter'
    for official_key, grad in grads.items():
        ours = params[official_to_ours[official_key]]
        assert ours.grad is not None, official_key
        torch.testing.assert_close(ours.grad, grad, rtol=1e-6, atol=1e-9, msg=lambda m: f'{official_key}: {m}')


@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'explicit'])
def test_parity_float32(fused):
    cfg, official, expected = _load_fixture()
    model = _build(cfg, official, torch.float32, fused).eval()
    with torch.no_grad():
        logits = model(expected['input'].float())
    torch.testing.assert_close(logits.double(), expected['logits_eval'], rtol=0, atol=1e-5)


def test_checkpoint_filter_is_noop_on_own_keys_and_unwraps_training_checkpoints():
    cfg, official, _ = _load_fixture()
    model = _build(cfg, official, torch.float32, True)
    own = model.state_dict()
    filtered = checkpoint_filter_fn(own, model)
    assert filtered.keys() == own.keys()
    assert all(filtered[k] is own[k] for k in own)
    wrapped = checkpoint_filter_fn({'model': official, 'epoch': 3}, model)
    assert wrapped.keys() == own.keys()


def test_checkpoint_filter_rejects_other_variant_with_a_clear_message():
    import timm
    small = timm.create_model('pervit_small', num_classes=0)
    tiny = timm.create_model('pervit_tiny')
    expected = r'looks like a pervit_small checkpoint.*Mismatch: stem\.0\.bn\.weight: checkpoint \(64,\) vs model'
    with pytest.raises(ValueError, match=expected):
        checkpoint_filter_fn(small.state_dict(), tiny)
