"""The model of a Hugging Face folder as a skeleton on the meta device, made real one piece at a time.

``open_skeleton(folder)`` reads the config, builds the model on the meta device (no memory), finds its
decoder layers (the one ``nn.ModuleList`` of ``num_hidden_layers`` blocks) and checks that the checkpoint's
tensor names are the model's. ``Skeleton.record`` makes the base model's other modules real (embeddings,
rotary tables) and runs it with every layer replaced by a recorder, so each layer's call (masks, positions)
is known without any layer being loaded; ``load_layer`` then loads one layer's tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from fxprune.errors import FxPruneError, ModelLoadError, first_line
from fxprune.partial import _Call
from fxprune.shards import Checkpoint

_HEADS = (("ForCausalLM", "AutoModelForCausalLM"), ("ForMaskedLM", "AutoModelForMaskedLM"),
          ("ForSequenceClassification", "AutoModelForSequenceClassification"))


class _Recorder(nn.Module):
    """Stands in for a layer while the base model runs: records its call and passes the hidden states on."""

    def __init__(self, layer: nn.Module, index: int, calls: dict[int, _Call]) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self.calls = calls

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls[self.index] = _Call(tuple(args), dict(kwargs))
        return hidden_of(self.calls[self.index])

    def __getattr__(self, name: str) -> Any:  # the base model reads layer attributes (attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


@dataclass
class Skeleton:
    """A folder's model on the meta device, its checkpoint, and where its layers are."""

    folder: Path
    model: nn.Module
    checkpoint: Checkpoint
    base: nn.Module
    base_name: str
    layers: nn.ModuleList
    layers_name: str
    use_cache: bool
    params_before: int
    vocabulary: int
    _real: list[nn.Module] = field(default_factory=list)

    def record(self, inputs: tuple[Any, ...]) -> list[_Call]:
        """Each layer's call when the base model runs on ``inputs`` (the layers replaced by recorders)."""
        if not self._real:
            self._make_base_real()
        calls: dict[int, _Call] = {}
        originals = list(self.layers)
        for i, layer in enumerate(originals):
            self.layers[i] = _Recorder(layer, i, calls)
        try:
            with torch.no_grad():
                self.base(*inputs)
        except Exception as e:  # noqa: BLE001 - any failure: the base model cannot run without its layers
            raise FxPruneError(f"{type(self.base).__name__} cannot run with its layers stood in for "
                               f"({first_line(e, typed=True)}): its layers cannot be streamed; use the in-memory "
                               "path") from e
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        if sorted(calls) != list(range(len(originals))):
            raise FxPruneError(f"{self.layers_name}: only layers {sorted(calls)} of {len(originals)} were called "
                               "once each: its layers cannot be streamed; use the in-memory path")
        first = hidden_of(calls[0])
        if not isinstance(first, torch.Tensor) or not first.is_floating_point():
            raise FxPruneError(f"{self.layers_name}.0 is not called with hidden states first: its layers cannot be "
                               "streamed; use the in-memory path")
        return [calls[i] for i in range(len(originals))]

    def _make_base_real(self) -> None:
        """The base model's modules outside the layers, loaded (non-persistent buffers as transformers sets them)."""
        inside = {id(m) for m in self.layers.modules()}
        for name, m in self.base.named_modules():
            if id(m) in inside or not _own_tensors(m):
                continue
            prefix = f"{self.base_name}.{name}" if name else self.base_name
            _load(m, prefix, self.checkpoint, self.model, recurse=False)
            self._real.append(m)

    def release_base(self) -> None:
        """Back to meta: the embeddings and the like are not needed once the calls are recorded."""
        for m in self._real:
            m.to("meta")
        self._real.clear()

    def load_layer(self, i: int) -> nn.Module:
        """Layer ``i`` with its tensors loaded from the checkpoint (and set into the skeleton)."""
        layer = self.layers[i]
        _load(layer, f"{self.layers_name}.{i}", self.checkpoint, self.model, recurse=True)
        return layer

    def set_layer(self, i: int, layer: nn.Module) -> None:
        """Put ``layer`` (the pruned one, on meta once written) in place of layer ``i``."""
        self.layers[i] = layer

    def outside_layers(self) -> list[str]:
        """The checkpoint's tensor names outside the layers (embeddings, final norm, head)."""
        prefix = self.layers_name + "."
        return [k for k in self.checkpoint.names() if not k.startswith(prefix)]


def hidden_of(call: _Call) -> Any:
    """A decoder layer's hidden-state input in a recorded call: its first argument, or ``hidden_states=``."""
    return call.args[0] if call.args else call.kwargs.get("hidden_states")


