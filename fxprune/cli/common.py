"""What the subcommands share: progress lines, loading the model and its inputs, and the policy flags as
``fxprune.prune`` arguments (the same options as the Python API)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import fxprune
from fxprune.errors import ArgumentError, FxPruneError, ShapeError, first_line
from fxprune.model_loader import (
    DEFAULT_INPUT_SHAPE,
    LoadedModel,
    load_checkpoint,
    load_model,
    parse_shape,
    random_inputs,
)

Inputs = tuple[torch.Tensor, ...]
DEFAULT_TOKENS = (1, 32)  # a language model's default input: one sequence of 32 token ids
EXIT_STRICT = 3  # --strict: a request was not honoured (nothing pruned, no head removed, ...)


class Steps:
    """Progress on stderr: a tqdm bar naming the current step on a terminal; elsewhere (a log, CI) one line
    per step once the run has taken ``QUIET_S`` seconds, so a long run is never silent and a quick failure
    still prints its one error line only. The steps started before that moment are printed then, with the
    time each started, so the lines always count 1, 2, ... up to the total."""

    QUIET_S = 3.0

    def __init__(self, total: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total, self.n, self.clock = total, 0, clock
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, file=sys.stderr, disable=not self.tty, leave=False,
                        bar_format="{desc:<28}{bar:20} {n_fmt}/{total_fmt} [{elapsed}]")
        self.started = False
        self.t0 = clock()
        self.pending: list[tuple[int, str, float]] = []  # steps not printed yet: (number, name, start)

    def step(self, name: str) -> None:
        """Finish the previous step and start ``name``."""
        if self.started:
            self.bar.update()
        self.started = True
        self.n += 1
        self.bar.set_description_str(name)
        elapsed = self.clock() - self.t0
        self.pending.append((self.n, name, elapsed))
        self._flush(elapsed)

    def _flush(self, elapsed: float) -> bool:
        """Print the steps not printed yet once the run is long enough; True when the lines are shown."""
        if self.tty or elapsed < self.QUIET_S:
            return False
        for n, name, at in self.pending:
            sys.stderr.write(f"fxprune: [{n}/{self.total}] {name} (at {at:.1f}s)\n")
        self.pending.clear()
        sys.stderr.flush()
        return True

    def done(self) -> None:
        """Finish the last step."""
        self.bar.update()
        elapsed = self.clock() - self.t0
        if self._flush(elapsed):
            sys.stderr.write(f"fxprune: done in {elapsed:.1f}s\n")


@contextmanager
def progress(total: int) -> Iterator[Steps]:
    """A :class:`Steps` of ``total`` steps whose bar is closed however the block ends."""
    steps = Steps(total)
    try:
        yield steps
    finally:
        steps.bar.close()


def shape_text(shapes: Any) -> str:
    return ", ".join("x".join(str(d) for d in s) for s in shapes)



def load_inputs(args: argparse.Namespace) -> tuple[LoadedModel, Inputs]:
    """Build the model, load the checkpoint, make seeded inputs and check the model runs on them."""
    loaded = load_model(args.model, seed=args.seed, trust_pickle=args.trust_pickle)
    if args.checkpoint:
        load_checkpoint(loaded.model, args.checkpoint)
    vocab = token_vocabulary(loaded.model)
    if args.input_shape:
        shapes = tuple(parse_shape(s) for s in args.input_shape)
    else:
        shapes = loaded.input_shapes or ((DEFAULT_TOKENS,) if vocab else (DEFAULT_INPUT_SHAPE,))
    inputs = random_inputs(shapes, args.seed)
    args.vocabulary = vocab  # --data reduces byte ids into it (fxprune.data)
    if vocab:  # a language model takes token ids, not floats
        gen = torch.Generator().manual_seed(args.seed)
        inputs = tuple(torch.randint(0, vocab, tuple(x.shape), generator=gen) for x in inputs)
    elif (dtype := float_dtype(loaded.model)) in (torch.bfloat16, torch.float16):  # inputs of its own dtype
        inputs = tuple(x.to(dtype) for x in inputs)
    try:
        with torch.no_grad():
            loaded.model(*inputs)
    except Exception as e:
        raise ShapeError(
            f"{loaded.spec} does not run on input shape {shape_text(shapes)} ({type(e).__name__}: {first_line(e)}); "
            "set --input-shape"
        ) from e
    return loaded, inputs


def float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 when it has none)."""
    tensors = (*model.parameters(), *model.buffers())
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


