"""``python -m timm_pervit``: the dispatcher and ``--help`` of every registered subcommand, in real subprocesses."""
import importlib.util
import subprocess
import sys

import pytest

from timm_pervit.__main__ import COMMANDS, main


def _run(*args):
    return subprocess.run([sys.executable, '-m', 'timm_pervit', *args], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_every_command():
    proc = _run('--help')
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        assert name in proc.stdout


def test_no_command_is_an_error(capsys):
    assert main([]) == 2
    assert 'usage' in capsys.readouterr().out


def test_unknown_command_is_an_error():
    proc = _run('frobnicate')
    assert proc.returncode != 0
    assert 'invalid choice' in proc.stderr


@pytest.mark.parametrize('command', sorted(COMMANDS))
def test_subcommand_help(command):
    module = COMMANDS[command][0]
    # a registered command must have its module: a missing one fails here instead of being skipped
    assert importlib.util.find_spec(module) is not None, f'{command}: module {module} does not exist'
    proc = _run(command, '--help')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.lstrip().startswith('usage:')
    assert f'timm_pervit {command}' in proc.stdout or command in proc.stdout.splitlines()[0]
