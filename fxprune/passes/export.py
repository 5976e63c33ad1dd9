"""Export a (pruned) model to one verified ONNX file.

Pipeline: export in eval mode -> ``onnxsim`` simplify -> ``onnx.checker`` -> compare onnxruntime (graph
optimisations off) with PyTorch on seeded random inputs (``passes/onnx_check.py``) -> move the file into
place. Everything is staged in a hidden temporary directory next to the target, so a failure leaves no
partial file.

Exporter choice (torch 2.14): the default ``"auto"`` uses the legacy TorchScript exporter
(``dynamo=False``) and falls back to the torch.export-based one (``dynamo=True``) when it raises.
TorchScript honours the requested opset exactly and is 10-100x faster on small CNNs; the dynamo exporter
only implements opset 18 and silently leaves the model at 18 when its down-conversion fails (it does for
Conv/BatchNorm nets at opsets 13 and 17), and it rejects 3-D ``scaled_dot_product_attention``. Names
are always given: legacy export of a GraphModule with dynamic axes fails without output names.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from fxprune.errors import ExportError, first_line
from fxprune.metrics import eval_mode
from fxprune.passes.onnx_check import (
    ORT_LOG_SEVERITY,
    check_onnx,
    flatten_outputs,
    input_tensors,
    make_check_inputs,
    ort_session_options,
)
from fxprune.state import kept_buffers

logger = logging.getLogger(__name__)

__all__ = ["EXPORTERS", "ORT_LOG_SEVERITY", "ExportReport", "check_onnx", "export_onnx", "flatten_outputs",
           "make_check_inputs", "ort_session_options"]

Inputs = tuple[torch.Tensor, ...]
EXPORTERS = ("auto", "torchscript", "dynamo")
# Weights from this size on go to one external ``<name>.data`` file (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD_BYTES = 2**31 - 2**27
@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how it was verified.

    Attributes:
        path: The written ``.onnx`` file.
        opset: The default-domain opset of the written model.
        exporter: ``"torchscript"`` (legacy, ``dynamo=False``) or ``"dynamo"`` (torch.export based).
        nodes_before_simplify: Graph nodes (subgraphs included) straight out of the exporter.
        nodes_after_simplify: Graph nodes in the written model.
        bytes_before_simplify: Size on disk of the exporter's output.
        bytes_after_simplify: Size on disk of the written model (external data included).
        simplified: Whether onnxsim ran.
        max_abs_diff: Largest |onnxruntime - torch| over all checked outputs; NaN when not checked.
        n_checked_inputs: Number of random input tuples checked (0 when ``check=False``).
    """

    path: str
    opset: int
    exporter: str
    nodes_before_simplify: int
    nodes_after_simplify: int
    bytes_before_simplify: int
    bytes_after_simplify: int
    simplified: bool
    max_abs_diff: float
    n_checked_inputs: int


def _count_nodes(graph: onnx.GraphProto) -> int:
    """Count nodes of ``graph`` including those of subgraphs (If/Loop/Scan bodies)."""
    subgraphs = [g for node in graph.node for attr in node.attribute for g in [attr.g, *attr.graphs]]
    return len(graph.node) + sum(_count_nodes(g) for g in subgraphs)


