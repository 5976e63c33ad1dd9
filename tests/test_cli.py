"""The ``fxprune`` command line end to end, its one-line errors, and every command block of the docs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
UNTRACEABLE = """
import torch
from torch import nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 8, 3)

    def forward(self, x):
        y = self.a(x)
        if y.sum() > 0:  # data-dependent control flow in the root forward: torch.fx cannot trace it
            y = y * 2
        return self.b(y)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Checked(Tiny):
    def forward(self, x):
        torch._assert(x.shape[-1] == 16, "16x16 images")  # a TracerWarning when traced for ONNX
        return super().forward(x)
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; return (status, stdout, stderr)."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(UNTRACEABLE)
    return tmp_path


def test_help_for_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    assert all(cmd in top for cmd in ("compile", "analyze", "bench"))
    expected = {
        "compile": ["--ratio", "--target-macs", "--round-to", "--input-shape", "--onnx", "--opset", "--no-simplify",
                    "--report", "--quantize", "int8-dynamic", "--calibration-samples", "--checkpoint", "--debug"],
        "analyze": ["--input-shape", "--json", "--checkpoint"],
        "bench": ["--runs", "--threads", "--warmup", "--ratio", "--onnxruntime"],
    }
    for cmd, flags in expected.items():
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert all(flag in text for flag in flags), cmd


