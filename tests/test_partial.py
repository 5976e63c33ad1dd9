"""Piecewise pruning: untraceable roots and opaque modules, and the real models that need it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.outputs import tensors_of
from tests.test_rules import cbr


class ListRoot(nn.Module):
    """A root that iterates over a list of images (like torchvision detection): not traceable as a whole."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(cbr(3, 16), cbr(16, 16), nn.Conv2d(16, 4, 1))

    def forward(self, images):
        return [self.backbone(img[None]) for img in images]


class OpaqueHead(nn.Module):
    """Data-dependent control flow around a traceable branch."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Sequential(cbr(8, 16), cbr(16, 16), nn.Conv2d(16, 2, 1))

    def forward(self, x):
        y = self.branch(x)
        return y if y.sum() > 0 else -y


class WithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = cbr(3, 8)
        self.head = OpaqueHead()

    def forward(self, x):
        return self.head(self.stem(x))


def _check_same_structure(model: nn.Module, pruned: nn.Module, inputs: tuple) -> None:
    with torch.no_grad():
        a, b = tensors_of(model(*inputs)), tensors_of(pruned(*inputs))
    assert [t.shape for t in a] == [t.shape for t in b]


def test_untraceable_root_prunes_its_traceable_parts() -> None:
    torch.manual_seed(0)
    model = ListRoot().eval()
    x = ([torch.randn(3, 8, 8)],)
    r = fxprune.prune(model, 0.5, example_inputs=x, verify=True)
    assert type(r.model) is ListRoot and r.params_after < r.params_before
    assert [p.name for p in r.parts] == ["backbone"] and r.parts[0].oracle == "passed"
    assert r.model.backbone[0][0].out_channels == 8
    _check_same_structure(model, r.model, x)


def test_parts_called_twice_are_left_alone_with_a_reason() -> None:
    torch.manual_seed(0)
    x = ([torch.randn(3, 8, 8), torch.randn(3, 8, 8)],)
    with pytest.raises(fxprune.TraceError, match="backbone: called 2 times"):
        fxprune.compile(ListRoot().eval(), 0.5, example_inputs=x)


def test_untraceable_root_without_inputs_is_a_clear_error() -> None:
    with pytest.raises(fxprune.TraceError, match="example_inputs"):
        fxprune.compile(ListRoot().eval(), 0.5)


def test_opaque_module_insides_are_pruned_and_proven() -> None:
    torch.manual_seed(0)
    model = WithHead().eval()
    x = (torch.randn(1, 3, 8, 8),)
    r = fxprune.prune(model, 0.5, example_inputs=x, verify=True)
    head = next(p for p in r.parts if p.name == "head")  # tried whole first; its branch is a part inside it
    assert head.children == ["head.branch"]
    assert head.params_after < head.params_before and head.oracle == "passed"
    assert r.model.get_submodule("stem.0").out_channels == 8  # feeds the opaque head: pinned
    _check_same_structure(model, r.model, x)


transformers = pytest.importorskip("transformers")


def _hf_models():
    from transformers import (
        BertConfig,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        ViTConfig,
        ViTForImageClassification,
    )

    ids = (torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0)),)
    return {
        "bert": (lambda: BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=128, vocab_size=100)), ids),
        "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                    bos_token_id=0, eos_token_id=0)), ids),
        "llama": (lambda: LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=128,
                                                      vocab_size=100)), ids),
        "qwen2": (lambda: Qwen2ForCausalLM(Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=128,
                                                      vocab_size=100)), ids),  # no head_dim field
        "vit": (lambda: ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                           intermediate_size=128, image_size=32, patch_size=8)),
                (torch.randn(1, 3, 32, 32),)),
    }


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit"])
def test_hugging_face_models_shrink(name: str) -> None:
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    build, x = _hf_models()[name]
    model = build().eval()
    r = fxprune.prune(model, 0.5, example_inputs=x, verify=True)
    assert type(r.model) is type(model) or isinstance(r.model, torch.fx.GraphModule)
    assert r.params_after < r.params_before
    assert all(p.oracle in ("passed", "") or "norm" in p.oracle for p in r.parts if not p.skipped)
    _check_same_structure(model, r.model, x)


def test_ignore_reaches_inside_parts() -> None:
    torch.manual_seed(0)
    model = WithHead().eval()
    x = (torch.randn(1, 3, 8, 8),)
    r = fxprune.prune(model, 0.5, example_inputs=x, ignore=["head.branch"])
    assert all(p.params_after == p.params_before for p in r.parts if p.name.startswith("head"))
    assert r.model.get_submodule("head.branch.0.0").out_channels == 16
    r = fxprune.prune(model, 0.5, example_inputs=x, ignore=["head.branch.1"], verify=True)
    assert r.model.get_submodule("head.branch.1.0").out_channels == 16  # kept by the user
    assert r.model.get_submodule("head.branch.0.0").out_channels == 16  # feeds the kept conv: coupled to it
    r = fxprune.prune(model, 0.5, example_inputs=x, ignore=["head.branch.1.0"], verify=True)
    assert r.model.get_submodule("head.branch.1.0").out_channels == 16


def test_nested_opaque_modules_are_pruned_once() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = OpaqueHead()

        def forward(self, x):
            y = self.inner(x)
            return y * 2 if y.mean() > 0 else y

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.outer = cbr(3, 8), Outer()

        def forward(self, x):
            return self.outer(self.stem(x))

    torch.manual_seed(0)
    r = fxprune.prune(Net().eval(), 0.5, example_inputs=(torch.randn(1, 3, 8, 8),), verify=True)
    assert r.model.get_submodule("outer.inner.branch.0.0").out_channels == 8  # 16 -> 8, not pruned twice


def _width(q: nn.Module) -> int:
    return q.weight.shape[1] if type(q).__name__ == "Conv1D" else q.out_features  # Conv1D keeps [in, out]


# (attention module, q projection, heads attribute, head-dim attribute) per Hugging Face model
_HF_ATTENTION = {
    "bert": ("encoder.layer.0.attention.self", "query", "num_attention_heads", "attention_head_size"),
    "gpt2": ("transformer.h.0.attn", "c_attn", "num_heads", "head_dim"),
    "llama": ("model.layers.0.self_attn", "q_proj", None, "head_dim"),
    "vit": ("vit.layers.0.attention", "q_proj", "num_attention_heads", "head_dim"),
}


@pytest.mark.parametrize("prune_heads", [False, True])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit"])
def test_hugging_face_attention_shrinks_with_consistent_heads(name: str, prune_heads: bool) -> None:
    """Self-attention is pruned (example-value tracing), and heads x head_dim equals the q width after."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    build, x = _hf_models()[name]
    model = build().eval()
    path, q_name, heads_attr, dim_attr = _HF_ATTENTION[name]
    r = fxprune.prune(model, 0.5, example_inputs=x, verify=True, prune_heads=prune_heads)
    before, after = model.get_submodule(path), r.model.get_submodule(path)
    q_before, q_after = getattr(before, q_name), getattr(after, q_name)
    share = 3 if name == "gpt2" else 1  # GPT-2's c_attn holds q, k and v
    if name == "llama" and not prune_heads:
        assert _width(q_after) == _width(q_before)  # RoPE pins the head dim: only whole heads can go
    else:
        assert _width(q_after) == _width(q_before) // 2
        heads = getattr(after, heads_attr) if heads_attr else _width(q_after) // after.head_dim
        assert heads * getattr(after, dim_attr) * share == _width(q_after)
        same = "head_dim" if prune_heads else "heads"
        if same == "head_dim":
            assert getattr(after, dim_attr) == getattr(before, dim_attr)
        elif heads_attr:
            assert getattr(after, heads_attr) == getattr(before, heads_attr)
    _check_same_structure(model, r.model, x)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit"])
