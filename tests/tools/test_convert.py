"""The converter: official checkpoint -> hub-ready folder (safe loading, variant inference, verification, model card,
CLI, clear errors)."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from timm_pervit import PERVIT_VARIANTS
from timm_pervit._compat import timm_loads_files_weights_only
from timm_pervit.tools.convert import convert_checkpoint, load_checkpoint, main, push_folder
from timm_pervit import timm_to_official
from timm_pervit.paper import PAPER_RESULTS
from timm_pervit.keys import official_to_timm

from tests.conftest import FIXTURES
from tests.conftest import PicklePayload


def test_timm_to_official_inverts_official_to_timm():
    official = load_file(os.path.join(FIXTURES, 'micro_official_state_dict.safetensors'))
    back = timm_to_official(official_to_timm(official))
    assert back.keys() == official.keys()
    for k, v in official.items():
        assert torch.equal(back[k], v), k


def test_converted_folder(pervit_hub_root, pervit_tiny_official):
    root, result = pervit_hub_root
    folder = result.output_dir
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert not [p for p in folder.parent.iterdir() if p.name.endswith('.partial')]  # temp folder gone

    # weights: exactly the source tensors, timm layout
    converted = load_file(str(folder / 'model.safetensors'))
    src = pervit_tiny_official.source_state_dict
    assert converted.keys() == src.keys()
    assert all(torch.equal(converted[k], src[k]) for k in src)

    # config.json in timm's format
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'pervit_tiny' and config['num_classes'] == 1000
    assert config['pretrained_cfg']['first_conv'] == 'stem.0.conv'
    assert config['pretrained_cfg']['license'] == 'apache-2.0'

    # summary figures
    model = timm.create_model('pervit_tiny')
    assert result.variant == 'pervit_tiny' and result.num_params == sum(p.numel() for p in model.parameters())
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert 1.6 < result.gmacs < 1.9
    line = result.summary()
    for part in ('variant=pervit_tiny', f'params={result.num_params:,}', 'max_logit_diff=', str(folder)):
        assert part in line

    # model card: hub metadata header + body
    card = (folder / 'README.md').read_text()
    assert card.startswith('---\n')
    meta = yaml.safe_load(card.split('---\n')[1])
    assert meta['library_name'] == 'timm' and meta['license'] == 'apache-2.0'
    assert 'imagenet-1k' in meta['datasets'] and 'timm' in meta['tags'] and meta['metrics'] == ['accuracy']
    top1 = meta['model-index'][0]['results'][0]['metrics'][0]
    assert top1['value'] == PAPER_RESULTS['pervit_tiny'][0] and 'top-1' in top1['name']
    assert f'{result.num_params:,}' in card and f'{result.gmacs:.3f}' in card
    assert "timm.create_model('hf-hub:timm-pervit/pervit_tiny.in1k', pretrained=True)" in card
    assert '@inproceedings{min2022peripheral' in card


def _malicious_checkpoint(tmp_path):
    """A .pth whose unpickling would write a marker file: (path, marker)."""
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'model': {'head.weight': torch.zeros(2, 2)}, 'args': PicklePayload(marker)}, evil)
    return evil, marker


def test_malicious_pickle_is_refused(tmp_path):
    evil, marker = _malicious_checkpoint(tmp_path)
    with pytest.raises(ValueError, match='Refused to load'):
        load_checkpoint(evil)
    assert main([str(evil), '-o', str(tmp_path / 'out'), '-q']) == 1
    # timm's own route (train.py --pretrained-path) refuses it too: timm itself where it loads weights_only, this
    # package's loader on the timm releases that would unpickle the file unrestricted
    refusal = 'weights_only=True blocked' if timm_loads_files_weights_only() else 'Refused to load'
    with pytest.raises((RuntimeError, ValueError), match=refusal):
        timm.create_model('pervit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))
    assert not marker.exists()
    assert not (tmp_path / 'out').exists()


def test_file_overlay_is_read_safely_where_timm_would_unpickle(tmp_path, monkeypatch, pervit_tiny_official):
    """On timm releases whose file loading is not weights_only, the package reads the file itself, safely."""
    import timm_pervit._compat
    monkeypatch.setattr(timm_pervit._compat, 'timm_loads_files_weights_only', lambda: False)
    evil, marker = _malicious_checkpoint(tmp_path)
    with pytest.raises(ValueError, match='Refused to load'):
        timm.create_model('pervit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))
    assert not marker.exists()
    # the official release (argparse.Namespace inside) still loads, converted, and the weights are not kept twice
    model = timm.create_model(
        'pervit_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(pervit_tiny_official.path)))
    for name, value in pervit_tiny_official.source_state_dict.items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)
    assert 'state_dict' not in model.pretrained_cfg


def test_checkpoint_of_another_variant_is_named(tmp_path, pervit_tiny_official):
    with pytest.raises(ValueError, match='looks like a pervit_tiny checkpoint') as info:
        convert_checkpoint(pervit_tiny_official.path, tmp_path / 'out', variant='pervit_small')
    assert 'blocks.0.attn.qkv.weight' in str(info.value) or 'Mismatch' in str(info.value)
    assert not (tmp_path / 'out').exists()


def test_unknown_architecture_cannot_be_inferred(tmp_path):
    micro = os.path.join(FIXTURES, 'micro_official_state_dict.safetensors')
    with pytest.raises(ValueError, match='matches none of') as info:
        convert_checkpoint(micro, tmp_path / 'out')
    assert all(v in str(info.value) for v in PERVIT_VARIANTS)
    assert main([micro, '--variant', 'pervit_tiny', '-o', str(tmp_path / 'out'), '-q']) == 1
    assert not (tmp_path / 'out').exists()


def test_non_empty_output_is_not_overwritten(tmp_path, pervit_tiny_official):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.txt').write_text('x')
    with pytest.raises(FileExistsError, match='--overwrite'):
        convert_checkpoint(pervit_tiny_official.path, out)
    assert (out / 'keep.txt').read_text() == 'x'


def test_push_without_token_is_a_clear_error(tmp_path, pervit_hf_env, pervit_hub_root, capsys):
    pervit_hf_env('http://127.0.0.1:9')  # no HF_TOKEN, empty HF_HOME: not logged in
    with pytest.raises(RuntimeError, match='hf auth login'):
        push_folder(pervit_hub_root[1].output_dir, 'timm-pervit/pervit_tiny.in1k')
    out = tmp_path / 'out'
    assert main([os.fspath(pervit_hub_root[1].output_dir / 'model.safetensors'), '-o', str(out),
                 '--push-to-hub', 'timm-pervit/pervit_tiny.in1k', '-q']) == 1
    assert 'HF_TOKEN' in capsys.readouterr().err
    assert not out.exists()  # fails before doing the work


@pytest.mark.slow
def test_cli_console_script_bare_state_dict(tmp_path, pervit_tiny_official):
    """`python -m timm_pervit convert` on a bare official state dict, variant inferred, verified."""
    bare = tmp_path / 'bare.pth'
    torch.save(pervit_tiny_official.official_state_dict, bare)
    out = tmp_path / 'pervit_tiny.in1k'
    proc = subprocess.run([sys.executable, '-m', 'timm_pervit', 'convert', str(bare), '-o', str(out), '--verify'],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith('variant=pervit_tiny params=7,591,000 ') and f'output={out}' in summary
    diff = float(summary.split('max_logit_diff=')[1].split()[0])
    assert diff < 1e-4
    assert 'Inferred variant pervit_tiny' in proc.stderr  # progress goes to the log
    converted = load_file(str(out / 'model.safetensors'))
    assert all(torch.equal(converted[k], v) for k, v in pervit_tiny_official.source_state_dict.items())
