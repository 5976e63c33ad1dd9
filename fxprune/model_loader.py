"""Resolve a MODEL spec of the command line into a randomly initialised ``nn.Module``.

Specs, tried in this order:

- ``models_zoo:NAME`` — a model of the bundled test zoo (its input shape is known).
- ``torchvision:NAME`` — ``torchvision.models.get_model(NAME, weights=None)``.
- ``timm:NAME`` — ``timm.create_model(NAME, pretrained=False)`` (input shape from its config).
- ``ultralytics:FILE.yaml`` — ``ultralytics.YOLO(FILE.yaml).model``; needs the optional ``ultralytics``.
- ``hf:FOLDER`` — a Hugging Face model folder (what ``save_pretrained`` writes), read from disk only: its
  weights when the folder has them (safetensors, or ``.bin`` read with ``weights_only``), else random init
  from its ``config.json``; the Auto class follows ``config.architectures``. No remote code is run.
- ``path/to/file.py:NAME`` — the file is imported and ``NAME()`` (a class or factory) is called.
- ``path/to/file.pt`` — a whole model saved with ``torch.save(model)``. Unpickling a whole module runs
  code stored in the file, so it is refused unless the caller opts in with ``trust_pickle=True`` (the
  CLI's ``--trust-pickle``); the file is first read with ``torch.load(weights_only=True)``, which runs no
  code, so a state_dict is recognised and explained without any risk. The model's class must be
  importable (as it was when saved).

Weights are never downloaded: everything is random init unless a ``state_dict`` checkpoint is loaded
with :func:`load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxprune.errors import ModelLoadError, first_line

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ModelLoadError", "load_checkpoint", "load_model", "parse_shape", "random_inputs"]

DEFAULT_INPUT_SHAPE = (1, 3, 224, 224)
_FILE_CLASS = re.compile(r"^(?P<file>.+\.py):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")



@dataclass(frozen=True)
class LoadedModel:
    """A model built from a spec.

    Attributes:
        model: The module, in eval mode.
        spec: The spec it was built from.
        input_shapes: The natural input shapes when the source knows them (zoo, timm), else None.
    """

    model: nn.Module
    spec: str
    input_shapes: tuple[tuple[int, ...], ...] | None


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"1,3,224,224"`` (or ``1x3x224x224``) into a tuple of positive ints.

    Raises:
        ModelLoadError: If the text is not a list of positive integers.
    """
    parts = [p.strip() for p in re.split(r"[,x]", text.strip())]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ModelLoadError(f"--input-shape must be positive integers separated by commas like 1,3,224,224, got {text!r}")
    return tuple(int(p) for p in parts)


def random_inputs(shapes: tuple[tuple[int, ...], ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal float32 inputs of the given shapes (the global RNG is not touched)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen) for shape in shapes)


def _from_zoo(name: str) -> LoadedModel:
    import models_zoo

    if name not in models_zoo.names():
        raise ModelLoadError(f"unknown models_zoo model {name!r}; choose one of: {', '.join(models_zoo.names())}")
    model, inputs = models_zoo.get(name)
    return LoadedModel(model, f"models_zoo:{name}", tuple(tuple(x.shape) for x in inputs))


def _from_torchvision(name: str) -> LoadedModel:
    tv_models = _import("torchvision", "pip install torchvision").models
    if name not in tv_models.list_models():
        close = _closest(name, tv_models.list_models())
        hint = f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
        raise ModelLoadError(f"unknown torchvision model {name!r}{hint}")
    kwargs: dict[str, Any] = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    return LoadedModel(tv_models.get_model(name, weights=None, **kwargs), f"torchvision:{name}", None)


def _from_timm(name: str) -> LoadedModel:
    timm = _import("timm", "pip install timm")
    if not timm.list_models(name):
        close = _closest(name, timm.list_models(f"*{name}*") or timm.list_models())
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ModelLoadError(f"unknown timm model {name!r}{hint}")
    model = timm.create_model(name, pretrained=False)
    size = getattr(model, "pretrained_cfg", {}).get("input_size")
    shapes = ((1, *size),) if size else None
    return LoadedModel(model, f"timm:{name}", shapes)


def _from_ultralytics(name: str) -> LoadedModel:
    ultralytics = _import("ultralytics", "pip install 'fxprune[yolo]' (or pip install ultralytics)")
    if not name.endswith((".yaml", ".yml")):
        raise ModelLoadError(
            f"ultralytics:{name}: give a model config such as yolov8n.yaml (a .pt file would download weights)"
        )
    model = ultralytics.YOLO(name).model
    size = int(getattr(model, "args", {}).get("imgsz", 640)) if isinstance(getattr(model, "args", None), dict) else 640
    return LoadedModel(model, f"ultralytics:{name}", ((1, 3, size, size),))  # YOLO's own input size


