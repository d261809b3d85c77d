"""Pretrained loading that fails: every error names the problem and the fix, only loading errors are translated, and
an unanswering hub cannot stall ``create_model(..., pretrained=True)``.

Local files go through what timm's train.py ``--pretrained-path`` does:
``timm.create_model('pervit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=...))``.
"""
import json
import os
import pickle
import random
import subprocess
import sys
import traceback

import pytest
import timm
import torch
from huggingface_hub import constants as hf_constants

from timm_pervit.tools.convert import main as convert_main
from timm_pervit.hub import PretrainedWeightsError, explain_pretrained_error, hub_timeout

from tests.conftest import MICRO_KWARGS
from tests.helpers.hub_server import SilentServer


def _load(path, **kwargs):
    return timm.create_model('pervit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)


def _load_micro(path):
    return _load(path, **MICRO_KWARGS)


def _rendered(error: BaseException) -> str:
    """What Python prints for the uncaught exception (with its chain)."""
    return ''.join(traceback.format_exception(type(error), error, error.__traceback__))


@pytest.fixture(scope='module')
def tiny_state_dict():
    return {k: v.clone() for k, v in timm.create_model('pervit_tiny').state_dict().items()}


def test_missing_file_names_path_and_fix(tmp_path):
    missing = tmp_path / 'nope' / 'pervit_tiny.pth'
    with pytest.raises(FileNotFoundError) as info:
        _load_micro(missing)
    msg = str(info.value)
    assert str(missing) in msg and 'does not exist' in msg and 'pretrained_cfg_overlay=dict(file=' in msg
    assert isinstance(info.value, PretrainedWeightsError) and info.value.reason == 'not_found'


def test_directory_instead_of_file(tmp_path):
    folder = tmp_path / 'pervit_tiny.in1k'
    folder.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        _load_micro(folder)
    msg = str(info.value)
    assert f'{folder} is a directory' in msg
    assert str(folder / 'model.safetensors') in msg and f"'local-dir:{folder}'" in msg


@pytest.mark.parametrize('content', ['list', 'tensor'])
def test_file_holding_no_state_dict(content, tmp_path):
    path = tmp_path / f'{content}.pth'
    torch.save([torch.zeros(3)] if content == 'list' else torch.zeros(3), path)
    with pytest.raises(ValueError) as info:
        _load_micro(path)
    msg = str(info.value)
    assert f'holds a {"list" if content == "list" else "Tensor"}, not a state dict' in msg and str(path) in msg
    assert isinstance(info.value, PretrainedWeightsError) and info.value.reason == 'invalid'


@pytest.mark.parametrize('seed', [0, 7, 17])  # three different failures of torch.load on random bytes
def test_random_bytes_are_corrupted_without_unsafe_advice(seed, tmp_path):
    path = tmp_path / 'random.pth'
    rng = random.Random(seed)
    path.write_bytes(bytes(rng.getrandbits(8) for _ in range(4096)))
    with pytest.raises(PretrainedWeightsError) as info:
        _load_micro(path)
    assert info.value.reason == 'corrupted' and str(path) in str(info.value)
    # loading random bytes as a pickle is never the fix: the advice must not show up, not even in the chain
    assert 'weights_only=False' not in _rendered(info.value)


def test_truncated_torch_file_is_corrupted(tmp_path):
    path = tmp_path / 'truncated.pth'
    torch.save(timm.create_model('pervit_tiny', **MICRO_KWARGS).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(PretrainedWeightsError) as info:
        _load_micro(path)
    assert info.value.reason == 'corrupted' and str(path) in str(info.value)


def test_wrong_shape_in_own_variant_gives_no_self_hint(tmp_path, tiny_state_dict):
    """A pervit_tiny checkpoint with one bad tensor must not say 'create pervit_tiny instead' to a pervit_tiny."""
    sd = dict(tiny_state_dict)
    sd['blocks.5.mlp.fc1.weight'] = torch.zeros(7, 7)
    path = tmp_path / 'bad_shape.pth'
    torch.save(sd, path)
    with pytest.raises(ValueError) as info:
        _load(path)
    msg = str(info.value)
    assert 'blocks.5.mlp.fc1.weight' in msg and 'does not fit' in msg
    assert 'looks like a pervit_tiny' not in msg


def test_non_finite_weights_are_refused_by_name(tmp_path):
    sd = timm.create_model('pervit_tiny', **MICRO_KWARGS).state_dict()
    sd['blocks.3.attn.qkv.weight'][0, 0] = float('nan')
    sd['pos_attn.blocks.2.norm2.bias'][1] = float('inf')
    path = tmp_path / 'diverged.pth'
    torch.save(sd, path)
    with pytest.raises(ValueError, match='NaN or Inf') as info:
        _load_micro(path)
    assert 'blocks.3.attn.qkv.weight' in str(info.value) and 'pos_attn.blocks.2.norm2.bias' in str(info.value)


def test_construction_errors_are_not_translated(tmp_path, tiny_state_dict):
    """Only timm's loading step is translated: a bad architecture argument surfaces as itself. (A readable file:
    on timm releases that would unpickle it, the file is read before the model is built.)"""
    path = tmp_path / 'tiny.pth'
    torch.save(tiny_state_dict, path)
    with pytest.raises(TypeError, match='bogus') as info:
        _load(path, bogus=1)
    assert not isinstance(info.value, PretrainedWeightsError)


def test_convert_output_is_an_existing_file(tmp_path, pervit_tiny_official, capsys):
    target = tmp_path / 'pervit_tiny.in1k'
    target.write_text('keep me')
    assert convert_main([str(pervit_tiny_official.path), '-o', str(target), '-q']) == 1
    err = capsys.readouterr().err
    assert f'{target} is an existing file' in err and 'Traceback' not in err
    assert target.read_text() == 'keep me'
    assert convert_main([str(pervit_tiny_official.path), '-o', str(target), '--overwrite', '-q']) == 1
    assert target.read_text() == 'keep me'


# --- hub ------------------------------------------------------------------------------------------------------------
def _offline_error(cause: BaseException) -> BaseException:
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # huggingface_hub < 0.25
        from huggingface_hub.utils import LocalEntryNotFoundError
    try:
        try:
            raise cause
        except Exception as e:
            raise LocalEntryNotFoundError('cannot find the requested files in the local cache') from e
    except LocalEntryNotFoundError as e:
        return e


@pytest.mark.parametrize('offline', [False, True])
def test_offline_message_names_the_actual_cause(offline, monkeypatch):
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', offline)
    error = explain_pretrained_error('pervit_tiny', _offline_error(ConnectionRefusedError(111, 'Connection refused')))
    msg = str(error)
    assert error.reason == 'offline' and 'no copy' in msg and 'timm-pervit/pervit_tiny.in1k' in msg
    if offline:
        assert 'HF_HUB_OFFLINE=1 is set' in msg
    else:
        assert 'could not be reached' in msg and 'Connection refused' in msg
        assert 'HF_HUB_OFFLINE' not in msg  # it is not set: unsetting it is no advice


_SILENT_CHILD = r'''
import json, time, timm
from timm_pervit.hub import PretrainedWeightsError
t0 = time.monotonic()
try:
    timm.create_model('pervit_tiny', pretrained=True)
    result = dict(loaded=True)
except PretrainedWeightsError as e:
    result = dict(loaded=False, reason=e.reason, message=str(e))
result['seconds'] = time.monotonic() - t0
print(json.dumps(result))
'''


def test_unanswering_hub_fails_in_bounded_time(tmp_path):
    """An endpoint that accepts connections and never replies (it used to hang for 10+ minutes)."""
    with SilentServer() as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'TIMM_PERVIT_HUB'))}
        env.update(HF_ENDPOINT=server.url, HF_HOME=str(tmp_path / 'home'), HF_HUB_CACHE=str(tmp_path / 'cache'),
                   HF_HUB_DISABLE_TELEMETRY='1', NO_PROXY='127.0.0.1,localhost', no_proxy='127.0.0.1,localhost',
                   TIMM_PERVIT_HUB_TIMEOUT='2')
        proc = subprocess.run([sys.executable, '-c', _SILENT_CHILD], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert server.connections >= 1
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result['loaded'] and result['reason'] == 'offline'
    assert 'did not answer within 2 s' in result['message'] and 'TIMM_PERVIT_HUB_TIMEOUT' in result['message']
    assert result['seconds'] < 60  # the budget is 2 s; before, huggingface_hub's retries ran for many minutes


def test_hub_timeout_setting(monkeypatch, caplog):
    monkeypatch.delenv('TIMM_PERVIT_HUB_TIMEOUT', raising=False)
    default = hub_timeout()
    assert 0 < default <= 120
    monkeypatch.setenv('TIMM_PERVIT_HUB_TIMEOUT', '7.5')
    assert hub_timeout() == 7.5
    monkeypatch.setenv('TIMM_PERVIT_HUB_TIMEOUT', '0')
    assert hub_timeout() == 0
    monkeypatch.setenv('TIMM_PERVIT_HUB_TIMEOUT', 'soon')
    assert hub_timeout() == default and 'soon' in caplog.text


# --- tensor dtypes --------------------------------------------------------------------------------------------------
def _save(state_dict, path):
    if path.suffix == '.safetensors':
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_integer_weights_are_refused_and_half_precision_loads(suffix, tmp_path):
    """An int64 tensor for a float parameter is refused by name (it used to load silently, cast to garbage), while
    float16 / bfloat16 files load as their float32 values and the int64 BatchNorm counters stay accepted."""
    sd = timm.create_model('pervit_tiny', **MICRO_KWARGS).state_dict()
    assert sd['stem.0.bn.num_batches_tracked'].dtype == torch.int64
    bad = dict(sd, **{'blocks.1.attn.qkv.weight': (sd['blocks.1.attn.qkv.weight'] * 100).to(torch.int64)})
    path = tmp_path / f'int64{suffix}'
    _save(bad, path)
    with pytest.raises(ValueError) as info:
        _load_micro(path)
    msg = str(info.value)
    assert ("PerViT checkpoint tensor 'blocks.1.attn.qkv.weight' is torch.int64 but the model expects a "
            "floating-point tensor (torch.float32)") in msg
    assert 'more' not in msg.split('.')[0] and 'pervit-convert' in msg
    for dtype in (torch.float16, torch.bfloat16):
        half = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
        path = tmp_path / f'{str(dtype)[6:]}{suffix}'
        _save(half, path)
        loaded = _load_micro(path).state_dict()
        for k, v in half.items():
            if k.startswith('head.'):
                continue  # 10 classes here, not the pretrained config's 1000: timm gives it a new head
            assert loaded[k].dtype == sd[k].dtype, k
            torch.testing.assert_close(loaded[k], v.to(sd[k].dtype), rtol=0, atol=0)


def test_converter_refuses_integer_weights_like_timm(tmp_path, pervit_tiny_official, capsys):
    """The converter gave torch's "Only Tensors of floating point ... can require gradients"; now it gives the
    message of timm's pretrained loading, word for word."""
    official = dict(pervit_tiny_official.official_state_dict)
    key = next(k for k, v in official.items() if v.is_floating_point() and v.dim() == 4)  # the stem's first conv
    official[key] = official[key].round().to(torch.int32)
    path = tmp_path / 'int32_official.pth'
    torch.save({'model': official, 'epoch': 299}, path)
    out = tmp_path / 'out'
    assert convert_main([str(path), '-o', str(out), '-q']) == 1
    err = capsys.readouterr().err
    assert ("PerViT checkpoint tensor 'stem.0.conv.weight' is torch.int32 but the model expects a floating-point "
            "tensor (torch.float32)") in err
    assert 'require gradients' not in err and 'Traceback' not in err and not out.exists()
    with pytest.raises(ValueError) as info:
        _load(path)
    assert f'pervit-convert: error: {info.value}' in err


# --- refused pickles ------------------------------------------------------------------------------------------------
class _RunsShell:
    """Unpickling it would run a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


_SYSTEM = f'{os.system.__module__}.{os.system.__name__}'  # how pickle names os.system: 'posix.system' on Linux


def _refused_pickle(tmp_path, form, state_dict):
    """A checkpoint holding ``state_dict`` and a shell command: (path, marker), in the legacy torch.save format or
    written by plain pickle.dump."""
    marker = tmp_path / 'pwned'
    checkpoint = {'model': state_dict, 'epoch': 3, 'args': _RunsShell(marker)}
    path = tmp_path / f'{form}.pth'
    if form == 'legacy':
        torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, 'wb') as f:
            pickle.dump(checkpoint, f)
    return path, marker


def _assert_refusal(msg, path):
    assert 'not allowed to be unpickled' in msg and _SYSTEM in msg and str(path) in msg
    assert 'Nothing in the file was executed' in msg and 'pervit-convert state_dict.pth' in msg
    assert 'corrupted' not in msg and 'download it again' not in msg


@pytest.mark.parametrize('timm_weights_only', [True, False], ids=['timm_loads', 'package_loads'])
@pytest.mark.parametrize('form', ['legacy', 'raw_pickle'])
def test_refused_pickle_is_named_not_corrupted(form, timm_weights_only, tmp_path, monkeypatch):
    """A legacy (non-zip) or raw-pickle file with a disallowed global was called corrupted; ``package_loads``: the
    timm releases where this package reads the file in timm's place."""
    import timm_pervit._compat
    if timm_weights_only and not timm_pervit._compat.timm_loads_files_weights_only():
        pytest.skip(f'timm {timm.__version__} reads weight files without weights_only, so this package reads them in '
                    f"its place (the package_loads case); pretending otherwise would let timm unpickle the file")
    monkeypatch.setattr(timm_pervit._compat, 'timm_loads_files_weights_only', lambda: timm_weights_only)
    path, marker = _refused_pickle(tmp_path, form, timm.create_model('pervit_tiny', **MICRO_KWARGS).state_dict())
    with pytest.raises(ValueError) as info:
        _load_micro(path)
    assert isinstance(info.value, PretrainedWeightsError) and info.value.reason == 'unsafe'
    _assert_refusal(str(info.value), path)
    assert not marker.exists()


@pytest.mark.parametrize('form', ['legacy', 'raw_pickle'])
def test_converter_names_refused_pickle_globals(form, tmp_path, capsys):
    path, marker = _refused_pickle(tmp_path, form, {'head.weight': torch.zeros(2, 2)})
    assert convert_main([str(path), '-o', str(tmp_path / 'out'), '-q']) == 1
    err = capsys.readouterr().err
    _assert_refusal(err, path)
    assert err.startswith(f'pervit-convert: error: Refused to load {path}: ') and 'Traceback' not in err
    if form == 'raw_pickle':  # torch.load cannot read a raw pickle at all: the advice says how to open it
        assert f'pickle.load(open({str(path)!r}, "rb"))' in err
    assert not marker.exists() and not (tmp_path / 'out').exists()


def _random_bytes(path):
    path.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(4096)))


def _truncated_legacy(path):
    torch.save({'w': torch.zeros(64, 64)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:600])


def test_converter_calls_damaged_files_corrupted(tmp_path, capsys):
    """Damaged files are not refusals: on random bytes the converter said "Refused to load ... could run arbitrary
    code". (The truncated legacy file guards the other side: a scan that finds no globals must not call it refused.)"""
    for damage in (_random_bytes, _truncated_legacy):
        path = tmp_path / f'{damage.__name__[1:]}.pth'
        damage(path)
        assert convert_main([str(path), '-o', str(tmp_path / 'out'), '-q']) == 1
        err = capsys.readouterr().err
        assert f'Cannot read {path} as a torch checkpoint' in err and 'truncated or corrupted' in err, err
        assert 'Refused' not in err and 'weights_only=False' not in err
        with pytest.raises(PretrainedWeightsError) as info:  # timm's pretrained loading agrees
            _load_micro(path)
        assert info.value.reason == 'corrupted'
