"""The ``retrofit`` command line: ``retrofit --version``, ``retrofit info``, ``retrofit kb ...``, ...

Each command group lives in ``retrofit/commands/<name>.py`` and exposes ``register(subparsers)``;
the ``kb`` group's modules expose ``register_kb(kb_subparsers)``. Modules are imported only to build
the parser, and heavy dependencies only inside the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
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
        epilog="example:\n  retrofit kb build photos/ kb/\n"
               "  retrofit train --model darknet-tiny --data photos/ --kb kb/ --out runs/a\n\n"
               "Run `retrofit COMMAND --help` for a command's options and an example.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"retrofit {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        mod = _import_command(name)
        if mod is not None:
            mod.register(sub)
    kb = sub.add_parser("kb", help="create, inspect and maintain knowledge bases",
                        description="Knowledge-base commands.", formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="example:\n  retrofit kb build photos/ kb/photos --image-encoder darknet-tiny\n"
                               "  retrofit kb info kb/photos\n\n"
                               "Run `retrofit kb KB_COMMAND --help` for a command's options and an example.")
    kb_sub = kb.add_subparsers(dest="kb_command", metavar="KB_COMMAND")
    kb.set_defaults(func=lambda args: kb.print_help() or 2)
    for name in _KB_COMMANDS:
        mod = _import_command(name)
        if mod is not None:
            mod.register_kb(kb_sub)
    # -v / -vv also after the command (`retrofit kb info KB -v`); counted on top of any given before it
    for p in [*sub.choices.values(), *kb_sub.choices.values()]:
        p.add_argument("-v", "--verbose", action="count", dest="verbose_after", default=argparse.SUPPRESS,
                       help="more logging (-v info, -vv debug)")
    parser.set_defaults(_subparsers=(sub, kb_sub))
    return parser


def _chosen(args: argparse.Namespace) -> argparse.ArgumentParser | None:
    """The parser of the (sub)command ``args`` were parsed for."""
    sub, kb_sub = args._subparsers
    if getattr(args, "kb_command", None):
        return kb_sub.choices.get(args.kb_command)
    return sub.choices.get(args.command) if getattr(args, "command", None) else None


def main(argv: list[str] | None = None) -> int:
    # torch's and faiss's OpenMP runtimes spin against each other on a few cores: small torch ops next to a search
    # ran 10-100x slower (a CLI training's epochs at ~220 samples/s instead of ~2,000-3,000). Set here, before the
    # commands import torch; a value the user set is kept, and a process that already loaded torch is unaffected.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return _main(argv)
    except KeyboardInterrupt:  # also while the parser imports the commands (a Ctrl-C right after the start)
        print("interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # an unknown option: the command's own usage, not the top level's
        (_chosen(args) or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    verbose = args.verbose + getattr(args, "verbose_after", 0)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit: a closed pipe must land in the handler below
        return rc
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `retrofit ... --json | head`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what the shell reports for a process the pipe closed on


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