def token_vocabulary(model: nn.Module) -> int | None:
    """The vocabulary size of a model that takes token ids (None for others): the ``nn.Embedding`` its
    ``get_input_embeddings()`` returns (Hugging Face), or its first submodule when that is an embedding."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else next(model.children(), None)
    except Exception:  # noqa: BLE001 - a model without an input embedding raises NotImplementedError
        emb = None
    return emb.num_embeddings if isinstance(emb, nn.Embedding) else None


def check_ratio(args: argparse.Namespace) -> None:
    """Refuse a ``--ratio`` outside [0, 1)."""
    if args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        raise ArgumentError(f"--ratio must satisfy 0 <= R < 1 (the fraction of channels removed), got {args.ratio:g}")


def check_inputs_exist(args: argparse.Namespace) -> None:
    """Refuse a missing ``--data`` or ``--checkpoint`` before any work is done."""
    for flag, value in (("--data", getattr(args, "data", None)), ("--checkpoint", getattr(args, "checkpoint", None))):
        if value and not Path(value).exists():
            raise ArgumentError(f"{flag} {value}: no such file or folder")


def prune_with_args(model: nn.Module, inputs: Inputs, args: argparse.Namespace, verify: bool) -> fxprune.PruneResult:
    """Call ``fxprune.prune`` with the policy flags that were given (the same options as the Python API)."""
    targeted = args.target_macs is not None or args.target_params is not None
    if targeted and args.ratio is not None:
        raise ArgumentError("give --ratio or a --target-macs/--target-params budget, not both (a budget searches the "
                           "ratio itself)")
    kwargs: dict[str, Any] = {"example_inputs": inputs, "ignore": args.ignore, "verify": verify,
                              "importance": importance_from_args(args, inputs),
                              "target_macs": args.target_macs, "target_params": args.target_params,
                              "round_to": args.round_to, "global_ranking": args.global_ranking,
                              "prune_heads": args.prune_heads, "min_channels": args.min_channels,
                              "leaves": tuple(args.leaf), "ratios": module_ratios(args.module_ratio) or None,
                              "hidden": args.hidden}
    if getattr(args, "reconstruct", False):  # the refit needs the layers' real inputs
        batches = data_batches(args, inputs)[:32]
        if not batches:
            raise ArgumentError("--reconstruct refits the kept weights on real inputs: pass --data (a folder of "
                                "images, a .npy/.pt tensor file, or a text file for a language model)")
        kwargs.update(calibration=batches, reconstruct=args.reconstruct)
    # Ultralytics' own DetectionModel, which YOLO(path) and `yolo train` load; a Hugging Face model stays its
    # own class, with its config, so that save_pretrained and from_pretrained work
    if is_ultralytics(args) or str(args.model).startswith("hf:") or getattr(args, "save_pretrained", None):
        kwargs["output"] = "module"
    ratio = args.ratio if args.ratio is not None else 0.5
    if getattr(args, "depth", None):  # whole blocks first (by calibration loss), then the widths of the rest
        batches = data_batches(args, inputs)[:32]
        if not batches:
            raise ArgumentError("--depth chooses the blocks to remove by the loss on real inputs: pass --data")
        depth = fxprune.prune_depth(model, args.depth, calibration=[b[0] if len(b) == 1 else b for b in batches])
        print(f"depth: removed blocks {', '.join(map(str, depth.removed))} of {depth.blocks} (calibration loss "
              f"{depth.loss_before:.4g} -> {depth.loss_after:.4g})")
        model = depth.model
    return fxprune.prune(model, ratio, **kwargs)


def is_ultralytics(args: argparse.Namespace) -> bool:
    return str(args.model).startswith("ultralytics:")


@contextmanager
def deploy_heads(model: nn.Module) -> Iterator[None]:
    """Ultralytics' export switch while exporting: its Detect head returns one tensor, as `yolo export` gives."""
    switched = [m for m in model.modules() if isinstance(getattr(m, "export", None), bool)]
    for m in switched:
        m.export = True
    try:
        yield
    finally:
        for m in switched:
            m.export = False


