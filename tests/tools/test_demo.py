"""The offline demo in a reduced mode (micro PerViT, 32 px, two epochs): files, reload identity, learning, errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from timm_pervit._compat import create_model_from_folder
from timm_pervit.tools.demo import (
    NUM_CLASSES, choose_threads, evaluate, family_table, load_digits_split, main, run_demo, train)

from tests.conftest import MICRO_ARCH
from tests.conftest import REPO
from tests.conftest import is_png
from tests.conftest import make_micro


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo')
    threads = torch.get_num_threads()
    try:  # threads=None: the demo picks its thread count itself
        summary = run_demo(
            output_dir=str(out), model_kwargs=MICRO_ARCH, img_size=32, epochs=2, table=False, progress=False,
            log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    return out, summary


def test_digits_split():
    x_train, y_train, x_test, y_test, raw = load_digits_split(img_size=40, seed=0)
    assert x_train.shape == (1437, 1, 40, 40) and x_test.shape == (360, 1, 40, 40)
    assert raw.shape == (360, 8, 8) and 0 <= raw.min() and raw.max() <= 1
    assert -1 - 1e-6 <= x_train.min() and x_train.max() <= 1 + 1e-6
    # stratified 20%: every digit keeps (about) its share in the held-out split
    counts = torch.bincount(y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    again = load_digits_split(img_size=40, seed=0)
    assert torch.equal(again[3], y_test)


def test_demo_writes_every_file(demo_run):
    out, summary = demo_run
    files = summary['files']
    for key in ('predictions', 'position_attention', 'non_locality'):
        assert is_png(files[key]), key
        assert Path(files[key]).parent == out
    folder = Path(files['model'])
    assert (folder / 'config.json').is_file() and (folder / 'model.safetensors').is_file()
    cfg = json.loads((folder / 'config.json').read_text())
    assert cfg['architecture'] == 'pervit_tiny' and cfg['num_classes'] == 10
    assert cfg['model_args']['embed_dims'] == list(MICRO_ARCH['embed_dims'])
    assert cfg['pretrained_cfg']['input_size'] == [3, 32, 32]
    assert json.loads(Path(files['summary']).read_text())['accuracy'] == summary['accuracy']


@pytest.mark.slow
def test_family_table():
    rows = family_table(img_size=32, min_time=0.05)
    assert [r['variant'] for r in rows] == ['pervit_tiny', 'pervit_small', 'pervit_medium']
    params = [r['params'] for r in rows]
    gmacs = [r['gmacs'] for r in rows]
    assert params[0] == sum(p.numel() for p in timm.create_model('pervit_tiny').parameters())
    assert params == sorted(params) and gmacs == sorted(gmacs) and gmacs[0] > 0
    assert all(r['img_per_s'] > 0 for r in rows)
    assert rows[0]['tag'] == 'pervit_tiny.in1k' and rows[0]['paper_top1'] == 78.8


def test_demo_learns(demo_run):
    _, summary = demo_run
    hist = summary['train']
    assert hist['steps'] == 2 * 45
    assert hist['epoch_losses'][-1] < hist['epoch_losses'][0]
    assert sum(hist['last_step_losses']) < sum(hist['first_step_losses'])
    assert summary['accuracy'] > 0.3  # chance is 0.1
    # non-locality after training differs from the peripheral initialization
    assert summary['non_locality'] != summary['non_locality_init']


def test_reloaded_model_predicts_identically(demo_run):
    out, summary = demo_run
    folder = summary['files']['model']
    for how, r in summary['reload'].items():
        assert r['identical_predictions'] and r['accuracy'] == summary['accuracy'], how
    # independently of the demo's own check: timm's pretrained path gives the accuracy the demo reported
    model = create_model_from_folder(folder)
    _, _, x_test, y_test, _ = load_digits_split(img_size=32, seed=0)
    acc = (evaluate(model, x_test).argmax(-1) == y_test).float().mean().item()
    assert acc == summary['accuracy']
    assert (REPO / 'hubconf.py').is_file() and 'torch.hub (local repo)' in summary['reload']


def test_demo_from_checkpoint_folder(demo_run, tmp_path):
    _, summary = demo_run
    again = run_demo(
        output_dir=str(tmp_path), checkpoint=summary['files']['model'], img_size=32, threads=1, table=False,
        progress=False, log=lambda *a: None)
    assert again['accuracy'] == summary['accuracy']
    assert is_png(again['files']['position_attention'])


@pytest.mark.parametrize('budget,max_epochs,expected', [(1e-3, 9, 1), (1e6, 3, 3)])
def test_time_budget_sizes_the_schedule(budget, max_epochs, expected):
    x_train, y_train, x_test, y_test, _ = load_digits_split(img_size=32, seed=0)
    model = make_micro(num_classes=NUM_CLASSES)
    hist = train(model, x_train[:256], y_train[:256], x_test[:64], y_test[:64], epochs=None, time_budget=budget,
                 max_epochs=max_epochs, max_steps=2, progress=False, log=lambda *a: None)
    assert hist['epochs'] == expected and hist['steps'] == 2 and hist['stopped_early']


def test_train_with_mixup():
    """--mixup: timm's Mixup mixes the batch in place, which a 3-channel view of the 1-channel digits cannot take."""
    x_train, y_train, _, _, _ = load_digits_split(img_size=32, seed=0)
    model = make_micro(num_classes=NUM_CLASSES)
    hist = train(model, x_train[:64], y_train[:64], epochs=1, mixup=0.2, max_steps=2, progress=False,
                 log=lambda *a: None)
    assert hist['steps'] == 2 and all(math.isfinite(v) for v in hist['step_losses'])


