"""The version shims of ``timm_pervit._compat``: every fallback gives what the real helper of newer releases gives,
and the behaviour that must not depend on the installed timm / torch / huggingface_hub does not.

Where the installed versions have the real helper, the fallback is forced (the helper hidden with monkeypatch), so
the paths of the oldest supported releases also run in the main CI on the newest ones.
"""
import argparse
import copy
import pickle

import pytest
import timm
import timm.layers
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_pervit import _compat

from tests.conftest import MICRO_KWARGS
from tests.conftest import PicklePayload
from tests.conftest import make_micro


def _version(v: str):
    return tuple(int(x) for x in v.split('+')[0].split('.')[:3] if x.isdigit())


# ---- activation checkpointing ---------------------------------------------------------------------------------------

def _frozen_stem_and_position(model):
    """Fine-tuning setup: the block inputs (stem output, position attention) then carry no gradient."""
    for p in list(model.stem.parameters()) + list(model.pos_attn.parameters()):
        p.requires_grad_(False)
    return model


def test_grad_checkpointing_is_non_reentrant_with_frozen_inputs():
    """With the stem and the position encoder frozen no block input requires grad: a re-entrant checkpoint would
    return an output without a graph (no parameter gradients at all); the non-re-entrant one gives the plain
    forward's gradients, bit for bit."""
    plain = _frozen_stem_and_position(make_micro(dtype=torch.float64)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 48, 64, dtype=torch.float64)
    y = torch.tensor([1, 7])
    losses = []
    for model in (plain, ckpt):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss)
    assert losses[1].requires_grad
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    trained = [(n, p) for n, p in plain.named_parameters() if p.requires_grad]
    assert any(n.startswith('blocks.0.') for n, _ in trained)
    ckpt_params = dict(ckpt.named_parameters())
    for name, p in trained:
        assert ckpt_params[name].grad is not None, name
        torch.testing.assert_close(ckpt_params[name].grad, p.grad, rtol=0, atol=0, msg=name)


def test_grad_checkpointing_with_autograd_grad_and_no_grad():
    """``torch.autograd.grad`` works through the checkpointed blocks (re-entrant checkpointing only supports
    ``backward()``), and a checkpointed model runs under ``torch.no_grad`` (e.g. train-mode evaluation) with the
    plain model's outputs."""
    plain = make_micro(dtype=torch.float64).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    params = [p for n, p in plain.named_parameters() if n.startswith('blocks.')]
    ckpt_params = [p for n, p in ckpt.named_parameters() if n.startswith('blocks.')]
    grads = torch.autograd.grad(plain(x).square().sum(), params)
    ckpt_grads = torch.autograd.grad(ckpt(x).square().sum(), ckpt_params)
    for g, cg in zip(grads, ckpt_grads):
        torch.testing.assert_close(cg, g, rtol=0, atol=0)
    with torch.no_grad():
        out, ckpt_out = plain(x), ckpt(x)
    assert not ckpt_out.requires_grad
    torch.testing.assert_close(ckpt_out, out, rtol=0, atol=0)


def test_checkpoint_function_with_a_no_grad_part_and_kwargs():
    """``_compat.checkpoint`` itself: keyword arguments reach the function, a ``torch.no_grad`` part inside it stays
    out of the graph, and inputs that need no gradient still give parameter gradients."""
    lin, frozen = nn.Linear(4, 4).double(), nn.Linear(4, 4).double()

    def fn(x, scale=1.):
        with torch.no_grad():
            shift = frozen(x)
        return lin(x) * scale + shift

    x = torch.randn(3, 4, dtype=torch.float64)
    plain = torch.autograd.grad(fn(x, scale=2.).sum(), lin.weight)[0]
    out = _compat.checkpoint(fn, x, scale=2.)
    assert out.requires_grad
    torch.testing.assert_close(torch.autograd.grad(out.sum(), lin.weight)[0], plain, rtol=0, atol=0)
    assert frozen.weight.grad is None


# ---- tracing probes -------------------------------------------------------------------------------------------------

def test_tracing_probes_under_compile_fullgraph():
    """The probes are traceable by dynamo with fullgraph=True on every torch (torch 2.1's dynamo cannot trace a
    ``hasattr`` on a module, so they are chosen at import) and report compiling, not fx tracing."""
    def fn(x):
        return x * 2 if _compat.is_compiling() and not _compat.is_fx_tracing() and not _compat.is_exporting() else x

    x = torch.ones(2)
    assert torch.equal(fn(x), x)
    assert torch.equal(torch.compile(fn, backend='eager', fullgraph=True)(x), 2 * x)


