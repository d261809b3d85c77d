"""Pretrained weights through timm's real loading path: configs, download from a loopback hub, cache, offline,
hub-id / local-dir / file sources, adaptation (num_classes, in_chans, features_only) and clear failures.

The hub is tests/helpers/hub_server.py (a real HTTP server on 127.0.0.1) serving a folder written by the converter
from a fake official pervit_tiny checkpoint (conftest.py: pervit_tiny_official, pervit_hub_root).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from timm_pervit import HF_HUB_NAMESPACE
from timm_pervit._compat import HAS_LOCAL_DIR
from timm_pervit.hub import PretrainedWeightsError

from tests.helpers.hub_server import LoopbackHub

REPO = f'{HF_HUB_NAMESPACE}/pervit_tiny.in1k'
PAPER_TOP1 = {'pervit_tiny': 78.8, 'pervit_small': 82.1, 'pervit_medium': 82.9}


def _assert_weights_equal(state_dict, source, skip=()):
    keys = [k for k in source if not k.startswith(skip)]
    assert keys and all(k in state_dict for k in keys)
    for k in keys:
        assert torch.equal(state_dict[k], source[k]), k


def _cache_files(cache: Path):
    return [p for p in cache.rglob('*')] if cache.exists() else []


def _assert_nothing_half_written(cache: Path):
    names = [p.name for p in _cache_files(cache)]
    assert not [n for n in names if n.endswith('.incomplete')], names
    blobs = [p for p in _cache_files(cache) if p.parent.name == 'blobs']
    snapshots = [p for p in _cache_files(cache) if p.is_file() and 'snapshots' in p.parts]
    assert not blobs and not snapshots, (blobs, snapshots)


def test_pretrained_cfgs():
    assert timm.list_pretrained('pervit*') == sorted(f'{v}.in1k' for v in PAPER_TOP1)
    for variant, top1 in PAPER_TOP1.items():
        cfg = timm.models.get_pretrained_cfg(f'{variant}.in1k')
        assert cfg.hf_hub_id == f'{HF_HUB_NAMESPACE}/{variant}.in1k'
        assert cfg.license == 'apache-2.0'
        assert cfg.paper_ids == 'arXiv:2206.06801'
        assert cfg.origin_url == 'https://github.com/juhongm999/pervit'
        assert f'top1={top1}' in cfg.notes and f'{top1}%' in cfg.description
        assert cfg.first_conv == 'stem.0.conv' and cfg.classifier == 'head' and cfg.num_classes == 1000


_CHILD = r'''
import json, sys, torch, timm, timm_pervit
from safetensors.torch import load_file
args = json.loads(sys.argv[1])
model = timm.create_model('pervit_tiny', pretrained=True).eval()
src = load_file(args['source'])
sd = model.state_dict()
result = dict(weights_equal=sd.keys() == src.keys() and all(torch.equal(sd[k], src[k]) for k in src),
              offline=__import__('huggingface_hub').constants.HF_HUB_OFFLINE)
x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = model(x)
    ref = timm.create_model('pervit_tiny').eval()
    ref.load_state_dict(src)
    result['same_as_source'] = torch.equal(out, ref(x))
    if args['roundtrip']:
        # the official checkpoint through timm's --pretrained-path route and the explicit official formula
        official = timm.create_model('pervit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=args['official']))
        for blk in official.blocks:
            blk.attn.fused_attn = False
        result['roundtrip_max_abs_diff'] = (out.double() - official.eval()(x).double()).abs().max().item()
print(json.dumps(result))
'''


def _run_child(tmp_path, official, source_file, roundtrip):
    arg = json.dumps(dict(source=str(source_file), official=str(official.path), roundtrip=roundtrip))
    proc = subprocess.run([sys.executable, '-c', _CHILD, arg], capture_output=True, text=True, env=dict(os.environ),
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_pretrained_true_downloads_caches_and_loads_offline(
        tmp_path, pervit_loopback_hub, pervit_hf_env, pervit_tiny_official):
    """create_model('pervit_tiny', pretrained=True) in fresh processes configured only through the environment."""
    hub = pervit_loopback_hub
    cache = pervit_hf_env(hub.url)
    source_file = tmp_path / 'source.safetensors'
    save_file(pervit_tiny_official.source_state_dict, str(source_file))

    first = _run_child(tmp_path, pervit_tiny_official, source_file, roundtrip=True)
    assert first['weights_equal'] and first['same_as_source'] and not first['offline']
    assert first['roundtrip_max_abs_diff'] < 1e-4
    print(f"round trip official checkpoint -> hub folder -> pretrained=True: max abs logit diff "
          f"{first['roundtrip_max_abs_diff']:.3e}")
    assert ('HEAD', f'/{REPO}/resolve/main/model.safetensors') in hub.requests
    assert any(m == 'GET' and p.startswith('/cdn/') for m, p in hub.requests)
    snapshot = list(cache.glob(f'models--{REPO.replace("/", "--")}/snapshots/*/model.safetensors'))
    assert len(snapshot) == 1
    assert not [p for p in _cache_files(cache) if p.name.endswith('.incomplete')]

    hub.stop()  # nothing to talk to any more: the cache alone must serve the weights
    pervit_hf_env('http://127.0.0.1:9', offline=True)
    second = _run_child(tmp_path, pervit_tiny_official, source_file, roundtrip=False)
    assert second['weights_equal'] and second['same_as_source'] and second['offline']


def test_hf_hub_prefix_and_local_dir(pervit_loopback_hub, pervit_hf_env, pervit_hub_root, pervit_tiny_official):
    pervit_hf_env(pervit_loopback_hub.url)
    model = timm.create_model(f'hf-hub:{REPO}', pretrained=True)
    _assert_weights_equal(model.state_dict(), pervit_tiny_official.source_state_dict)
    assert model.pretrained_cfg['hf_hub_id'] == REPO and model.pretrained_cfg['num_classes'] == 1000
    requested = {p for _, p in pervit_loopback_hub.requests}
    assert f'/{REPO}/resolve/main/config.json' in requested  # the architecture comes from the hub's config.json

    if not HAS_LOCAL_DIR:
        pytest.skip(f'timm {timm.__version__} cannot load a local-dir: folder of safetensors weights (the prefix came '
                    f'in timm 1.0.16, reading model.safetensors from it in 1.0.26)')
    model = timm.create_model(f'local-dir:{pervit_hub_root[0] / REPO}', pretrained=True)
    _assert_weights_equal(model.state_dict(), pervit_tiny_official.source_state_dict)


def test_official_checkpoint_file_overlay(pervit_tiny_official):
    """What timm's train.py --pretrained-path does: pretrained_cfg_overlay=dict(file=<official .pth>)."""
    model = timm.create_model(
        'pervit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(pervit_tiny_official.path)))
    _assert_weights_equal(model.state_dict(), pervit_tiny_official.source_state_dict)


@pytest.mark.parametrize('case', ['num_classes', 'in_chans', 'features_only'])
def test_pretrained_adaptation(case, pervit_loopback_hub, pervit_hf_env, pervit_tiny_official):
    pervit_hf_env(pervit_loopback_hub.url)
    src = pervit_tiny_official.source_state_dict
    if case == 'num_classes':
        model = timm.create_model('pervit_tiny', pretrained=True, num_classes=10)
        assert model.head.weight.shape == (10, 280)
        _assert_weights_equal(model.state_dict(), src, skip=('head.',))
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    elif case == 'in_chans':
        model = timm.create_model('pervit_tiny', pretrained=True, in_chans=1)
        _assert_weights_equal(model.state_dict(), src, skip=('stem.0.conv.weight',))
        # timm's adapt_input_conv: 3 -> 1 channel sums the RGB filters
        torch.testing.assert_close(model.stem[0].conv.weight, src['stem.0.conv.weight'].sum(1, keepdim=True))
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)
    else:
        model = timm.create_model('pervit_tiny', pretrained=True, features_only=True)
        sd = {k[len('model.'):]: v for k, v in model.state_dict().items()}  # FeatureGetterNet wraps the model
        assert 'blocks.11.attn.qkv.weight' in sd
        _assert_weights_equal(sd, {k: v for k, v in src.items() if k in sd})
        feats = model(torch.randn(1, 3, 64, 64))
        assert [f.shape[1] for f in feats] == model.feature_info.channels()


