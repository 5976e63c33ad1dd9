"""Scale (issue #18): fxprune and Torch-Pruning on Llama models of 0.1B to 1.1B parameters, on CPU.

Each model is a ``transformers.LlamaForCausalLM`` built from its config (random init, fixed seed, vocab
32000, untied embeddings, KV cache off so the root traces as one graph; nothing downloads). The ``1.1b``
preset is TinyLlama-1.1B's shape. Every (size, tool, round) runs in a fresh subprocess, so peak RSS is per
run; within a size the tools are interleaved (their order alternates by round), so drift in machine load
hits both alike. In the child, imports and model construction come first; only the prune call is timed:

- fxprune: ``fxprune.prune(model, ratio, example_inputs=(ids,), output=...)``, default head policy (RoPE
  pins Llama's head dim, so the MLP channels are pruned); ``--heads``: ``prune_heads=True``.
- Torch-Pruning: ``MetaPruner`` + ``step()`` as ``llm_quality.py`` runs it, ``MagnitudeImportance(p=2)``,
  the same ratio, ``embed_tokens`` and ``lm_head`` ignored (the residual width stays, as in fxprune), and
  the attention projections ignored too, so it prunes the MLP channels; ``--heads``: whole query heads
  (``num_heads``, ``prune_num_heads=True``, ``prune_head_dims=False``) and the MLP.

Per run: the child's peak RSS (``ru_maxrss``, read right after the prune call), its RSS right after the
model is built, the peak RSS during the prune call alone (VmHWM reset after the build; absolute, the built
model included), the model's own bytes (parameters and buffers), params before/after, layer-0 widths, and
whether the pruned model runs one short forward (outside the timer). A timeout, an out-of-memory, a kill or
an exception is recorded per cell, with the first line of its error.

    .venv/bin/python benchmarks/llm_scale.py [--sizes 0.1b,0.3b,0.6b,1.1b] [--rounds 1] [--heads]
        [--dtype float32|bfloat16] [--out out/llm_scale.jsonl]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

# hidden, MLP, layers, query heads, KV heads (head dim 64, tiny's 16)
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (128, 344, 2, 8, 2),  # ~8M params, almost all embeddings: a smoke test
    "0.1b": (768, 2048, 8, 12, 4),
    "0.3b": (1024, 2816, 20, 16, 4),
    "0.6b": (1536, 4096, 22, 24, 4),
    "1.1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B
}
VOCAB = 32000
TOOLS = ("fxprune", "torch_pruning")
MiB = 1 << 20
PEAK_GOAL = 1.5  # fxprune peak RSS / model bytes
SECONDS_GOAL = 60.0  # fxprune prune call at 1.1B


def build(spec: dict[str, Any]) -> Any:
    """The seeded random-init LlamaForCausalLM of ``spec["size"]``, built directly in ``spec["dtype"]``."""
    import torch
    import transformers

    hidden, mlp, layers, heads, kv = PRESETS[spec["size"]]
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048, tie_word_embeddings=False,
        use_cache=spec["kv_cache"], attn_implementation=spec["attn"])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, spec["dtype"]))  # no float32 copy first: it would set the peak
    try:
        return transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def prune_fxprune(model: Any, ids: Any, spec: dict[str, Any]) -> tuple[Any, float]:
    """fxprune's prune call on ``model``; returns the pruned model and the seconds of the call."""
    import fxprune

    t0 = time.perf_counter()
    r = fxprune.prune(model, spec["ratio"], example_inputs=(ids,), prune_heads=spec["heads"],
                      output=spec["output"], verify=spec["verify"])
    return r.model, time.perf_counter() - t0


