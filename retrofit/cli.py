"""The ``retrofit`` command line: ``retrofit --version``, ``retrofit info``, ``retrofit kb ...``, ...

Each command group lives in ``retrofit/commands/<name>.py`` and exposes ``register(subparsers)``;
the ``kb`` group's modules expose ``register_kb(kb_subparsers)``. Modules are imported only to build
the parser, and heavy dependencies only inside the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from retrofit._version import __version__

# top-level command modules, and modules that add subcommands to `retrofit kb`
_COMMANDS = ["info", "train", "predict", "demo"]
_KB_COMMANDS = ["kb", "kb_build"]


def _import_command(name: str):
    mod = f"retrofit.commands.{name}"
    try:
        return importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name == mod:  # that command group is not part of this build
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retrofit",
        description="Retrieval-augmented heads for existing image classifiers.",
        epilog="Run `retrofit COMMAND --help` for a command's options and an example.",
    )
    parser.add_argument("--version", action="version", version=f"retrofit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        mod = _import_command(name)
        if mod is not None:
            mod.register(sub)
    kb = sub.add_parser("kb", help="create, inspect and maintain knowledge bases",
                        description="Knowledge-base commands.")
    kb_sub = kb.add_subparsers(dest="kb_command", metavar="KB_COMMAND")
    kb.set_defaults(func=lambda args: kb.print_help() or 2)
    for name in _KB_COMMANDS:
        mod = _import_command(name)
        if mod is not None:
            mod.register_kb(kb_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