def test_compile_end_to_end(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["compile", "models_zoo:resnet_basic", "--ratio", "0.5", "--onnx", "out.onnx",
                          "--report", "report.md", "--save", "pruned.pt", "--runs", "3"], capsys)
    assert code == 0, err
    for name in ("out.onnx", "report.md", "report.json", "report_channels.png", "report_groups.dot", "pruned.pt"):
        assert (work / name).stat().st_size > 0, name
    assert not [p for p in work.iterdir() if p.name.startswith(".")], "staging folders left behind"
    assert "mask oracle: passed" in out and "out.onnx" in out

    data = json.loads((work / "report.json").read_text())
    assert data["model"] == "models_zoo:resnet_basic"
    assert data["after"]["params"] < 0.5 * data["before"]["params"]
    assert data["after"]["macs"] < data["before"]["macs"]
    assert data["after"]["onnx_bytes"] < data["before"]["onnx_bytes"]
    assert data["latency"]["runs"] == 3 and data["latency"]["threads"] >= 1
    assert data["onnx"]["nodes_after_simplify"] > 0 and data["onnx"]["bytes_after_simplify"] > 0
    prunable = [g for g in data["groups"] if g["prunable"]]
    assert prunable and all(g["kept"] == g["total"] // 2 for g in prunable)
    assert [g["reason"] for g in data["groups"] if not g["prunable"]] == ["model output (at fc[1])"]
    md = (work / "report.md").read_text()
    assert f"| parameters | {data['before']['params']:,} | {data['after']['params']:,} |" in md
    assert "model output" in md and "before simplify" in md and "report_channels.png" in md
    assert (work / "report_channels.png").read_bytes()[:4] == b"\x89PNG"
    assert "digraph" in (work / "report_groups.dot").read_text()

    # the ONNX file computes what the pruned PyTorch model computes, at another batch size too
    pruned = torch.load(work / "pruned.pt", weights_only=False).eval()
    session = ort.InferenceSession(str(work / "out.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = pruned(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


BAD = {
    "missing file": (["compile", "missing_model.pt", "--onnx", "o.onnx"], "not found"),
    "wrong input shape": (["compile", "models_zoo:resnet_basic", "--input-shape", "1,3,7", "--onnx", "o.onnx"],
                          "does not run on input shape 1x3x7"),
    "ratio 1.5": (["compile", "models_zoo:resnet_basic", "--ratio", "1.5", "--onnx", "o.onnx"], "--ratio"),
    "unknown model": (["compile", "no_such_model", "--onnx", "o.onnx"], "unknown model"),
    "unknown zoo name": (["compile", "models_zoo:nope", "--onnx", "o.onnx"], "unknown models_zoo model"),
    "untraceable file": (["compile", "nets.py:Branchy", "--input-shape", "1,3,16,16", "--onnx", "o.onnx",
                          "--report", "r.md"], "cannot trace Branchy.forward"),
    "missing class": (["compile", "nets.py:Nope", "--onnx", "o.onnx"], "has no class or function 'Nope'"),
    "state_dict as model": (["compile", "tiny_sd.pt", "--onnx", "o.onnx"], "--checkpoint"),
    "bad checkpoint": (["compile", "nets.py:Tiny", "--input-shape", "1,3,16,16", "--checkpoint", "nets.py"],
                       "not a state_dict"),
    "bad shape text": (["analyze", "models_zoo:mlp", "--input-shape", "1,x,3"], "--input-shape"),
    "quantize without onnx": (["compile", "models_zoo:mlp", "--quantize", "int8"], "--quantize needs --onnx"),
    "missing output folder": (["compile", "models_zoo:mlp", "--onnx", "no/such/dir/o.onnx"], "does not exist"),
    "usage error": (["compile", "models_zoo:mlp", "--round-to", "0"], "--round-to"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_status_2_and_no_output(case: str, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(torch.nn.Linear(2, 2).state_dict(), work / "tiny_sd.pt")
    argv, needle = BAD[case]
    before = listing(work)
    try:
        code, out, err = run(argv, capsys)
    except SystemExit as e:  # argparse usage errors exit directly
        code, (out, err) = int(e.code), capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2
    assert len(lines) == 1, err
    assert "error:" in lines[0] and needle in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert listing(work) == before


def test_debug_shows_traceback(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["compile", "models_zoo:nope", "--debug"], capsys)
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("fxprune compile: error:")


def test_debug_keeps_onnxruntime_logs_out(work: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """--debug is fxprune's debug log; onnxruntime's arena/session traces need --ort-log-level."""
    argv = ["compile", "models_zoo:mlp", "--ratio", "0.5", "--onnx", "m.onnx", "--runs", "0", "--debug"]
    assert main(argv) == 0
    err = capfd.readouterr().err  # onnxruntime writes to file descriptor 2 from C++
    assert "fxprune: DEBUG:" in err and "fxprune: INFO:" in err
    ort_lines = [ln for ln in err.splitlines() if ":onnxruntime:" in ln or "Arena" in ln]
    assert ort_lines == [], ort_lines[:3]
    assert main([*argv, "--ort-log-level", "verbose"]) == 0  # asked for: then they do show
    assert "[I:onnxruntime:" in capfd.readouterr().err


def test_no_warning_lines_without_verbose(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """torch's TracerWarning (torch._assert on a shape, traced for ONNX) is hidden unless -v/--debug."""
    argv = ["compile", "nets.py:Checked", "--input-shape", "1,3,16,16", "--onnx", "o.onnx", "--runs", "0"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert [ln for ln in err.splitlines() if "Warning" in ln] == []
    code, _, err = run([*argv, "--debug"], capsys)
    assert code == 0 and "TracerWarning" in err  # the model does warn: the default run hid it


def test_failure_after_export_leaves_nothing(work: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import fxprune.quantize
    from fxprune.quantize import QuantizationError

    def broken(*args: object, **kwargs: object) -> None:
        raise QuantizationError("simulated failure")

    monkeypatch.setattr(fxprune.quantize, "quantize_onnx", broken)
    before = listing(work)
    code, _, err = run(["compile", "models_zoo:mlp", "--onnx", "m.onnx", "--report", "m.md", "--quantize", "int8",
                        "--runs", "0"], capsys)
    assert code == 2 and "simulated failure" in err
    assert listing(work) == before  # the ONNX file was written, then discarded with its staging folder


def test_analyze_prints_groups(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["analyze", "models_zoo:resnet_basic"], capsys)
    assert code == 0
    assert "6 of 7 groups prunable" in out and "conv1.weight[0]" in out and "model output" in out
    code, out, _ = run(["analyze", "models_zoo:mlp", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["input_shapes"] == [[1, 64]] and any(g["prunable"] for g in data["groups"])


def test_bench_prints_latencies(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["bench", "models_zoo:resnet_basic", "--runs", "3", "--warmup", "1", "--threads", "1"], capsys)
    assert code == 0
    assert "1 thread, median of 3 runs" in out and "interleaved" in out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith(("original", "pruned"))}
    for name in ("original", "pruned"):  # median, then the p10-p90 band around it
        median = float(rows[name][3])
        p10, p90 = (float(v) for v in rows[name][4].split("-"))
        assert 0 < p10 <= median <= p90
    assert int(rows["pruned"][1].replace(",", "")) < int(rows["original"][1].replace(",", ""))
    assert "speedup: torch" in out


def test_file_class_checkpoint_and_saved_model(work: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(work))  # torch.load of a pickled model needs its class importable
    monkeypatch.delitem(sys.modules, "nets", raising=False)
    from nets import Tiny  # type: ignore[import-not-found]  # written by the fixture

    torch.manual_seed(5)
    trained = Tiny()
    torch.save(trained.state_dict(), work / "tiny.pt")
    torch.save(trained, work / "tiny_model.pt")
    code, out, err = run(["compile", "nets.py:Tiny", "--input-shape", "1,3,16,16", "--checkpoint", "tiny.pt",
                          "--save", "tiny_small.pt", "--runs", "0"], capsys)
    assert code == 0, err
    small = torch.load(work / "tiny_small.pt", weights_only=False)
    assert small.a.weight.shape[0] == 4  # half of the 8 hidden channels
    # the kept channels carry the checkpoint's weights, not the random init of the file's class
    kept = [i for i in range(8) if any(torch.equal(small.a.weight[j], trained.a.weight[i]) for j in range(4))]
    assert len(kept) == 4

    code, out, err = run(["compile", "tiny_model.pt", "--input-shape", "1,3,16,16", "--ratio", "0.25", "--runs", "0"],
                         capsys)
    assert code == 2 and "--trust-pickle" in err  # a pickled module is refused by default
    code, out, err = run(["compile", "tiny_model.pt", "--input-shape", "1,3,16,16", "--ratio", "0.25", "--runs", "0",
                          "--trust-pickle"], capsys)
    assert code == 0, err
    assert "fxprune compile tiny_model.pt" in out and "params" in out


class _Payload:
    """A pickle whose unpickling writes a file: what a hostile ``model.pt`` would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("command", ["compile", "analyze", "bench"])
def test_pickled_file_runs_no_code_without_trust_pickle(command: str, work: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    marker = work / "pwned.txt"
    torch.save({"model": _Payload(str(marker))}, work / "evil.pt")
    code, out, err = run([command, "evil.pt", "--input-shape", "1,4"], capsys)
    assert code == 2 and "--trust-pickle" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()  # nothing stored in the file was executed


def test_policy_flags_reach_prune(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import fxprune

    seen: list[dict[str, object]] = []
    real = fxprune.prune

    def spy(model, ratio=0.5, **kwargs):  # noqa: ANN001, ANN003
        seen.append({"ratio": ratio, **kwargs})
        return real(model, ratio, **kwargs)

    monkeypatch.setattr(fxprune, "prune", spy)
    argv = ["bench", "models_zoo:resnet_basic", "--runs", "1", "--ratio", "0.25", "--min-channels", "2",
            "--prune-heads", "--module-ratio", "layer1=0.1", "--leaf", "fc", "--importance", "taylor"]
    assert run(argv, capsys)[0] == 0
    kw = seen[-1]
    assert kw["ratio"] == 0.25 and kw["min_channels"] == 2 and kw["prune_heads"] is True
    assert kw["ratios"] == {"layer1": 0.1} and kw["leaves"] == ("fc",)
    assert isinstance(kw["importance"], fxprune.Taylor)
    code, _, err = run(["bench", "models_zoo:mlp", "--runs", "1", "--ratio", "0.3", "--target-macs", "0.5"], capsys)
    assert code == 2 and err.count("\n") == 1 and "not both" in err
    code, _, err = run(["bench", "models_zoo:mlp", "--runs", "1", "--module-ratio", "fc1"], capsys)
    assert code == 2 and "MODULE=R" in err


def test_console_entry_point_in_a_subprocess(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fxprune.cli"]
    bad = subprocess.run([*cmd, "compile", "models_zoo:mlp", "--ratio", "1.5", "--onnx", "x.onnx"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the docs' code blocks, run as written
FENCE = re.compile(r"(<!--\s*not tested:[^>]*-->\s*\n)?```(\w+)\n(.*?)```", re.S)
SHELL_SYNTAX = re.compile(r"[|<>;&$`()]")


def _commands(block: str) -> list[str]:
    """The block's commands (backslash continuations joined, comments and blank lines dropped)."""
    text = block.replace("\\\n", " ")
    return [ln for ln in (line.split(" #")[0].strip() for line in text.splitlines()) if ln and not ln.startswith("#")]


def _run_doc(doc: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> int:
    monkeypatch.chdir(tmp_path)
    shim = tmp_path / "_bin"
    shim.mkdir()
    (shim / "fxprune").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m fxprune.cli "$@"\n')
    (shim / "fxprune").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    ran = 0
    for skipped, lang, body in FENCE.findall((ROOT / "docs" / doc).read_text()):
        if skipped or lang not in ("bash", "python"):
            continue
        if lang == "python":
            exec(compile(body, f"{doc} python block", "exec"), {"__name__": "__doc_block__"})  # noqa: S102
        elif all(c.startswith("fxprune ") and not SHELL_SYNTAX.search(c) for c in _commands(body)):
            for command in _commands(body):  # plain fxprune commands run in-process (no interpreter start-up)
                code = main(shlex.split(command)[1:])
                _, err = capsys.readouterr()
                assert code == 0, f"{doc}: `{command}` failed: {err}"
        else:
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{doc}: block failed:\n{body}\n{done.stderr}"
        ran += 1
    return ran


def test_docs_cli_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_doc("cli.md", tmp_path, monkeypatch, capsys) >= 6
    assert (tmp_path / "small.int8.onnx").exists() and (tmp_path / "mlp.int8.onnx").exists()


def test_docs_quickstart_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_doc("quickstart.md", tmp_path, monkeypatch, capsys) >= 5
    assert (tmp_path / "tiny.onnx").exists() and (tmp_path / "small_py.int8.onnx").exists()


def test_progress_lines_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from fxprune.cli import common

    monkeypatch.setattr(common.Steps, "QUIET_S", 0.0)  # a long run: every step is reported
    code, out, err = run(["bench", "models_zoo:mlp", "--runs", "2", "--ratio", "0.25"], capsys)
    assert code == 0
    steps = [ln for ln in err.splitlines() if ln.startswith("fxprune: [")]
    assert [ln.split("] ")[1].split(" (")[0] for ln in steps] == ["loading model", "pruning", "timing"]
    assert "fxprune: done in" in err


def test_data_feeds_taylor_and_int8_calibration(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    torch.save(torch.randn(16, 3, 32, 32), work / "real.pt")
    code, out, err = run(["compile", "models_zoo:resnet_basic", "--ratio", "0.5", "--importance", "taylor",
                          "--data", "real.pt", "--onnx", "m.onnx", "--quantize", "int8", "--runs", "0"], capsys)
    assert code == 0, err
    assert "calibration batches from --data" in out and "RANDOM" not in out
    code, out, err = run(["compile", "models_zoo:resnet_basic", "--ratio", "0.5", "--onnx", "r.onnx",
                          "--quantize", "int8", "--runs", "0"], capsys)
    assert code == 0 and "RANDOM calibration inputs" in out  # said plainly when no data was given


def test_activation_importance_needs_and_uses_data(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    torch.save(torch.randn(8, 3, 32, 32), work / "real.pt")
    code, out, err = run(["compile", "models_zoo:resnet_basic", "--ratio", "0.5", "--importance", "activation",
                          "--data", "real.pt", "--save", "a.pt", "--runs", "0"], capsys)
    assert code == 0, err
    assert (work / "a.pt").exists()
    code, out, err = run(["compile", "models_zoo:resnet_basic", "--ratio", "0.5", "--importance", "activation",
                          "--runs", "0"], capsys)
    assert code != 0 and "--data" in err
