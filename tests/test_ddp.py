"""Distributed fine-tuning for real: two processes under ``torchrun`` (gloo, CPU) run ``tests/ddp_worker.py``.

One launch covers the pruned GraphModule and the ``output="module"`` result under ``finetune(ddp=True)``,
under FSDP2 (the docs' ``fully_shard`` snippet, executed as written) and under FSDP1. The tests below read
what each rank saved and printed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "ddp_worker.py"
PHASES = ("ddp-graph", "ddp-module", "fsdp-graph", "fsdp-module", "fsdp1-graph", "fsdp1-module")
EPOCHS = 3  # ddp_worker.EPOCHS
PROGRESS = re.compile(r"finetune (epoch )?\d+/\d+")  # the tqdm bar ("finetune 1/3") and the epoch lines

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


@dataclass(frozen=True)
class Run:
    """What the two-process run left behind."""

    out: Path
    results: list[dict[str, Any]]  # per rank
    logs: list[str]  # per rank: stdout and stderr as torchrun's --redirects kept them

    def state(self, phase: str, rank: int) -> dict[str, torch.Tensor]:
        """The full state dict ``rank`` saved after ``phase``."""
        return torch.load(self.out / f"{phase}_rank{rank}.pt")


def _rank_log(log_dir: Path, rank: int) -> str:
    files = sorted(log_dir.glob(f"*/attempt_*/{rank}/std*.log"))
    assert [f.name for f in files] == ["stderr.log", "stdout.log"], files
    # tqdm redraws with carriage returns: split them into lines too.
    return "\n".join(f.read_text().replace("\r", "\n") for f in files)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Launch the worker on two processes once; fail with both ranks' output if it fails."""
    base = tmp_path_factory.mktemp("ddp")
    out, log_dir = base / "out", base / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--log-dir", str(log_dir), "--redirects", "3", str(WORKER), str(out)]
    proc = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        logs = "\n".join(f"--- {f}\n{f.read_text()[-4000:]}" for f in sorted(log_dir.rglob("*.log")))
        pytest.fail(f"torchrun exited with {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}\n{logs}")
    results = [json.loads((out / f"results_rank{r}.json").read_text()) for r in (0, 1)]
    return Run(out, results, [_rank_log(log_dir, r) for r in (0, 1)])


def test_two_ranks_ran_every_phase(run: Run) -> None:
    assert [r["world_size"] for r in run.results] == [2, 2]
    for r in run.results:
        assert set(r) == {"world_size", *PHASES}


@pytest.mark.parametrize("phase", PHASES)
def test_loss_falls(run: Run, phase: str) -> None:
    got = run.results[0][phase]
    history = got["history"]
    assert len(history) == EPOCHS
    assert all(later < earlier for earlier, later in zip(history, history[1:], strict=False)), history
    assert history[-1] < 0.7 * history[0], history
    assert got["after"] < 0.8 * got["before"], got  # on the whole data set, in eval mode


@pytest.mark.parametrize("phase", PHASES)
def test_ranks_end_bit_identical(run: Run, phase: str) -> None:
    # The losses are averaged over both ranks, and both ranks evaluate the same model.
    assert run.results[0][phase] == run.results[1][phase]
    mine, theirs = run.state(phase, 0), run.state(phase, 1)
    assert list(mine) == list(theirs)
    assert any("running_mean" in k for k in mine)  # BatchNorm buffers are part of it
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


def test_wrappers_were_real(run: Run) -> None:
    got = run.results[0]
    assert "GraphModule" in got["ddp-graph"]["type"] and got["ddp-module"]["type"] == "Sequential"
    assert {got[p]["param_type"] for p in ("ddp-graph", "ddp-module")} == {"Parameter"}  # unwrapped again
    for p in ("fsdp-graph", "fsdp-module"):  # FSDP2 really sharded the student
        assert got[p]["type"].startswith("FSDP") and got[p]["param_type"] == "DTensor", got[p]
    assert {got[p]["type"] for p in ("fsdp1-graph", "fsdp1-module")} == {"FullyShardedDataParallel"}


@pytest.mark.parametrize("output", ["graph", "module"])
def test_fsdp_trains_like_ddp(run: Run, output: str) -> None:
    ddp = run.state(f"ddp-{output}", 0)
    for kind in ("fsdp", "fsdp1"):
        sharded = run.state(f"{kind}-{output}", 0)
        assert list(sharded) == list(ddp)
        for k in ddp:
            torch.testing.assert_close(sharded[k], ddp[k], rtol=1e-5, atol=1e-6, msg=f"{kind}-{output} {k}")
    # The GraphModule and the module are the same function with the same weights: they train alike.
    graph = run.state("ddp-graph", 0)
    for k in graph:
        torch.testing.assert_close(ddp[k], graph[k], rtol=1e-5, atol=1e-6)


def test_only_rank0_prints_progress(run: Run) -> None:
    rank0, rank1 = run.logs
    lines = rank0.splitlines()
    epoch_lines = [ln for ln in lines if re.match(r"finetune epoch \d+/\d+: loss", ln)]
    records = [ln for ln in lines if ln.startswith("INFO fxprune.recovery.finetune: finetune epoch")]
    assert len(epoch_lines) == len(records) == EPOCHS * len(PHASES), rank0[-3000:]
    assert any(ln.startswith(f"finetune 1/{EPOCHS}:") for ln in lines)  # the tqdm bar
    assert "fxprune.pipeline" in rank1  # rank 1's output was captured...
    assert not PROGRESS.search(rank1), rank1[-3000:]  # ...and holds no progress
    assert "fxprune.recovery.finetune" not in rank1


def test_no_rank_writes_files(run: Run) -> None:
    for r in run.results:
        assert all(r[p]["scratch"] == [] for p in PHASES)  # finetune ran in an empty cwd that stayed empty
    written = sorted(str(p.relative_to(run.out)) for p in run.out.rglob("*") if p.is_file())
    expected = sorted([f"results_rank{r}.json" for r in (0, 1)] + [f"{p}_rank{r}.pt" for p in PHASES for r in (0, 1)])
    assert written == expected  # only what the worker itself saved
