"""``python -m timm_pervit``: the dispatcher and ``--help`` of every registered subcommand, in real subprocesses, and
what the package and the dispatcher import at start-up."""
import importlib.util
import json
import os
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


# --- start-up cost: what gets imported ------------------------------------------------------------------------------
#: Modules that registering the models does not need: `import timm_pervit` runs in every process importing timm.
_NOT_AT_IMPORT = ('timm_pervit.hub', 'timm_pervit.tools.model_card', 'timm_pervit.tools.benchmark',
                  'timm_pervit.tools.demo', 'huggingface_hub.repocard')

_IMPORT_CHILD = f'''
import json, sys
import timm_pervit
loaded = [m for m in {_NOT_AT_IMPORT!r} if m in sys.modules]
registered = sys.modules['timm'].list_models('pervit*')  # by the import itself (the start-up hook is off)
error = timm_pervit.PretrainedWeightsError  # still importable from the package, on first use
print(json.dumps(dict(loaded=loaded, registered=registered, error=error.__module__ + '.' + error.__name__)))
'''


_RECORD_MODULES = """
import atexit, json, os, sys
atexit.register(lambda: open(os.environ['RECORD_MODULES_TO'], 'w').write(json.dumps(sorted(sys.modules))))
"""


def _imported_modules(tmp_path, *args: str):
    """Run `python *args` for real and return (process, names of all modules it imported by the time it exited).

    A sitecustomize (imported by `site` at start-up) records sys.modules when the interpreter exits."""
    hook = tmp_path / 'record'
    hook.mkdir()
    (hook / 'sitecustomize.py').write_text(_RECORD_MODULES)
    record = tmp_path / 'modules.json'
    env = dict(os.environ, PYTHONPATH=str(hook), RECORD_MODULES_TO=str(record))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=240, env=env)
    return proc, set(json.loads(record.read_text()))


def test_import_registers_without_loading_helpers():
    env = dict(os.environ, TIMM_PERVIT_NO_AUTOLOAD='1')
    proc = subprocess.run([sys.executable, '-c', _IMPORT_CHILD], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result['loaded'] == []
    assert result['registered'] == ['pervit_medium', 'pervit_small', 'pervit_tiny']
    assert result['error'] == 'timm_pervit.hub.PretrainedWeightsError'


@pytest.mark.parametrize('args', [('--help',), ('frobnicate',)])
def test_help_and_unknown_command_import_no_torch(args, tmp_path):
    proc, names = _imported_modules(tmp_path, '-m', 'timm_pervit', *args)
    assert proc.returncode == (0 if args == ('--help',) else 2), proc.stderr[-2000:]
    assert {'argparse', 'timm_pervit'} <= names  # the record is complete
    heavy = {'torch', 'timm', 'huggingface_hub', 'timm_pervit.pervit'} & names
    assert not heavy, f'`python -m timm_pervit {" ".join(args)}` imported {sorted(heavy)}'


def test_commands_run_with_the_models_registered(tmp_path):
    """The other side of the fast --help: before running a command, __main__ registers the models."""
    proc, names = _imported_modules(tmp_path, '-m', 'timm_pervit', 'recipe', '--help')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'timm_pervit.pervit' in names and 'timm' in names