def test_choose_threads_picks_the_faster():
    threads = torch.get_num_threads()
    model = make_micro(num_classes=NUM_CLASSES).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        # two candidates also where the tests run on one thread (conftest's setting per pytest-xdist worker)
        torch.set_num_threads(2)
        timings = choose_threads(model, 32, batch_size=4)
        assert set(timings) == {2, 1} and all(t > 0 for t in timings.values())
        assert torch.get_num_threads() == min(timings, key=timings.get)
    finally:
        torch.set_num_threads(threads)
    assert model.training  # mode restored, and no state changed (BatchNorm statistics included)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_demo_errors(tmp_path, capsys):
    assert main(['--model', 'pervit_giant', '--output-dir', str(tmp_path), '--no-table']) == 1
    assert 'unknown model' in capsys.readouterr().err
    assert main(['--checkpoint', str(tmp_path / 'missing'), '--output-dir', str(tmp_path), '--no-table']) == 1
    assert 'does not exist' in capsys.readouterr().err
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    assert main(['--output-dir', str(blocker / 'sub'), '--no-table']) == 1  # a path below a file
    assert 'not writable' in capsys.readouterr().err
    assert main(['--model-kwargs', '[1, 2]', '--output-dir', str(tmp_path), '--no-table']) == 1
    assert 'JSON object' in capsys.readouterr().err


@pytest.mark.slow
def test_demo_cli_subprocess(tmp_path):
    """The real command line, as the README runs it (reduced), its output sent to a log file as in CI or under nohup:
    plain progress lines, no progress-bar frames."""
    log = tmp_path / 'demo.log'
    with open(log, 'w') as f:
        proc = subprocess.run(
            [sys.executable, '-m', 'timm_pervit', 'demo', '--output-dir', str(tmp_path / 'out'), '--no-table',
             '--model-kwargs', json.dumps(MICRO_ARCH), '--img-size', '32', '--epochs', '1', '--max-steps', '5'],
            stdout=f, stderr=subprocess.STDOUT, text=True, timeout=300, cwd=str(tmp_path))
    text = log.read_text()
    assert proc.returncode == 0, text
    assert 'held-out top-1' in text and 'Output files' in text
    for name in ('predictions.png', 'position_attention.png', 'non_locality.png', 'summary.json'):
        assert (tmp_path / 'out' / name).is_file(), name
    assert '\r' not in text and '%|' not in text  # no bar frames, no bar
    steps = [ln for ln in text.splitlines() if ln.startswith('train: ')]
    # 5 steps: a line each (one per tenth, rounded up), in order, each with its loss, then the epoch line after them
    assert [ln.split(',')[0] for ln in steps] == [f'train: {n}/5 steps ({20 * n}%)' if n > 1 else
                                                  'train: 1/5 step (20%)' for n in range(1, 6)]
    assert all('; epoch 1, loss ' in ln for ln in steps)
    lines = text.splitlines()
    assert lines.index(steps[-1]) < next(i for i, ln in enumerate(lines) if ln.startswith('epoch 1/1: train loss'))
