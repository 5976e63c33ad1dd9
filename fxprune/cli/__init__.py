"""The ``fxprune`` command line: ``compile``, ``analyze`` and ``bench`` (see docs/cli.md).

Every error is reported as one line on stderr with exit status 2; ``--debug`` adds the traceback.
Library warnings are hidden unless ``--verbose`` or ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from fxprune.cli.parser import build_parser

__all__ = ["main"]

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


ORT_LOG_LEVELS = {"verbose": 0, "info": 1, "warning": 2, "error": 3, "fatal": 4}


@contextmanager
def _logging(args: argparse.Namespace) -> Iterator[None]:
    """Route fxprune's log records to stderr at the level the flags ask for, and restore everything after.

    Python warnings (torch's tracer warnings among them) are hidden unless ``-v`` or ``--debug`` is given;
    ``--debug`` shows each warning once, even those torch hides by default. onnxruntime's own C++ log
    stays at "error" unless ``--ort-log-level`` asks for more: ``--debug`` is fxprune's debug log only.
    """
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fxprune: %(levelname)s: %(message)s"))
    logger = logging.getLogger("fxprune")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        with warnings.catch_warnings(), _ort_logging(ORT_LOG_LEVELS[args.ort_log_level]):
            if args.debug:
                warnings.simplefilter("default")  # once per place, torch's own filters overridden
            elif not args.verbose:
                warnings.simplefilter("ignore")  # torch/onnx warnings are noise on a command line
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


@contextmanager
def _ort_logging(severity: int) -> Iterator[None]:
    """Set onnxruntime's C++ log severity (0 verbose .. 4 fatal) for the default logger and for the sessions
    fxprune opens; restore onnxruntime's default (2, warning) after."""
    from fxprune.passes.onnx_check import ORT_LOG_SEVERITY

    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    token = ORT_LOG_SEVERITY.set(severity)
    if ort is not None:
        ort.set_default_logger_severity(severity)
    try:
        yield
    finally:
        if ort is not None:
            ort.set_default_logger_severity(2)
        ORT_LOG_SEVERITY.reset(token)


def _one_line(e: BaseException) -> str:
    """The first line of an error, prefixed with its type unless it is one fxprune raises on purpose."""
    from fxprune.errors import FxPruneError, first_line

    if isinstance(e, (FxPruneError, ValueError)) and str(e).strip():
        return first_line(e)
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"file not found: {e.filename}"
    return first_line(e, typed=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fxprune`` command line.

    Args:
        argv: The arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on any error, 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from fxprune.cli.bench import run_bench
    from fxprune.cli.commands import run_analyze, run_compile
    from fxprune.cli.yolo import run_finetune_yolo

    handler = {"compile": run_compile, "analyze": run_analyze, "bench": run_bench,
               "finetune-yolo": run_finetune_yolo}[args.command]
    with _logging(args):
        try:
            return handler(args)
        except KeyboardInterrupt:
            sys.stderr.write("fxprune: interrupted\n")
            return EXIT_INTERRUPTED
        except Exception as e:  # noqa: BLE001 - every failure becomes one line and status 2
            if args.debug:
                traceback.print_exc(file=sys.stderr)
            sys.stderr.write(f"fxprune {args.command}: error: {_one_line(e)}\n")
            return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