def _own_tensors(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))


def _load(module: nn.Module, prefix: str, checkpoint: Checkpoint, model: nn.Module, recurse: bool) -> None:
    """Make ``module`` real on the CPU with the checkpoint's tensors (in their stored dtype)."""
    module.to_empty(device="cpu", recurse=recurse)  # recurse=False: only this module's own tensors
    for m in module.modules() if recurse else [module]:  # rotary tables and the like are not in the checkpoint: transformers' own init makes them
        if m._non_persistent_buffers_set and callable(getattr(model, "_init_weights", None)):
            model._init_weights(m)
    keys = list(module.state_dict().keys()) if recurse else [
        k for k, v in {**module._parameters, **module._buffers}.items()
        if v is not None and k not in module._non_persistent_buffers_set]
    state = {k: checkpoint.get(f"{prefix}.{k}") for k in keys if f"{prefix}.{k}" in checkpoint}
    missing = [k for k in keys if k not in state]
    if missing:
        raise ModelLoadError(f"{checkpoint.folder}: no tensor {prefix}.{missing[0]} in the checkpoint")
    module.load_state_dict(state, strict=recurse, assign=True)


def open_skeleton(folder: str | Any) -> Skeleton:
    """The folder's model on the meta device, with its checkpoint opened and its layers found.

    Raises:
        ModelLoadError: no such folder, no readable config, remote code, missing or unreadable shards.
        FxPruneError: a model whose layers cannot be streamed (naming why), or whose tensor names differ.
    """
    import transformers

    from fxprune.model_loader import _check_hf_folder

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{folder}: not a folder holding a config.json (what save_pretrained writes)")
    _check_hf_folder(path, str(folder))  # remote code, a bad config, missing or corrupt shards: named
    checkpoint = Checkpoint(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        arch = next(iter(getattr(config, "architectures", None) or ()), "")
        auto = getattr(transformers, next((a for suffix, a in _HEADS if arch.endswith(suffix)), "AutoModelForCausalLM"))
        with torch.device("meta"):
            model = auto.from_config(config)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise ModelLoadError(f"{folder}: transformers cannot build its model ({first_line(e, typed=True)})") from e
    model.eval()
    base_name = getattr(model, "base_model_prefix", "")
    base = getattr(model, base_name, None) if base_name else None
    if not isinstance(base, nn.Module):
        raise FxPruneError(f"{type(model).__name__} has no base model ({base_name!r}): it cannot be streamed; use "
                           "the in-memory path")
    n = getattr(config.get_text_config(), "num_hidden_layers", None)
    lists = [(name, m) for name, m in base.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(lists) != 1:
        raise FxPruneError(f"{type(model).__name__}: {'no' if not lists else len(lists)} module lists of "
                           f"num_hidden_layers={n} blocks in {base_name}: its layers cannot be streamed; use the "
                           "in-memory path")
    layers_name = f"{base_name}.{lists[0][0]}"
    _check_names(model, checkpoint, layers_name)
    params_before = sum(math.prod(checkpoint.shape(k)) for k in checkpoint.names() if is_parameter(model, k))
    emb = model.get_input_embeddings()
    return Skeleton(path, model, checkpoint, base, base_name, lists[0][1], layers_name,
                    bool(getattr(config, "use_cache", False)), params_before, int(emb.num_embeddings))


def is_parameter(model: nn.Module, key: str) -> bool:
    """Whether ``key`` names a parameter of ``model`` (not a buffer)."""
    module, _, attr = key.rpartition(".")
    try:
        return attr in model.get_submodule(module)._parameters
    except AttributeError:
        return False


def _check_names(model: nn.Module, checkpoint: Checkpoint, layers_name: str) -> None:
    """The checkpoint holds exactly the model's persistent tensors (a tied one may be absent)."""
    want = set(model.state_dict().keys())
    have = set(checkpoint.names())
    tied = set(getattr(model, "all_tied_weights_keys", None) or ())
    missing = sorted(want - have - tied)
    extra = sorted(have - want)
    if missing or extra:
        raise FxPruneError(f"{checkpoint.folder}: the checkpoint's tensor names are not the model's (missing "
                           f"{missing[:3]}, unexpected {extra[:3]}); transformers converts such names when it loads "
                           "the whole model: use the in-memory path")
    if not any(k.startswith(layers_name + ".") for k in have):
        raise FxPruneError(f"{checkpoint.folder}: no tensor of {layers_name} in the checkpoint")
