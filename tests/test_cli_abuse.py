"""The command line under abuse: hostile model files, unwritable outputs, odd data, broken Hugging Face folders,
half-precision models, ``--strict``. Each case gives a typed error, one line on stderr and a non-zero exit (or
a documented fallback), never a traceback."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import onnx
import pytest
import torch

from fxprune.cli import main
from fxprune.cli.parser import build_parser
from fxprune.errors import ArgumentError, ModelLoadError

pytestmark = pytest.mark.usefixtures("one_thread")

NETS = '''
import sys

import torch
from torch import nn

SEEN_ARGV = list(sys.argv)  # what the file saw while being imported


def Mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def Bf16():
    return Mlp().to(torch.bfloat16)


def Fp16():
    return Mlp().to(torch.float16)


class Pinned(nn.Module):
    """Every channel is pinned: the Linear feeds an LSTM, which has no channel rule."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.lstm = nn.LSTM(8, 6, batch_first=True)

    def forward(self, x):
        return self.lstm(self.fc(x))[0]


class SmallLM(nn.Module):
    """Token ids in, logits out; a vocabulary of 50 ids, fewer than the 256 byte values of a text file."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 32)
        self.head = nn.Linear(32, 50)

    def forward(self, ids):
        return self.head(torch.relu(self.up(self.embed(ids))))
'''


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; return (status, stdout, stderr)."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The single error line of a failed run (asserts there is exactly one and no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("fxprune: WARNING")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error:" in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nets.py").write_text(NETS)
    return tmp_path


# ------------------------------------------------------------------------------------------- model files
def test_model_file_calling_sys_exit_is_a_load_error(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "quits.py").write_text("import sys\nfrom torch import nn\nsys.exit(0)\nNet = nn.Identity\n")
    code, out, err = run(["compile", "quits.py:Net", "--runs", "0"], capsys)
    line = one_error_line(err)
    assert code == 2 and out == ""
    assert "model file quits.py called sys.exit(0) while being imported" in line
    with pytest.raises(ModelLoadError, match="quits.py"):
        from fxprune.model_loader import load_model

        load_model("quits.py:Net")


def test_model_file_sees_only_its_own_path_in_argv(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "parses.py").write_text(
        "import argparse, json, sys\nfrom torch import nn\n"
        "json.dump(sys.argv, open('argv.json', 'w'))\n"
        "argparse.ArgumentParser().parse_args()  # fails on fxprune's own flags\n"
        "def Net():\n    return nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 2))\n")
    argv_before = list(sys.argv)
    code, out, err = run(["compile", "parses.py:Net", "--input-shape", "1,16", "--runs", "0"], capsys)
    assert code == 0, err
    assert "usage:" not in err and "fxprune compile parses.py:Net" in out
    assert json.loads((work / "argv.json").read_text()) == ["parses.py"]
    assert sys.argv == argv_before  # restored afterwards


# ----------------------------------------------------------------------------------------------- outputs
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")
@pytest.mark.parametrize(("flag", "target"), [
    ("--onnx", "/proc/fxprune_nope/x.onnx"), ("--onnx", "/proc/x.onnx"), ("--report", "/proc/r.md"),
    ("--save", "/proc/m.pt"), ("--save-pretrained", "/proc/fxprune_out"), ("--save-plan", "/proc/p.json"),
])
def test_unwritable_output_is_an_argument_error_before_any_work(
        flag: str, target: str, work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import fxprune.cli.common
    from fxprune.cli.commands import run_compile

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(fxprune.cli.common, "load_model", no_work)
    args = build_parser().parse_args(["compile", "models_zoo:mlp", flag, target, "--runs", "0"])
    with pytest.raises(ArgumentError, match=re.escape(f"{flag} {target}")):
        run_compile(args)
    code, out, err = run(["compile", "models_zoo:mlp", flag, target, "--runs", "0"], capsys)
    assert code == 2 and out == "" and flag in one_error_line(err)


def test_save_pretrained_into_a_folder_with_files_is_refused(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "taken").mkdir()
    (work / "taken" / "mine.txt").write_text("keep")
    code, out, err = run(["compile", "models_zoo:mlp", "--save-pretrained", "taken", "--runs", "0"], capsys)
    assert code == 2 and "--save-pretrained taken exists and is not empty" in one_error_line(err)
    assert sorted(p.name for p in (work / "taken").iterdir()) == ["mine.txt"]


# ---------------------------------------------------------------------------------------- help, progress
def test_compile_help_lists_every_model_form(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["compile", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for form in ("models_zoo:NAME", "torchvision:NAME", "timm:NAME", "ultralytics:FILE.yaml", "hf:FOLDER",
                 "path/to/file.py:NAME", "torch.save(model)", "--strict"):
        assert form in text, form


def test_progress_lines_number_every_step(capsys: pytest.CaptureFixture[str]) -> None:
    """Steps 1 and 2 end quickly, step 3 starts after the quiet period: all four are printed, in order."""
    from fxprune.cli import common

    clock = iter([0.0, 0.0, 1.0, 5.0, 6.0, 7.0])  # start, then each step, then done
    bar = common.Steps(4, clock=lambda: next(clock))
    for name in ("loading model", "pruning", "measuring", "saving"):
        bar.step(name)
    bar.done()
    bar.bar.close()
    err = capsys.readouterr().err
    steps = re.findall(r"^fxprune: \[(\d)/(\d)\] (.+) \(at ([\d.]+)s\)$", err, re.M)
    assert [(n, total, name) for n, total, name, _ in steps] == [
        ("1", "4", "loading model"), ("2", "4", "pruning"), ("3", "4", "measuring"), ("4", "4", "saving")]
    assert [float(at) for *_, at in steps] == [0.0, 1.0, 5.0, 6.0] and "fxprune: done in 7.0s" in err


# ------------------------------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize(("factory", "dtype"), [("Bf16", "bfloat16"), ("Fp16", "float16")])
def test_half_precision_model_exports_a_float32_onnx_file(
        factory: str, dtype: str, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["compile", f"nets.py:{factory}", "--input-shape", "2,16", "--onnx", "m.onnx",
                          "--save", "m.pt", "--runs", "0"], capsys)
    assert code == 0, err
    assert f"float32 copy of the {dtype} model" in out and "re-export" not in out + err
    proto = onnx.load(str(work / "m.onnx"))
    assert {t.data_type for t in proto.graph.initializer} == {onnx.TensorProto.FLOAT}
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    saved = torch.load(work / "m.pt", weights_only=False)
    assert next(saved.parameters()).dtype == getattr(torch, dtype)  # only the ONNX copy was cast


def test_simplify_that_grows_the_file_keeps_the_smaller_one(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """onnxsim adds shape annotations: on a tiny MLP the simplified file is larger and has no fewer nodes."""
    code, out, err = run(["compile", "nets.py:Mlp", "--input-shape", "1,16", "--onnx", "m.onnx", "--runs", "0"],
                         capsys)
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("ONNX m.onnx"))
    before, after, grown = (int(v.replace(",", "")) for v in
                            re.search(r"bytes ([\d,]+) -> ([\d,]+) \(onnxsim made it larger, ([\d,]+) bytes: "
                                      r"kept the unsimplified file\)", line).groups())
    assert (work / "m.onnx").stat().st_size == after <= before < grown


# ------------------------------------------------------------------------------------------------ --data
@pytest.mark.parametrize(("make", "needle"), [
    (None, "no such file or folder"),
    (b"", "empty"),
    (bytes(range(256)) * 4, "not a UTF-8 text file"),
])
def test_bad_data_file_names_data_and_the_file(make: bytes | None, needle: str, work: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    if make is not None:
        (work / "corpus.txt").write_bytes(make)
    argv = ["compile", "nets.py:SmallLM", "--importance", "activation", "--data", "corpus.txt", "--runs", "0"]
    code, out, err = run(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and out == "" and "--data corpus.txt" in line and needle in line
    if make is not None:
        from fxprune.data import load_batches

        with pytest.raises(ArgumentError, match=needle):
            load_batches(work / "corpus.txt", ((1, 32),))


def test_text_data_is_reduced_into_a_small_vocabulary(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    code, out, err = run(["compile", "nets.py:SmallLM", "--ratio", "0.5", "--importance", "activation",
                          "--data", "corpus.txt", "--save", "s.pt", "--runs", "0"], capsys)
    assert code == 0, err
    assert "modulo 50" in err and err.count("modulo 50") == 1 and "IndexError" not in err
    assert torch.load(work / "s.pt", weights_only=False).up.out_features == 16


# ---------------------------------------------------------------------------------------------- --strict
def test_strict_fails_when_nothing_was_pruned(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["compile", "nets.py:Pinned", "--input-shape", "1,5,4", "--save", "p.pt", "--runs", "0"]
    code, out, err = run([*argv, "--strict"], capsys)
    assert code == 3 and "--strict" in err and "nothing was pruned" in err and "Traceback" not in err
    assert not (work / "p.pt").exists()  # nothing is written
    code, out, err = run(argv, capsys)
    assert code == 0 and "nothing was pruned" in out and (work / "p.pt").exists()


# ------------------------------------------------------------------------------------------ finetune-yolo
def test_finetune_yolo_passes_dataset_names_to_ultralytics(work: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from fxprune.cli import yolo

    (work / "mine.yaml").write_text("names: {0: box}\n")
    assert yolo.dataset_argument("coco8.yaml") == "coco8.yaml"  # Ultralytics resolves its own names
    assert yolo.dataset_argument("mine.yaml") == "mine.yaml"
    for bad in ("nowhere/coco8.yaml", "coco8", str(work)):
        with pytest.raises(ArgumentError, match=re.escape(f"--data {bad}")):
            yolo.dataset_argument(bad)
    pytest.importorskip("ultralytics")

    def reached(path: str) -> None:
        raise ArgumentError(f"reached the checkpoint {path}")

    monkeypatch.setattr(yolo, "load_detection_model", reached)  # no training, no download
    code, _, err = run(["finetune-yolo", "pruned.pt", "--data", "coco8.yaml"], capsys)
    assert code == 2 and "reached the checkpoint pruned.pt" in one_error_line(err)


# ---------------------------------------------------------------------------------- Hugging Face folders
@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved with save_pretrained (weights and config)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("hf") / "llama"
    transformers.LlamaForCausalLM(config).eval().save_pretrained(folder)
    return folder


def test_piecewise_summary_counts_the_pruned_parts(llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["compile", f"hf:{llama}", "--ratio", "0.5", "--runs", "0"], capsys)
    assert code == 0, err
    head = out.splitlines()[0]
    parts, total = (int(v) for v in re.search(r"(\d+) of (\d+) parts pruned", head).groups())
    assert 1 <= parts <= total and "0 channel groups" not in head
    kept = float(next(ln for ln in out.splitlines() if ln.startswith("params")).split()[-1])
    assert kept < 0.9  # the table agrees: the model did shrink


def _copy(llama: Path, to: Path) -> Path:
    to.mkdir()
    for f in llama.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def _broken_folders(llama: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Each broken folder, with what its one error line must say."""
    corrupt = _copy(llama, root / "corrupt")
    (corrupt / "model.safetensors").write_bytes((llama / "model.safetensors").read_bytes()[:3000])
    remote = root / "remote"
    remote.mkdir()
    config = json.loads((llama / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Net"}}))
    sharded = root / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((llama / "config.json").read_text())
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    return {"corrupt": (corrupt, "model.safetensors is not a readable safetensors file"),
            "remote": (remote, "auto_map"),
            "sharded": (sharded, "model-00001-of-00002.safetensors"),
            "missing": (root / "nowhere", "no such folder"),
            "no config": (root, "config.json")}


def test_broken_hf_folders_are_load_errors(llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fxprune.model_loader import load_model

    for case, (folder, needle) in _broken_folders(llama, tmp_path).items():
        with pytest.raises(ModelLoadError, match=re.escape(needle)):
            load_model(f"hf:{folder}")
        code, out, err = run(["compile", f"hf:{folder}", "--runs", "0"], capsys)
        assert code == 2 and out == "" and needle in one_error_line(err), case


def test_hf_folder_without_weights_says_it_is_random(llama: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text((llama / "config.json").read_text())
    code, out, err = run(["compile", f"hf:{tmp_path}", "--runs", "0"], capsys)
    assert code == 0 and "no weights" in err and "randomly initialised" in err, err
