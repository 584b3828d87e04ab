"""Argument helpers shared by the subcommands: --config/--set, run shortcuts, config resolution."""

from __future__ import annotations

import argparse

from stence.config import Config, ConfigError, absolute_paths, apply_overrides, load_config
from stence.train.driver import parse_worker_resources

RAW = argparse.RawDescriptionHelpFormatter
RUN_FLAGS = (("workers", "train.workers"), ("gpus", "train.gpus"), ("name", "train.name"))


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


def add_run_args(p: argparse.ArgumentParser) -> None:
    """--workers / --gpus / --name shortcuts for train.* (they override --set)."""
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (0 = in-process local mode)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per worker")
    p.add_argument("--name", default=None, help="run name (the same name resumes the run)")


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults <- --config YAML <- --set overrides <- run shortcuts; every path field made absolute against
    the current directory, once, here (Ray workers and Tune trials run in other working directories)."""
    try:
        cfg = load_config(getattr(args, "config", None), list(getattr(args, "set", []) or []))
        extra = {key: getattr(args, flag) for flag, key in RUN_FLAGS if getattr(args, flag, None) is not None}
        cfg = absolute_paths(apply_overrides(cfg, extra))
        parse_worker_resources(cfg.train.worker_resources)  # a bad entry fails here, not in every trial
        return cfg
    except ConfigError as e:
        raise SystemExit(f"config error: {e}") from e
