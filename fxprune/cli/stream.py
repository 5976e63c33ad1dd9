"""``fxprune compile hf:FOLDER ... --save-pretrained OUT`` streamed: one decoder layer in memory at a time
(``fxprune.streaming``), for the options that need no whole model; anything else loads it whole."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fxprune.cli.common import DEFAULT_TOKENS, EXIT_STRICT, check_inputs_exist, check_ratio
from fxprune.cli.staging import OutputStage
from fxprune.errors import ArgumentError
from fxprune.model_loader import parse_shape

__all__ = ["run_stream", "stream_blockers"]

# options that need the whole model, by the name the note gives them
_WHOLE = (("onnx", "--onnx"), ("quantize", "--quantize"), ("report", "--report"), ("save", "--save"),
          ("save_plan", "--save-plan"), ("target_macs", "--target-macs"), ("target_params", "--target-params"),
          ("hidden", "--hidden"), ("depth", "--depth"), ("global_ranking", "--global-ranking"),
          ("module_ratio", "--module-ratio"), ("leaf", "--leaf"), ("checkpoint", "--checkpoint"))


def stream_blockers(args: argparse.Namespace) -> list[str]:
    """The given options that streaming cannot honour (empty: the command can stream)."""
    flags = [flag for attr, flag in _WHOLE if getattr(args, attr, None) not in (None, False, [], ())]
    if (args.importance or "").lower() == "taylor":
        flags.append("--importance taylor")
    if getattr(args, "reconstruct", False) == "bias":  # every layer's config changes first
        flags.append("--reconstruct-bias")
    return flags


def run_stream(args: argparse.Namespace) -> int:
    """Prune ``hf:FOLDER`` layer by layer into ``--save-pretrained``; all or nothing is written."""
    from fxprune.streaming import prune_pretrained

    check_ratio(args)
    check_inputs_exist(args)
    folder = str(args.model)[len("hf:"):]
    t0 = time.perf_counter()
    with OutputStage() as stage:
        stage.check_folder(args.save_pretrained, "--save-pretrained")
        vocab = _vocabulary(folder)
        shapes = tuple(parse_shape(s) for s in args.input_shape) if args.input_shape else (DEFAULT_TOKENS,)
        gen = torch.Generator().manual_seed(args.seed)
        example = tuple(torch.randint(0, vocab, shape, generator=gen) for shape in shapes)
        calibration = _calibration(args, shapes, vocab)
        if args.reconstruct and not calibration:
            raise ArgumentError("--reconstruct refits the kept weights on real inputs: pass --data")
        importance = args.importance or ("activation" if calibration else "l2")
        if importance.lower() == "activation" and not calibration:
            raise ArgumentError("--importance activation measures real inputs: pass --data (a text file)")

        def said(i: int, n: int, report: Any) -> None:
            how = f"oracle {report.oracle}" if report.oracle else (f"kept whole: {report.skipped}" if report.skipped
                                                                    else "no oracle")
            sys.stderr.write(f"fxprune: layer {i}/{n} {report.name}: {report.params_before:,} -> "
                             f"{report.params_after:,} parameters ({how}) {time.perf_counter() - t0:.0f}s\n")

        result = prune_pretrained(folder, stage.path(args.save_pretrained), args.ratio if args.ratio is not None else 0.5,
                                  example_inputs=example, calibration=calibration, importance=importance,
                                  prune_heads=args.prune_heads, round_to=args.round_to, min_channels=args.min_channels,
                                  ignore=tuple(args.ignore), reconstruct=args.reconstruct, verify=not args.no_verify,
                                  on_layer=said)
        if args.strict and result.unhonoured:
            sys.stderr.write(f"fxprune compile: error: --strict: {len(result.unhonoured)} request(s) not honoured, "
                             f"nothing written: {'; '.join(result.unhonoured)}\n")
            return EXIT_STRICT
        stage.commit()
    proven = sum(p.oracle == "passed" for p in result.parts)
    print(f"{args.model} streamed layer by layer ({len(result.parts)} layers, importance {importance}"
          f"{', ' + str(len(calibration)) + ' calibration batches' if calibration else ''})")
    print(f"parameters: {result.params_before:,} -> {result.params_after:,} "
          f"({result.params_after / max(result.params_before, 1):.1%})")
    print(f"oracle: {proven} of {len(result.parts)} layers proven" + ("" if not args.no_verify else " (--no-verify)"))
    print("config: " + (", ".join(f"{k}={v}" for k, v in result.config_changes.items()) or "unchanged"))
    print(f"wrote {Path(args.save_pretrained)}/ ({', '.join(result.files)}) in {result.seconds:.1f}s")
    if result.unhonoured:
        print(f"not honoured ({len(result.unhonoured)}; --strict makes this an error): " + "; ".join(result.unhonoured))
    return 0


def _vocabulary(folder: str) -> int:
    from fxprune.streaming_model import open_skeleton

    return open_skeleton(folder).vocabulary


def _calibration(args: argparse.Namespace, shapes: tuple[tuple[int, ...], ...], vocab: int) -> list[Any] | None:
    if not args.data:
        return None
    from fxprune.data import load_batches

    return load_batches(args.data, shapes, dtype=torch.int64, vocabulary=vocab)[:32] or None
