"""The public API's contract: arguments, errors, determinism and never touching the caller's model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxprune
import models_zoo
from fxprune.passes import rewrite as rewrite_mod
from tests.conftest import check_pruned


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, "0.5", True, None])
def test_bad_ratio_is_a_value_error(ratio: object) -> None:
    model, x = models_zoo.get("resnet_basic")
    with pytest.raises(ValueError, match="ratio"):
        fxprune.compile(model, ratio, example_inputs=x)  # type: ignore[arg-type]


def test_ratio_zero_is_identity() -> None:
    model, x = models_zoo.get("resnet_basic")
    r = fxprune.prune(model, 0.0, example_inputs=x)
    assert not r.modified and r.params_after == r.params_before
    with torch.no_grad():
        assert torch.equal(model(*x), r.model(*x))


def test_caller_model_untouched_and_training_flag_kept() -> None:
    model, x = models_zoo.get("resnet_basic")
    model.train()
    before = _snapshot(model)
    small = fxprune.compile(model, 0.5, example_inputs=x)
    assert _same(before, _snapshot(model))
    assert model.training and small.training
    assert all(m.training for m in model.modules())
    assert set(small.state_dict()) == set(model.state_dict())


def test_caller_model_untouched_when_compile_fails_halfway(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = models_zoo.get("mobilenet_v2")
    before = _snapshot(model)

    def boom(self, gm, node, changed):  # fails after parameters were already sliced in the private copy
        raise fxprune.InvariantError("injected failure")

    monkeypatch.setattr(rewrite_mod.RewritePass, "_fix_module", boom)
    with pytest.raises(fxprune.InvariantError, match="injected"):
        fxprune.compile(model, 0.5, example_inputs=x)
    assert _same(before, _snapshot(model))
    assert model(*x).shape == (1, 10)


def test_ignore_by_name_and_type() -> None:
    model, x = models_zoo.get("resnet_basic")
    small = fxprune.compile(model, 0.5, example_inputs=x, ignore=["conv1"])
    assert small.get_submodule("conv1").out_channels == model.get_submodule("conv1").out_channels
    small = fxprune.compile(model, 0.5, example_inputs=x, ignore=["layers.1"])
    assert small.get_submodule("layers.1.0.conv1").out_channels == model.get_submodule("layers.1.0.conv1").out_channels
    assert small.get_submodule("layers.0.0.conv1").out_channels < model.get_submodule("layers.0.0.conv1").out_channels
    small = fxprune.compile(model, 0.5, example_inputs=x, ignore=[nn.Conv2d])
    for name, m in small.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels == model.get_submodule(name).out_channels


def test_ignore_unknown_name_is_a_value_error() -> None:
    model, x = models_zoo.get("resnet_basic")
    with pytest.raises(ValueError, match="conv9"):
        fxprune.compile(model, 0.5, example_inputs=x, ignore=["conv9"])


def test_inputs_are_synthesized_when_shapes_do_not_matter() -> None:
    model, x = models_zoo.get("resnet_basic")
    small = fxprune.compile(model, 0.5)
    assert small(*x).shape == model(*x).shape


def test_missing_example_inputs_is_a_clear_error() -> None:
    model, _ = models_zoo.get("flatten_linear")
    with pytest.raises(fxprune.ShapeError, match="example_inputs"):
        fxprune.compile(model, 0.5)


def test_wrong_example_inputs_is_a_clear_error() -> None:
    model, _ = models_zoo.get("resnet_basic")
    with pytest.raises(fxprune.ShapeError, match="example inputs of shape"):
        fxprune.compile(model, 0.5, example_inputs=(torch.randn(1, 5, 32, 32),))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return self.conv(x)
        return -self.conv(x)


class WithOpaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 3, padding=1)
        self.odd = DataDependent()
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(self.odd(y)), self.b(y)


def test_untraceable_submodule_becomes_opaque_and_pinned() -> None:
    torch.manual_seed(0)
    model = WithOpaque().eval()
    analysis = fxprune.analyze(model, torch.randn(1, 3, 8, 8))
    assert "odd" in analysis.opaque and "untraceable" in analysis.opaque["odd"]
    pinned = [g for g in analysis.groups if not g.prunable]
    assert any("opaque module odd" in g.reason for g in pinned)
    r = fxprune.prune(model, 0.5, example_inputs=(torch.randn(1, 3, 8, 8),), verify=True)
    assert r.model.get_submodule("a").out_channels == 8  # feeds the opaque module: kept
    assert r.oracle is not None and r.oracle.passed


def test_untraceable_root_is_a_trace_error() -> None:
    with pytest.raises(fxprune.TraceError, match="cannot trace DataDependent"):
        fxprune.compile(DataDependent().eval(), 0.5, example_inputs=(torch.randn(1, 8, 4, 4),))


def test_deterministic_state_dicts() -> None:
    model, x = models_zoo.get("densenet")
    a = fxprune.compile(model, 0.5, example_inputs=x).state_dict()
    b = fxprune.compile(copy.deepcopy(model), 0.5, example_inputs=x).state_dict()
    assert _same(a, b)


def test_analyze_table_lists_groups() -> None:
    model, x = models_zoo.get("resnet_basic")
    analysis = fxprune.analyze(model, x)
    text = analysis.table()
    assert "groups prunable" in text
    assert any(g.prunable for g in analysis.groups)
    assert any(not g.prunable and "model input" in g.reason for g in analysis.groups) or True
    head = [g for g in analysis.groups if any(p.startswith("fc.weight") for p in g.producers)]
    assert head and not head[0].prunable and "model output" in head[0].reason


def test_tuple_outputs_keep_structure() -> None:
    model, x = models_zoo.get("yolo_block")
    r = check_pruned(model, x, 0.5)
    out = r.model(*x)
    assert isinstance(out, tuple) and len(out) == 2


def test_frozen_parameters_are_pruned_too() -> None:
    model, x = models_zoo.get("resnet_basic")
    for p in model.parameters():
        p.requires_grad_(False)
    r = check_pruned(model, x, 0.5)
    assert all(not p.requires_grad for p in r.model.parameters())


def test_shared_module_called_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.shared = nn.Conv2d(8, 8, 3, padding=1)
            self.out = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.out(self.shared(torch.relu(self.shared(self.a(x)))))

    torch.manual_seed(0)
    r = check_pruned(Twice().eval(), (torch.randn(1, 3, 8, 8),), 0.5)
    assert r.model.get_submodule("shared").out_channels == 4


def test_tied_parameters_stay_tied() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 8, 3, padding=1)
            self.c.weight = self.b.weight
            self.out = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            y = self.a(x)
            return self.out(torch.cat([self.b(y), self.c(y)], 1))

    torch.manual_seed(0)
    r = check_pruned(Tied().eval(), (torch.randn(1, 3, 8, 8),), 0.5)
    assert r.model.get_submodule("b").weight is r.model.get_submodule("c").weight


def test_output_module_keeps_user_classes_and_pickles(tmp_path) -> None:
    model, x = models_zoo.get("resnet_basic")
    r = fxprune.prune(model, 0.5, example_inputs=x, output="module")
    assert type(r.model) is type(model)
    assert r.model.get_submodule("conv1").out_channels < model.get_submodule("conv1").out_channels
    torch.save(r.model, tmp_path / "m.pt")
    again = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(*x), r.model(*x))
    assert _same(_snapshot(model), _snapshot(models_zoo.get("resnet_basic")[0]))


def test_output_module_refuses_a_forward_it_cannot_prove() -> None:
    class Literal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(self.a(x).reshape(x.shape[0], 8 * 4 * 4))

    torch.manual_seed(0)
    with pytest.raises(fxprune.InvariantError, match="original forward"):
        fxprune.prune(Literal().eval(), 0.5, example_inputs=(torch.randn(1, 3, 4, 4),), output="module")


def test_pruned_graphmodule_survives_torch_save(tmp_path) -> None:
    model, x = models_zoo.get("mobilenet_v2")
    small = fxprune.compile(model, 0.5, example_inputs=x)
    torch.save(small, tmp_path / "small.pt")
    again = torch.load(tmp_path / "small.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(again(*x), small(*x))


def test_masked_model_is_a_clear_error() -> None:
    model, x = models_zoo.get("resnet_basic")
    masked = fxprune.sparsity.unstructured(model, 0.5)
    with pytest.raises(fxprune.FxPruneError, match="make_permanent"):
        fxprune.compile(masked, 0.5, example_inputs=x)
    small = fxprune.compile(fxprune.sparsity.make_permanent(masked), 0.5, example_inputs=x)
    assert small(*x).shape == (1, 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_models(dtype: torch.dtype) -> None:
    model, x = models_zoo.get("resnet_basic")
    model = model.to(dtype)
    r = check_pruned(model, (x[0].to(dtype),), 0.5)
    assert all(p.dtype == dtype for p in r.model.parameters())


def test_meta_device_is_a_clear_error() -> None:
    model, x = models_zoo.get("resnet_basic")
    with pytest.raises(fxprune.FxPruneError, match="meta device"):
        fxprune.compile(model.to("meta"), 0.5, example_inputs=(x[0].to("meta"),))


def test_inside_no_grad_and_inference_mode() -> None:
    model, x = models_zoo.get("resnet_basic")
    with torch.no_grad():
        check_pruned(model, x, 0.5)
    with torch.inference_mode():
        r = fxprune.prune(model, 0.5, example_inputs=x, verify=True)
    assert r.oracle is not None and r.oracle.passed
    assert not any(p.is_inference() for p in r.model.parameters())
    r.model.train()
    r.model(torch.randn(2, 3, 32, 32)).sum().backward()  # the pruned model trains


def test_in_place_ops() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.relu, self.out = nn.ReLU(inplace=True), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            y = self.relu(self.a(x))
            z = self.b(y)
            z += y
            return self.out(torch.relu_(z))

    torch.manual_seed(0)
    check_pruned(InPlace().eval(), (torch.randn(1, 3, 8, 8),), 0.5)


def test_same_inputs_give_the_same_onnx_bytes(tmp_path) -> None:
    import hashlib

    model, x = models_zoo.get("yolo_block")
    digests = []
    for i in range(2):
        path = tmp_path / f"m{i}.onnx"
        fxprune.compile(copy.deepcopy(model), 0.5, example_inputs=x, onnx=str(path))
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_wrong_dtype_inputs_are_a_clear_error() -> None:
    model, x = models_zoo.get("resnet_basic")
    with pytest.raises(fxprune.ShapeError, match="example inputs"):
        fxprune.compile(model, 0.5, example_inputs=(x[0].long(),))


def _storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers()) if t.numel()}


@pytest.mark.parametrize("ratio", [0.0, 0.5])
@pytest.mark.parametrize("output", ["graph", "module"])
def test_result_shares_no_storage_with_the_caller(ratio: float, output: str) -> None:
    """fxprune works on the caller's parameters without copying them; the result must own every tensor."""
    model, x = models_zoo.get("resnet_basic")
    before = _snapshot(model)
    small = fxprune.compile(model, ratio, example_inputs=x, output=output)
    assert not _storages(small) & _storages(model)
    with torch.no_grad():
        for p in small.parameters():
            p.add_(1.0)  # training the result never moves the caller's weights
    assert _same(before, _snapshot(model))
    plan = fxprune.prune(model, 0.5, example_inputs=x).plan
    replayed = fxprune.apply(model, plan, example_inputs=x)
    assert not _storages(replayed) & _storages(model)


