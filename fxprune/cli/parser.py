"""The argparse definition of ``fxprune compile | analyze | bench``."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["build_parser"]

MODEL_HELP = (
    "the model, one of: models_zoo:NAME (the bundled test zoo); torchvision:NAME; timm:NAME; "
    "ultralytics:FILE.yaml (needs ultralytics); hf:FOLDER (a Hugging Face folder written by save_pretrained, read "
    "from disk only: its weights, or random init from its config.json; no remote code runs); "
    "path/to/file.py:NAME (a class or factory in the file, called without arguments); or a file saved with "
    "torch.save(model) (unpickling runs code from the file: refused unless --trust-pickle). Weights are random "
    "unless the source holds them or --checkpoint is given; nothing is downloaded."
)

EPILOG = """examples:
  fxprune compile models_zoo:resnet_basic --ratio 0.5 --onnx small.onnx --report report.md
  fxprune compile torchvision:resnet50 --target-macs 0.5 --round-to 8 --onnx r50.onnx --quantize int8
  fxprune analyze timm:convnext_tiny
  fxprune bench models_zoo:resnet18 --ratio 0.5 --runs 20

Errors print one line on stderr and exit with status 2 (--debug shows the traceback); with --strict, a request
that was not honoured exits with status 3.
"""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--input-shape", action="append", metavar="N,C,H,W",
                   help="shape of the example input, e.g. 1,3,224,224 (repeat once per input for multi-input "
                        "models); default: the zoo/timm entry's shape, else 1,3,224,224")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="a state_dict file (torch.save(model.state_dict())) loaded into the model, strictly")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow MODEL to be a pickled torch.save(model) file; unpickling runs code stored in the "
                        "file, so only for files you trust (default: refused; state_dicts need no flag)")
    p.add_argument("--ignore", action="append", default=[], metavar="MODULE",
                   help="qualified name of a submodule whose channels must stay (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="show library log messages and warnings")
    p.add_argument("--debug", action="store_true", help="debug logging, and a full traceback on errors")
    p.add_argument("--ort-log-level", choices=["verbose", "info", "warning", "error", "fatal"], default="error",
                   help="onnxruntime's own log level (default error; info and verbose print its arena and "
                        "allocator traces, even without --debug)")


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning policy")
    g.add_argument("--ratio", type=float, metavar="R",
                   help="fraction of channels removed from every prunable group, 0 <= R < 1 (default 0.5, "
                        "or searched when a --target-* is given)")
    g.add_argument("--target-macs", type=float, metavar="F",
                   help="keep this fraction of the original MACs (the ratio is searched), e.g. 0.5")
    g.add_argument("--target-params", type=float, metavar="F", help="keep this fraction of the original parameters")
    g.add_argument("--round-to", type=_positive_int, metavar="N", help="round kept channel counts to multiples of N")
    g.add_argument("--global-ranking", action="store_true",
                   help="rank channels across groups instead of removing the same fraction from each")
    g.add_argument("--importance", default=None, metavar="NAME",
                   help="channel importance criterion (default: activation with --data, else l2): l2, l1, "
                        "random, bn_scale, lamp, activation "
                        "(activation-aware, on --data), or taylor (first-order Taylor on --data, else on seeded "
                        "batches shaped like the inputs)")
    g.add_argument("--min-channels", type=_positive_int, default=1, metavar="N",
                   help="keep at least N channels in every group (default 1)")
    g.add_argument("--hidden", type=float, metavar="F",
                   help="language models: also remove this fraction of the hidden size (the residual stream: "
                        "embeddings, every norm and projection, lm_head), e.g. 0.25")
    g.add_argument("--prune-heads", action="store_true",
                   help="remove whole attention heads instead of thinning every head (a key/value head with its "
                        "query heads)")
    g.add_argument("--prune-query-heads", dest="prune_heads", action="store_const", const="query",
                   help="keep every key/value head and remove the same query heads from each group "
                        "(grouped-query attention; elsewhere whole heads, as --prune-heads)")
    g.add_argument("--depth", type=float, metavar="N",
                   help="language models: first remove N whole blocks (decoder layers; a fraction < 1: that share "
                        "of them), chosen by the loss on --data (fxprune.prune_depth)")
    g.add_argument("--reconstruct", action="store_true",
                   help="refit the kept weights of every layer that loses inputs by least squares on --data "
                        "(bias compensation where there is a bias); proven by the oracle like the rest")
    g.add_argument("--reconstruct-bias", dest="reconstruct", action="store_const", const="bias",
                   help="--reconstruct, after giving a Hugging Face model the biases its config can describe "
                        "(mlp_bias, attention_bias) for the refit to compensate into (in memory, not streamed)")
    g.add_argument("--module-ratio", action="append", default=[], metavar="MODULE=R",
                   help="a ratio for one submodule (and what is coupled to it), e.g. layer4=0.7 (repeatable)")
    g.add_argument("--data", metavar="PATH",
                   help="real inputs for --importance activation/taylor and int8 calibration: a folder of images, a .npy/.pt "
                        "tensor file, or a text file (bytes as token ids); default: seeded random inputs")
    g.add_argument("--leaf", action="append", default=[], metavar="MODULE",
                   help="keep this submodule opaque: traced as one call, its channels kept (repeatable)")


def _add_timing_args(p: argparse.ArgumentParser, runs: int) -> None:
    g = p.add_argument_group("timing")
    g.add_argument("--runs", type=_non_negative_int, default=runs,
                   help=f"timed runs; the median is reported (default {runs}; 0 skips timing in compile)")
    g.add_argument("--warmup", type=_non_negative_int, default=3, help="untimed warm-up runs (default 3)")
    g.add_argument("--threads", type=_positive_int,
                   help="CPU threads for timing (default: half the cores, at most 4: stable figures)")


def build_parser() -> argparse.ArgumentParser:
    """The ``fxprune`` argument parser with its subcommands."""
    parser = _Parser(prog="fxprune", description="fxprune: structured pruning as a torch.fx compiler pass.",
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from fxprune import __version__

    parser.add_argument("--version", action="version", version=f"fxprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    c = sub.add_parser("compile", help="prune a model, export ONNX, optionally quantise, write a report",
                       description="Prune MODEL, prove it with the mask oracle, export a simplified ONNX file "
                                   "checked in onnxruntime, optionally quantise it to int8 and write a report. "
                                   "Outputs appear only when every step succeeded.")
    _add_model_args(c)
    _add_prune_args(c)
    o = c.add_argument_group("outputs")
    o.add_argument("--onnx", metavar="PATH", help="write the pruned model as ONNX (simplified, onnxruntime-checked)")
    o.add_argument("--opset", type=_positive_int, default=18, help="ONNX opset (default 18)")
    o.add_argument("--no-simplify", action="store_true", help="skip simplification")
    o.add_argument("--simplifier", choices=["onnxsim", "onnxslim"], default="onnxsim",
                   help="ONNX simplifier (default onnxsim; onnxslim needs `pip install onnxslim`)")
    o.add_argument("--static-batch", action="store_true", help="fix the batch size (default: dynamic batch dim)")
    o.add_argument("--report", metavar="PATH.md",
                   help="write a Markdown report, and beside it PATH.json (same data), PATH_channels.png "
                        "and PATH_groups.dot (rendered to .svg when Graphviz is installed)")
    o.add_argument("--save", metavar="PATH.pt", help="torch.save the pruned GraphModule")
    o.add_argument("--save-pretrained", metavar="FOLDER",
                   help="Hugging Face models: save_pretrained the pruned model (its config rewritten) into a new "
                        "folder; reload with from_pretrained. hf:FOLDER with safetensors weights is streamed one "
                        "decoder layer at a time (the model is never whole in memory) unless an option needs it "
                        "whole or --in-memory is given")
    o.add_argument("--in-memory", action="store_true",
                   help="with hf:FOLDER and --save-pretrained: load the whole model instead of streaming it")
    o.add_argument("--save-plan", metavar="PATH.json", help="save the pruning plan (replay with fxprune.apply)")
    o.add_argument("--no-verify", action="store_true", help="skip the mask-equivalence oracle")
    o.add_argument("--strict", action="store_true",
                   help="exit with status 3, writing nothing, when a request was not honoured (nothing pruned, "
                        "no attention head removed, the hidden size kept); without it these are warnings")
    q = c.add_argument_group("int8 quantisation (onnxruntime; needs --onnx)")
    q.add_argument("--quantize", choices=["int8", "int8-dynamic"],
                   help="int8: static, calibrated activations (CNNs); int8-dynamic: weights only (Linear-heavy)")
    q.add_argument("--quantized-onnx", metavar="PATH", help="int8 output file (default: ONNX path with .int8.onnx)")
    q.add_argument("--calibration-samples", type=_positive_int, default=32, metavar="N",
                   help="random seeded calibration inputs (default 32)")
    q.add_argument("--quant-format", choices=["qdq", "qoperator"], default="qdq", help="static format (default qdq)")
    q.add_argument("--no-per-channel", action="store_true", help="per-tensor weight scales for static int8")
    _add_timing_args(c, runs=20)

    a = sub.add_parser("analyze", help="list the coupled channel groups, nothing is modified",
                       description="Trace MODEL and print its coupled channel groups: size, pinned channels, "
                                   "and why a group cannot be pruned.")
    _add_model_args(a)
    a.add_argument("--json", action="store_true", help="print the groups as JSON instead of a table")

    b = sub.add_parser("bench", help="time the original and the pruned model (median CPU latency)",
                       description="Prune MODEL and time the original and the pruned model on the CPU: median "
                                   "latency of --runs runs after --warmup runs, with the thread count stated.")
    _add_model_args(b)
    _add_prune_args(b)
    _add_timing_args(b, runs=30)
    b.add_argument("--onnxruntime", action="store_true", help="also time both models exported to ONNX in onnxruntime")
    from fxprune.cli.yolo import add_parser

    add_parser(sub)
    return parser
