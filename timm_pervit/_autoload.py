"""Zero-config registration: make ``pervit_*`` known to timm in every Python process that imports timm.

timm's own scripts (train.py, validate.py, benchmark.py) only ``import timm`` and call ``timm.create_model(name)``,
so the models must be registered without anyone importing ``timm_pervit``. The installation therefore ships two
files at the top of site-packages (both regular and editable installs, written by the build step in ``setup.py``):

* ``timm_pervit-autoload.pth``: one line, run by Python's ``site`` module at interpreter start-up, that imports
  ``_timm_pervit_autoload`` and calls its ``install()``; it does nothing, silently, when that module is gone (a
  partial uninstall), instead of printing a traceback at every start-up;
* ``_timm_pervit_autoload.py``: a copy of this module (stdlib only, so it can run before anything else).

``install()`` only adds a tiny finder to ``sys.meta_path``: nothing is imported at start-up (not torch, not timm,
not even ``logging``), so an interpreter that never uses timm pays only for reading this file. The finder answers
lookups of ``timm`` with timm's regular spec whose loader registers PerViT right after executing timm. Finding is
not importing: availability probes such as ``importlib.util.find_spec('timm')`` (transformers does this) also
reach the finder, so it stays in place through them and only the actual execution of timm imports
``timm_pervit`` (which registers the models); the finder then removes itself. ``import timm_pervit`` stays the
explicit way and is idempotent: it is a plain module import, so nothing is registered twice.

Failures never break the interpreter: anything raised by the hook (a broken or half-removed installation, an
incompatible timm, even a ``SystemExit`` from the package's import) is logged as a warning on the ``timm_pervit``
logger and ``import timm`` carries on without the PerViT models. Only ``KeyboardInterrupt`` goes through.

Opt out by setting the environment variable ``TIMM_PERVIT_NO_AUTOLOAD=1`` (also ``true``/``yes``/``on``) before
Python starts; ``import timm_pervit`` then registers the models explicitly.
"""
import os
import sys

TYPE_CHECKING = False  # `typing` is not imported at start-up: annotations below are strings
if TYPE_CHECKING:
    from typing import Any, Optional, Sequence

__all__ = ['ENV_OPT_OUT', 'TRIGGER', 'PACKAGE', 'PTH_NAME', 'PTH_LINE', 'HOOK_MODULE', 'install', 'is_disabled']

#: Environment variable that disables the automatic registration when set to 1/true/yes/on.
ENV_OPT_OUT = 'TIMM_PERVIT_NO_AUTOLOAD'

#: The module whose first import triggers the registration.
TRIGGER = 'timm'

#: The package imported to register the models.
PACKAGE = 'timm_pervit'

#: Name of the start-up file placed in site-packages.
PTH_NAME = 'timm_pervit-autoload.pth'

#: Name under which a copy of this module is placed at the top of site-packages.
HOOK_MODULE = '_timm_pervit_autoload'

#: The single line of the start-up file. ``site`` executes lines that start with ``import`` and prints a traceback
#: for any error, so the import of the hook module is guarded: a ``.pth`` left behind by a partial uninstall stays
#: silent. ``sys`` is already imported at that point; the ``exec`` is needed for a ``try`` on a single line. When
#: ``site`` processes the file twice (Python 3.11 venvs, ``lib64 -> lib`` symlinks), the second import comes from
#: ``sys.modules`` and ``install()`` is idempotent.
PTH_LINE = (
    f'import sys; exec("try:\\n import {HOOK_MODULE}\\nexcept ImportError:\\n pass\\n'
    f'else:\\n {HOOK_MODULE}.install()")\n')


def is_disabled() -> bool:
    """True when the user opted out of the automatic registration through ``TIMM_PERVIT_NO_AUTOLOAD``."""
    return os.environ.get(ENV_OPT_OUT, '').strip().lower() in ('1', 'true', 'yes', 'on')


def _warn(message: str) -> None:
    """Log a warning on the package logger (``logging`` is imported only on this rare path)."""
    try:
        import logging
        logging.getLogger(PACKAGE).warning(message, exc_info=True)
    except Exception:  # never let the report itself break the interpreter
        pass


