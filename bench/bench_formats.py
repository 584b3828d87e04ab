"""Read throughput per ECG export format, against WFDB on the same signals, in one run on one core.

The same synthetic records (same seed, same signals) are written as WFDB, GE MUSE XML, HL7 aECG XML and DICOM
ECG; each set is read with `read_ecg_file` (the reader ingest and predict use), repeatedly for at least
`--seconds`. Philips has no writer: the real SierraECG sample (12 x 5500, XLI-compressed) is read instead,
so its row is a different signal of about the same size. Reported: records/s on one core and the ratio to
WFDB measured in the same run.

Usage: python -m bench.bench_formats [--records 40] [--seconds 3] [--out bench/results/formats.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from bench.bench_data import _pin_one_core
from stence.data.ecg_formats import read_ecg_file
from stence.data.synth import SynthConfig, write_cohort

FORMATS = ("wfdb", "muse", "hl7", "dicom")
PHILIPS_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ecg_vendor" / "129DYPRG.XML"


def _records(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.suffix.lower() in (".hea", ".xml", ".dcm")]


def _rate(paths: list[Path], seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < len(paths):
        read_ecg_file(paths[n % len(paths)])
        n += 1
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--records", type=int, default=40, help="records per format (2 per synthetic patient)")
    p.add_argument("--seconds", type=float, default=3.0, help="reading time per format")
    p.add_argument("--out", default="bench/results/formats.json")
    args = p.parse_args(argv)
    _pin_one_core()
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            cfg = SynthConfig.preset("tiny", patients=max(1, args.records // 2), ecg_format=fmt, seed=0)
            write_cohort(Path(tmp) / fmt, cfg)
            rates[fmt] = _rate(_records(Path(tmp) / fmt / "ecg"), args.seconds)
    if PHILIPS_SAMPLE.is_file():
        rates["philips (real sample)"] = _rate([PHILIPS_SAMPLE], args.seconds)
    base = rates["wfdb"]
    result = {
        "benchmark": "formats",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores_used": 1},
        "records_per_s_per_core": {k: round(v, 1) for k, v in rates.items()},
        "ratio_to_wfdb": {k: round(v / base, 3) for k, v in rates.items()},
        "signal": "12 leads x 10 s at 500 Hz (synthetic); Philips: 12 x 11 s at 500 Hz (real sample)",
    }
    print(f"{'format':<22}{'records/s/core':>16}{'vs WFDB':>10}")
    for k, v in rates.items():
        print(f"{k:<22}{v:>16.1f}{v / base:>9.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