def test_hugging_face_pruned_models_export_to_onnx(name: str, tmp_path) -> None:
    """ONNX of the pruned model matches onnxruntime. GPT-2 and Llama export with the KV cache off and a fixed
    batch: their unpruned exports fail the same way with a symbolic batch (mask creation in transformers)."""
    from fxprune.passes.export import export_onnx

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    build, x = _hf_models()[name]
    r = fxprune.prune(build().eval(), 0.5, example_inputs=x, prune_heads=True)
    for mod in r.model.modules():
        if getattr(getattr(mod, "config", None), "use_cache", False):
            mod.config.use_cache = False
    dynamic = name in ("bert", "vit")
    report = export_onnx(r.model, x, tmp_path / f"{name}.onnx", dynamic_batch=dynamic, n_check_inputs=2 if dynamic else 1)
    assert report.max_abs_diff < 1e-4


@pytest.mark.parametrize(("name", "prune_heads"), [("llama", False), ("llama", True), ("vit", True),
                                                   ("qwen2", True)])
def test_hugging_face_config_follows_the_pruned_widths(name: str, prune_heads: bool, tmp_path) -> None:
    """output="module": the config describes the pruned model, so save_pretrained/from_pretrained round-trips."""
    from fxprune.outputs import tensors_of

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    build, x = _hf_models()[name]
    model = build().eval()
    r = fxprune.prune(model, 0.5, example_inputs=x, prune_heads=prune_heads, output="module")
    assert r.model.config.intermediate_size == 64 and model.config.intermediate_size == 128  # caller's untouched
    if prune_heads:
        assert r.model.config.num_attention_heads == 2
    r.model.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        for a, b in zip(tensors_of(r.model(*x)), tensors_of(back(*x)), strict=True):
            assert torch.equal(a, b)


