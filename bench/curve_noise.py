"""How noisy is a sweep objective? Seed-to-seed spread of one configuration against the spread between
configurations, on a curve table (bench/record_curves.py).

For every metric column of the table, each run is summarised by its value at the last epoch. `seed_sd` pools
the standard deviation over training seeds within each configuration recorded with several seeds; `config_sd`
is the standard deviation across configurations of their first seed's value. An objective is worth optimising
when `noise_to_spread` (their ratio) is well below 1: then the differences a searcher ranks are not luck.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

NON_METRICS = {"seed", "epoch", "config_id"}


def noise_report(df: pd.DataFrame, params: list[str]) -> dict[str, dict[str, Any]]:
    metrics = [c for c in df.columns if c not in NON_METRICS and c not in params
               and pd.api.types.is_numeric_dtype(df[c])]  # fmt: skip
    last = df[df["epoch"] == df["epoch"].max()]
    out: dict[str, dict[str, Any]] = {}
    for m in metrics:
        within = [g[m].var(ddof=1) for _, g in last.groupby(params) if len(g) >= 2]
        first = last.sort_values("seed").groupby(params)[m].first()
        seed_sd = math.sqrt(float(np.mean(within))) if within else math.nan
        config_sd = float(first.std(ddof=1)) if len(first) >= 2 else math.nan
        out[m] = {"seed_sd": seed_sd, "config_sd": config_sd,
                  "noise_to_spread": seed_sd / config_sd if config_sd else math.nan,
                  "configs_with_seeds": len(within), "configs": int(len(first))}  # fmt: skip
    return dict(sorted(out.items(), key=lambda kv: (math.isnan(kv[1]["noise_to_spread"]),
                                                    kv[1]["noise_to_spread"])))
