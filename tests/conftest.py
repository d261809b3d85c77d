"""Shared fixtures and helpers of the test suite (one copy each). Every test runs on CPU, offline.

The rooms mirror the package: tests/model (the PerViT model and its timm API), tests/layers (the position engine, the
attention kernel and the fast-path gates), tests/loading (hub, pretrained weights, checkpoint errors, start-up
registration, version shims), tests/tools (the command-line tools) and tests/integrations (export, transformers,
timm's scripts, DDP, downstream libraries, torch.hub). Scripts and servers the tests start by path live in
tests/helpers, the official-code fixture in tests/fixtures.
"""
import copy
import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch

os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')

if os.environ.get('PYTEST_XDIST_WORKER'):
    # pytest -n 2 on 2 cores: one intra-op thread per worker (and per subprocess it starts) avoids oversubscription,
    # which makes torch's CPU kernels many times slower
    os.environ['OMP_NUM_THREADS'] = '1'
    torch.set_num_threads(1)

#: The repository root (README.md, docs/, pyproject.toml).
REPO = Path(__file__).resolve().parents[1]
#: The official-code fixture of the micro PerViT (tests/fixtures/README.md).
FIXTURES = REPO / 'tests' / 'fixtures'
#: Scripts the tests start by path (DDP workers under torchrun) and the loopback hub server.
HELPERS = REPO / 'tests' / 'helpers'


def _load_micro_config() -> Dict[str, Any]:
    with open(os.path.join(FIXTURES, 'micro_config.json'), encoding='utf-8') as f:
        return json.load(f)


#: The official-code config of the parity fixture (tests/fixtures/micro_config.json): the one source of the micro model.
MICRO_CONFIG = _load_micro_config()
#: The micro PerViT's architecture, in timm_pervit's terms, without head arguments: for calls that pass their own
#: ``num_classes`` (``timm.create_model(name, num_classes=3, **MICRO_ARCH)``, ``torch.hub.load``, the demo's
#: ``model_kwargs``). The fixture's input channels (``convstem_dims[0]``) are PerViT's default ``in_chans`` (3,
#: checked in tests/model/test_parity.py), so they stay out and calls can choose their own.
MICRO_ARCH = dict(
    embed_dims=tuple(MICRO_CONFIG['emb_dims']),
    stem_dims=tuple(MICRO_CONFIG['convstem_dims'][1:]),
    num_heads=MICRO_CONFIG['num_heads'],
)
#: The micro PerViT of the parity fixture with its head: cheap enough for every feature test.
MICRO_KWARGS = dict(MICRO_ARCH, num_classes=MICRO_CONFIG['num_classes'])


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def micro_kwargs():
    return dict(MICRO_KWARGS)


def make_micro(**kwargs):
    """A micro PerViT (the parity fixture's architecture) with the given overrides."""
    from timm_pervit import PerViT
    return PerViT(**dict(MICRO_KWARGS, **kwargs))


def perturbed_micro(scale: float = 0.1, parts: str = 'pos_attn', **kwargs):
    """A micro PerViT with its position parameters (``parts='pos_attn'``) or its whole state (``parts='all'``) moved
    off the initial values by ``scale`` x N(0, 1), so that no value or gradient is special by symmetry."""
    model = make_micro(**kwargs)
    tensors = model.pos_attn.parameters() if parts == 'pos_attn' else model.state_dict().values()
    with torch.no_grad():
        for t in tensors:
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * scale)
    return model


# ---- the position engine through its public API -------------------------------------------------------------------
def builds(model) -> int:
    """Blocks whose position attention was computed since creation or the last ``clear_cache()`` (eager calls)."""
    return model.pos_attn.cache_info()['builds']


def fresh_eval(model, x: torch.Tensor) -> torch.Tensor:
    """The ground truth of an inference: an independent copy in eval mode, its position attention recomputed from
    the current weights (a copy starts with an empty cache)."""
    ref = copy.deepcopy(model).eval()
    ref.pos_attn.clear_cache()
    with torch.no_grad():
        return ref(x)


def fresh_phi(model, h: int, w: int) -> torch.Tensor:
    """log(phi_p) of every block recomputed from the current weights (no cache involved), stacked."""
    with torch.no_grad():
        return torch.stack(model.pos_attn.compute(h, w))


def served_phi(model, h: int, w: int) -> torch.Tensor:
    """log(phi_p) of every block as the model uses it at inference (through the cache), stacked."""
    with torch.no_grad():
        return torch.stack(model.pos_attn(h, w))


class GraphRecorder:
    """A ``torch.compile`` backend that records the FX graphs dynamo hands over and runs them as they are."""

    def __init__(self):
        self.graphs: List[Any] = []

    def __call__(self, gm, example_inputs) -> Callable:
        self.graphs.append(gm)
        return gm


# ---- files, optional dependencies, hostile pickles -----------------------------------------------------------------
def is_png(path) -> bool:
    """Whether the file starts with the PNG signature."""
    with open(path, 'rb') as f:
        return f.read(8) == b'\x89PNG\r\n\x1a\n'


