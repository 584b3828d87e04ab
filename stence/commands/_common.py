"""Argument helpers shared by the subcommands: --config/--set and config resolution."""

from __future__ import annotations

import argparse

from stence.config import Config, ConfigError, load_config

RAW = argparse.RawDescriptionHelpFormatter


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="YAML config file (defaults are embedded)")
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        default=[],
        help="dotted overrides, e.g. --set optim.lr_ecg=3e-5 loss.w_sten=0.3",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    try:
        return load_config(getattr(args, "config", None), list(getattr(args, "set", []) or []))
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from e