def test_tracing_probes_under_fx_and_jit_trace():
    class Probe(nn.Module):
        def forward(self, x):
            return x + float(_compat.is_exporting()) + 2 * float(_compat.is_fx_tracing())

    x = torch.zeros(1)
    assert torch.fx.symbolic_trace(Probe())(x).item() == 2.
    assert torch.jit.trace(Probe(), x, check_trace=False)(x).item() == 1.
    assert Probe()(x).item() == 0.


# ---- fallbacks of newer timm helpers --------------------------------------------------------------------------------

def test_drop_path_rates_fallback(monkeypatch):
    real = [_compat.calculate_drop_path_rates(0.1, n) for n in (1, 2, 12)]
    monkeypatch.delattr(timm.layers, 'calculate_drop_path_rates', raising=False)  # timm < 1.0.21
    fallback = [_compat.calculate_drop_path_rates(0.1, n) for n in (1, 2, 12)]
    for r, f in zip(real, fallback):
        assert f == pytest.approx(r)
    assert fallback[2][0] == 0 and fallback[2][-1] == pytest.approx(0.1) and fallback[0] == [0.]


def test_device_dtype_fallback(monkeypatch):
    model = make_micro(dtype=torch.float64)
    monkeypatch.delattr(timm.layers, 'get_device_dtype', raising=False)  # timm < 1.0.29
    assert _compat.get_device_dtype(model) == {'device': torch.device('cpu'), 'dtype': torch.float64}
    model.reset_classifier(3)
    assert model.head.weight.dtype == torch.float64


def test_build_mlp_without_factory_kwargs():
    """timm < 1.0.20 layers take no device/dtype: the layer is built under the device and cast to the dtype."""
    class OldMlp(timm.layers.Mlp):
        def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.):
            super().__init__(in_features, hidden_features, out_features, act_layer=act_layer, drop=drop)

    meta = _compat.build_mlp(OldMlp, 8, 16, out_features=4, device='meta', dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in meta.parameters()} == {('meta', torch.bfloat16)}
    cpu = _compat.build_mlp(OldMlp, 8, 16, dtype=torch.float64)
    assert {p.dtype for p in cpu.parameters()} == {torch.float64} and cpu.fc2.out_features == 8


def test_local_dir_support_flag():
    """``local-dir:`` loads a safetensors folder from timm 1.0.26 on (the prefix exists from 1.0.16, but reads
    model.safetensors with torch.load before 1.0.26); the hint of a failed pretrained load names it only there."""
    from timm_pervit.hub import _how_to_convert
    assert _compat.HAS_LOCAL_DIR == (_version(timm.__version__) >= (1, 0, 26))
    assert ("'local-dir:pervit_tiny.in1k'" in _how_to_convert('pervit_tiny')) == _compat.HAS_LOCAL_DIR


# ---- safe checkpoint loading ----------------------------------------------------------------------------------------

def _official_like(path):
    torch.save({'model': {'w': torch.arange(4.)}, 'epoch': 3, 'args': argparse.Namespace(lr=0.1)}, path)


@pytest.mark.parametrize('restricted', [False, True], ids=['installed_torch', 'torch_lt_2_5_fallback'])
def test_torch_load_weights_only_allows_namespace_and_refuses_code(tmp_path, monkeypatch, restricted):
    """argparse.Namespace (official checkpoints) loads; a pickled callable is refused and never runs. ``restricted``
    forces the unpickler used on torch < 2.5, which has no ``safe_globals``."""
    if restricted:
        monkeypatch.setattr(_compat, 'HAS_SAFE_GLOBALS', False)
    good, evil, marker = tmp_path / 'good.pth', tmp_path / 'evil.pth', tmp_path / 'pwned'
    _official_like(good)
    ckpt = _compat.torch_load_weights_only(str(good), [argparse.Namespace])
    assert ckpt['args'] == argparse.Namespace(lr=0.1) and torch.equal(ckpt['model']['w'], torch.arange(4.))
    with pytest.raises(pickle.UnpicklingError):
        _compat.torch_load_weights_only(str(good))  # Namespace not allow-listed
    torch.save({'model': {'w': torch.zeros(2)}, 'args': PicklePayload(marker)}, evil)
    with pytest.raises(pickle.UnpicklingError):
        _compat.torch_load_weights_only(str(evil), [argparse.Namespace])
    assert not marker.exists()


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    """The torch < 2.5 fallback resolves only torch's weights-only globals and the given classes."""
    marker = tmp_path / 'pwned'
    module = _compat._restricted_pickle_module([argparse.Namespace])
    for obj in (PicklePayload(marker), {'t': torch.zeros(1), 'fn': print}, {'ns': argparse.ArgumentParser}):
        path = tmp_path / 'x.pth'
        torch.save(obj, path)
        with pytest.raises(pickle.UnpicklingError, match='not allow-listed'):
            torch.load(str(path), map_location='cpu', pickle_module=module, weights_only=False)
    assert not marker.exists()
    path = tmp_path / 'ok.pth'
    torch.save({'sd': {'a': torch.ones(2, dtype=torch.bfloat16)}, 'args': argparse.Namespace(x=[1, (2, 3)])}, path)
    out = torch.load(str(path), map_location='cpu', pickle_module=module, weights_only=False)
    assert out['args'].x == [1, (2, 3)] and out['sd']['a'].dtype == torch.bfloat16