def test_hugging_face_config_it_cannot_describe_is_left_with_a_warning(caplog) -> None:
    """BERT derives its head size from hidden_size: thinned heads cannot be described, and the warning says so."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    build, x = _hf_models()["bert"]
    with caplog.at_level("WARNING", logger="fxprune"):
        r = fxprune.prune(build().eval(), 0.5, example_inputs=x, output="module")
    assert "derives the head size from hidden_size" in caplog.text
    assert r.model.config.intermediate_size == 128 and r.model.config.num_attention_heads == 4
    assert r.model.encoder.layer[0].intermediate.dense.out_features == 64  # the model itself is pruned


@pytest.mark.parametrize("target", ["target_params", "target_macs"])
def test_budget_counts_opaque_parts_once(target: str) -> None:
    """A budget with opaque parts is searched over the whole model: no compounding inside each part."""
    torch.manual_seed(0)
    model = WithHead().eval()
    x = (torch.randn(1, 3, 8, 8),)
    r = fxprune.prune(model, 0.5, example_inputs=x, **{target: 0.5})
    frac = r.params_after / r.params_before if target == "target_params" else r.macs_after / r.macs_before
    assert 0.4 <= frac <= 0.5
    assert any(p.name == "head" and p.params_after < p.params_before for p in r.parts)


def test_part_outcomes_steer_the_walk() -> None:
    """``compile_fn`` answers with a typed outcome, never an exception read as a signal: a failed part is
    reported as kept whole and its children are tried; an untraced one, its children, silently."""
    from fxprune.errors import FxPruneError
    from fxprune.part_outcomes import Failed, Untraced
    from fxprune.partial import compile_parts

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
            self.b = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    seen: list[str] = []

    def compile_fn(part, inputs, ignore, calibration, gradients, name, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append(name)
        return Failed(FxPruneError("its proof failed")) if name == "a" else Untraced("not whole")

    root = Net()
    reports = compile_parts(root, root, "", (torch.randn(2, 4),), compile_fn, [])
    assert seen == ["a", "a.0", "a.2", "b"]
    assert [(r.name, r.skipped) for r in reports] == [("a", "FxPruneError: its proof failed")]