_HF_HEADS = (("ForCausalLM", "AutoModelForCausalLM"), ("ForMaskedLM", "AutoModelForMaskedLM"),
             ("ForSequenceClassification", "AutoModelForSequenceClassification"),
             ("ForImageClassification", "AutoModelForImageClassification"))


def _from_hf(folder: str) -> LoadedModel:
    transformers = _import("transformers", "pip install transformers")
    path = Path(folder)
    if not path.is_dir():
        raise ModelLoadError(f"hf:{folder}: no such folder; give a folder holding the config.json (and weights) "
                             "that save_pretrained wrote; fxprune never downloads models")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"hf:{folder}: not a folder holding a config.json (what save_pretrained writes); "
                             "fxprune never downloads models")
    _check_hf_folder(path, folder)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        arch = next(iter(getattr(config, "architectures", None) or ()), "")
        auto = getattr(transformers, next((a for suffix, a in _HF_HEADS if arch.endswith(suffix)), "AutoModel"))
        if _hf_weights(path):
            model = auto.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        else:  # a config only: random init, as every other source
            log.warning("hf:%s holds a config.json and no weights: the model is randomly initialised", folder)
            model = auto.from_config(config)
    except Exception as e:  # noqa: BLE001 - transformers raises many types (OSError, ValueError, SafetensorError)
        raise ModelLoadError(f"hf:{folder}: transformers cannot load it ({type(e).__name__}: {first_line(e)})") from e
    return LoadedModel(model.eval(), f"hf:{folder}", None)


def _hf_weights(path: Path) -> list[Path]:
    """The weight files of a Hugging Face folder (safetensors, ``.bin``, and their shard indexes)."""
    return sorted(f for pattern in ("*.safetensors", "*.bin", "*.index.json") for f in path.glob(pattern))


def _check_hf_folder(path: Path, folder: str) -> None:
    """Refuse what transformers would not load cleanly, naming the file: a config that asks for remote code
    (``auto_map``), an unreadable config, a corrupt safetensors file, a shard index naming missing files.

    Raises:
        ModelLoadError: naming the file and what to do.
    """
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"hf:{folder}: {path / 'config.json'} is not valid JSON ({first_line(e)})") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"hf:{folder}: {path / 'config.json'} does not hold a JSON object")
    if "auto_map" in config:
        raise ModelLoadError(f"hf:{folder}: {path / 'config.json'} has an auto_map: the model's classes are code "
                             "stored with it (trust_remote_code), and fxprune never runs remote code; load it in "
                             "Python yourself and call fxprune.prune")
    for index in path.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError) as e:
            raise ModelLoadError(f"hf:{folder}: cannot read the shard index {index} ({first_line(e)})") from e
        missing = sorted(str(s) for s in shards if not (path / str(s)).is_file())
        if missing:
            raise ModelLoadError(f"hf:{folder}: {index.name} names weight files that are not there: "
                                 f"{', '.join(missing[:3])}; copy the whole folder")
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError
            raise ModelLoadError(f"hf:{folder}: {f} is not a readable safetensors file ({first_line(e)}); "
                                 "save the model again with save_pretrained") from e


