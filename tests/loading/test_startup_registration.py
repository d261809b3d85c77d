"""Zero-config registration: ``import timm`` alone makes ``pervit_*`` available, in real fresh interpreters.

Every test runs a real subprocess of the installed package (``sys.executable``, cwd outside the repository so the
source tree cannot stand in for the installation). The slow tests build the package the way pip does (a regular
wheel, an editable install) into brand-new virtual environments and check the start-up hook lands in site-packages.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from timm_pervit import _autoload

from tests.conftest import REPO


def run_python(
        code: str,
        cwd: Path,
        env: Optional[Dict[str, str]] = None,
        python: str = sys.executable,
        timeout: float = 240,
) -> subprocess.CompletedProcess:
    """Run ``python -c code`` in a clean environment (no PYTHONPATH, no opt-out unless given)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', _autoload.ENV_OPT_OUT)}
    full_env.update(env or {})
    return subprocess.run(
        [python, '-c', code], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f'subprocess failed:\n{proc.stdout}\n{proc.stderr}'
    return json.loads(proc.stdout.strip().splitlines()[-1])


_STARTUP_MODULES = """
import sys
mods = sorted(sys.modules)
meta = [type(f).__name__ for f in sys.meta_path]
import json
print(json.dumps(dict(mods=mods, meta=meta)))
"""

_CREATE = """
import sys
before = dict(timm='timm' in sys.modules, torch='torch' in sys.modules, pervit='timm_pervit' in sys.modules)
import timm
model = timm.create_model('pervit_small', num_classes=7)
import json
print(json.dumps(dict(
    before=before, cls=type(model).__module__ + '.' + type(model).__name__,
    listed=timm.list_models('pervit*'), num_classes=model.num_classes,
    params=sum(p.numel() for p in model.parameters()),
    hook_left=[type(f).__name__ for f in sys.meta_path if 'Timm' in type(f).__name__],
    timm_loader=type(timm.__spec__.loader).__name__,
)))
"""


def _site_packages(python: str = sys.executable) -> List[Path]:
    out = subprocess.run(
        [python, '-c', 'import json, site; print(json.dumps(site.getsitepackages()))'],
        capture_output=True, text=True, check=True)
    return [Path(p) for p in json.loads(out.stdout)]


def test_hook_files_installed_in_site_packages():
    """The installation of sys.executable (editable in CI) put the .pth and an up-to-date hook copy at the top."""
    dirs = [d for d in _site_packages() if (d / _autoload.PTH_NAME).is_file()]
    assert dirs, f'{_autoload.PTH_NAME} is in none of {_site_packages()}: reinstall with `pip install -e .`'
    site_dir = dirs[0]
    assert (site_dir / _autoload.PTH_NAME).read_text() == _autoload.PTH_LINE
    installed = (site_dir / f'{_autoload.HOOK_MODULE}.py').read_text()
    assert installed == Path(_autoload.__file__).read_text(), 'hook copy is stale: reinstall the package'


def test_startup_imports_nothing_heavy(tmp_path):
    """At start-up the hook module runs (the .pth worked) but torch, timm, typing and logging are not imported."""
    res = last_json(run_python(_STARTUP_MODULES, tmp_path))
    assert _autoload.HOOK_MODULE in res['mods']
    assert '_TimmImportFinder' in res['meta']
    heavy = ('torch', 'timm', 'timm_pervit', 'numpy', 'typing', 'logging')
    heavy = [m for m in res['mods'] if m.split('.')[0] in heavy]
    assert heavy == []


def test_import_timm_alone_registers_pervit(tmp_path):
    """A fresh interpreter: `import timm; timm.create_model('pervit_small')` with no import of timm_pervit."""
    res = last_json(run_python(_CREATE, tmp_path))
    assert res['before'] == dict(timm=False, torch=False, pervit=False)
    assert res['cls'] == 'timm_pervit.pervit.PerViT'
    assert set(res['listed']) >= {'pervit_tiny', 'pervit_small', 'pervit_medium'}
    assert res['num_classes'] == 7
    assert res['hook_left'] == []  # one-shot: the finder removed itself
    assert res['timm_loader'] != '_RegisteringLoader'  # timm's module keeps its real loader


def test_opt_out_environment_variable(tmp_path):
    """TIMM_PERVIT_NO_AUTOLOAD=1: timm works without pervit; an explicit import still registers the models."""
    code = """
import sys, json
meta = [type(f).__name__ for f in sys.meta_path]
import timm
res = dict(meta=meta, listed=timm.list_models('pervit*'), imported='timm_pervit' in sys.modules)
try:
    timm.create_model('pervit_tiny')
    res['error'] = None
except RuntimeError as e:
    res['error'] = str(e)
import timm_pervit
res['after'] = type(timm.create_model('pervit_tiny', num_classes=2)).__name__
print(json.dumps(res))
"""
    res = last_json(run_python(code, tmp_path, env={_autoload.ENV_OPT_OUT: '1'}))
    assert '_TimmImportFinder' not in res['meta']
    assert res['listed'] == [] and not res['imported']
    assert 'pervit_tiny' in res['error']
    assert res['after'] == 'PerViT'


@pytest.mark.parametrize('value,disabled', [
    ('1', True), ('true', True), ('YES', True), (' on ', True), ('', False), ('0', False), ('no', False)])
def test_opt_out_values(monkeypatch, value, disabled):
    monkeypatch.setenv(_autoload.ENV_OPT_OUT, value)
    assert _autoload.is_disabled() is disabled


@pytest.mark.parametrize('order', ['timm_first', 'pervit_first', 'pervit_first_opt_out'])
def test_explicit_import_is_idempotent(tmp_path, order):
    """`import timm_pervit` before or after the automatic registration warns nothing and registers once."""
    imports = {
        'timm_first': 'import timm; import timm_pervit; import timm_pervit.pervit',
        'pervit_first': 'import timm_pervit; import timm',
        'pervit_first_opt_out': 'import timm_pervit; import timm',
    }[order]
    code = f"""
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    {imports}
from timm.models import _registry
print(json.dumps(dict(
    warnings=[str(w.message) for w in caught if 'pervit' in str(w.message).lower() or 'Overwrit' in str(w.message)],
    modules=sorted({{_registry._model_to_module[n] for n in timm.list_models('pervit*')}}),
)))
"""
    env = {_autoload.ENV_OPT_OUT: '1'} if order.endswith('opt_out') else None
    proc = run_python(code, tmp_path, env=env)
    res = last_json(proc)
    assert res['warnings'] == []
    assert res['modules'] == ['pervit']  # timm records the last component of the module name
    assert 'timm_pervit' not in proc.stderr


def test_broken_package_never_breaks_the_interpreter(tmp_path):
    """A timm_pervit that fails to import (shadowed by a broken copy): timm imports, works, and a warning says why."""
    sandbox = tmp_path / 'sandbox'
    (sandbox / 'timm_pervit').mkdir(parents=True)
    (sandbox / 'timm_pervit' / '__init__.py').write_text("raise RuntimeError('simulated broken installation')\n")
    code = """
import json, sys
import timm
model = timm.create_model('test_vit', num_classes=3)
print(json.dumps(dict(model=type(model).__name__, listed=timm.list_models('pervit*'),
                      pervit_loaded='timm_pervit' in sys.modules)))
"""
    proc = run_python(code, tmp_path, env={'PYTHONPATH': str(sandbox)})
    res = last_json(proc)
    assert res == dict(model='VisionTransformer', listed=[], pervit_loaded=False)
    assert 'simulated broken installation' in proc.stderr
    assert _autoload.ENV_OPT_OUT in proc.stderr  # the warning names the way out


_PROBE_THEN_IMPORT = """
import importlib, importlib.metadata, importlib.util, json, pkgutil, sys
def state():
    return dict(timm='timm' in sys.modules, pervit='timm_pervit' in sys.modules,
                hook=[type(f).__name__ for f in sys.meta_path if 'Timm' in type(f).__name__])
{probe}
probed = state()
{load}
print(json.dumps(dict(probed=probed, after=state(), listed=timm.list_models('pervit*'),
                      loader=type(timm.__spec__.loader).__name__)))
"""

# An availability probe is not an import: the spec it gets is never executed, and the later import looks timm up anew
_PROBES = {
    'find_spec': ("importlib.util.find_spec('timm')", 'import timm'),
    'find_spec_twice': ("importlib.util.find_spec('timm'); importlib.util.find_spec('timm')", 'import timm'),
    'find_spec_import_module': ("importlib.util.find_spec('timm')", "timm = importlib.import_module('timm')"),
    'pkgutil_find_loader': ("pkgutil.find_loader('timm')", 'import timm'),
    'metadata_version': ("importlib.metadata.version('timm')", 'import timm'),
    # looking up a submodule imports its parent for real: registration happens during the probe itself
    'find_spec_submodule': ("importlib.util.find_spec('timm.models')", 'import timm'),
    # the import-a-module-from-its-spec recipe executes the probe's own spec
    'probe_spec_executed': (
        "spec = importlib.util.find_spec('timm'); timm = importlib.util.module_from_spec(spec); "
        "sys.modules['timm'] = timm; spec.loader.exec_module(timm)", 'pass'),
}


@pytest.mark.parametrize('probe', list(_PROBES))
def test_import_probe_keeps_registration(tmp_path, probe):
    """Finding timm (availability checks) before importing it: the later import still registers PerViT, once."""
    probe_code, load_code = _PROBES[probe]
    if probe == 'pkgutil_find_loader' and not hasattr(__import__('pkgutil'), 'find_loader'):
        pytest.skip('pkgutil.find_loader was removed in this Python version')
    proc = run_python(_PROBE_THEN_IMPORT.format(probe=probe_code, load=load_code), tmp_path)
    res = last_json(proc)
    assert set(res['listed']) >= {'pervit_tiny', 'pervit_small', 'pervit_medium'}
    if probe in ('find_spec_submodule', 'probe_spec_executed'):
        assert res['probed']['timm']
    else:  # a probe costs nothing: timm not imported, the hook still waiting for the real import
        assert res['probed'] == dict(timm=False, pervit=False, hook=['_TimmImportFinder'])
    assert res['after'] == dict(timm=True, pervit=True, hook=[])  # registered, then the finder removed itself
    assert res['loader'] != '_RegisteringLoader'
    assert 'timm_pervit' not in proc.stderr


def test_transformers_then_timm_registers_pervit(tmp_path):
    """transformers probes timm (importlib.util.find_spec, importlib.metadata) on import: timm still gets PerViT."""
    if importlib.util.find_spec('transformers') is None:
        pytest.skip('transformers is not installed (needed to check its timm availability probe)')
    code = """
import json, sys
import transformers
from transformers.utils import is_timm_available
available, imported = is_timm_available(), 'timm' in sys.modules
import timm
print(json.dumps(dict(available=available, imported=imported, listed=timm.list_models('pervit*'))))
"""
    res = last_json(run_python(code, tmp_path))
    assert res['available'] and not res['imported']  # transformers did probe, without importing timm
    assert set(res['listed']) >= {'pervit_tiny', 'pervit_small', 'pervit_medium'}


@pytest.mark.parametrize('error', ['SystemExit(0)', "SystemExit('simulated exit')", 'KeyboardInterrupt()'])
def test_package_raising_base_exception(tmp_path, error):
    """A SystemExit from importing the package must not end the process importing timm; Ctrl-C still stops it."""
    sandbox = tmp_path / 'sandbox'
    (sandbox / 'timm_pervit').mkdir(parents=True)
    (sandbox / 'timm_pervit' / '__init__.py').write_text(f'raise {error}\n')
    code = """
import json, sys
try:
    import timm
except KeyboardInterrupt:
    print(json.dumps(dict(interrupted=True)))
    sys.exit(0)
print(json.dumps(dict(interrupted=False, listed=timm.list_models('pervit*'),
                      vit=type(timm.create_model('test_vit')).__name__)))
"""
    proc = run_python(code, tmp_path, env={'PYTHONPATH': str(sandbox)})
    res = last_json(proc)
    if error.startswith('KeyboardInterrupt'):
        assert res == dict(interrupted=True)
        return
    assert res == dict(interrupted=False, listed=[], vit='VisionTransformer')
    for part in ('SystemExit', 'reinstall timm-pervit', _autoload.ENV_OPT_OUT):  # the problem, then the fixes
        assert part in proc.stderr


def _bare_venv(path: Path) -> Tuple[str, Path]:
    """A new venv without pip or any package: (its python, its site-packages)."""
    venv.EnvBuilder(with_pip=False, symlinks=os.name != 'nt').create(path)
    python = str(path / ('Scripts' if os.name == 'nt' else 'bin') / 'python')
    return python, _site_packages(python)[0]


def test_pth_line_is_one_import_line():
    """site executes only lines starting with `import `, one line each."""
    assert _autoload.PTH_LINE.startswith('import ') and _autoload.PTH_LINE.count('\n') == 1
    assert _autoload.PTH_LINE.endswith('\n')


def test_pth_without_hook_module_is_silent(tmp_path):
    """A partial uninstall (the .pth left, the hook module gone): start-up prints nothing and works."""
    python, site_dir = _bare_venv(tmp_path / 'venv')
    (site_dir / _autoload.PTH_NAME).write_text(_autoload.PTH_LINE)
    proc = run_python('import sys; print(sys.flags.no_site)', tmp_path, python=python)
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, '0', '')


