"""torch.hub: hubconf.py at the repository root lists, documents and builds every variant."""
import inspect
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

from timm_pervit import PERVIT_VARIANTS, PerViT

from tests.conftest import MICRO_ARCH
from tests.conftest import REPO as REPO_ROOT

REPO = str(REPO_ROOT)


def _github_cache(hub_dir: Path, ref: str = 'main') -> str:
    """Lay the repository out in a torch.hub cache the way torch.hub extracts a GitHub download.

    ``torch.hub.list``/``help`` only take GitHub repos; with the ``<owner>_<repo>_<ref>`` folder present (and
    ``skip_validation``) torch.hub runs its whole GitHub code path on it, minus the download.
    """
    repo_dir = hub_dir / f'owner_timm-pervit_{ref}'
    repo_dir.mkdir(parents=True)
    shutil.copy2(Path(REPO) / 'hubconf.py', repo_dir / 'hubconf.py')
    shutil.copytree(Path(REPO) / 'timm_pervit', repo_dir / 'timm_pervit', ignore=shutil.ignore_patterns('__pycache__'))
    return f'owner/timm-pervit:{ref}'


def test_hub_list_help_load_github_layout(tmp_path, monkeypatch):
    """`torch.hub.list/help/load('<owner>/<repo>', ...)`, the documented usage, on a cached GitHub checkout."""
    monkeypatch.setattr(torch.hub, '_hub_dir', str(tmp_path / 'hub'))
    repo = _github_cache(tmp_path / 'hub')
    opts = dict(trust_repo=True, skip_validation=True)
    # torch.hub.list has no verbose argument in torch 2.1 and 2.2
    quiet = dict(verbose=False) if 'verbose' in inspect.signature(torch.hub.list).parameters else {}
    assert sorted(torch.hub.list(repo, **quiet, **opts)) == sorted(PERVIT_VARIANTS)
    for name in PERVIT_VARIANTS:
        doc = torch.hub.help(repo, name, **opts)
        assert 'pretrained' in doc and 'timm.create_model' in doc and f'{name}.in1k' in doc
    model = torch.hub.load(repo, 'pervit_small', num_classes=3, verbose=False, **opts, **MICRO_ARCH)
    assert isinstance(model, PerViT) and model.num_classes == 3


def test_hub_load_default_variant():
    model = torch.hub.load(REPO, 'pervit_tiny', source='local')
    reference = timm.create_model('pervit_tiny')
    assert isinstance(model, PerViT)
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
        [(k, v.shape) for k, v in reference.state_dict().items()]


def test_hub_load_forwards_kwargs():
    model = torch.hub.load(
        REPO, 'pervit_small', source='local', num_classes=5, in_chans=1, drop_path_rate=0.1, **MICRO_ARCH).eval()
    assert model.num_classes == 5 and model.in_chans == 1 and model.num_heads == MICRO_ARCH['num_heads']
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model(torch.randn(2, 1, 32, 48)).shape == (2, 5)
    backbone = torch.hub.load(
        REPO, 'pervit_medium', source='local', features_only=True, out_indices=(1, 3), **MICRO_ARCH)
    # blocks 1 and 3 end the first two stages, whose outputs have the next stage's width
    assert [f.shape[1] for f in backbone(torch.randn(1, 3, 64, 64))] == list(MICRO_ARCH['embed_dims'][1:3])


def test_hub_load_pretrained_from_file(tmp_path):
    """pretrained=True through hub, the weights file given by timm's pretrained_cfg_overlay (no network)."""
    source = timm.create_model('pervit_tiny', num_classes=4, **MICRO_ARCH).eval()
    path = tmp_path / 'weights.safetensors'
    save_file(source.state_dict(), str(path))
    model = torch.hub.load(
        REPO, 'pervit_tiny', source='local', pretrained=True, num_classes=4,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=4), **MICRO_ARCH).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


@pytest.mark.slow
def test_hub_load_in_fresh_interpreter(tmp_path):
    """hubconf registers the models itself: works with the automatic registration turned off, outside the repo."""
    code = f"""
import json, sys, torch
model = torch.hub.load({REPO!r}, 'pervit_tiny', source='local', num_classes=3, **{MICRO_ARCH!r})
out = model.eval()(torch.randn(1, 3, 32, 32))
import timm_pervit
print(json.dumps(dict(shape=list(out.shape), cls=type(model).__name__, registered=sorted(timm_pervit.PERVIT_VARIANTS))))
"""
    env = dict(os.environ, TIMM_PERVIT_NO_AUTOLOAD='1')
    env.pop('PYTHONPATH', None)
    proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == dict(shape=[1, 3], cls='PerViT', registered=sorted(PERVIT_VARIANTS))