def test_repo_not_published(tmp_path, pervit_hf_env):
    with LoopbackHub(tmp_path / 'empty_hub') as hub:
        cache = pervit_hf_env(hub.url)
        with pytest.raises(PretrainedWeightsError) as info:
            timm.create_model('pervit_tiny', pretrained=True)
    msg = str(info.value)
    assert info.value.reason == 'not_published' and REPO in msg and 'does not exist' in msg
    assert 'python -m timm_pervit convert' in msg and 'pretrained_cfg_overlay=dict(file=' in msg
    _assert_nothing_half_written(cache)


def test_weights_file_missing(tmp_path, pervit_hf_env, pervit_hub_root):
    repo = tmp_path / 'hub' / REPO
    repo.mkdir(parents=True)
    shutil.copy(pervit_hub_root[0] / REPO / 'config.json', repo)
    with LoopbackHub(tmp_path / 'hub') as hub:
        cache = pervit_hf_env(hub.url)
        with pytest.raises(PretrainedWeightsError, match='weights file') as info:
            timm.create_model('pervit_tiny', pretrained=True)
    assert info.value.reason == 'not_published'
    _assert_nothing_half_written(cache)


def test_unknown_revision(pervit_loopback_hub, pervit_hf_env):
    cache = pervit_hf_env(pervit_loopback_hub.url)
    with pytest.raises(PretrainedWeightsError, match='the revision') as info:
        timm.create_model('pervit_tiny', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=f'{REPO}@v9'))
    assert info.value.reason == 'not_published'
    _assert_nothing_half_written(cache)