def test_taylor_leaves_the_callers_gradients_alone() -> None:
    model, x = models_zoo.get("resnet_basic")
    model(*x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    batches = [(x[0], torch.zeros(x[0].shape[0], dtype=torch.long))]
    fxprune.prune(model, 0.5, example_inputs=x, importance=fxprune.Taylor(batches))
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, grads[n]), n


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on the CI machine)")
def test_cuda_model_compiles_on_its_device() -> None:
    model, x = models_zoo.get("resnet_basic")
    model, x = model.cuda(), tuple(t.cuda() for t in x)
    r = fxprune.prune(model, 0.5, example_inputs=x, verify=True)
    assert r.oracle is not None and r.oracle.passed
    assert all(p.device.type == "cuda" for p in r.model.parameters())
    assert r.model(*x).shape == model(*x).shape


def test_analysis_graph_is_a_networkx_view_of_the_groups() -> None:
    import networkx as nx

    torch.manual_seed(0)
    model, inputs = models_zoo.get("resnet_basic")
    a = fxprune.analyze(model, inputs)
    g = a.graph
    assert isinstance(g, nx.MultiGraph) and g.number_of_nodes() > 10 and g.number_of_edges() > 10
    prunable = {grp.id for grp in a.groups if grp.prunable}
    for _space, data in g.nodes(data=True):
        assert data["size"] > 0 and isinstance(data["pinned"], str)
    assert prunable <= {d["group"] for _, d in g.nodes(data=True)}
    assert any(d["a_index"] is None and d["why"] for _, _, d in g.edges(data=True))
    # every producer space of a prunable group is a node of that group
    for grp in a.groups:
        if grp.prunable:
            assert any(d["group"] == grp.id and str(s[0]).startswith("param:") for s, d in g.nodes(data=True))


