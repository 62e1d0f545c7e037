"""The analyzer on a long sweep: `loopdiag report` and `analyze` over a synthetic run store.

Builds a store of RUNS runs x STEPS logged steps x LOOPS loops (default 100 x 10,000 x 12,
about 1.3 GB of JSONL) from the reference task's records (`reports/flt-stability-task`:
every key the recorder writes, per-loop lists stretched to LOOPS loops, values jittered
and the loss decaying), cached under benchmarks/.cache/. Then times, side by side, each in
its own process so its peak memory is its own:

  cold report   from the JSONL alone, building every run's columnar copy, with --jobs 1
                and with --jobs N side by side
  warm report   the copies present
  warm analyze  the stability table

Peak memory is the most the command and its worker processes held at once (their
resident sets summed, sampled every 20 ms), or the command's own peak where /proc is
missing. Targets: warm report <= 5 s and <= 1 GB; cold report <= 60 s and <= 2 GB.

    python benchmarks/analyzer.py                      # 100 x 10k x 12
    python benchmarks/analyzer.py --runs 4 --steps 200 --loops 4   # a smoke run
    python benchmarks/analyzer.py --replay 1000000     # detector replay, 100 runs x 10k
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_SUITE = ROOT / "reports" / "flt-stability-task" / "runs"
ARCHS = ("looped", "flt", "flt-res", "looped-inject")
LR = 3e-3
TARGETS = {"cold report": (60.0, 2048.0), "warm report": (5.0, 1024.0),
           "warm analyze": (5.0, 1024.0)}
SAMPLE_EVERY_S = 0.02


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


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants, summed (0 once it has ended)."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines()
                       if line.startswith("VmRSS:")), 0)
        pending += [int(child) for child in children]
    return total / 1024  # KiB


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak MiB) of one command in its own process: the peak of its
    resident set summed with its workers', where /proc tells them, else its own."""
    with tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT)
        tree_peak = 0.0
        while not (ended := os.wait4(child.pid, os.WNOHANG))[0]:
            tree_peak = max(tree_peak, tree_rss_mib(child.pid))
            time.sleep(SAMPLE_EVERY_S)
        wall = time.perf_counter() - start
        _, status, usage = ended
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            stderr.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}):\n"
                               f"{stderr.read().decode()[-2000:]}")
    return wall, max(tree_peak, usage.ru_maxrss / 1024)  # ru_maxrss: KiB on Linux


def measure(store: Path, out: Path, jobs: int) -> dict[str, tuple[float, float]]:
    """Each phase in its own process; the cold report once per number of jobs, every
    copy removed before it."""
    loopdiag = [sys.executable, "-W", "ignore", "-m", "loopdiag"]  # run from ROOT: this tree's
    report = [*loopdiag, "report", str(store), "--out", str(out)]
    results = {}
    for count in dict.fromkeys((1, jobs)):
        for copy in store.glob("*/metrics.parquet"):
            copy.unlink()
        results[f"cold report, --jobs {count}"] = timed([*report, "--jobs", str(count)])
    results["warm report"] = timed(report)
    results["warm analyze"] = timed([*loopdiag, "analyze", str(store)])
    return results


def measure_replay(records: int, steps: int, sample: int) -> dict[str, float]:
    """Records/s of replaying the default detectors (`finished=True`) over `records`
    synthetic records in runs of `steps`, record by record and over whole columns, side
    by side; the per-record path runs on the first `sample` records and is extrapolated."""
    from loopdiag.detect import default_detectors, replay

    template = template_records()
    rng = np.random.default_rng(0)
    decay = 1.0 + 2.0 * np.exp(-np.arange(steps) / (steps / 10))
    runs = []
    for _ in range(max(1, records // steps)):
        picks = rng.integers(0, len(template), steps).tolist()
        losses = (np.exp(0.05 * rng.standard_normal(steps)) * decay).tolist()
        runs.append([{**template[pick], "step": index + 1, "loss": template[pick]["loss"] * loss}
                     for index, (pick, loss) in enumerate(zip(picks, losses))])
    total = sum(map(len, runs))

    def rate(path_runs: list[list[dict]], vectorised: bool) -> tuple[float, int]:
        start, count = time.perf_counter(), 0
        for run in path_runs:
            replay(run, default_detectors(), finished=True, vectorised=vectorised)
            count += len(run)
        return count / (time.perf_counter() - start), count

    sampled = [run[:sample] for run in runs[:1]] if sample < steps else runs[:max(1, sample // steps)]
    per_record, measured = rate(sampled, vectorised=False)
    vectorised, _ = rate(runs, vectorised=True)
    print(f"replay of the default detectors over {total:,} records ({len(runs)} runs x {steps:,}):")
    print(f"{'path':<12}{'records/s':>12}{'s for all':>11}")
    print(f"{'per record':<12}{per_record:>12,.0f}{total / per_record:>11.1f}   "
          f"(measured on {measured:,} records, extrapolated)")
    print(f"{'vectorised':<12}{vectorised:>12,.0f}{total / vectorised:>11.1f}   "
          f"{vectorised / per_record:.0f}x the per-record path; target <= 10 s per 1M records: "
          f"{'ok' if 1e6 / vectorised <= 10 else 'MISSED'}")
    return {"per_record": per_record, "vectorised": vectorised}


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--loops", type=int, default=12)
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes building the copies in the cold report")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache",
                        help="where the synthetic store is kept between runs")
    parser.add_argument("--replay", type=int, metavar="RECORDS",
                        help="time replaying the default detectors over RECORDS synthetic "
                             "records (runs of --steps) instead, per record vs vectorised")
    parser.add_argument("--replay-sample", type=int, default=20_000,
                        help="records the per-record replay is measured on")
    args = parser.parse_args(argv)
    if args.replay:
        return measure_replay(args.replay, args.steps, args.replay_sample)
    name = f"analyzer-{args.runs}x{args.steps}x{args.loops}"
    store, out = (args.cache / name).resolve() / "runs", (args.cache / name).resolve() / "report"
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
    print(f"{'phase':<26}{'wall s':>8}{'peak MiB':>10}   target")
    for phase, (wall, peak) in results.items():
        wall_max, peak_max = TARGETS[phase.split(",")[0]]
        verdict = "ok" if wall <= wall_max and peak <= peak_max else "MISSED"
        print(f"{phase:<26}{wall:>8.1f}{peak:>10.0f}   <= {wall_max:g} s, <= {peak_max:g} MiB: {verdict}")
    return results


if __name__ == "__main__":
    main()