def require(module: str, reason: str) -> Any:
    """Import an optional dependency; skip only when it is not installed (a broken install fails)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(reason)
    return importlib.import_module(module)


def cpu_half_conv(dtype: torch.dtype = torch.float16) -> bool:
    """Whether this torch has convolutions in ``dtype`` on the CPU (torch 2.1 has no float16 ones)."""
    try:
        torch.nn.functional.conv2d(torch.zeros(1, 1, 3, 3, dtype=dtype), torch.zeros(1, 1, 1, 1, dtype=dtype))
        return True
    except RuntimeError:
        return False


class PicklePayload:
    """An object whose unpickling runs code that writes ``marker``: what a weights-only load must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f'open({str(self.marker)!r}, "w").write("owned")',)


# ---- pretrained weights / loopback hub (tests/tools/test_convert.py, tests/loading/test_hub.py) ---------------------
class PervitOfficialCheckpoint:
    """A fake official pervit_tiny release: random (perturbed) weights in the official key layout, saved like the
    official training checkpoints ({'model', 'optimizer', 'epoch', 'model_ema', 'args': argparse.Namespace})."""

    def __init__(self, path, source_state_dict, official_state_dict):
        self.path = path
        self.source_state_dict = source_state_dict  # timm layout, what the converted weights must equal
        self.official_state_dict = official_state_dict


@pytest.fixture(scope='session')
def pervit_tiny_official(tmp_path_factory):
    import argparse
    import timm
    from timm_pervit import timm_to_official
    gen = torch.Generator().manual_seed(1234)
    model = timm.create_model('pervit_tiny')
    with torch.no_grad():
        for t in model.state_dict().values():  # move every parameter and BN buffer off its initial value
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen) * 0.02)
    source = {k: v.clone() for k, v in model.state_dict().items()}
    official = timm_to_official(source)
    path = tmp_path_factory.mktemp('official') / 'pervit_tiny_official.pth'
    torch.save({
        'model': official,
        'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-5, 'params': [0, 1]}]},
        'lr_scheduler': {'last_epoch': 299},
        'epoch': 299,
        'model_ema': None,
        'args': argparse.Namespace(model='pervit_tiny', lr=1e-3, batch_size=128, epochs=300),
    }, path)
    return PervitOfficialCheckpoint(path, source, official)


@pytest.fixture(scope='session')
def pervit_hub_root(tmp_path_factory, pervit_tiny_official):
    """A hub folder tree `<root>/timm-pervit/pervit_tiny.in1k/` written by the converter (verified).

    Returns (root, ConversionResult)."""
    from timm_pervit import HF_HUB_NAMESPACE
    from timm_pervit.tools.convert import convert_checkpoint
    root = tmp_path_factory.mktemp('hub')
    result = convert_checkpoint(
        pervit_tiny_official.path, root / HF_HUB_NAMESPACE / 'pervit_tiny.in1k', verify=True)
    return root, result


@pytest.fixture
def pervit_loopback_hub(pervit_hub_root):
    """A running loopback hub (tests/helpers/hub_server.py) serving the converted pervit_tiny repo."""
    from tests.helpers.hub_server import LoopbackHub
    with LoopbackHub(pervit_hub_root[0]) as hub:
        yield hub


@pytest.fixture
def pervit_hf_env(monkeypatch, tmp_path):
    """Point huggingface_hub at a loopback endpoint with a fresh cache, in this process and for subprocesses.

    huggingface_hub reads HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE / HF_HOME once at import, so the module
    constants are patched as well as the environment, and so are the copies that modules of huggingface_hub < 0.25
    took with ``from .constants import ENDPOINT, ...`` (file_download, hf_api, ...). Call the returned function with
    the endpoint URL (and offline=True for HF_HUB_OFFLINE=1); it returns the cache directory.
    """
    import sys

    from huggingface_hub import constants

    home = tmp_path / 'hf_home'
    cache = tmp_path / 'hf_cache'

    def point(endpoint: str, offline: bool = False):
        for k, v in dict(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(cache), HF_HOME=str(home),
                         HF_HUB_OFFLINE='1' if offline else '0', NO_PROXY='127.0.0.1,localhost',
                         no_proxy='127.0.0.1,localhost').items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv('HF_TOKEN', raising=False)
        values = dict(
            ENDPOINT=endpoint,
            HUGGINGFACE_CO_URL_TEMPLATE=endpoint + '/{repo_id}/resolve/{revision}/{filename}',
            HF_HUB_CACHE=str(cache),
            HF_HUB_OFFLINE=offline,
            HF_HOME=str(home),
            HF_TOKEN_PATH=str(home / 'token'),
        )
        if hasattr(constants, 'AGENT_HARNESSES_PATH'):  # huggingface_hub >= 1.19 only; never create it on older ones
            values['AGENT_HARNESSES_PATH'] = str(home / '.agent_harnesses.json')
        for name, value in values.items():
            monkeypatch.setattr(constants, name, value)
        for mod_name, module in list(sys.modules.items()):
            if mod_name.startswith('huggingface_hub.') and module is not None and module is not constants:
                for name, value in values.items():
                    if hasattr(module, name):
                        monkeypatch.setattr(module, name, value)
        return cache

    return point