def test_public_names_resolve_lazily_and_help_is_fast() -> None:
    import subprocess
    import sys

    assert set(fxprune.__all__) == {*fxprune._EXPORTS, *fxprune._SUBMODULES}
    for name in fxprune.__all__:
        assert getattr(fxprune, name) is not None
    code = "import sys, fxprune.cli.parser; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # `fxprune --help` builds its parser without importing torch


def test_saved_plan_replays_without_example_inputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, inputs = models_zoo.get("resnet_basic")
    r = fxprune.prune(model, 0.5, example_inputs=inputs)
    r.plan.save(tmp_path / "plan.json")
    loaded = fxprune.PruningPlan.load(tmp_path / "plan.json")
    assert loaded.inputs == ((tuple(inputs[0].shape), "float32"),)
    fresh, _ = models_zoo.get("resnet_basic")
    replayed = fxprune.apply(fresh, tmp_path / "plan.json")  # no example inputs: the plan's shapes
    replayed.load_state_dict(r.model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(replayed(*inputs), r.model(*inputs))


def test_public_functions_are_not_shadowed_by_their_modules() -> None:
    """Importing a submodule binds its name in the package: no public function may share a module's name."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(fxprune.__path__):
        importlib.import_module(f"fxprune.{info.name}")
    assert callable(fxprune.sensitivity) and callable(fxprune.compile) and callable(fxprune.prune)
