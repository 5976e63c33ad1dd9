"""Per-model compile time of fxprune beside Torch-Pruning, repeated in fresh processes: medians and ratios.

The coverage run (``coverage.py --tp``) times one first compile per model and tool, which on a shared
2-core machine can swing by 2x. This benchmark repeats that measurement: for every model, ``--rounds``
rounds, each running a fresh fxprune process and a fresh Torch-Pruning process (interleaved, so drift in
machine load hits both alike). Each process builds the model (random weights, 1 torch thread), times the
first compile after import at the given ratio, and reports it. The table has both medians, their ratio
(Torch-Pruning / fxprune: above 1 means fxprune is faster) and how many rounds fxprune won.

    .venv/bin/python benchmarks/compile_race.py --models tv:efficientnet_b0,timm:repvgg_a0 [--rounds 5]
    .venv/bin/python benchmarks/compile_race.py --from-coverage docs/coverage.jsonl   # every model TP handles

Specs are those of ``coverage.py`` (``tv:``, ``tvseg:``, ``tvdet:``, ``timm:``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def child_fx(spec: str, ratio: float) -> dict[str, Any]:
    """One fxprune compile (in the subprocess): the first after import, without ``verify``."""
    from coverage import build

    from fxprune import (
        prune,  # the import is outside the timer, as Torch-Pruning's is (fxprune imports lazily)
    )

    model, x = build(spec)
    t0 = time.perf_counter()
    r = prune(model, ratio, example_inputs=x)
    import fxprune

    return {"s": time.perf_counter() - t0, "params_ratio": r.params_after / r.params_before,
            "src": os.path.dirname(os.path.dirname(os.path.abspath(fxprune.__file__)))}


def child_tp(spec: str, ratio: float) -> dict[str, Any]:
    """One Torch-Pruning step (in the subprocess), as ``coverage.py`` runs it."""
    from coverage import child_tp as run

    row = run(spec, ratio)
    return {"s": row["tp_s"], "params_ratio": row["tp_params_ratio"], "ok": row["tp_ok"]}


def _run(tool: str, spec: str, ratio: float, timeout: int, plain: bool = False,
         src: str = "") -> dict[str, Any] | None:
    """One child process; ``src``: the source tree fxprune is imported from (a checkout of another commit)."""
    cmd = [sys.executable, __file__, f"--child-{tool}", spec, "--ratio", str(ratio)]
    env = dict(os.environ, FXPRUNE_FAST="0" if plain else os.environ.get("FXPRUNE_FAST", "1"))
    if src:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(src), env.get("PYTHONPATH", "")) if p)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def race(spec: str, ratio: float, rounds: int, timeout: int, plain: bool = False, base: str = "") -> dict[str, Any]:
    """``rounds`` interleaved fresh-process compiles of each tool on one model.

    With ``plain``, every round also runs fxprune with its speed shortcuts off (``FXPRUNE_FAST=0``), so
    the table shows what the shortcuts buy, measured under the same load. With ``base`` (a source tree of
    another commit), every round also runs that fxprune: an A/B of two versions under the same load.
    """
    fx_base: list[float] = []
    fx: list[float] = []
    tp: list[float] = []
    fx_plain: list[float] = []
    for _ in range(rounds):
        a = _run("fx", spec, ratio, timeout)
        c = _run("fx", spec, ratio, timeout, plain=True) if plain else {"s": 0.0}
        b = _run("tp", spec, ratio, timeout)
        d = _run("fx", spec, ratio, timeout, src=base) if base else {"s": 0.0, "src": ""}
        if a is None or c is None or b is None or not b.get("ok"):
            return {"model": spec, "error": "fxprune failed" if a is None or c is None
                    else "Torch-Pruning failed or timed out"}
        if base and (d is None or os.path.abspath(d["src"]) != os.path.abspath(base)):
            return {"model": spec, "error": f"fxprune at --base failed or was not imported from it ({d})"}
        fx.append(a["s"])
        tp.append(b["s"])
        fx_plain.append(c["s"])
        fx_base.append(d["s"])
    wins = sum(f < t for f, t in zip(fx, tp, strict=True))
    row = {"model": spec, "fx_s": statistics.median(fx), "tp_s": statistics.median(tp),
           "ratio": statistics.median(tp) / statistics.median(fx), "wins": wins, "rounds": rounds,
           "fx_all": fx, "tp_all": tp}
    if plain:
        row.update(fx_plain_s=statistics.median(fx_plain), fx_plain_all=fx_plain,
                   plain_ratio=statistics.median(tp) / statistics.median(fx_plain))
    if base:
        row.update(fx_base_s=statistics.median(fx_base), fx_base_all=fx_base,
                   base_ratio=statistics.median(fx_base) / statistics.median(fx))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="", help="comma-separated coverage specs")
    parser.add_argument("--from-coverage", default="", help="a coverage JSONL: every model Torch-Pruning handled")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--out", default="", help="append rows to this JSONL")
    parser.add_argument("--plain", action="store_true",
                        help="also time fxprune with its speed shortcuts off (FXPRUNE_FAST=0) in every round")
    parser.add_argument("--base", default="", metavar="SRC",
                        help="also time the fxprune of this source tree (e.g. a git worktree of an older commit) "
                             "in every round: base / fxprune above 1 means this tree is faster")
    parser.add_argument("--child-fx", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-tp", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_fx or args.child_tp:
        run = child_fx if args.child_fx else child_tp
        print(json.dumps(run(args.child_fx or args.child_tp, args.ratio)))
        return
    specs = [s for s in args.models.split(",") if s]
    if args.from_coverage:
        with open(args.from_coverage) as f:
            specs += [r["model"] for r in map(json.loads, f) if r.get("tp_ok")]
    if not specs:
        parser.error("give --models or --from-coverage")
    import torch

    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M} | {platform.machine()} {os.cpu_count()} cores | "
          f"torch {torch.__version__} | ratio {args.ratio} | {args.rounds} rounds, fresh process each\n")
    extra = " fxprune FAST=0 median s | TP / fxprune FAST=0 |" if args.plain else ""
    extra += " base median s | base / fxprune |" if args.base else ""
    if args.base:
        head = subprocess.run(["git", "-C", args.base, "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True).stdout.strip()[:80]
        print(f"base: {args.base} ({head or 'not a git checkout'})\n")
    print("| model | fxprune median s | Torch-Pruning median s | TP / fxprune | fxprune faster in |" + extra)
    print("|---|---|---|---|---|" + ("---|---|" if args.plain else "") + ("---|---|" if args.base else ""))
    rows = []
    for spec in specs:
        row = race(spec, args.ratio, args.rounds, args.timeout, args.plain, args.base)
        rows.append(row)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        if "error" in row:
            print(f"| {spec} | - | - | - | {row['error']} |", flush=True)
        else:
            cells = (f" {row['fx_plain_s']:.3f} | {row['plain_ratio']:.2f}x |" if args.plain else "")
            cells += (f" {row['fx_base_s']:.3f} | {row['base_ratio']:.2f}x |" if args.base else "")
            print(f"| {spec} | {row['fx_s']:.3f} | {row['tp_s']:.3f} | {row['ratio']:.2f}x | "
                  f"{row['wins']}/{row['rounds']} |" + cells, flush=True)
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    if ratios:
        slower = [r["model"] for r in rows if r.get("ratio", 2) < 1]
        print(f"\nmedian TP / fxprune: {statistics.median(ratios):.2f}x over {len(ratios)} models; "
              f"fxprune slower (by median) on {len(slower)}: {', '.join(slower) or 'none'}")
        if args.base:
            ab = [r["base_ratio"] for r in rows if "base_ratio" in r]
            print(f"median base / fxprune: {statistics.median(ab):.2f}x over {len(ab)} models "
                  f"(this tree faster on {sum(x > 1 for x in ab)})")
        if args.plain:
            plain = [r["plain_ratio"] for r in rows if "plain_ratio" in r]
            print(f"median TP / fxprune with FXPRUNE_FAST=0: {statistics.median(plain):.2f}x; "
                  f"shortcuts on / off: {statistics.median([r['fx_plain_s'] / r['fx_s'] for r in rows if 'plain_ratio' in r]):.2f}x faster")


if __name__ == "__main__":
    main()
