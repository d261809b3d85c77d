"""The package layout: the runtime never loads ``timm_pervit.tools``, and every console script resolves.

``timm_pervit.tools`` holds what people run around the models (converter, benchmark, demo, plots, recipes); the
models, their checkpoint loading and the start-up registration must work without it, since ``import timm_pervit``
runs in every process that uses timm.
"""
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict

from tests.conftest import REPO

_RUNTIME_CHILD = '''
import json, sys
import timm_pervit, timm
model = timm.create_model('pervit_tiny')
loaded = sorted(m for m in sys.modules if m == 'timm_pervit.tools' or m.startswith('timm_pervit.tools.'))
print(json.dumps(dict(file=timm_pervit.__file__, model=type(model).__module__, loaded=loaded)))
'''


def _child_env() -> Dict[str, str]:
    """This checkout first on the child's path, so it imports the package under test."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get('PYTHONPATH')) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS='1')


def test_creating_a_model_loads_no_tooling():
    proc = subprocess.run(
        [sys.executable, '-c', _RUNTIME_CHILD], capture_output=True, text=True, timeout=240, env=_child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result['file']).resolve().is_relative_to(REPO / 'timm_pervit')  # the checkout, not another install
    assert result['model'] == 'timm_pervit.pervit'
    assert result['loaded'] == [], f'creating pervit_tiny imported {result["loaded"]}'


def test_count_gmacs_is_the_tools_function_loaded_on_first_use():
    import timm_pervit
    from timm_pervit.tools.flops import count_gmacs

    assert timm_pervit.count_gmacs is count_gmacs
    assert 'count_gmacs' in dir(timm_pervit)


def _console_scripts() -> Dict[str, str]:
    """``[project.scripts]`` of this checkout's pyproject.toml (installed metadata may describe another checkout)."""
    text = (REPO / 'pyproject.toml').read_text(encoding='utf-8')
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError:
            tomllib = None
    if tomllib is not None:
        return dict(tomllib.loads(text)['project']['scripts'])
    section = re.search(r'^\[project\.scripts\]\s*$(.*?)(?=^\[|\Z)', text, re.M | re.S)
    assert section is not None, 'pyproject.toml has no [project.scripts]'
    return dict(re.findall(r'^\s*([\w.-]+)\s*=\s*"([^"]+)"', section.group(1), re.M))


def test_every_console_script_resolves():
    import timm_pervit

    package_dir = Path(timm_pervit.__file__).resolve().parent
    scripts = _console_scripts()
    assert {'timm-pervit', 'pervit-convert', 'pervit-benchmark'} <= set(scripts)
    for name, target in scripts.items():
        module_name, _, attr = target.partition(':')
        assert attr, f'{name} = {target!r} names no function'
        module = importlib.import_module(module_name)
        # from this package, not found through another (e.g. editable) installation's finder
        where = Path(module.__file__).resolve()
        assert where.is_relative_to(package_dir), f'{name}: {module_name} is {where}'
        assert callable(getattr(module, attr, None)), f'{name} = {target!r}: {module_name} has no callable {attr}'
