"""``python -m timm_pervit <command>``: the package's command line.

Commands are implemented in their own modules, each exposing ``main(argv) -> int``, and imported only when used.
``--help`` and argument errors answer without importing torch or timm: run as ``python -m timm_pervit``, the package
skips registering the models at import (see ``timm_pervit._running_command_line``) and this module registers them
before it runs a command.
"""
import argparse
import importlib
import sys
from typing import List, Optional

#: command -> (module, one-line help)
COMMANDS = {
    'demo': ('timm_pervit.tools.demo', 'offline end-to-end demo: train pervit_tiny on real digits, save, reload, plot'),
    'visualize': ('timm_pervit.tools.visualize', 'plot the learned peripheral position attention of a model'),
    'benchmark': ('timm_pervit.tools.benchmark', 'speed/memory benchmark against the explicit official formula'),
    'convert': (
        'timm_pervit.tools.convert', 'convert an official PerViT checkpoint to a hub-ready folder (and publish)'),
    'recipe': ('timm_pervit.tools.recipes', "print the path of the paper's train.py recipe for a variant"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog='python -m timm_pervit',
        description='PerViT for timm. Run `python -m timm_pervit <command> --help` for the options of a command.',
    )
    parser.add_argument(
        'command', choices=sorted(COMMANDS), help='; '.join(f'{k}: {v[1]}' for k, v in COMMANDS.items()))
    if not argv or argv[0] in ('-h', '--help'):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    importlib.import_module('timm_pervit.pervit')  # registers the models with timm for the command
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == '__main__':
    sys.exit(main())
