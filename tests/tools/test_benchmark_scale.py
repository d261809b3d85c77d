"""Tests of the benchmark's ``--scale`` mode: every (candidate, size) measured in its own process, one table, JSON
rows and a log-log plot; points a candidate cannot run are n/a with the reason, not a crash.

No timing assertions beyond positivity and the ratios being the ratios of the reported times.
"""
import json
import subprocess
import sys

import pytest
import timm

from timm_pervit.tools import benchmark

from tests.conftest import MICRO_KWARGS as MICRO

MICRO_JSON = json.dumps(MICRO)
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow
def test_scale_end_to_end(tmp_path):
    """Two sizes, PerViT, the explicit formula, a dynamic-size ViT and a fixed-size ConViT, inference and training:
    one row per (size, candidate) with complete figures; the fixed-size peer and an explicit-formula training step
    over the memory bound are n/a with their reasons."""
    out, plot = tmp_path / 'scale.json', tmp_path / 'scale.png'
    model = timm.create_model('pervit_tiny', **MICRO)
    # a memory bound between the explicit formula's estimated training step at 32px and at 64px: 64px training is
    # skipped, everything else (64px inference included) runs
    need = {s: benchmark.official_formula_bytes(model, s, 2, train=True) / 2 ** 20 for s in (32, 64)}
    limit = (need[32] + need[64]) / 2
    assert need[32] < limit < need[64] and benchmark.official_formula_bytes(model, 64, 1, train=False) / 2 ** 20 < limit
    peers = ['deit_tiny_patch16_224', 'convit_tiny']
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_pervit', 'benchmark', '--model', 'pervit_tiny', '--model-kwargs', MICRO_JSON,
         '--scale', '32,64', '--peers', ','.join(peers), '--iters', '1', '--warmup', '0', '--threads', '1',
         '--scale-train', '--scale-mem-limit', repr(limit), '--json', str(out), '--scale-plot', str(plot)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(out.read_text())
    assert payload['meta']['threads'] == 1 and payload['meta']['gemm_fp32_gflops'] > 0
    rows = payload['rows']
    names = ['pervit_tiny', 'reference', *peers]
    assert [(r['img_size'], r['candidate']) for r in rows] == [(s, c) for s in (32, 64) for c in names]
    by_key = {(r['img_size'], r['candidate']): r for r in rows}
    for size in (32, 64):
        ours = by_key[(size, 'pervit_tiny')]
        for name in names[:3]:
            r = by_key[(size, name)]
            assert r['tokens'] == (size // 16) ** 2 and not r['na']
            assert r['first_s'] > 0 and r['steady_s'] > 0 and r['peak_mb'] > 0 and r['step_mb'] is not None
            assert len(r['times_s']) == 1 and r['steady_s'] == r['times_s'][0]
            if name != 'pervit_tiny':
                # PerViT's figure over the candidate's, at the same size
                assert r['ratio'] == pytest.approx(ours['steady_s'] / r['steady_s'], rel=1e-9)
                assert r['mem_ratio'] == pytest.approx(ours['peak_mb'] / r['peak_mb'], rel=1e-9)
            if (size, name) == (64, 'reference'):
                assert 'estimate' in r['train_na'] and '--scale-mem-limit' in r['train_na']
                assert r['train_s'] is None and r['train_ratio'] is None
            else:
                assert not r['train_na'] and r['train_s'] > 0 and r['train_peak_mb'] > 0
                if name != 'pervit_tiny':
                    assert r['train_ratio'] == pytest.approx(ours['train_s'] / r['train_s'], rel=1e-9)
        # the explicit formula computes PerViT's function: same weights and input in another process, same logits
        assert by_key[(size, 'reference')]['rel_err'] < 1e-4
        assert ours['build_s'] > 0 and ours['train_build_s'] > 0 and ours['build_gflop'] > 0
        assert ours['build_gflops'] == pytest.approx(ours['build_gflop'] / ours['build_s'], rel=1e-9)
        assert ours['build_gemm_pct'] == pytest.approx(
            100 * ours['build_gflops'] / payload['meta']['gemm_fp32_gflops'], rel=1e-9)
        assert ours['ratio'] is None  # no ratio against itself
        fixed = by_key[(size, 'convit_tiny')]
        assert "doesn't match model (224)" in fixed['na'] and 'dynamic_img_size' in fixed['na']
        assert fixed['train_na'] and fixed['steady_s'] is None and fixed['ratio'] is None
    assert by_key[(64, 'pervit_tiny')]['build_gflop'] > by_key[(32, 'pervit_tiny')]['build_gflop']
    # the table: one line per row, n/a cells for the fixed-size peer with its reason
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('| 32 |') or ln.startswith('| 64 |')]
    assert [ln.split(' | ')[2] for ln in lines] == names * 2
    convit = next(ln for ln in lines if ln.startswith('| 64 | 16 | convit_tiny |'))
    assert '| n/a | n/a |' in convit and "n/a: AssertionError: Input height (64) doesn't match" in convit
    # the plot is a real PNG image
    data = plot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    import matplotlib.image
    img = matplotlib.image.imread(str(plot))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400


def test_scale_plot_names_the_extra_without_matplotlib(tmp_path, monkeypatch, capsys):
    """Without matplotlib, --scale-plot stops before measuring anything, naming the extra to install."""
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # what an environment without it raises: ImportError
    rc = benchmark.main(['--model-kwargs', MICRO_JSON, '--scale', '32', '--scale-plot', str(tmp_path / 'p.png'),
                         '--no-roofline'])
    assert rc == 2
    assert 'pip install timm-pervit[viz]' in capsys.readouterr().err
    assert not (tmp_path / 'p.png').exists()


@pytest.mark.parametrize('value', ['big', '224,-1', ','])
def test_scale_sizes_must_be_positive_integers(value, capsys):
    assert benchmark.main(['--model-kwargs', MICRO_JSON, '--scale', value]) == 2
    assert '--scale takes positive input sizes' in capsys.readouterr().err


def test_scale_options_in_the_help(capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(['--help'])
    assert exc.value.code == 0
    help_text = ' '.join(capsys.readouterr().out.split())  # argparse wraps lines
    for option in ('--scale ', '--scale-train', '--scale-plot', '--scale-mem-limit', '--scale-timeout'):
        assert option in help_text
    assert '80% of the memory free' in help_text