def _register() -> None:
    """Import the package so that its ``@register_model`` functions run; log and continue on any failure."""
    if PACKAGE in sys.modules:  # explicitly imported already (it is importing timm right now), nothing to do
        return
    try:
        __import__(PACKAGE)
    except KeyboardInterrupt:  # the user asked to stop: that is not ours to swallow
        raise
    except BaseException as e:  # a SystemExit from a broken install must not end the process that imported timm
        _warn(
            f'{PACKAGE}: registering the PerViT models with timm at import failed ({type(e).__name__}: {e}); '
            f'timm works without them. Run `import {PACKAGE}` to see the error, reinstall timm-pervit to fix it, or '
            f'set {ENV_OPT_OUT}=1 to turn the automatic registration off.')


class _RegisteringLoader:
    """Wraps the real loader of ``timm``: executes the module, restores the real loader, then registers PerViT.

    Everything but ``exec_module`` is delegated, so a spec handed to an availability probe and never executed
    behaves like timm's own.
    """

    def __init__(self, loader: 'Any', finder: '_TimmImportFinder'):
        self._loader = loader
        self._finder = finder

    def __getattr__(self, name: str) -> 'Any':
        return getattr(self._loader, name)

    def create_module(self, spec: 'Any') -> 'Any':
        return self._loader.create_module(spec)

    def exec_module(self, module: 'Any') -> None:
        try:
            self._loader.exec_module(module)  # errors of timm itself propagate untouched (the finder stays for a retry)
        finally:
            try:
                module.__loader__ = self._loader
                if getattr(module, '__spec__', None) is not None:
                    module.__spec__.loader = self._loader
            except Exception:
                pass
        self._finder.register_once()


class _TimmImportFinder:
    """``sys.meta_path`` finder that wraps the loader of ``timm`` until PerViT is registered, then removes itself.

    It never removes itself on a mere lookup: ``importlib.util.find_spec('timm')`` goes through ``sys.meta_path``
    exactly like an import does, and a finder gone after such a probe would leave the later ``import timm`` without
    the models. Each lookup returns a fresh spec (the import system does not reuse a probe's spec), so whichever
    spec is finally executed carries the registering loader.
    """

    def __init__(self) -> None:
        # True while this finder looks up timm's real spec, which walks sys.meta_path again and reaches this finder:
        # it must answer None there. Finders are called under the global import lock, so one flag is enough.
        self._searching = False
        # True once the registration ran: a reference kept somewhere (a spec from a probe) must not register again
        self._done = False

    def find_spec(
            self, fullname: str, path: 'Optional[Sequence[str]]' = None, target: 'Any' = None) -> 'Any':
        if fullname != TRIGGER or self._searching or self._done:
            return None
        self._searching = True
        try:
            import importlib.util  # only now, on the first lookup of timm
            spec = importlib.util.find_spec(fullname)  # the regular lookup (editable-install finders, sys.path)
            if spec is None or spec.loader is None or not hasattr(spec.loader, 'exec_module'):
                return None  # let the import system report timm as missing, as usual
            spec.loader = _RegisteringLoader(spec.loader, self)
            return spec
        except Exception:
            _warn(f'{PACKAGE}: the automatic registration hook failed; importing timm without the PerViT models.')
            return None
        finally:
            self._searching = False

    def register_once(self) -> None:
        """Called once timm has been executed: register PerViT, then leave ``sys.meta_path`` for good."""
        if self._done:
            return
        self._done = True  # first, so that nothing below can reach the registration again
        try:
            _register()
        finally:
            self.uninstall()

    def uninstall(self) -> None:
        """Remove every instance of this finder from ``sys.meta_path``."""
        sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != type(self).__name__]


def install() -> bool:
    """Arrange for ``timm_pervit`` to be imported right after ``timm`` (called at start-up by the ``.pth`` file).

    Returns:
        True when the hook is in place (or no longer needed because timm is already imported and the models are
        registered now), False when disabled through ``TIMM_PERVIT_NO_AUTOLOAD`` or when it could not be installed.
        Never raises.
    """
    try:
        if is_disabled():
            return False
        if TRIGGER in sys.modules:  # timm is already there (installed late, e.g. from a running session)
            _register()
            return True
        if not any(type(f).__name__ == _TimmImportFinder.__name__ for f in sys.meta_path):
            sys.meta_path.insert(0, _TimmImportFinder())
        return True
    except Exception:
        _warn(f'{PACKAGE}: could not install the automatic registration hook.')
        return False
