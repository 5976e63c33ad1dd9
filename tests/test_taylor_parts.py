"""Taylor importance of a model pruned part by part: every part is scored by the whole model's loss.

A part (a Hugging Face decoder, a block under an untraceable root) takes other inputs than the model and returns
other outputs, so the user's batches and loss cannot run on it. Its scores must be ``|w * dL/dw|`` with ``L``
the whole model's loss on the user's batches, exactly as when the model is traced whole; the caller's model is
never run or changed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.passes.importance import GroupTensors
from tests.test_activation_importance import Untraceable

VOCAB = 100
_LLAMA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 128, "vocab_size": VOCAB, "max_position_embeddings": 64}
_GPT2 = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "vocab_size": VOCAB, "n_positions": 64}


class Recording(fxprune.Taylor):
    """Taylor, recording the gradient rows and the scores every group is given."""

    def __init__(self, batches: list[tuple[Any, Any]], loss_fn: Any = None) -> None:
        super().__init__(batches, loss_fn)
        self.grads: list[tuple[str, int, torch.Tensor | None, torch.Tensor]] = []

    def __call__(self, g: GroupTensors) -> np.ndarray:
        self.grads += [(m.param, m.dim, m.index, m.grad.clone()) for m in g.members if m.grad is not None]
        return super().__call__(g)


def _lm_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out["logits"].reshape(-1, VOCAB), target.reshape(-1))


def _token_batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(1, VOCAB, (2, 8), generator=gen), torch.randint(1, VOCAB, (2, 8), generator=gen))
            for _ in range(n)]


def _hand_gradients(model: nn.Module, batches: list[tuple[Any, Any]], loss_fn: Any) -> dict[str, torch.Tensor]:
    """dL/dw of the whole model summed over the batches, on a copy in eval mode."""
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(True)
    for inputs, target in batches:
        loss_fn(work(inputs), target).backward()
    return {n: p.grad.detach().clone() for n, p in work.named_parameters() if p.grad is not None}


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "training": {n: m.training for n, m in model.named_modules()}}


def _assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    assert all(torch.equal(p, before["params"][n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["requires_grad"]
    assert {n: m.training for n, m in model.named_modules()} == before["training"]


def _kept_rows(pruned: torch.Tensor, original: torch.Tensor, dim: int) -> set[int]:
    """The channels of ``original`` (along ``dim``) that ``pruned`` kept, found by exact match."""
    rows, kept = original.movedim(dim, 0), set()
    for row in pruned.movedim(dim, 0):
        (hit,) = [i for i in range(rows.shape[0]) if torch.equal(rows[i], row)]
        kept.add(hit)
    return kept


def _top(scores: torch.Tensor, k: int) -> set[int]:
    return set(torch.topk(scores, k).indices.tolist())


def _oracle_passed(result: fxprune.PruneResult) -> bool:
    compiled = [p for p in result.parts if not p.skipped]
    return bool(compiled) and all(p.oracle == "passed" for p in compiled)


@pytest.fixture(autouse=True)
def _quiet(one_thread: object) -> None:
    try:
        import transformers
    except ImportError:  # the Hugging Face tests skip themselves
        return
    transformers.logging.set_verbosity_error()


def test_llama_parts_are_scored_by_the_whole_models_loss() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA)).eval()
    batches, before = _token_batches(), _snapshot(model)
    taylor = Recording(batches, _lm_loss)
    r = fxprune.prune(model, 0.5, example_inputs=(batches[0][0],), importance=taylor, output="module", verify=True)
    assert r.oracle is None and r.parts, "a causal LM's root is pruned piecewise"
    assert _oracle_passed(r), r.parts
    assert r.params_after < r.params_before
    _assert_unchanged(model, before)
    hand = _hand_gradients(model, batches, _lm_loss)
    # Every gradient a part was scored with is the whole model's, for the same parameter.
    assert taylor.grads
    for param, dim, index, grad in taylor.grads:
        (full,) = [n for n in hand if n.endswith("." + param.removeprefix("inner."))]
        want = hand[full].movedim(dim, 0).reshape(hand[full].shape[dim], -1)
        torch.testing.assert_close(grad, want if index is None else want[index], rtol=1e-5, atol=1e-7)
    assert {p for p, *_ in taylor.grads} >= {f"inner.layers.{i}.{m}.weight" for i in range(2)
                                             for m in ("mlp.gate_proj", "mlp.down_proj", "self_attn.v_proj")}
    # The MLP of layer 0 kept exactly its top channels by |w * dL/dw| of gate, up and down.
    mlp, pruned = model.model.layers[0].mlp, r.model.model.layers[0].mlp
    g = "model.layers.0.mlp."
    scores = ((mlp.gate_proj.weight * hand[g + "gate_proj.weight"]).sum(1).abs()
              + (mlp.up_proj.weight * hand[g + "up_proj.weight"]).sum(1).abs()
              + (mlp.down_proj.weight * hand[g + "down_proj.weight"]).sum(0).abs()).detach()
    k = pruned.gate_proj.out_features
    assert k < mlp.gate_proj.out_features
    assert _kept_rows(pruned.gate_proj.weight, mlp.gate_proj.weight, 0) == _top(scores, k)
    assert r.model.config.intermediate_size == k
    with torch.no_grad():
        assert r.model(batches[0][0]).logits.shape == (2, 8, VOCAB)


def test_gpt2_parts_under_a_callers_no_grad() -> None:
    """GPT-2 (tied lm_head, Conv1D weights stored [in, out]); the caller's no_grad does not stop the gradients."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**_GPT2)).eval()
    batches, before = _token_batches(2), _snapshot(model)
    with torch.no_grad():
        r = fxprune.prune(model, 0.5, example_inputs=(batches[0][0],), importance=fxprune.Taylor(batches, _lm_loss),
                          output="module", verify=True, ignore=[f"transformer.h.{i}.attn" for i in range(2)])
    assert r.oracle is None and _oracle_passed(r), r.parts
    _assert_unchanged(model, before)
    hand = _hand_gradients(model, batches, _lm_loss)
    mlp, pruned = model.transformer.h[1].mlp, r.model.transformer.h[1].mlp
    g = "transformer.h.1.mlp."
    scores = ((mlp.c_fc.weight * hand[g + "c_fc.weight"]).sum(0).abs()
              + (mlp.c_fc.bias * hand[g + "c_fc.bias"]).abs()
              + (mlp.c_proj.weight * hand[g + "c_proj.weight"]).sum(1).abs()).detach()
    k = pruned.c_fc.weight.shape[1]
    assert k < mlp.c_fc.weight.shape[1]
    assert _kept_rows(pruned.c_fc.weight, mlp.c_fc.weight, 1) == _top(scores, k)


