"""The shared progress helper (timm_pervit.tools.progress): a bar on a terminal, plain periodic lines elsewhere, or
none.

The command lines that use it (demo, benchmark) are run into log files in tests/tools/test_demo.py and
tests/tools/test_benchmark.py."""
import argparse
import io
import sys

import pytest

from timm_pervit.tools.progress import Progress, add_progress_arguments, resolve_mode


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_resolve_mode():
    log_file, terminal = io.StringIO(), _Terminal()
    for auto in (True, None, 'auto'):
        assert resolve_mode(auto, log_file) == 'log'
        assert resolve_mode(auto, terminal) == 'bar'
    assert resolve_mode(False, terminal) == 'off'
    assert resolve_mode('log', terminal) == 'log' and resolve_mode('bar', log_file) == 'bar'
    assert resolve_mode('off', terminal) == 'off'
    with pytest.raises(ValueError, match='progress must be one of'):
        resolve_mode('fancy')


def test_log_mode_writes_periodic_plain_lines():
    lines = []
    with Progress(25, 'train', 'auto', log=lines.append, file=io.StringIO(), interval=None) as bar:
        assert bar.mode == 'log'
        for i in range(25):
            bar.update(loss=f'{2 - i / 25:.3f}')
        bar.write('epoch 1/1 done')
    # a line at every tenth (rounded up: every 3 steps), the line between them, and the final count at close
    assert [ln.split(',')[0] for ln in lines if ln.startswith('train:')] == [
        f'train: {n}/25 steps ({100 * n / 25:.0f}%)' for n in (3, 6, 9, 12, 15, 18, 21, 24, 25)]
    assert lines[-2] == 'epoch 1/1 done'
    assert lines[-1].endswith('; loss 1.040') and '\r' not in ''.join(lines)
    assert ' left' in lines[0] and ' left' not in lines[-1]


def test_log_mode_default_goes_to_the_stream_and_unknown_total():
    stream = io.StringIO()
    with Progress(None, 'warm-up', True, file=stream, every=2, interval=None) as bar:
        for _ in range(3):
            bar.update()
    assert [ln.split(',')[0] for ln in stream.getvalue().splitlines()] == ['warm-up: 2 steps', 'warm-up: 3 steps']


def test_off_writes_nothing_and_keeps_written_lines():
    stream, lines = io.StringIO(), []
    with Progress(10, 'train', False, log=lines.append, file=stream) as bar:
        for _ in range(10):
            bar.update()
        bar.write('kept')
    assert stream.getvalue() == '' and lines == ['kept']


def test_bar_mode_on_a_terminal():
    pytest.importorskip('tqdm', reason='tqdm is not installed: the bar mode falls back to plain lines')
    terminal, lines = _Terminal(), []
    with Progress(4, 'train', 'auto', log=lines.append, file=terminal) as bar:
        assert bar.mode == 'bar'
        for _ in range(4):
            bar.update(loss='1.000')
        bar.write('above the bar')
    assert '\r' in terminal.getvalue() and '4/4' in terminal.getvalue()  # tqdm redraws in place
    assert lines == ['above the bar']


def test_bar_mode_without_tqdm_falls_back_to_lines(monkeypatch):
    monkeypatch.setitem(sys.modules, 'tqdm.auto', None)  # import fails
    lines = []
    with Progress(2, 'train', 'bar', log=lines.append, file=_Terminal(), every=1) as bar:
        bar.update()
        bar.update()
    assert bar.mode == 'log' and [ln.split(',')[0] for ln in lines] == ['train: 1/2 step (50%)',
                                                                        'train: 2/2 steps (100%)']


def test_command_line_options():
    parser = argparse.ArgumentParser()
    add_progress_arguments(parser)
    assert parser.parse_args([]).progress == 'auto'
    assert parser.parse_args(['--no-progress']).progress == 'off'
    assert parser.parse_args(['--progress', 'log']).progress == 'log'
    with pytest.raises(SystemExit):
        parser.parse_args(['--progress', 'fancy'])


@pytest.mark.parametrize('args,disabled', [([], True), (['--no-progress'], True), (['--progress', 'bar'], False)])
def test_converter_hub_upload_bars_only_on_a_terminal(args, disabled, monkeypatch):
    """The converter has no bars of its own; off a terminal (here: pytest's captured stderr) it switches off
    huggingface_hub's upload bars for --push-to-hub."""
    import huggingface_hub.utils

    from timm_pervit.tools import convert
    calls = []
    monkeypatch.setattr(huggingface_hub.utils, 'disable_progress_bars', lambda: calls.append(1))

    def no_conversion(*a, **k):
        raise RuntimeError('stopped before converting')

    monkeypatch.setattr(convert, 'convert_checkpoint', no_conversion)
    assert convert.main(['missing.pth', '--push-to-hub', 'someone/repo', *args]) == 1
    assert calls == ([1] if disabled else [])