def _from_python_file(file: str, name: str) -> LoadedModel:
    path = Path(file)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {file}")
    module_name = f"_fxprune_user_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # sibling imports of the user's file
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here
    try:
        with _as_script(file, f"the model file {file}", "while being imported"):
            spec.loader.exec_module(module)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"importing {file} failed: {type(e).__name__}: {first_line(e)}") from e
    finally:
        sys.path.remove(str(path.resolve().parent))
    factory: Callable[[], Any] | None = getattr(module, name, None)
    if not callable(factory):
        found = sorted(k for k, v in vars(module).items() if isinstance(v, type) and issubclass(v, nn.Module))
        raise ModelLoadError(f"{file} has no class or function {name!r}; nn.Module classes there: {found or 'none'}")
    try:
        with _as_script(file, f"{file}:{name}()", "when called"):
            model = factory()
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{name}() failed (it must be callable without arguments): {first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{file}:{name}() returned a {type(model).__name__}, not an nn.Module")
    return LoadedModel(model, f"{file}:{name}", None)


@contextlib.contextmanager
def _as_script(file: str, what: str, when: str) -> Iterator[None]:
    """Run user code with ``sys.argv == [file]``, its stderr held back, and ``sys.exit`` turned into an error.

    A model file may parse the command line (argparse) or call ``sys.exit()`` at import time; neither may end
    fxprune's own process, and argparse's usage text must not add lines to the one-line error. What the code
    wrote to stderr is passed on when it returns normally.
    """
    argv, stderr = sys.argv, sys.stderr
    held = io.StringIO()
    sys.argv, sys.stderr = [file], held
    ok = False
    try:
        yield
        ok = True
    except SystemExit as e:
        said = next((ln.strip() for ln in reversed(held.getvalue().splitlines()) if ln.strip()), "")
        detail = f" ({said[:200]})" if said else ""
        raise ModelLoadError(
            f"{what} called sys.exit({e.code!r}) {when}{detail}: a model file must not parse the command line "
            "or exit when imported; put that code under if __name__ == '__main__':"
        ) from e
    finally:
        sys.argv, sys.stderr = argv, stderr
        if ok and held.getvalue():
            stderr.write(held.getvalue())


def _from_saved(file: str, trust_pickle: bool) -> LoadedModel:
    try:  # weights_only=True runs no code from the file: a state_dict or tensors load, a module is refused
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the file holds objects beyond tensors and containers
        if not trust_pickle:
            raise ModelLoadError(
                f"{file} holds a pickled object (a whole model?), and unpickling it would run code stored in the "
                "file; fxprune refuses that by default. If you trust the file, pass --trust-pickle (Python: "
                "load_model(..., trust_pickle=True)); or save a state_dict and give it as --checkpoint"
            ) from e
        try:
            obj = torch.load(file, map_location="cpu", weights_only=False)  # the caller trusts this file
        except Exception as e2:
            raise ModelLoadError(
                f"cannot load {file} with torch.load: {type(e2).__name__}: {first_line(e2)} "
                "(a torch.save(model) file needs the model's class to be importable)"
            ) from e2
    if isinstance(obj, dict):
        raise ModelLoadError(
            f"{file} holds a state_dict, not a model; give the architecture as MODEL and this file as --checkpoint"
        )
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{file} holds a {type(obj).__name__}, not an nn.Module")
    return LoadedModel(obj, file, None)


def load_model(spec: str, *, seed: int = 0, trust_pickle: bool = False) -> LoadedModel:
    """Build the model a spec names, with seeded random weights, in eval mode.

    Args:
        spec: See the module docstring for the accepted forms.
        seed: Seed of the random initialisation (``torch.manual_seed``).
        trust_pickle: allow a ``torch.save(model)`` file to be unpickled (this runs code stored in the
            file; only for files you trust). Without it such a file is refused with a ``ModelLoadError``.

    Returns:
        The loaded model.

    Raises:
        ModelLoadError: If the spec names no model, a file is missing, or the source package is absent.
    """
    torch.manual_seed(seed)
    prefix, _, rest = spec.partition(":")
    sources = {"models_zoo": _from_zoo, "torchvision": _from_torchvision, "timm": _from_timm,
               "ultralytics": _from_ultralytics, "hf": _from_hf}
    if prefix in sources and rest:
        loaded = sources[prefix](rest)
    elif match := _FILE_CLASS.match(spec):
        loaded = _from_python_file(match["file"], match["name"])
    elif spec.endswith(".py"):
        raise ModelLoadError(f"name the model class in the file: {spec}:ClassName")
    elif Path(spec).is_file():
        loaded = _from_saved(spec, trust_pickle)
    elif "/" in spec or "\\" in spec or Path(spec).suffix:
        raise ModelLoadError(f"model file not found: {spec}")
    else:
        raise ModelLoadError(
            f"unknown model {spec!r}; use models_zoo:NAME, torchvision:NAME, timm:NAME, ultralytics:FILE.yaml, "
            "hf:FOLDER, path/to/file.py:ClassName or a file saved with torch.save(model)"
        )
    log.info("loaded %s (%s)", loaded.spec, type(loaded.model).__name__)
    return LoadedModel(loaded.model.eval(), loaded.spec, loaded.input_shapes)


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a ``state_dict`` file into ``model`` (strict; ``{"state_dict": ...}`` and ``{"model": ...}`` unwrapped).

    Raises:
        ModelLoadError: If the file is missing, is not a state_dict, or does not match the model.
    """
    if not Path(path).is_file():
        raise ModelLoadError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"cannot read checkpoint {path}: not a state_dict saved with torch.save ({type(e).__name__})"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelLoadError(f"checkpoint {path} holds a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = [k for k in own.keys() & state.keys() if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", sorted(wrong))) if v]
        raise ModelLoadError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def _closest(name: str, choices: list[str], n: int = 5) -> list[str]:
    """Up to ``n`` names a user most likely meant: the name as a prefix first, then by similarity."""
    import difflib

    low = name.lower()
    prefix = sorted((c for c in choices if c.startswith(low)), key=len)
    similar = difflib.get_close_matches(low, choices, n=n, cutoff=0.5)
    inside = [c for c in choices if low in c]
    return list(dict.fromkeys([*prefix, *similar, *inside]))[:n]


def _import(name: str, how: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ModelLoadError(f"{name} is not installed; {how}") from e

