"""Scale, streamed (issue #28): prune Llama-shaped folders of 0.5B to 7B parameters from their safetensors.

``--write`` makes each folder first: a ``LlamaConfig`` (bfloat16, untied embeddings) saved with
``save_pretrained`` and random bfloat16 weights (normal, std 0.02; norms 1) written tensor by tensor with
``fxprune.shards.ShardWriter``, so writing never holds more than one 2 GiB shard either. Nothing downloads.
The calibration text is Python's own standard-library source (shipped with Python), read as byte ids.

Each run is a fresh process (``python -m fxprune.cli compile ...``) timed by its wall clock; its
peak RSS is the child's ``ru_maxrss`` read by a fresh wrapper process. Runs go one at a time: run this on an
idle machine. Paths:

- ``stream``: ``fxprune compile hf:FOLDER --ratio 0.5 --prune-heads --data calib.txt --save-pretrained OUT``
  (streaming is the default for this command);
- ``in-memory``: the same with ``--in-memory`` (sizes up to ``--in-memory-max``);
- ``torch-pruning``: ``from_pretrained``, Torch-Pruning's ``MetaPruner`` as ``llm_scale.py`` runs it (MLP and
  whole heads at 0.5, L2 magnitude: its pruner takes no calibration data), ``save_pretrained`` (same sizes);
- then a reload check in another fresh process: ``from_pretrained(OUT, dtype=bfloat16)``, the config's widths,
  and ``generate`` of 8 new tokens with the KV cache.

    .venv/bin/python benchmarks/llm_stream.py --root /tmp/llm_stream [--sizes 1.1b,7b] [--write]
        [--in-memory-max 1.1b] [--out out/llm_stream.jsonl]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

# hidden, MLP, layers, query heads, KV heads
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (256, 688, 2, 8, 2),
    "0.5b": (1024, 2816, 24, 16, 4),
    "1.1b": (2048, 5632, 22, 32, 4),  # TinyLlama-1.1B
    "3b": (3200, 8640, 26, 32, 32),  # OpenLLaMA-3B
    "7b": (4096, 11008, 32, 32, 32),  # Llama-2-7B
}
VOCAB = 32000
GiB = 1 << 30
ORDER = list(PRESETS)


def write_folder(folder: Path, size: str, seed: int = 0) -> int:
    """A Llama-shaped folder of random bfloat16 weights, written one tensor at a time; returns its bytes."""
    import torch
    import transformers

    from fxprune.shards import ShardWriter

    hidden, mlp, layers, heads, kv = PRESETS[size]
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                      tie_word_embeddings=False, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder, 2 * GiB)
    for name, t in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            value = torch.ones(t.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16)
        writer.add(name, value)
    writer.close()
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def calibration_text(path: Path) -> None:
    """Python's standard-library source as calibration text (shipped with Python; no download)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in sorted(lib.glob("*.py"))[:40])
    path.write_text(text[:400_000], encoding="utf-8")


def measured(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run ``cmd`` in a fresh wrapper process: wall seconds, the child's peak RSS, exit status, its last lines."""
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "print(repr((r.returncode, time.perf_counter() - t, "
               "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.stdout[-3000:], r.stderr[-3000:])))")
    try:
        out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": "timeout", "seconds": timeout}
    rc, seconds, rss_kib, stdout, stderr = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our repr
    return {"rc": rc, "seconds": round(seconds, 1), "peak_rss_gib": round(rss_kib / (1 << 20), 3),
            "stdout": stdout, "stderr_tail": stderr[-800:]}


TORCH_PRUNING = """
import sys, time, torch, transformers
sys.path.insert(0, sys.argv[3])
from llm_scale import prune_torch_pruning
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
ids = torch.randint(0, m.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
m.config.use_cache = False  # its tracer follows a tensor output, not a cache
model, seconds = prune_torch_pruning(m, ids, {"ratio": 0.5, "heads": True})
model.config.use_cache = True
model.save_pretrained(sys.argv[2])
print(f"prune call {seconds:.1f}s")
"""

RELOAD = """
import sys, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
c = m.config
ids = torch.randint(0, c.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    out = m.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
print(repr({"intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "params": sum(p.numel() for p in m.parameters()),
            "dtype": str(next(m.parameters()).dtype), "generated": out.shape[1] - 8}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/tmp/llm_stream", help="where the folders are written (not the repo)")
    ap.add_argument("--sizes", default="1.1b,7b")
    ap.add_argument("--write", action="store_true", help="write the folders that do not exist yet")
    ap.add_argument("--in-memory-max", default="1.1b", help="largest size also run with --in-memory")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default="out/llm_stream.jsonl")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    calib = root / "calib.txt"
    if not calib.exists():
        calibration_text(calib)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    stamp = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
             "python": platform.python_version()}
    for size in args.sizes.split(","):
        folder = root / size
        if not folder.exists():
            if not args.write:
                sys.exit(f"{folder} does not exist: pass --write")
            t = time.perf_counter()
            nbytes = write_folder(folder, size)
            print(f"wrote {folder}: {nbytes / GiB:.2f} GiB in {time.perf_counter() - t:.0f}s", flush=True)
        nbytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        whole = ORDER.index(size) <= ORDER.index(args.in_memory_max)
        paths = ["stream"] + (["in-memory", "torch-pruning"] if whole else [])
        for path in paths:
            out = root / f"{size}-{path}-out"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            cmd = [sys.executable, "-m", "fxprune.cli", "compile", f"hf:{folder}", "--ratio", "0.5", "--prune-heads",
                   "--data", str(calib), "--save-pretrained", str(out)] + (["--in-memory"] if path == "in-memory" else [])
            if path == "torch-pruning":  # load, prune in place (L2 magnitude: MetaPruner has no calibration), save
                cmd = [sys.executable, "-c", TORCH_PRUNING, str(folder), str(out), str(Path(__file__).parent)]
            row: dict[str, Any] = {**stamp, "size": size, "path": path, "model_gib": round(nbytes / GiB, 3),
                                   **measured(cmd, args.timeout)}
            if row["rc"] == 0:
                check = measured([sys.executable, "-c", RELOAD, str(out)], args.timeout)
                row["reload"] = check["stdout"].strip().splitlines()[-1] if check["rc"] == 0 else check
                row["reload_peak_rss_gib"] = check.get("peak_rss_gib")
            row["prune_call"] = next((ln for ln in row.get("stdout", "").splitlines() if ln.startswith("prune call")), "")
            row["peak_over_model"] = round(row.get("peak_rss_gib", 0) / max(row["model_gib"], 1e-9), 3)
            print(json.dumps({k: v for k, v in row.items() if k not in ("stdout", "stderr_tail")}), flush=True)
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            subprocess.run(["rm", "-rf", str(out)], check=True)


if __name__ == "__main__":
    main()
