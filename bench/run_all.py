"""`make bench`: every benchmark in bench/, each printing its ratios and writing bench/results/<name>.json."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("bench.bench_data", "bench.bench_train", "bench.bench_encoder", "bench.bench_search",
              "bench.bench_formats", "bench.bench_replay")


def main() -> int:
    failed = []
    for mod in BENCHMARKS:
        print(f"==> {mod}", flush=True)
        if subprocess.call([sys.executable, "-m", mod]) != 0:
            failed.append(mod)
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