def test_a_part_whose_inputs_differ_from_the_roots() -> None:
    """The root's batches (5 features) do not fit the block (8): Taylor still finds the silent channels, whose
    gradients through the ReLU are zero, from the whole model's loss."""
    torch.manual_seed(1)
    model, x = Untraceable().eval(), torch.randn(4, 5)
    batches = [(torch.randn(16, 5), torch.randn(16, 4)) for _ in range(3)]
    r = fxprune.prune(model, 0.25, example_inputs=(x,), ignore=["scale"],
                      importance=fxprune.Taylor(batches, F.mse_loss))
    assert [p.name for p in r.parts if p.params_after < p.params_before] == ["block"]
    assert _kept_rows(r.model.block.a.weight, model.block.a.weight, 0) == set(range(4, 16))
    with torch.no_grad():  # exactly the silent channels went: the output is unchanged
        assert torch.allclose(r.model(batches[0][0]), model(batches[0][0]), atol=1e-5)


class OpaqueBlock(nn.Module):
    """Branches on data, so a traced root keeps it opaque; its ``mlp`` is pruned as a part of it."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # never true: data-dependent control flow
            x = -x
        return self.mlp(x)


class TracedRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre, self.drop, self.block = nn.Linear(5, 8), nn.Dropout(0.5), OpaqueBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.drop(self.pre(x)))


def test_parts_of_an_opaque_module_in_a_traced_root_of_a_training_model() -> None:
    """The caller's model is in train mode: the gradients are still taken in eval mode (no dropout), as for a
    traced graph, and the opaque block's part keeps its top channels by the whole model's |w * dL/dw|."""
    torch.manual_seed(0)
    model, x = TracedRoot().train(), torch.randn(4, 5)
    batches = [(torch.randn(16, 5), torch.randn(16, 4)) for _ in range(3)]
    before = _snapshot(model)
    r = fxprune.prune(model, 0.5, example_inputs=(x,), importance=fxprune.Taylor(batches, F.mse_loss))
    assert [p.name for p in r.parts if p.params_after < p.params_before] == ["block"], r.parts
    _assert_unchanged(model, before)
    hand, mlp = _hand_gradients(model, batches, F.mse_loss), model.block.mlp
    scores = ((mlp[0].weight * hand["block.mlp.0.weight"]).sum(1).abs()
              + (mlp[0].bias * hand["block.mlp.0.bias"]).abs()
              + (mlp[2].weight * hand["block.mlp.2.weight"]).sum(0).abs()).detach()
    pruned = r.model.block.mlp[0]
    assert pruned.out_features < 16
    assert _kept_rows(pruned.weight, mlp[0].weight, 0) == _top(scores, pruned.out_features)


def test_a_loss_that_does_not_fit_the_whole_model_is_an_argument_error() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA)).eval()
    batches = _token_batches(1)
    with pytest.raises(fxprune.ArgumentError, match="loss_fn") as info:
        fxprune.prune(model, 0.5, example_inputs=(batches[0][0],),
                      importance=fxprune.Taylor(batches, lambda out, t: out["no_such_output"].sum()))
    assert isinstance(info.value, ValueError) and not isinstance(info.value, KeyError)


_CLI_NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Linear(5, 8)
        self.block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: the root is pruned part by part
            x = -x
        return self.block(self.scale(x))
"""


def test_cli_taylor_on_data_prunes_the_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``--importance taylor --data`` on a root pruned part by part (the block takes 8 features, the data 5).

    The command line cannot run a language model on token ids (its example inputs are float), so this model
    stands in for one."""
    from fxprune.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(_CLI_NET)
    torch.save(torch.randn(16, 5, generator=torch.Generator().manual_seed(0)), tmp_path / "real.pt")
    code = main(["compile", "nets.py:Net", "--input-shape", "4,5", "--ratio", "0.5", "--importance", "taylor",
                 "--data", "real.pt", "--runs", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    params = next(ln.split() for ln in out.splitlines() if ln.startswith("params"))
    assert int(params[2]) < int(params[1])
