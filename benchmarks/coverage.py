"""Coverage of the whole corpus: every torchvision model and the common timm families at one ratio.

Each model runs in its own subprocess with a timeout, so a crash or a hang does not stop the run. A model
is "ok" when compile succeeds, the parameter count drops, the output structure and shapes equal the
original's, the mask oracle passes (LayerNorm, RMSNorm and GroupNorm over pruned channels included), and
the ONNX export matches onnxruntime. Rows go to a JSONL file; a Markdown summary is printed.

    .venv/bin/python benchmarks/coverage.py --out docs/coverage.jsonl [--only torchvision] [--tp]

With --tp, Torch-Pruning runs on every model too (its own subprocess, memory capped), and the table gains
its success count and the median ratio of the two compile times (both: the first compile after import).
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
import tempfile
import time
from collections import defaultdict
from typing import Any

TIMM = [
    "resnet18", "resnet50", "convnext_tiny", "efficientnet_b0", "mobilenetv3_large_100", "regnety_004",
    "ghostnet_100", "repvgg_a0", "cspdarknet53", "densenet121", "mixer_b16_224", "poolformer_s12",
    "efficientformer_l1", "levit_128", "mobilevit_s", "vit_small_patch16_224", "deit_small_patch16_224",
    "swin_tiny_patch4_window7_224", "eva02_tiny_patch14_224",
]
SEG_DET = [
    "fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "ssdlite320_mobilenet_v3_large",
]


def corpus(only: str) -> list[str]:
    """Model specs: ``tv:<name>``, ``tvseg:<name>``, ``tvdet:<name>``, ``timm:<name>``."""
    import torchvision

    specs = []
    if only in ("", "torchvision"):
        specs += [f"tv:{n}" for n in sorted(torchvision.models.list_models(module=torchvision.models))]
    if only in ("", "segdet"):
        specs += [f"tvseg:{n}" for n in SEG_DET[:3]] + [f"tvdet:{n}" for n in SEG_DET[3:]]
    if only in ("", "timm"):
        specs += [f"timm:{n}" for n in TIMM]
    return specs


def family(spec: str) -> str:
    """The family a model is reported under (resnet, vit, swin, ...)."""
    kind, name = spec.split(":", 1)
    if kind != "tv":
        return {"tvseg": "tv-segmentation", "tvdet": "tv-detection"}.get(kind, "timm")
    for prefix in ("resnext", "wide_resnet", "resnet", "regnet", "efficientnet_v2", "efficientnet", "mobilenet_v2",
                   "mobilenet_v3", "mnasnet", "shufflenet", "squeezenet", "densenet", "convnext", "vit", "swin",
                   "maxvit", "vgg", "inception", "googlenet", "alexnet"):
        if name.startswith(prefix):
            return prefix
    return name


def build(spec: str) -> tuple[Any, tuple[Any, ...]]:
    """The model (random weights, eval mode) and its example inputs."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    kind, name = spec.split(":", 1)
    if kind == "timm":
        import timm

        model = timm.create_model(name, pretrained=False).eval()
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        x: tuple[Any, ...] = (torch.randn(1, *size),)
    else:
        import torchvision

        kwargs: dict[str, Any] = {"weights": None}
        if name in ("googlenet", "inception_v3"):
            kwargs.update(aux_logits=False, init_weights=True)
        if kind == "tvdet":
            kwargs["weights_backbone"] = None
        if kind == "tvseg":
            kwargs.update(weights_backbone=None, aux_loss=False)
        model = torchvision.models.get_model(name, **kwargs).eval()
        side = 299 if name == "inception_v3" else 224
        x = ([torch.rand(3, 320, 320)],) if kind == "tvdet" else (torch.randn(1, 3, side, side),)
    return model, x