def module_ratios(items: list[str]) -> dict[str, float]:
    """``--module-ratio layer4=0.7`` (repeatable) as ``{"layer4": 0.7}``."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ArgumentError(f"--module-ratio takes MODULE=R, e.g. layer4=0.7, got {item!r}") from None
        if not sep or not name.strip():
            raise ArgumentError(f"--module-ratio takes MODULE=R, e.g. layer4=0.7, got {item!r}")
    return out


def importance_from_args(args: argparse.Namespace, inputs: Inputs) -> Any:
    """The criterion ``--importance`` names; ``activation`` measures the layers' inputs on ``--data``
    batches (required); ``taylor`` scores on ``--data`` batches, else on four seeded
    batches shaped like the inputs (first-order Taylor needs gradients of a loss: the mean square of the
    outputs, which needs no labels)."""
    if args.importance is None:  # --data given: measured on it, not on the weights alone
        args.importance = "activation" if getattr(args, "data", None) else "l2"
    if args.importance.lower() == "activation":
        batches = data_batches(args, inputs)[:32]
        if not batches:
            raise ArgumentError("--importance activation measures real inputs: pass --data (a folder of images, a "
                               ".npy/.pt tensor file, or a text file for a language model)")
        return fxprune.Activations(batches)
    if args.importance.lower() != "taylor":
        return args.importance
    batches = data_batches(args, inputs)[:8] or [_like(inputs, args.seed + k) for k in range(4)]
    if not inputs[0].is_floating_point():  # token ids: the language model's own next-token loss
        return fxprune.Taylor([(b, b[0]) for b in batches], loss_fn=next_token_loss)
    return fxprune.Taylor([(b, None) for b in batches], loss_fn=output_energy)


def _like(inputs: Inputs, seed: int) -> Inputs:
    """Seeded random inputs shaped like ``inputs``; token ids stay below the largest id seen."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=gen).to(x.dtype) if x.is_floating_point() else
                 torch.randint(0, int(x.max()) + 1, tuple(x.shape), generator=gen) for x in inputs)


def next_token_loss(out: Any, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position's logits against the next token id (Taylor scores for a language model)."""
    from fxprune.outputs import tensors_of

    logits = next((t for t in tensors_of(out) if t.is_floating_point() and t.dim() == 3), None)
    if logits is None:
        raise FxPruneError("--importance taylor on token ids needs a model returning N x L x vocab logits")
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def data_batches(args: argparse.Namespace, inputs: Inputs) -> list[Inputs]:
    """The ``--data`` batches shaped like ``inputs`` (empty without ``--data``)."""
    if not getattr(args, "data", None):
        return []
    from fxprune.data import load_batches

    cached = getattr(args, "data_cache", None)
    if cached is None:  # read once: importance and int8 calibration share the batches (and the notes)
        cached = load_batches(args.data, tuple(tuple(x.shape) for x in inputs), dtype=inputs[0].dtype,
                              vocabulary=getattr(args, "vocabulary", None))
        args.data_cache = cached
    return cached


def int8_feeds(onnx_path: Path, args: argparse.Namespace, inputs: Inputs) -> list[dict[str, Any]] | None:
    """int8 calibration feeds from ``--data`` (None: seeded random inputs, and the report says so)."""
    batches = data_batches(args, inputs)
    if not batches:
        return None
    import onnxruntime as ort

    from fxprune.passes.export import ort_session_options

    session = ort.InferenceSession(str(onnx_path), ort_session_options(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [{name: (b[0].float() if b[0].is_floating_point() else b[0]).numpy()}  # float32, as the ONNX file
            for b in batches[: args.calibration_samples]]


def output_energy(out: Any, _target: Any) -> torch.Tensor:
    """A label-free loss for Taylor scores on the command line: the mean square of every float output."""
    from fxprune.outputs import tensors_of

    terms = [t.float().pow(2).mean() for t in tensors_of(out) if t.is_floating_point()]
    if not terms:
        raise FxPruneError("--importance taylor needs a model with floating-point outputs")
    return torch.stack(terms).sum()