def test_pth_processed_twice_installs_one_finder(tmp_path):
    """The .pth run twice (venv start-up on Python 3.11, a lib64 -> lib symlink): one finder, no output."""
    python, site_dir = _bare_venv(tmp_path / 'venv')
    (site_dir / _autoload.PTH_NAME).write_text(_autoload.PTH_LINE)
    shutil.copy2(_autoload.__file__, site_dir / f'{_autoload.HOOK_MODULE}.py')
    alias = tmp_path / 'lib64'
    alias.symlink_to(site_dir, target_is_directory=True)
    code = f"""
import json, site, sys
meta = lambda: [type(f).__name__ for f in sys.meta_path if 'Timm' in type(f).__name__]
at_start = meta()
site.addsitedir({str(site_dir)!r}); site.addsitedir({str(alias)!r})  # what site does for lib and lib64
print(json.dumps(dict(at_start=at_start, after=meta())))
"""
    proc = run_python(code, tmp_path, python=python)
    assert proc.stderr == ''
    assert last_json(proc) == dict(at_start=['_TimmImportFinder'], after=['_TimmImportFinder'])


def test_install_in_process(monkeypatch):
    """install(): False when opted out (meta_path untouched); with timm already imported it registers at once."""
    import timm
    before = list(sys.meta_path)
    monkeypatch.setenv(_autoload.ENV_OPT_OUT, 'yes')
    assert _autoload.install() is False
    assert sys.meta_path == before
    monkeypatch.delenv(_autoload.ENV_OPT_OUT)
    assert _autoload.install() is True  # timm is in sys.modules here: nothing left to hook
    assert sys.meta_path == before
    assert 'pervit_medium' in timm.list_models('pervit*')


