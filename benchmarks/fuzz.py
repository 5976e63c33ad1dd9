"""Long fuzz campaign: prune thousands of random networks with the oracle on and report every failure.

    .venv/bin/python benchmarks/fuzz.py --n 10000 --start 0            # cases 0..9999, all cores
    .venv/bin/python benchmarks/fuzz.py --n 2000 --shrink --regressions tests/regressions

Each case is ``fxprune.testing.fuzz.run_case(seed)``: a random network pruned with a random plan and with
L2 importance at random ratios, checked by the mask oracle and the fuzz invariants (ONNX on one case in
``--onnx-every``). The report gives cases tried, failures (seed and error, grouped by kind), time taken,
machine and date; ``--json`` writes it to a file. With ``--shrink`` the first seed of each kind of failure
is shrunk to a minimal network and saved as a strict-xfail regression test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from fxprune.testing.fuzz import CaseResult, run_case, shrink_case, signature_of_text, write_regression


def _init_worker() -> None:
    # One thread per process: on a shared machine intra-op threads fight each other (40x slower here).
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)


def _one(args: tuple[int, int, int]) -> CaseResult:
    seed, max_nodes, onnx_every = args
    return run_case(seed, max_nodes=max_nodes, onnx_every=onnx_every)


def machine() -> str:
    """A one-line description of this machine and the torch build."""
    cpu = platform.processor() or platform.machine()
    return f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores, Python " \
           f"{platform.python_version()}, torch {torch.__version__}"


def commit() -> str:
    """The git commit fuzzed (``+dirty`` when fxprune/ has uncommitted changes), or "unknown"."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "fxprune"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def campaign(start: int, n: int, jobs: int, max_nodes: int, onnx_every: int) -> tuple[list[CaseResult], float]:
    """Run cases ``start .. start + n - 1`` on ``jobs`` processes with a progress bar."""
    work = [(s, max_nodes, onnx_every) for s in range(start, start + n)]
    results: list[CaseResult] = []
    t0 = time.perf_counter()
    tqdm.set_lock(threading.RLock())  # tqdm's default lock is a multiprocessing one that leaks a semaphore
    bar = tqdm(total=n, unit="case", dynamic_ncols=True)
    with mp.get_context("spawn").Pool(jobs, initializer=_init_worker) as pool:
        for res in pool.imap_unordered(_one, work, chunksize=4):
            results.append(res)
            bar.update()
            if res.status == "fail":
                bar.set_postfix(failures=sum(r.status == "fail" for r in results))
                tqdm.write(f"FAIL seed {res.seed}: {res.error}")
    bar.close()
    return sorted(results, key=lambda r: r.seed), time.perf_counter() - t0


def report(results: list[CaseResult], seconds: float, args: argparse.Namespace) -> dict[str, object]:
    """Summary numbers and the failures grouped by kind."""
    status = Counter(r.status for r in results)
    kinds: dict[str, list[int]] = defaultdict(list)
    for r in results:
        if r.status != "ok":
            kinds[signature_of_text(r.error)].append(r.seed)
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "commit": commit(),
        "jobs": args.jobs,
        "seeds": [args.start, args.start + args.n - 1],
        "max_nodes": args.max_nodes,
        "cases": len(results),
        "ok": status["ok"],
        "failures": status["fail"],
        "unsupported": status["unsupported"],
        "modified": sum(r.modified for r in results),
        "oracle_not_applicable": sum(bool(r.oracle_skipped) for r in results),
        "onnx_checked": sum(r.onnx_checked for r in results),
        "mean_steps": round(sum(r.n_steps for r in results) / max(1, len(results)), 2),
        "seconds": round(seconds, 1),
        "cpu_seconds_per_case": round(sum(r.seconds for r in results) / max(1, len(results)), 3),
        "kinds": {k: seeds for k, seeds in sorted(kinds.items(), key=lambda kv: -len(kv[1]))},
        "failed": [asdict(r) for r in results if r.status != "ok"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10000, help="number of cases")
    p.add_argument("--start", type=int, default=0, help="first seed")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--max-nodes", type=int, default=12, help="most ops per network")
    p.add_argument("--onnx-every", type=int, default=20, help="check ONNX export on one case in this many (0: never)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--shrink", action="store_true", help="shrink the first seed of each kind of failure")
    p.add_argument("--regressions", type=Path, default=Path("tests/regressions"), help="where --shrink writes tests")
    args = p.parse_args(argv)
    results, seconds = campaign(args.start, args.n, args.jobs, args.max_nodes, args.onnx_every)
    rep = report(results, seconds, args)
    print(f"\n{rep['cases']} cases in {rep['seconds']} s on {rep['machine']} ({rep['date']}), {args.jobs} jobs, "
          f"fxprune {rep['commit']}")
    print(f"ok {rep['ok']}, failures {rep['failures']}, clean refusals {rep['unsupported']}; "
          f"pruned {rep['modified']}, oracle not applicable {rep['oracle_not_applicable']}, "
          f"ONNX checked {rep['onnx_checked']}")
    for kind, seeds in rep["kinds"].items():  # type: ignore[union-attr]
        print(f"  {len(seeds):5d} x {kind}   seeds {seeds[:8]}{' ...' if len(seeds) > 8 else ''}")
    for r in rep["failed"]:  # type: ignore[union-attr]
        print(f"  seed {r['seed']}: [{r['status']}] {r['error']}")
    if args.shrink:
        _init_worker()
        failed = {r.seed for r in results if r.status == "fail"}
        for kind, seeds in rep["kinds"].items():  # type: ignore[union-attr]
            if seeds[0] not in failed:  # a clean refusal: nothing to shrink
                continue
            spec, run, error = shrink_case(seeds[0], max_nodes=args.max_nodes, onnx_every=args.onnx_every)
            path = write_regression(spec, run, error, args.regressions, dt.date.today().isoformat())
            print(f"shrunk seed {seeds[0]} ({kind}) to {len(spec.steps)} ops: {path}")
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1, default=str))
    return 1 if rep["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