def prune_torch_pruning(model: Any, ids: Any, spec: dict[str, Any]) -> tuple[Any, float]:
    """Torch-Pruning's MetaPruner and step on ``model`` (in place; the child owns it), as ``llm_quality.py``."""
    import torch_pruning as tp

    cfg = model.config
    attn = [layer.self_attn for layer in model.model.layers]
    ignored = [model.lm_head, model.model.embed_tokens]
    extra: dict[str, Any] = {}
    if spec["heads"]:
        num_heads = {}
        for a in attn:
            num_heads.update({a.q_proj: cfg.num_attention_heads, a.k_proj: cfg.num_key_value_heads,
                              a.v_proj: cfg.num_key_value_heads})
        extra = {"num_heads": num_heads, "prune_num_heads": True, "prune_head_dims": False,
                 "head_pruning_ratio": spec["ratio"]}
    else:
        ignored += [p for a in attn for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, ids, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=spec["ratio"], ignored_layers=ignored, global_pruning=False,
                                      **extra)
        pruner.step()
    seconds = time.perf_counter() - t0
    for a in attn:  # the attributes its LLM example updates after pruning
        cfg.num_attention_heads = a.q_proj.out_features // a.head_dim
        cfg.num_key_value_heads = a.k_proj.out_features // a.head_dim
        a.num_key_value_groups = cfg.num_attention_heads // cfg.num_key_value_heads
    cfg.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    return model, seconds