def _copy_project(dst: Path) -> Path:
    """The files a build needs, copied so the build never writes into the working tree."""
    dst.mkdir()
    for name in ('pyproject.toml', 'setup.py', 'README.md'):
        shutil.copy2(REPO / name, dst / name)
    shutil.copytree(REPO / 'timm_pervit', dst / 'timm_pervit', ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    return dst


def _fresh_venv(path: Path) -> str:
    """A new venv (no pip) that sees the current environment's packages (torch, timm, pip) but not timm_pervit."""
    venv.EnvBuilder(with_pip=False, symlinks=os.name != 'nt').create(path)
    python = str(path / ('Scripts' if os.name == 'nt' else 'bin') / 'python')
    own = _site_packages(python)[0]
    (own / '_parent_env.pth').write_text('\n'.join(str(p) for p in _site_packages()) + '\n')
    return python


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['wheel', 'editable'])
def test_fresh_install_ships_the_hook(tmp_path, mode):
    """Install the package the way pip does (regular wheel / editable) into a new venv: the hook works there."""
    project = _copy_project(tmp_path / 'project')
    python = _fresh_venv(tmp_path / 'venv')
    pip = [python, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index', '--no-build-isolation',
           '--ignore-installed', '--disable-pip-version-check']
    if mode == 'wheel':
        dist = tmp_path / 'dist'
        subprocess.run(
            [sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-index', '--no-build-isolation',
             '--disable-pip-version-check', '-w', str(dist), str(project)], check=True, capture_output=True)
        wheel = next(dist.glob('timm_pervit-*.whl'))
        names = zipfile.ZipFile(wheel).namelist()
        assert _autoload.PTH_NAME in names and f'{_autoload.HOOK_MODULE}.py' in names  # at the wheel's root
        variants = ('pervit_tiny', 'pervit_small', 'pervit_medium')
        assert all(f'timm_pervit/tools/recipes/{v}.yaml' in names for v in variants)
        subprocess.run(pip + [str(wheel)], check=True, capture_output=True)
    else:
        subprocess.run(pip + ['-e', str(project)], check=True, capture_output=True)
    site_dir = _site_packages(python)[0]
    assert (site_dir / _autoload.PTH_NAME).read_text() == _autoload.PTH_LINE
    assert (site_dir / f'{_autoload.HOOK_MODULE}.py').is_file()

    code = _CREATE + "import timm_pervit; print(json.dumps(dict(file=timm_pervit.__file__)))\n"
    proc = run_python(code, tmp_path, python=python)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    res, where = json.loads(lines[-2]), Path(json.loads(lines[-1])['file'])
    assert res['before'] == dict(timm=False, torch=False, pervit=False)
    assert res['cls'] == 'timm_pervit.pervit.PerViT'
    expected_root = site_dir if mode == 'wheel' else project
    assert where.resolve().is_relative_to(expected_root.resolve())
    # pip uninstall takes the hook away with the package (both files are in the wheel's RECORD)
    subprocess.run([python, '-m', 'pip', 'uninstall', '-y', '-q', 'timm-pervit'], check=True, capture_output=True)
    assert not (site_dir / _autoload.PTH_NAME).exists() and not (site_dir / f'{_autoload.HOOK_MODULE}.py').exists()
