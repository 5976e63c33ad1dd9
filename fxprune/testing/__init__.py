"""Fuzz testing for fxprune: random networks, the per-case checks, a shrinker and regression files."""

from __future__ import annotations

from fxprune.testing.fuzz import (
    CaseResult,
    FuzzCheckError,
    check_case,
    run_case,
    shrink,
    shrink_case,
    write_regression,
)
from fxprune.testing.invalid import InvalidNet
from fxprune.testing.netgen import random_net, random_spec
from fxprune.testing.netspec import NetSpec, Step, build, instantiate, make_inputs, to_source

__all__ = [
    "CaseResult",
    "FuzzCheckError",
    "InvalidNet",
    "NetSpec",
    "Step",
    "build",
    "check_case",
    "instantiate",
    "make_inputs",
    "random_net",
    "random_spec",
    "run_case",
    "shrink",
    "shrink_case",
    "to_source",
    "write_regression",
]
