"""Subcommands of the `stence` CLI, one module each (see stence/cli.py)."""
