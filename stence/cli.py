"""The `stence` command. Thin: every subcommand lives in `stence/commands/<name>.py`.

A command module exposes `add_parser(subparsers)`, which registers its parser and sets `func` to a
`run(args) -> int` callable. Modules are discovered, so adding a command touches no other file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

import stence.commands as commands_pkg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stence",
        description="StenCE platform: ECG-angiography contrastive pretraining for severe stenosis.",
        epilog="example: stence synth runs/raw && stence ingest runs/raw --out runs/cohort",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"stence.commands.{mod.name}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