@pytest.mark.parametrize('how', ['HF_HUB_OFFLINE', 'unreachable'])
def test_offline_without_cache(how, tmp_path, pervit_hf_env, monkeypatch):
    hub = LoopbackHub(tmp_path).start()
    url = hub.url
    hub.stop()  # a port that refuses connections
    cache = pervit_hf_env(url, offline=how == 'HF_HUB_OFFLINE')
    # the time budget for reaching the hub (retries of a refused connection included): the behaviour, not the wait
    monkeypatch.setenv('TIMM_PERVIT_HUB_TIMEOUT', '1')
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model('pervit_tiny', pretrained=True)
    msg = str(info.value)
    assert info.value.reason == 'offline' and 'no copy' in msg and 'timm_pervit convert' in msg
    if how == 'HF_HUB_OFFLINE':
        assert 'HF_HUB_OFFLINE=1 is set' in msg
    else:  # worded by the actual cause: nothing about HF_HUB_OFFLINE, which is not set
        assert f'the hub at {url} could not be reached' in msg and 'HF_HUB_OFFLINE' not in msg
    _assert_nothing_half_written(cache)


def test_interrupted_download_leaves_nothing(pervit_loopback_hub, pervit_hf_env, pervit_hub_root):
    hub = pervit_loopback_hub
    size = (pervit_hub_root[0] / REPO / 'model.safetensors').stat().st_size
    hub.declared_sizes[(REPO, 'model.safetensors')] = size + 4096  # the transfer ends before the announced size
    cache = pervit_hf_env(hub.url)
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model('pervit_tiny', pretrained=True)
    assert info.value.reason == 'download_failed'
    partial = [p for p in _cache_files(cache) if p.name.endswith('.incomplete')]
    if partial:  # huggingface_hub < 1.18 keeps the broken download to resume from it: the message must say so
        assert len(partial) == 1 and f'the partial download stays in the cache ({partial[0]})' in str(info.value)
        partial[0].unlink()
    else:
        assert 'nothing was written to the cache' in str(info.value)
    _assert_nothing_half_written(cache)


def test_corrupted_weights_on_hub(tmp_path, pervit_hf_env, pervit_hub_root):
    repo = tmp_path / 'hub' / REPO
    shutil.copytree(pervit_hub_root[0] / REPO, repo)
    data = (repo / 'model.safetensors').read_bytes()
    (repo / 'model.safetensors').write_bytes(data[:len(data) // 2])  # a truncated upload
    with LoopbackHub(tmp_path / 'hub') as hub:
        cache = pervit_hf_env(hub.url)
        with pytest.raises(PretrainedWeightsError, match='corrupted or truncated') as info:
            timm.create_model('pervit_tiny', pretrained=True)
    assert info.value.reason == 'corrupted' and 'was removed' in str(info.value)
    _assert_nothing_half_written(cache)  # the unreadable download is not kept in the cache


def test_corrupted_local_file(tmp_path, pervit_hub_root):
    bad = tmp_path / 'model.safetensors'
    data = (pervit_hub_root[0] / REPO / 'model.safetensors').read_bytes()
    bad.write_bytes(data[:1000])
    with pytest.raises(PretrainedWeightsError, match='corrupted or truncated') as info:
        timm.create_model('pervit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(bad)))
    assert info.value.reason == 'corrupted' and str(bad) in str(info.value)
    assert bad.stat().st_size == 1000  # a user's file is never touched


def test_checkpoint_of_another_variant(tmp_path, pervit_hf_env, pervit_hub_root):
    """The tiny weights published under the small repo: the error names the variant they belong to."""
    small_repo = f'{HF_HUB_NAMESPACE}/pervit_small.in1k'
    shutil.copytree(pervit_hub_root[0] / REPO, tmp_path / 'hub' / small_repo)
    with LoopbackHub(tmp_path / 'hub') as hub:
        pervit_hf_env(hub.url)
        with pytest.raises(ValueError, match='looks like a pervit_tiny checkpoint') as info:
            timm.create_model('pervit_small', pretrained=True)
    assert 'Mismatch: ' in str(info.value)