def _proc_status_mib(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith(field + ":"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def _reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0), so that it then measures the prune call alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _widths(model: Any, head_dim: int) -> str:
    """Layer 0 by its weights (a GraphModule keeps the names): q/kv heads x head dim, MLP width, hidden.

    Both tools keep the head dim here (RoPE pins it in fxprune, ``prune_head_dims=False`` in Torch-Pruning).
    """
    w = dict(model.named_parameters())
    q, k = (w[f"model.layers.0.self_attn.{n}_proj.weight"].shape for n in "qk")
    ff = w["model.layers.0.mlp.gate_proj.weight"].shape[0]
    return f"heads {q[0] / head_dim:g}/{k[0] / head_dim:g}x{head_dim}, ff {ff}, d {q[1]}"


def _error(e: BaseException) -> tuple[str, str]:
    """(status, first line of the error) of an exception."""
    text = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    oom = isinstance(e, MemoryError) or any(s in str(e) for s in ("can't allocate memory", "out of memory"))
    return ("oom" if oom else "error"), text


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One (tool, size) run in this fresh process: build, time the prune call, measure memory, try a forward."""
    import torch
    import transformers

    importlib.import_module(spec["tool"])  # the tool's import is outside the timer (and only the tool's)
    transformers.logging.set_verbosity_error()
    if spec["mem_limit_gb"]:  # after the imports: CUDA builds of torch map GiBs of address space at import
        limit = int(spec["mem_limit_gb"] * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    row: dict[str, Any] = {"threads_used": torch.get_num_threads()}
    stage = "build"
    try:
        model = build(spec)
        gc.collect()
        row["params_before"] = sum(p.numel() for p in model.parameters())
        row["model_mib"] = sum(t.nbytes for t in [*model.parameters(), *model.buffers()]) / MiB
        row["rss_built_mib"] = _proc_status_mib("VmRSS")
        row["widths_before"] = _widths(model, model.config.head_dim)  # Torch-Pruning prunes in place
        ids = torch.randint(0, VOCAB, (1, spec["seq"]), generator=torch.Generator().manual_seed(0))
        reset = _reset_peak()
        stage = "prune"
        pruned, row["prune_s"] = (prune_fxprune if spec["tool"] == "fxprune" else prune_torch_pruning)(
            model, ids, spec)
        row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        row["prune_peak_rss_mib"] = _proc_status_mib("VmHWM") if reset else None
        row["params_after"] = sum(p.numel() for p in pruned.parameters())
        row["widths_after"] = _widths(pruned, model.config.head_dim)
    except Exception as e:  # a failure is a result (MemoryError included)
        row["status"], row["error"] = _error(e)
        row["error"] = f"{stage}: {row['error']}"
        return row
    row["status"] = "ok"
    try:  # one short forward, outside the timer
        with torch.no_grad():
            out = pruned(ids[:, :8])
        logits = out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)
        good = tuple(logits.shape) == (1, 8, VOCAB) and bool(torch.isfinite(logits).all())
        row["forward"] = "ok" if good else f"bad logits {tuple(logits.shape)}"
    except Exception as e:
        row["forward"] = "failed: " + _error(e)[1]
    return row


def run_cell(spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    """Run ``child(spec)`` in a fresh subprocess; a timeout, a kill or a crash becomes a failed row."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    row = dict(spec)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "error": f"timeout after {timeout} s", "wall_s": timeout}
    row["wall_s"] = time.perf_counter() - t0
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return {**row, **json.loads(line)}
    if p.returncode < 0:
        name = signal.Signals(-p.returncode).name
        why = " (likely the OOM killer)" if name == "SIGKILL" else ""
        return {**row, "status": "killed", "error": f"killed by {name}{why}"}
    lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
    return {**row, "status": "error", "error": (lines[-1] if lines else f"exit {p.returncode}, no output")[:200]}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _git_commit() -> str:
    """Short HEAD, marked when fxprune/ differs from it (the measured code is then not that commit)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "fxprune"]).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted fxprune/ changes" if dirty else "")


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, versions, date and commit: the context a reader needs for the figures."""
    cpu = platform.processor() or platform.machine()
    mem = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / (1 << 20):.0f} GiB"
    except OSError:
        pass
    return {"machine": f"{cpu} ({platform.machine()})", "cores": os.cpu_count(), "memory": mem,
            "torch": _version("torch"), "transformers": _version("transformers"),
            "torch_pruning": _version("torch-pruning"), "date": datetime.datetime.now().isoformat(" ", "minutes"),
            "commit": _git_commit(), "command": " ".join([".venv/bin/python", *sys.argv])}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the ok rounds of one (size, tool); failures named with their first line."""
    ok = [r for r in rows if r["status"] == "ok"]
    fails = [r for r in rows if r["status"] != "ok"]
    s: dict[str, Any] = {"ok": len(ok), "rounds": len(rows),
                         "failure": f"{fails[0]['status']}: {fails[0]['error']}" if fails else ""}
    if ok:
        med = {k: statistics.median(r[k] for r in ok) for k in ("prune_s", "peak_rss_mib", "rss_built_mib")}
        s.update(ok[0], **med)
        s["peak_ratio"] = med["peak_rss_mib"] / ok[0]["model_mib"]
        # what the prune call adds above the built model (imports and the model itself excluded)
        s["extra_ratio"] = (med["peak_rss_mib"] - med["rss_built_mib"]) / ok[0]["model_mib"]
        s["forwards"] = sorted({r["forward"] for r in ok})
    return s


def _f(x: float | None, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def report(results: dict[tuple[str, str], list[dict[str, Any]]], meta: dict[str, Any], args: argparse.Namespace) -> None:
    """The Markdown tables: one row per (size, tool), then the issue's three goals per size."""
    print(f"\n## Pruning Llama at scale on CPU ({meta['date']})\n")
    print(f"- command: `{meta['command']}`")
    print(f"- machine: {meta['machine']}, {meta['cores']} cores, {meta['memory']} RAM; torch {meta['torch']}, "
          f"transformers {meta['transformers']}, torch_pruning {meta['torch_pruning']}; commit {meta['commit']}")
    print(f"- ratio {args.ratio}, {'whole heads and MLP' if args.heads else 'MLP channels'}, {args.dtype}, "
          f"example input 1 x {args.seq} token ids, fxprune output={args.output!r} verify={args.verify}, "
          f"{args.rounds} round(s) (medians), a fresh process per run, timeout {args.timeout} s\n")
    print("| size | tool | params before -> after | layer 0 after | prune s | peak RSS MiB | prune-call peak MiB "
          "| RSS built MiB | model MiB | peak / model | (peak - built) / model | forward | ok / runs | failure |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    summaries: dict[tuple[str, str], dict[str, Any]] = {}
    for (size, tool), rows in results.items():
        s = summaries[size, tool] = summarize(rows)
        if s["ok"]:
            print(f"| {size} | {tool} | {s['params_before'] / 1e6:.1f}M -> {s['params_after'] / 1e6:.1f}M | "
                  f"{s['widths_after']} | {s['prune_s']:.2f} | {s['peak_rss_mib']:.0f} | "
                  f"{_f(s['prune_peak_rss_mib'])} | {_f(s['rss_built_mib'])} | {s['model_mib']:.0f} | "
                  f"{s['peak_ratio']:.2f}x | {s['extra_ratio']:.2f}x | {', '.join(s['forwards'])} | {s['ok']}/{s['rounds']} | {s['failure']} |")
        else:
            print(f"| {size} | {tool} | - | - | - | - | - | - | - | - | - | - | 0/{s['rounds']} | {s['failure']} |")
    print("\n| size | fxprune faster than Torch-Pruning | fxprune peak RSS < 1.5x model | fxprune < 60 s at 1.1B |")
    print("|---|---|---|---|")
    for size in dict.fromkeys(size for size, _ in results):
        fx, tp = summaries.get((size, "fxprune"), {}), summaries.get((size, "torch_pruning"), {})
        if not fx.get("ok"):
            why = f"n/a (fxprune {fx['failure'].split(':')[0]})" if fx else "n/a (not run)"
            print(f"| {size} | {why} | {why} | {why if size == '1.1b' else '-'} |")
            continue
        if tp.get("ok"):
            fast = (f"{'yes' if fx['prune_s'] < tp['prune_s'] else 'no'} ({fx['prune_s']:.1f} vs "
                    f"{tp['prune_s']:.1f} s, {tp['prune_s'] / fx['prune_s']:.2f}x)")
        else:
            fast = f"n/a (Torch-Pruning {tp['failure'].split(':')[0]})" if tp else "n/a (not run)"
        peak = (f"{'yes' if fx['peak_ratio'] < PEAK_GOAL else 'no'} ({fx['peak_ratio']:.2f}x; the prune call adds "
                f"{fx['extra_ratio']:.2f}x)")
        secs = f"{'yes' if fx['prune_s'] < SECONDS_GOAL else 'no'} ({fx['prune_s']:.1f} s)" if size == "1.1b" else "-"
        print(f"| {size} | {fast} | {peak} | {secs} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.1b,0.3b,0.6b,1.1b", help=f"comma-separated presets of {', '.join(PRESETS)}")
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--heads", action="store_true", help="prune whole attention heads as well as the MLP")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seq", type=int, default=32, help="tokens in the example input (batch 1)")
    p.add_argument("--output", choices=("module", "graph"), default="module", help="fxprune's output=")
    p.add_argument("--verify", action="store_true", help="run fxprune's oracle (float64: slow and 2x memory)")
    p.add_argument("--kv-cache", action="store_true", help="leave use_cache on: fxprune prunes part by part")
    p.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each run (0: torch's default)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run, model build included")
    p.add_argument("--mem-limit-gb", type=float, default=0.0, help="RLIMIT_AS (address space, set after the imports) per run (0: none)")
    p.add_argument("--out", default="out/llm_scale.jsonl", help="append one JSON line per run here ('' for none)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    sizes, tools = [s for s in args.sizes.split(",") if s], [t for t in args.tools.split(",") if t]
    if bad := [s for s in sizes if s not in PRESETS] + [t for t in tools if t not in TOOLS]:
        p.error(f"unknown size or tool: {', '.join(bad)}")
    meta = machine()
    print(" | ".join(f"{k} {v}" for k, v in meta.items() if k != "command"), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps({"kind": "meta", **meta, **vars(args)}) + "\n")
    base = {"ratio": args.ratio, "heads": args.heads, "dtype": args.dtype, "seq": args.seq, "output": args.output,
            "verify": args.verify, "kv_cache": args.kv_cache, "attn": args.attn, "threads": args.threads,
            "mem_limit_gb": args.mem_limit_gb}
    results: dict[tuple[str, str], list[dict[str, Any]]] = {(s, t): [] for s in sizes for t in tools}
    for size in sizes:
        for rnd in range(args.rounds):
            for tool in tools if rnd % 2 == 0 else tools[::-1]:  # alternate which tool runs first
                row = run_cell({**base, "size": size, "tool": tool, "round": rnd}, args.timeout)
                results[size, tool].append(row)
                what = (f"{row['prune_s']:.2f} s, peak {row['peak_rss_mib']:.0f} MiB "
                        f"({row['peak_rss_mib'] / row['model_mib']:.2f}x model), forward {row['forward']}"
                        if row["status"] == "ok" else f"{row['status'].upper()} {row['error']}")
                print(f"{size} {tool} round {rnd + 1}: {what} [{row['wall_s']:.0f} s wall]", flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps({"kind": "run", **row}) + "\n")
    report(results, meta, args)


if __name__ == "__main__":
    main()
