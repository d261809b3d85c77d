"""Build step of timm-pervit: install the zero-config registration hook next to the package.

All metadata lives in ``pyproject.toml``. This file only extends setuptools' ``build_py`` so that the top of
site-packages receives ``timm_pervit-autoload.pth`` and ``_timm_pervit_autoload.py`` (a copy of
``timm_pervit/_autoload.py``), see that module's docstring. It works for both kinds of installation:

* regular (``pip install .``, ``pip wheel .``): the files are written to ``build_lib``, the root of the wheel;
* editable (``pip install -e .``, PEP 660): setuptools runs the build steps with ``editable_mode`` set and points the
  ``install`` command's ``install_lib`` at the root of the editable wheel, so the files go there (a ``.pth`` only
  works at the top of site-packages, and a real copy of the hook module does not depend on the order in which
  ``site`` processes the ``.pth`` files of the editable finder and ours).
"""
import importlib.util
import os
from typing import List

from setuptools import setup
from setuptools.command.build_py import build_py

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_autoload():
    """Load ``timm_pervit/_autoload.py`` on its own (importing the package would import torch and timm)."""
    path = os.path.join(_HERE, 'timm_pervit', '_autoload.py')
    spec = importlib.util.spec_from_file_location('_timm_pervit_autoload_build', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


class BuildPyWithAutoload(build_py):
    """``build_py`` that also writes the start-up hook to the root of the (regular or editable) wheel."""

    def _hook_files(self, root: str) -> List[str]:
        autoload, _ = _load_autoload()
        return [os.path.join(root, autoload.PTH_NAME), os.path.join(root, autoload.HOOK_MODULE + '.py')]

    def _hook_root(self) -> str:
        if self.editable_mode:
            return self.get_finalized_command('install').install_lib
        return self.build_lib

    def run(self) -> None:
        super().run()
        autoload, source = _load_autoload()
        root = self._hook_root()
        os.makedirs(root, exist_ok=True)
        pth, module = self._hook_files(root)
        with open(pth, 'w', encoding='utf-8') as f:
            f.write(autoload.PTH_LINE)
        self.copy_file(source, module, preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> List[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:  # written straight into the editable wheel, not part of the editable mapping
            return outputs
        return outputs + self._hook_files(self.build_lib)


setup(cmdclass={'build_py': BuildPyWithAutoload})