def _opset_of(proto: onnx.ModelProto) -> int:
    """The default-domain (ai.onnx) opset version of ``proto``."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def _call_exporter(name: str, model: nn.Module, args: Inputs, f: Path, opset: int, **kw: Any) -> None:
    """Run one torch exporter (``"torchscript"`` or ``"dynamo"``), logging its warnings.

    The caller's warning filters decide which warnings are logged (the CLI ignores them all without
    ``-v``, and torch hides tracer warnings of its own submodules); deprecations are logged at debug level.

    TorchScript switches to external data by itself past 2 GiB. Dynamo gets the batch dims as
    ``dynamic_shapes`` (not the deprecated ``dynamic_axes``); a string dim becomes ``Dim.DYNAMIC`` named
    ``"batch"``, so a batch-1 example is not specialised.
    """
    external_data = kw.pop("external_data")
    if name == "dynamo":
        if kw.pop("dynamic_axes"):
            kw["dynamic_shapes"] = tuple({0: "batch"} if x.dim() >= 1 else None for x in args)
        kw.update(external_data=external_data, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", category=DeprecationWarning)
        torch.onnx.export(model, args, os.fspath(f), dynamo=name == "dynamo", opset_version=opset, **kw)
    for w in caught:
        level = logging.DEBUG if issubclass(w.category, DeprecationWarning) else logging.WARNING
        logger.log(level, "%s exporter: %s: %s", name, w.category.__name__, w.message)


def _run_exporters(
    exporter: str, model: nn.Module, args: Inputs, stage: Path, opset: int, names: dict[str, Any], large: bool
) -> tuple[onnx.ModelProto, str, int]:
    """Export with the chosen exporter(s); return (loaded model, exporter used, bytes on disk)."""
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    failures: list[tuple[str, Exception]] = []
    for name in order:
        out_dir = stage / f"raw-{name}"
        out_dir.mkdir()
        raw = out_dir / "model.onnx"
        try:
            with eval_mode(model):
                _call_exporter(name, model, args, raw, opset, external_data=large, **names)
            proto = onnx.load(os.fspath(raw))  # pulls any external data into memory
            if _opset_of(proto) != opset:
                raise ExportError(f"exporter wrote opset {_opset_of(proto)} instead of the requested {opset}")
            return proto, name, sum(p.stat().st_size for p in out_dir.iterdir())
        except Exception as e:
            failures.append((name, e))
            more = "; trying the next exporter" if name != order[-1] else ""
            logger.warning("%s ONNX exporter failed: %s%s", name, first_line(e, innermost=True, typed=True), more)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
    summary = "; ".join(f"{n}: {first_line(e, innermost=True, typed=True)}" for n, e in failures)
    raise ExportError(
        f"ONNX export failed ({summary}). Check that the model runs on example_inputs and uses only ops "
        f"opset {opset} supports; try opset >= 18 or another exporter ({', '.join(EXPORTERS)})"
    ) from failures[-1][1]


def _simplify(proto: onnx.ModelProto, tool: str = "onnxsim") -> onnx.ModelProto:
    """Run onnxsim (without its own random check: ours follows) or onnxslim."""
    if tool == "onnxslim":
        try:
            import onnxslim

            return onnxslim.slim(proto)
        except ImportError as e:
            raise ExportError("simplify='onnxslim' needs the onnxslim package: pip install onnxslim") from e
        except Exception as e:
            raise ExportError(f"onnxslim failed: {first_line(e, innermost=True, typed=True)}; pass simplify='onnxsim' or False") from e
    if tool != "onnxsim":
        raise ExportError(f"unknown simplifier {tool!r}: use 'onnxsim', 'onnxslim' or False")
    try:
        import onnxsim

        kwargs: dict[str, Any] = {"check_n": 0}
        if "certify" in inspect.signature(onnxsim.simplify).parameters:
            kwargs["certify"] = False
        simplified, ok = onnxsim.simplify(proto, **kwargs)
    except Exception as e:
        raise ExportError(f"onnxsim failed: {first_line(e, innermost=True, typed=True)}; pass simplify=False") from e
    if not ok:
        raise ExportError("onnxsim could not validate the simplified model; pass simplify=False")
    return simplified


def float32_copy(model: nn.Module, args: Any) -> tuple[nn.Module, Any, str | None]:
    """A float32 copy of a bfloat16/float16 model and its inputs, for ONNX export only (onnxruntime's CPU
    kernels lack half precision for many ops: its check would fail); the model itself when nothing is half.

    Returns:
        The model to export, its inputs, and the dtype(s) it was cast from (None when nothing was cast).
    """
    half = (torch.bfloat16, torch.float16)
    leaves = [t for t in torch.utils._pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers(), *leaves) if t.is_floating_point()}
    names = sorted(str(d).removeprefix("torch.") for d in dtypes if d in half)
    if not names:
        return model, args, None
    cast = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.float() if t.dtype in half else t, args)
    return copy.deepcopy(model).float(), cast, "/".join(names)


def export_onnx(model: nn.Module, example_inputs: Inputs, path: str | os.PathLike[str], *, opset: int = 18,
                simplify: bool | str = True, check: bool = True, dynamic_batch: bool = True, n_check_inputs: int = 3,
                rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0, exporter: str = "auto") -> ExportReport:
    """Export ``model`` to a single, simplified ONNX file verified against PyTorch (``_export_onnx`` has the
    details: arguments, returns, errors). A Hugging Face model's key/value cache is switched off meanwhile
    (config ``use_cache``): a cache object is state, not an ONNX output."""
    from fxprune.partial import no_kv_cache

    with no_kv_cache(model):
        return _export_onnx(model, example_inputs, path, opset=opset, simplify=simplify, check=check,
                            dynamic_batch=dynamic_batch, n_check_inputs=n_check_inputs, rtol=rtol, atol=atol,
                            seed=seed, exporter=exporter)


def _export_onnx(model: nn.Module, example_inputs: Inputs, path: str | os.PathLike[str], *, opset: int = 18,
                simplify: bool | str = True, check: bool = True, dynamic_batch: bool = True, n_check_inputs: int = 3,
                rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0, exporter: str = "auto") -> ExportReport:
    """Export ``model`` to a single, simplified ONNX file verified against PyTorch.

    The model is exported in eval mode and left unmodified (training flags restored). Models whose
    weights stay under ~1.9 GiB are written as one self-contained file; larger ones get one
    ``<path>.data`` external-data file next to it (and are not simplified).

    Args:
        model: The model (``nn.Module`` or ``torch.fx.GraphModule``).
        example_inputs: Positional inputs of one forward call; dim 0 is the batch.
        path: Where to write the ``.onnx`` file (parent directories are created).
        opset: ONNX opset of the default domain; the written model has exactly this opset.
        simplify: True or "onnxsim" (default), "onnxslim" (the alternative), or False to skip.
        check: Compare onnxruntime with PyTorch on ``n_check_inputs`` seeded random inputs.
        dynamic_batch: Make dim 0 of every input and output symbolic (``"batch"``); checks then use
            batch sizes 1 and 2.
        n_check_inputs: Number of random input tuples to check.
        rtol: Relative tolerance of the check.
        atol: Absolute tolerance of the check, times ``max(1, max |output|)`` per output tensor.
        seed: Seed of the random check inputs.
        exporter: ``"auto"`` (TorchScript, falling back to dynamo), ``"torchscript"`` or ``"dynamo"``.

    Returns:
        The export report.

    Raises:
        ExportError: If the model does not run, every exporter fails, onnxsim or the ONNX checker
            fails, or onnxruntime disagrees with PyTorch. No file is written then.
    """
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not args or not all(
        isinstance(x, torch.Tensor) or (isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x))
        for x in args
    ):
        raise ExportError("example_inputs must be a non-empty tuple of tensors (or of lists of tensors)")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; use one of {EXPORTERS}")
    model, args, cast = float32_copy(model, args)
    if cast:
        logger.warning("fxprune: the ONNX file holds a float32 copy of the %s model (onnxruntime's CPU kernels lack "
                       "it for many ops); cast the exported model back if your runtime supports it", cast)
    target = Path(path)
    try:
        with eval_mode(model), torch.no_grad(), kept_buffers(model):  # the file holds the state as it is
            raw_outputs = model(*args)
    except Exception as e:
        raise ExportError(f"model does not run on example_inputs: {type(e).__name__}: {e}") from e
    outputs = flatten_outputs(raw_outputs)
    input_names = [f"input_{i}" for i in range(len(input_tensors(args)))]
    output_names = [f"output_{i}" for i in range(len(outputs))]
    named = [*zip(input_names, input_tensors(args), strict=True), *zip(output_names, outputs, strict=True)]
    dynamic_axes = {name: {0: "batch"} for name, t in named if dynamic_batch and t.dim() >= 1} or None
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    large = weight_bytes >= EXTERNAL_DATA_THRESHOLD_BYTES
    names = {"input_names": input_names, "output_names": output_names, "dynamic_axes": dynamic_axes}

    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with kept_buffers(model):  # an exporter's own runs leave a forward's state as it was
            proto, used, bytes_before = _run_exporters(exporter, model, args, stage, opset, names, large)
        nodes_before = _count_nodes(proto.graph)
        if simplify and not large:
            proto = _simplify(proto, "onnxsim" if simplify is True else str(simplify))
        elif simplify:
            logger.warning("model weights exceed %d bytes: skipping onnxsim", EXTERNAL_DATA_THRESHOLD_BYTES)
        nodes_after = _count_nodes(proto.graph)
        staged = stage / target.name
        data_name = f"{target.name}.data"
        external = {"save_as_external_data": True, "all_tensors_to_one_file": True, "location": data_name}
        onnx.save_model(proto, os.fspath(staged), **(external if large else {}))
        try:
            onnx.checker.check_model(os.fspath(staged))
        except Exception as e:
            raise ExportError(f"onnx.checker failed: {first_line(e, innermost=True, typed=True)}; try simplify=False") from e
        max_diff, n_checked = math.nan, 0
        if check:
            inputs_list = make_check_inputs(args, n_check_inputs, dynamic_batch=dynamic_batch, seed=seed)
            max_diff = check_onnx(staged, model, inputs_list, rtol=rtol, atol=atol)
            n_checked = len(inputs_list)
        bytes_after = sum(p.stat().st_size for p in stage.iterdir() if p.is_file())
        if (stage / data_name).exists():
            os.replace(stage / data_name, target.parent / data_name)
        os.replace(staged, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    report = ExportReport(path=os.fspath(target), opset=_opset_of(proto), exporter=used,
                          nodes_before_simplify=nodes_before, nodes_after_simplify=nodes_after,
                          bytes_before_simplify=bytes_before, bytes_after_simplify=bytes_after,
                          simplified=bool(simplify) and not large, max_abs_diff=max_diff, n_checked_inputs=n_checked)
    logger.info("exported %s: %s", target, report)
    return report
