"""The analyzer on a long sweep: `loopdiag report` and `analyze` over a synthetic run store.

Builds a store of RUNS runs x STEPS logged steps x LOOPS loops (default 100 x 10,000 x 12,
about 1.3 GB of JSONL) from the reference task's records (`reports/flt-stability-task`:
every key the recorder writes, per-loop lists stretched to LOOPS loops, values jittered
and the loss decaying), cached under benchmarks/.cache/. Then times, side by side, each in
its own process so its peak memory is its own:

  cold report   from the JSONL alone, building every run's columnar copy (--jobs)
  warm report   the copies present
  warm analyze  the stability table

Targets: warm report <= 5 s and <= 1 GB; cold report <= 60 s and <= 2 GB.

    python benchmarks/analyzer.py                      # 100 x 10k x 12
    python benchmarks/analyzer.py --runs 4 --steps 200 --loops 4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_SUITE = ROOT / "reports" / "flt-stability-task" / "runs"
ARCHS = ("looped", "flt", "flt-res", "looped-inject")
LR = 3e-3
TARGETS = {"cold report": (60.0, 2048.0), "warm report": (5.0, 1024.0),
           "warm analyze": (5.0, 1024.0)}


def template_records() -> list[dict]:
    """One reference run's records: the keys and magnitudes the recorder writes."""
    from loopdiag.store import read_records

    run_dir = sorted(path for path in TEMPLATE_SUITE.iterdir() if path.is_dir())[0]
    return read_records(run_dir)


def run_records(template: list[dict], steps: int, loops: int, seed: int) -> list[str]:
    """STEPS JSONL lines like the template's, per-loop lists stretched to LOOPS loops."""
    rng = np.random.default_rng(seed)
    per_loop = [key for key, value in template[0].items() if isinstance(value, list)]
    scalars = [key for key, value in template[0].items()
               if key != "step" and isinstance(value, float)]
    picks = rng.integers(0, len(template), steps)
    jitter = np.exp(0.05 * rng.standard_normal((steps, len(scalars) + len(per_loop) * loops)))
    decay = 1.0 + 2.0 * np.exp(-np.arange(steps) / (steps / 10))
    lines = []
    for index in range(steps):
        base = template[picks[index]]
        factors = jitter[index].tolist()
        record = {"step": index + 1}
        for position, key in enumerate(scalars):
            value = base.get(key)
            record[key] = None if value is None else value * factors[position]
        record["loss"] = base["loss"] * decay[index] * factors[0]
        record["n_loops"] = loops
        offset = len(scalars)
        for key in per_loop:
            values = base[key]
            record[key] = [values[min(loop * len(values) // loops, len(values) - 1)]
                           * factors[offset + loop] for loop in range(loops)]
            offset += loops
        lines.append(json.dumps(record) + "\n")
    return lines


def build_store(store: Path, runs: int, steps: int, loops: int) -> Path:
    """Write the synthetic suite folder (JSONL, configs, summaries, suite.json)."""
    from loopdiag.store import write_suite_manifest

    template = template_records()
    cells = {}
    for index in range(runs):
        arch, seed = ARCHS[index % len(ARCHS)], index // len(ARCHS)
        run_id = f"{arch}-k{loops:02d}-s{seed}"
        cells[run_id] = {"arch": arch, "n_loops": loops, "lr": LR, "seed": seed}
        run_dir = store / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        config = {"cell": cells[run_id], "model": {"arch": arch, "n_loops": loops},
                  "train": {"steps": steps, "lr": LR, "warmup_steps": steps // 20}}
        (run_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
        (run_dir / "metrics.jsonl").write_text("".join(run_records(template, steps, loops, index)),
                                               encoding="utf-8")
        collapsed = index % 10 == 9  # a few failed runs: the report explains each
        event = {"step": steps // 2, "detector": "residual_blowup", "severity": "critical",
                 "message": "synthetic", "evidence": {}}
        (run_dir / "events.jsonl").write_text(json.dumps(event) + "\n" if collapsed else "",
                                              encoding="utf-8")
        summary = ({"status": "collapsed", "step": steps // 2, "signal": "residual_blowup"}
                   if collapsed else {"status": "stable"})
        (run_dir / "summary.json").write_text(json.dumps({**summary, "last_step": steps}),
                                              encoding="utf-8")
    write_suite_manifest(store, {"name": "analyzer-benchmark"}, cells)
    return store


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one command in its own process."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    stderr = child.stderr.read().decode()
    child.stderr.close()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}):\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss / 1024  # KiB on Linux


def measure(store: Path, out: Path, jobs: int) -> dict[str, tuple[float, float]]:
    for copy in store.glob("*/metrics.parquet"):
        copy.unlink()
    loopdiag = [sys.executable, "-W", "ignore", "-m", "loopdiag"]
    report = [*loopdiag, "report", str(store), "--out", str(out)]
    return {"cold report": timed([*report, "--jobs", str(jobs)]),
            "warm report": timed(report),
            "warm analyze": timed([*loopdiag, "analyze", str(store)])}


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--loops", type=int, default=12)
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes building the copies in the cold report")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache",
                        help="where the synthetic store is kept between runs")
    args = parser.parse_args(argv)
    name = f"analyzer-{args.runs}x{args.steps}x{args.loops}"
    store, out = args.cache / name / "runs", args.cache / name / "report"
    from loopdiag.store._files import SUITE_FILE

    if not (store / SUITE_FILE).is_file():
        print(f"building the store in {store} ...", flush=True)
        start = time.perf_counter()
        shutil.rmtree(store, ignore_errors=True)
        build_store(store, args.runs, args.steps, args.loops)
        print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    size = sum(path.stat().st_size for path in store.glob("*/metrics.jsonl"))
    print(f"{args.runs} runs x {args.steps} steps x {args.loops} loops: "
          f"{args.runs * args.steps:,} records, {size / 2**20:,.0f} MiB of JSONL")
    results = measure(store, out, args.jobs)
    copies = sum(path.stat().st_size for path in store.glob("*/metrics.parquet"))
    print(f"columnar copies: {copies / 2**20:,.1f} MiB ({copies / size:.1%} of the JSONL)")
    print(f"{'phase':<14}{'wall s':>9}{'peak MiB':>10}   target")
    for phase, (wall, peak) in results.items():
        wall_max, peak_max = TARGETS[phase]
        verdict = "ok" if wall <= wall_max and peak <= peak_max else "MISSED"
        print(f"{phase:<14}{wall:>9.1f}{peak:>10.0f}   <= {wall_max:g} s, <= {peak_max:g} MiB: {verdict}")
    return results


if __name__ == "__main__":
    main()