def test_converter_reads_official_checkpoint(tmp_path, monkeypatch):
    """The converter's loader reads an official-style checkpoint (with its argparse.Namespace) on every torch."""
    from timm_pervit.checkpoint_io import load_checkpoint
    monkeypatch.setattr(_compat, 'HAS_SAFE_GLOBALS', False)
    path = tmp_path / 'official.pth'
    _official_like(path)
    assert torch.equal(load_checkpoint(path)['w'], torch.arange(4.))


# ---- huggingface_hub constants in the loopback-hub fixture ----------------------------------------------------------

def test_hub_fixture_patches_only_existing_constants(pervit_hf_env):
    """``AGENT_HARNESSES_PATH`` (huggingface_hub >= 1.19) is patched only where it exists, and the module-level copies
    of the constants that huggingface_hub < 0.25 keeps (file_download.ENDPOINT, ...) follow the endpoint."""
    from huggingface_hub import constants, file_download
    had = hasattr(constants, 'AGENT_HARNESSES_PATH')
    cache = pervit_hf_env('http://127.0.0.1:9')
    assert hasattr(constants, 'AGENT_HARNESSES_PATH') == had
    assert constants.ENDPOINT == 'http://127.0.0.1:9' and constants.HF_HUB_CACHE == str(cache)
    for name in ('ENDPOINT', 'HUGGINGFACE_CO_URL_TEMPLATE', 'HF_HUB_CACHE'):
        if hasattr(file_download, name):
            assert getattr(file_download, name) == getattr(constants, name), name
    assert file_download.hf_hub_url('a/b', 'c.txt').startswith('http://127.0.0.1:9/a/b/resolve/')


# ---- found by timm's own tests/test_models.py (.ci/timm_suite) ------------------------------------------------------

def test_create_under_meta_device_context():
    """timm's cfg test creates every model inside ``with torch.device('meta')`` (timm >= 1.0.2x): the helper tensors
    of the constructor (stage ends, initial gate values, drop-path rates) must not follow the context."""
    with torch.device('meta'):
        model = timm.create_model('pervit_tiny', device='meta', dtype=torch.float32, drop_path_rate=0.1).eval()
    assert {p.device.type for p in model.parameters()} == {'meta'}
    assert [i['module'] for i in model.feature_info][-1] == 'blocks.11'
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model(torch.randn(1, 3, 64, 64, device='meta')).shape == (1, 1000)


# ---- hub-ready folders (save_for_hf / local-dir:) ------------------------------------------------------------------

@pytest.mark.parametrize('local_dir', [True, False], ids=['installed_timm', 'timm_lt_1_0_26_fallback'])
def test_folder_round_trip(tmp_path, monkeypatch, local_dir):
    from timm_pervit.tools.model_card import save_for_hf
    """A micro model saved with its data config and a pretrained-config update reloads with the same architecture,
    weights, outputs and configs: timm 1.0.31's save_for_hf / local-dir:, or the steps that stand in for them."""
    if not local_dir:
        monkeypatch.setattr(_compat, 'HAS_LOCAL_DIR', False)
    model = timm.create_model('pervit_tiny', **MICRO_KWARGS).eval()
    model_args = {k: v for k, v in MICRO_KWARGS.items() if k != 'num_classes'}
    data_config = dict(input_size=(3, 48, 48), mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0, interpolation='bilinear')
    save_for_hf(model, tmp_path, description='a micro test model', tag='micro', notes=('a test',),
                data_config=data_config, model_args=model_args)
    assert (tmp_path / 'model.safetensors').is_file()
    reloaded = _compat.create_model_from_folder(tmp_path).eval()
    assert reloaded.num_classes == 10 and reloaded.num_heads == MICRO_KWARGS['num_heads']
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    cfg = reloaded.pretrained_cfg
    assert tuple(cfg['input_size']) == (3, 48, 48) and tuple(cfg['mean']) == (0.5,) * 3
    assert cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bilinear' and cfg['num_classes'] == 10
    assert cfg['tag'] == 'micro' and list(cfg['notes']) == ['a test'] and cfg['first_conv'] == 'stem.0.conv'
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
    headless = _compat.create_model_from_folder(tmp_path, num_classes=0)  # kwargs win, as with local-dir:
    assert headless.num_classes == 0
    assert headless.blocks[0].attn.qkv.weight.shape == model.blocks[0].attn.qkv.weight.shape