def child(spec: str, ratio: float) -> dict[str, Any]:
    """Run one model (in the subprocess): a timed compile, then the proofs (oracle, shapes, ONNX)."""
    import fxprune
    from fxprune import prune  # imported before the timer, as Torch-Pruning is (fxprune imports lazily)
    from fxprune.passes.export import export_onnx

    model, x = build(spec)
    kind = spec.split(":", 1)[0]
    row: dict[str, Any] = {"model": spec, "family": family(spec)}
    t0 = time.perf_counter()
    prune(model, ratio, example_inputs=x)  # the first compile after import, timed like Torch-Pruning's
    row["compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = fxprune.prune(model, ratio, example_inputs=x, verify=True)
    row["total_s"] = time.perf_counter() - t0
    row["params_ratio"] = r.params_after / r.params_before
    row["macs_ratio"] = r.macs_after / max(1, r.macs_before)
    changed_parts = [p for p in r.parts if p.params_after < p.params_before]
    if r.oracle is not None and r.oracle.applicable:
        row["oracle"] = "passed" if r.oracle.passed else f"failed: {r.oracle.max_abs_diff:.3g}"
    elif r.oracle is None and changed_parts:  # pruned part by part: every pruned part has its own proof
        bad = [p for p in changed_parts if p.oracle != "passed"]
        row["oracle"] = "passed" if not bad else f"part {bad[0].name}: {bad[0].oracle}"
        row["parts_proven"] = len(changed_parts) - len(bad)
    else:
        row["oracle"] = f"n/a: {r.oracle.reason if r.oracle else ''}"
    row["noop"] = not r.modified or r.params_after >= r.params_before
    detection = kind == "tvdet"
    with tempfile.TemporaryDirectory() as d:
        try:
            export_onnx(r.model, x, os.path.join(d, "m.onnx"), n_check_inputs=1, dynamic_batch=not detection)
            row["onnx"] = "ok"
        except Exception as e:  # noqa: BLE001 - reported in the table
            row["onnx"] = f"error: {type(e).__name__}: {str(e)[:160]}"
            if detection and "differs from PyTorch" in str(e):
                try:  # the same check on the unpruned detector: NMS over near-tied random scores
                    export_onnx(model, x, os.path.join(d, "u.onnx"), n_check_inputs=1, dynamic_batch=False)
                except Exception as e0:  # noqa: BLE001
                    if "differs from PyTorch" in str(e0):
                        row["onnx"] = "exported; onnxruntime differs from PyTorch as for the unpruned model"
    row["ok"] = (not row["noop"]) and row["oracle"] == "passed" and (row["onnx"] == "ok" or row["onnx"].startswith("exported;"))
    return row


def _shapes(out: Any) -> list[tuple[int, ...]]:
    from fxprune.outputs import tensors_of

    return [tuple(t.shape) for t in tensors_of(out)]


def child_tp(spec: str, ratio: float) -> dict[str, Any]:
    """Torch-Pruning on the same model (in the subprocess, memory capped at 12 GiB): time, params, shapes.

    Torch-Pruning's default setup for classification: L2 magnitude, the same ratio, the class outputs
    (1000 ImageNet classes, 21 VOC classes) ignored. "ok": the step finishes, the parameter count drops, and the pruned model runs with the original
    output shapes (it has no oracle; a wrong model that runs counts as ok here).
    """
    import resource

    import torch
    import torch.nn as nn

    resource.setrlimit(resource.RLIMIT_AS, (12 << 30, 12 << 30))
    import torch_pruning as tp

    model, x = build(spec)
    row: dict[str, Any] = {"model": spec, "family": family(spec)}
    with torch.no_grad():
        want = _shapes(model(*x))
    p0 = sum(p.numel() for p in model.parameters())
    # The classifier (a Linear, or SqueezeNet's 1x1 conv) and segmentation heads keep their class outputs.
    ignored = [m for m in model.modules() if (isinstance(m, nn.Linear) and m.out_features in (1000, 21))
               or (isinstance(m, nn.Conv2d) and m.out_channels in (1000, 21))]
    t0 = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x[0] if len(x) == 1 else x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    row["tp_s"] = time.perf_counter() - t0
    row["tp_params_ratio"] = sum(p.numel() for p in model.parameters()) / p0
    try:
        with torch.no_grad():
            got = _shapes(model(*x))
        row["tp_ok"] = row["tp_params_ratio"] < 1.0 and got == want
        row["tp_error"] = "" if row["tp_ok"] else ("no-op" if row["tp_params_ratio"] >= 1.0 else f"output shapes {got[:2]} != {want[:2]}")
    except Exception as e:  # noqa: BLE001 - reported in the table
        row["tp_ok"], row["tp_error"] = False, f"pruned model fails: {type(e).__name__}: {str(e)[:120]}"
    return row


def run_tp(spec: str, ratio: float, timeout: int) -> dict[str, Any]:
    """Run ``child_tp`` in a subprocess; a crash, an out-of-memory or a timeout becomes a failed row."""
    cmd = [sys.executable, __file__, "--child-tp", spec, "--ratio", str(ratio)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"tp_ok": False, "tp_error": f"timeout after {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"tp_ok": False, "tp_error": err[:200]}


def run_one(spec: str, ratio: float, timeout: int) -> dict[str, Any]:
    """Run ``child`` in a subprocess; a crash or timeout becomes an error row."""
    cmd = [sys.executable, __file__, "--child", spec, "--ratio", str(ratio)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": spec, "family": family(spec), "ok": False, "error": f"timeout after {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    err = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": spec, "family": family(spec), "ok": False, "error": err[:300]}


def summarize(rows: list[dict[str, Any]]) -> str:
    """Markdown: per family total/ok/noop/errors, medians; then every row that is not ok."""
    import torch

    fam: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        fam[r["family"]].append(r)
    out = [f"{datetime.date.today()} | {platform.machine()} {os.cpu_count()} cores | torch {torch.__version__}\n",
           "| family | total | ok | no-op | error | oracle passed | median params left | median MACs left "
           "| median compile s | ONNX ok | TP ok | TP / fxprune compile time (median) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def med(rs: list[dict[str, Any]], key: str) -> str:
        vals = [r[key] for r in rs if key in r]
        return f"{statistics.median(vals):.3f}" if vals else "-"

    def tp(rs: list[dict[str, Any]]) -> str:
        ran = [r for r in rs if "tp_ok" in r]
        if not ran:
            return "- | -"
        speed = [r["tp_s"] / r["compile_s"] for r in ran if r.get("tp_ok") and r.get("compile_s")]
        return f"{sum(bool(r['tp_ok']) for r in ran)}/{len(ran)} | " + (f"{statistics.median(speed):.2f}x" if speed else "-")

    for name, rs in [*sorted(fam.items()), ("**all**", rows)]:
        out.append(f"| {name} | {len(rs)} | {sum(r['ok'] for r in rs)} | {sum(bool(r.get('noop')) for r in rs)} | "
                   f"{sum('error' in r for r in rs)} | {sum(r.get('oracle') == 'passed' for r in rs)} | "
                   f"{med(rs, 'params_ratio')} | {med(rs, 'macs_ratio')} | "
                   f"{med(rs, 'compile_s')} | {sum(r.get('onnx') == 'ok' for r in rs)} | {tp(rs)} |")
    bad = [r for r in rows if not r["ok"]]
    if bad:
        def why(r: dict[str, Any]) -> str:
            if r.get("error") or r.get("noop"):
                return r.get("error") or "no-op"
            return r["oracle"] if r.get("oracle") != "passed" else str(r.get("onnx"))

        out += ["", "Not ok:", ""] + [f"- {r['model']}: {why(r)}" for r in bad]
    tp_bad = [r for r in rows if "tp_ok" in r and not r["tp_ok"]]
    if tp_bad:
        out += ["", "Torch-Pruning not ok:", ""] + [f"- {r['model']}: {r.get('tp_error', '')}" for r in tp_bad]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--only", default="", choices=["", "torchvision", "segdet", "timm"])
    parser.add_argument("--models", default="", help="comma-separated specs instead of the corpus")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--out", default="coverage.jsonl")
    parser.add_argument("--tp", action="store_true", help="also run Torch-Pruning on every model (own subprocess)")
    parser.add_argument("--tp-timeout", type=int, default=300)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-tp", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ratio)))
        return
    if args.child_tp:
        print(json.dumps(child_tp(args.child_tp, args.ratio)))
        return
    specs = args.models.split(",") if args.models else corpus(args.only)
    done = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {r["model"]: r for r in map(json.loads, f)}
    with open(args.out, "a") as f:
        for spec in specs:
            if spec in done:
                continue
            row = run_one(spec, args.ratio, args.timeout)
            if args.tp:
                row.update({k: v for k, v in run_tp(spec, args.ratio, args.tp_timeout).items() if k.startswith("tp")})
            done[spec] = row
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"{spec:45s} {'ok' if row['ok'] else 'NOT OK'} {row.get('error', '')[:100]}", flush=True)
    print(summarize([done[s] for s in specs if s in done]))


if __name__ == "__main__":
    main()
