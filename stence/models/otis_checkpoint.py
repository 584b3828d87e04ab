"""The OTIS checkpoint loader's former module: the loader now lives beside the encoder it builds, in
stence/models/otis.py (as EchoingECG's does in echoingecg.py), so the two no longer import each other. Imports
from here keep working."""

from stence.models.otis import interpolate_time_table, load_otis_checkpoint

__all__ = ["interpolate_time_table", "load_otis_checkpoint"]
