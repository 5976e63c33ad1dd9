"""Shared test helpers: every pruning test goes through ``check_pruned``, which applies the oracle."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import fxprune
from fxprune.outputs import tensors_of


def check_pruned(
    model: torch.nn.Module,
    inputs: tuple[Any, ...],
    ratio: float = 0.5,
    *,
    importance: Any = "l2",
    expect_shrink: bool = True,
    expect_exact: bool = True,
    **kwargs: Any,
) -> fxprune.PruneResult:
    """Prune, then assert: oracle passes, outputs keep structure and shapes, names kept, params drop."""
    before = copy.deepcopy(model.state_dict())
    result = fxprune.prune(model, ratio, example_inputs=inputs, importance=importance, verify=True, **kwargs)
    # The caller's model is untouched.
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    oracle = result.oracle
    assert oracle is not None
    if expect_exact:
        assert oracle.applicable, oracle.reason
        assert oracle.passed, oracle.max_abs_diff
    with torch.no_grad():
        ref = tensors_of(model.eval()(*inputs))
        got = tensors_of(result.model.eval()(*inputs))
    assert [t.shape for t in ref] == [t.shape for t in got]
    assert set(result.model.state_dict()) == set(model.state_dict())
    if expect_shrink:
        assert result.modified
        assert result.params_after < result.params_before
    return result


@pytest.fixture
def pruned_ok():
    """The ``check_pruned`` helper as a fixture."""
    return check_pruned


@pytest.fixture
def one_thread() -> object:
    """One torch thread: on a small, shared CI machine two threads contend and slow every op tenfold."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
