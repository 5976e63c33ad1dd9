"""The worker ``tests/test_ddp.py`` launches with ``torchrun --nproc_per_node=2`` (gloo, CPU). Not a test module.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT``.

Every phase starts from the same seeded conv net, cut with ``fxprune.compile(model, 0.5, ...)`` on every rank,
and distils it from the unpruned model with ``finetune`` on a ``DistributedSampler`` loader:

- ``ddp-graph`` / ``ddp-module``: the GraphModule and the ``output="module"`` result, ``finetune(ddp=True)``.
- ``fsdp-graph`` / ``fsdp-module``: the FSDP2 (``fully_shard``) snippet of docs/recovery.md, executed as
  written, with ``fxprune.compile`` bound to the phase's ``output``.
- ``fsdp1-graph`` / ``fsdp1-module``: the same student wrapped in ``FullyShardedDataParallel`` instead.

Each rank runs ``finetune`` inside its own empty scratch directory (``OUT/scratch{rank}``) and writes, for
the test to compare, ``OUT/{phase}_rank{rank}.pt`` (the full state dict after training) and
``OUT/results_rank{rank}.json`` (losses, wrapper types, what the scratch directory holds afterwards).
Progress goes to stderr, which torchrun's ``--redirects`` keeps per rank.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import fxprune
from fxprune.recovery import finetune

DOCS = Path(__file__).resolve().parent.parent / "docs" / "recovery.md"
FSDP_MARKER = "<!-- not tested here: tests/test_ddp.py runs it under torchrun -->"
EPOCHS, LR = 3, 0.05  # the FSDP snippet in the docs must use the same (checked below)


def build_data() -> TensorDataset:
    """128 learnable samples: the label is the arg-max of a fixed linear map of the channel means."""
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(128, 3, 8, 8, generator=g)
    ys = (xs.mean((2, 3)) @ torch.randn(3, 4, generator=g)).argmax(1)
    return TensorDataset(xs, ys)


def build_model(data: TensorDataset) -> nn.Module:
    """A small conv net with BatchNorm (buffers are part of the check), trained a little: the teacher.

    Seeded and single-threaded, so every rank builds bit-for-bit the same model (and the same cut).
    """
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(data.tensors[0]), data.tensors[1]).backward()
        opt.step()
    return model.eval()


def full_loss(model: nn.Module, data: TensorDataset) -> float:
    """Cross-entropy of ``model`` over the whole data set, in eval mode (the same on every rank)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = float(F.cross_entropy(model(data.tensors[0]), data.tensors[1]))
    model.train(was)
    return loss


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (FSDP2 parameters are DTensors: gathered here, a collective)."""
    state = model.state_dict()
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}


def fsdp_snippet() -> str:
    """The FSDP code block of docs/recovery.md, the one right after ``FSDP_MARKER``."""
    text = DOCS.read_text()
    match = re.search(re.escape(FSDP_MARKER) + r"\n```python\n(.*?)```", text, re.S)
    if match is None:
        raise SystemExit(f"no python block after {FSDP_MARKER!r} in {DOCS}")
    block = match.group(1)
    if f"epochs={EPOCHS}, lr={LR}" not in block:
        raise SystemExit(f"the docs' FSDP block must train with epochs={EPOCHS}, lr={LR} like the DDP phases")
    return block


def run_phase(phase: str, output: str, data: TensorDataset, scratch: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Prune, wrap as the phase says and fine-tune; returns the trained student and what to report."""
    model = build_model(data)
    x = data.tensors[0][:2]
    before = full_loss(fxprune.compile(model, 0.5, example_inputs=(x,), output=output), data)
    loader = DataLoader(data, batch_size=16, sampler=DistributedSampler(data, shuffle=True, seed=0))
    cwd = Path.cwd()
    os.chdir(scratch)  # anything finetune wrote to a relative path would land here
    try:
        if phase.startswith("ddp"):
            pruned = fxprune.compile(model, 0.5, example_inputs=(x,), output=output)
            history = finetune(pruned, loader, teacher=model, epochs=EPOCHS, lr=LR, ddp=True)
        elif phase.startswith("fsdp1"):
            from torch.distributed.fsdp import FullyShardedDataParallel

            pruned = FullyShardedDataParallel(fxprune.compile(model, 0.5, example_inputs=(x,), output=output),
                                              device_id=torch.device("cpu"), use_orig_params=True)
            history = finetune(pruned, loader, teacher=model, epochs=EPOCHS, lr=LR)
        else:
            namespace: dict[str, Any] = {
                "fxprune": types.SimpleNamespace(compile=functools.partial(fxprune.compile, output=output)),
                "model": model, "x": x, "loader": loader, "finetune": finetune,
            }
            exec(compile(fsdp_snippet(), f"{DOCS.name}:fsdp", "exec"), namespace)  # noqa: S102 - our docs
            pruned, history = namespace["pruned"], namespace["history"]
    finally:
        os.chdir(cwd)
    report = {
        "history": [h.loss for h in history],
        "before": before,
        "after": full_loss(pruned, data),
        "type": type(pruned).__name__,
        "param_type": type(next(pruned.parameters())).__name__,
        "scratch": sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*")),
    }
    return pruned, report


def main() -> None:
    """Run every phase on this rank and write its state dicts and report under ``sys.argv[1]``."""
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    scratch = out / f"scratch{rank}"
    scratch.mkdir(parents=True, exist_ok=True)
    data = build_data()
    results: dict[str, Any] = {"world_size": dist.get_world_size()}
    for phase in ("ddp-graph", "ddp-module", "fsdp-graph", "fsdp-module", "fsdp1-graph", "fsdp1-module"):
        pruned, results[phase] = run_phase(phase, phase.split("-")[1], data, scratch)
        # FULL_STATE_DICT (FSDP1's default) gathers on every rank, under the model's own names.
        state = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in full_state(pruned).items()}
        torch.save(state, out / f"{phase}_rank{rank}.pt")
    (out / f"results_rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
