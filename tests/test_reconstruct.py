"""``reconstruct=True``: least-squares refit of the consumers of removed channels, proven by the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.passes.refit import DAMP


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).eval()


def _error(model: nn.Module, pruned: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        want = model(x)
        return float((pruned(x) - want).norm() / want.norm())


CAL = [torch.randn(64, 16, generator=torch.Generator().manual_seed(s)) for s in range(4)]
HELD_OUT = torch.randn(512, 16, generator=torch.Generator().manual_seed(99))


@pytest.mark.parametrize("output", ["graph", "module"])
def test_refit_is_the_least_squares_solution_and_is_proven(output: str) -> None:
    model = _mlp()
    plain = fxprune.prune(model, 0.5, example_inputs=(CAL[0][:2],), importance="activation", calibration=CAL)
    r = fxprune.prune(model, 0.5, example_inputs=(CAL[0][:2],), importance="activation", calibration=CAL,
                      reconstruct=True, verify=True, output=output)
    assert r.oracle.applicable and r.oracle.passed
    assert plain.plan.kept == r.plan.kept  # the same channels; only the kept weights change
    (fit,) = r.reconstruction
    assert fit.name == "2" and fit.kept == 32 and fit.bias and fit.error_after < fit.error_before
    assert _error(model, r.model, HELD_OUT) < 0.7 * _error(model, plain.model, HELD_OUT)
    # The same solution computed independently, in numpy, on the eager model's own activations.
    with torch.no_grad():
        x = torch.cat([torch.relu(model[0](b)) for b in CAL]).double().numpy()
    kept = sorted(_kept_columns(model[2].weight, r.model))
    xk = np.concatenate([x[:, kept], np.ones((len(x), 1))], 1)
    target = x @ model[2].weight.detach().double().numpy().T + model[2].bias.detach().double().numpy()
    h = xk.T @ xk
    solution = np.linalg.solve(h + DAMP * h.diagonal().mean() * np.eye(len(h)), xk.T @ target).T
    got = r.model.state_dict()
    np.testing.assert_allclose(got["2.weight"].double().numpy(), solution[:, :-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["2.bias"].double().numpy(), solution[:, -1], rtol=1e-4, atol=1e-5)


def test_a_chain_is_refitted_in_order_toward_the_unpruned_outputs() -> None:
    """Two consumers in a row: the second is fitted on what the pruned, refitted first one gives it, with the
    unpruned model's output as the target (so it also makes up for what the first one lost): numpy, on the
    eager model and on the pruned model, gives the same weights."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 8)).eval()
    r = fxprune.prune(model, 0.5, example_inputs=(CAL[0][:2],), importance="activation", calibration=CAL,
                      reconstruct=True, verify=True, output="module")
    assert r.oracle.passed and [f.name for f in r.reconstruction] == ["2", "4"]
    with torch.no_grad():
        x_o = torch.cat([model[3](model[2](model[1](model[0](b)))) for b in CAL]).double().numpy()
        x_p = torch.cat([r.model[3](r.model[2](r.model[1](r.model[0](b)))) for b in CAL]).double().numpy()
    w, b = model[4].weight.detach().double().numpy(), model[4].bias.detach().double().numpy()
    target = x_o @ w.T + b
    xk = np.concatenate([x_p, np.ones((len(x_p), 1))], 1)
    h = xk.T @ xk
    solution = np.linalg.solve(h + DAMP * h.diagonal().mean() * np.eye(len(h)), xk.T @ target).T
    np.testing.assert_allclose(r.model[4].weight.detach().double().numpy(), solution[:, :-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(r.model[4].bias.detach().double().numpy(), solution[:, -1], rtol=1e-4, atol=1e-5)


def _kept_columns(original: torch.Tensor, pruned: nn.Module) -> list[int]:
    """The hidden channels kept: the rows of the first layer that survive."""
    rows = {tuple(r.tolist()): j for j, r in enumerate(_mlp()[0].weight.detach())}
    return [rows[tuple(r.tolist())] for r in pruned.state_dict()["0.weight"]]


def test_a_1x1_conv_consumer_is_refitted() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 1)).eval()
    cal = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    plain = fxprune.prune(net, 0.5, example_inputs=(cal[0][:1],), importance="activation", calibration=cal)
    r = fxprune.prune(net, 0.5, example_inputs=(cal[0][:1],), importance="activation", calibration=cal,
                      reconstruct=True, verify=True)
    assert r.oracle.passed and [f.name for f in r.reconstruction] == ["2"]
    x = torch.randn(8, 3, 8, 8)
    assert _error(net, r.model, x) < _error(net, plain.model, x)


def test_a_refit_the_reference_does_not_see_fails_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refit must happen before the oracle's reference is taken: one that reaches only the pruned model
    (here 1% on the refitted layer, after the rewrite) is an InvariantError, not a result."""
    import fxprune.stages as stages

    real = stages.generated

    def spoiled(gm: torch.nn.Module) -> torch.nn.Module:
        gm = real(gm)
        with torch.no_grad():
            gm.get_submodule("2").weight.mul_(1.01)
        return gm

    monkeypatch.setattr(stages, "generated", spoiled)
    with pytest.raises(fxprune.InvariantError, match="mask oracle"):
        fxprune.prune(_mlp(), 0.5, example_inputs=(CAL[0][:2],), importance="activation", calibration=CAL,
                      reconstruct=True, verify=True)


def test_reconstruct_needs_calibration() -> None:
    with pytest.raises(fxprune.ArgumentError, match="calibration"):
        fxprune.prune(_mlp(), 0.5, example_inputs=(CAL[0][:2],), reconstruct=True)


transformers = pytest.importorskip("transformers")


def _tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


def test_a_llama_pruned_part_by_part_is_refitted_in_every_layer() -> None:
    model = _tiny_llama()
    g = torch.Generator().manual_seed(0)
    cal = [torch.randint(0, 96, (4, 16), generator=g) for _ in range(4)]
    kwargs = dict(example_inputs=(cal[0][:1],), importance="activation", calibration=cal, output="module")
    plain = fxprune.prune(model, 0.5, **kwargs)
    r = fxprune.prune(model, 0.5, reconstruct=True, verify=True, **kwargs)
    assert all(p.oracle in ("passed", "") for p in r.parts)
    names = [f.name.removeprefix("inner.").removeprefix("model.") for f in r.reconstruction]
    lost = [f.name.removeprefix("inner.").removeprefix("model.") for f in r.reconstruction if f.kept < f.inputs]
    assert lost == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]  # the consumers of removed channels
    after = [f"layers.1.{x}" for x in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                          "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")]
    assert sorted(set(names) - set(lost)) == sorted(after)  # what runs after them, on their changed output
    q = r.model.model.layers[1].self_attn.q_proj.weight  # refitted with its shape unchanged: kept once settled
    assert not torch.equal(q, model.model.layers[1].self_attn.q_proj.weight)
    assert all(f.error_after <= f.error_before and not f.bias for f in r.reconstruction)
    assert all(f.error_after < f.error_before for f in r.reconstruction if f.kept < f.inputs)
    ids = torch.randint(0, 96, (4, 16), generator=g)
    with torch.no_grad():
        want = model(ids).logits
        err = [float((m(ids).logits - want).norm() / want.norm()) for m in (plain.model, r.model)]
    assert err[1] < err[0]


def test_cli_reconstruct_on_a_folder(tmp_path) -> None:
    from fxprune.cli import main

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "llama")
    text = tmp_path / "calib.txt"
    text.write_text("for i in range(10):\n    print(i * i)\n" * 16)
    args = ["compile", f"hf:{tmp_path / 'llama'}", "--ratio", "0.5", "--importance", "activation", "--data",
            str(text), "--runs", "0", "--save-pretrained", str(tmp_path / "out")]
    assert main([*args, "--reconstruct"]) == 0
    refit = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    args[-1] = str(tmp_path / "plain")
    assert main(args) == 0
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert torch.equal(refit.model.layers[0].mlp.up_proj.weight, plain.model.layers[0].mlp.up_proj.weight)  # the same channels
    for a, b in zip(refit.model.layers, plain.model.layers, strict=True):  # (later layers see a pruned upstream)
        assert a.mlp.down_proj.weight.shape == b.mlp.down_proj.weight.shape
        assert not torch.allclose(a.mlp.down_proj.weight, b.mlp.down_proj.weight)  # the consumer refitted
    assert main(["compile", f"hf:{tmp_path / 'llama'}", "--reconstruct", "--runs", "0"]) != 0  # no --data


@pytest.mark.parametrize("padding", [1, "same", 0])
def test_a_3x3_conv_consumer_is_refitted_through_its_patches(padding: object) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=padding),
                        nn.BatchNorm2d(8)).eval()
    cal = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    plain = fxprune.prune(net, 0.5, example_inputs=(cal[0][:1],), importance="activation", calibration=cal)
    r = fxprune.prune(net, 0.5, example_inputs=(cal[0][:1],), importance="activation", calibration=cal,
                      reconstruct=True, verify=True)
    assert r.oracle.passed
    (fit,) = r.reconstruction
    assert (fit.name, fit.kept, fit.inputs, fit.bias) == ("2", 8, 16, True) and fit.error_after < fit.error_before
    x = torch.randn(16, 3, 8, 8)
    assert _error(net, r.model, x) < _error(net, plain.model, x)


def test_a_refit_that_finds_no_layer_is_said(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect")).eval()  # not refittable
    cal = [torch.randn(2, 3, 8, 8)]
    with caplog.at_level("WARNING", logger="fxprune"):
        r = fxprune.prune(net, 0.5, example_inputs=(cal[0][:1],), calibration=cal, reconstruct=True, verify=True)
    assert r.params_after < r.params_before and r.reconstruction == ()
    assert any("refitted no layer" in n for n in r.unhonoured) and "refitted no layer" in caplog.text


class _Residual(nn.Module):
    """Two residual MLP blocks: ``h = x + W2 relu(W1 x)``, ``y = h + W4 relu(W3 h)``."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2, self.w3, self.w4 = nn.Linear(16, 48), nn.Linear(48, 16), nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.w2(torch.relu(self.w1(x)))
        return h + self.w4(torch.relu(self.w3(h)))


def test_a_residual_branch_is_refitted_toward_the_unpruned_sum() -> None:
    """The last layer of a residual branch is fitted so that stream + branch (the pruned stream, refitted branch)
    matches the unpruned sum: numpy, on the eager original and pruned models, gives the same weights."""
    torch.manual_seed(3)
    model = _Residual().eval()
    r = fxprune.prune(model, 0.5, example_inputs=(CAL[0][:2],), importance="activation", calibration=CAL,
                      reconstruct=True, verify=True, output="module")
    assert r.oracle.passed and [f.name for f in r.reconstruction] == ["w2", "w3", "w4"]
    assert [f.kept < f.inputs for f in r.reconstruction] == [True, False, True]  # w3 loses no input: it runs after w2
    p = r.model
    with torch.no_grad():
        want = torch.cat([model(b) for b in CAL]).double().numpy()  # the unpruned sum
        h_o = torch.cat([b + model.w2(torch.relu(model.w1(b))) for b in CAL])
        h_p = torch.cat([b + p.w2(torch.relu(p.w1(b))) for b in CAL])
        x_p = torch.relu(p.w3(h_p)).double().numpy()
    # w3 (every input kept): toward its unpruned output, on the pruned stream
    group = next(g for g in r.plan.groups if g.producers == ("w3.weight[0]",))
    rows = list(r.plan.kept[group.id])  # w3's output rows that stay
    _assert_fit(p.w3, h_p.double().numpy(), model.w3(h_o).detach().double().numpy(), rows)
    _assert_fit(p.w4, x_p, want - h_p.double().numpy())


def _assert_fit(layer: nn.Linear, x: np.ndarray, target: np.ndarray, rows: list[int] | None = None) -> None:
    """``layer``'s ``[W b]`` is the damped least-squares fit of ``target`` on ``[x, 1]`` (numpy; ``rows`` of it)."""
    xk = np.concatenate([x, np.ones((len(x), 1))], 1)
    h = xk.T @ xk
    solution = np.linalg.solve(h + DAMP * h.diagonal().mean() * np.eye(len(h)), xk.T @ target).T
    solution = solution if rows is None else solution[rows]
    np.testing.assert_allclose(layer.weight.detach().double().numpy(), solution[:, :-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.bias.detach().double().numpy(), solution[:, -1], rtol=1e-4, atol=1e-5)


def test_batches_are_cut_to_the_example_shapes() -> None:
    """A batch of the example's shapes is one piece; k times its rows, k pieces; a one-row tensor in both (a
    broadcast mask, rotary tables) goes into every piece; anything else cannot be run by a specialised graph."""
    from fxprune.passes.reconstruct import example_shaped

    x, cos = torch.randn(2, 5, 4), torch.randn(1, 5, 3)
    assert [tuple(t.shape for t in p) for p in example_shaped([(x, cos)], (x, cos))] == [((2, 5, 4), (1, 5, 3))]
    big = torch.randn(6, 5, 4)
    pieces = example_shaped([(big, cos)], (x, cos))
    assert len(pieces) == 3 and all(p[1] is cos for p in pieces) and torch.equal(pieces[2][0], big[4:6])
    assert example_shaped([(torch.randn(3, 5, 4), cos)], (x, cos)) is None  # not a multiple
    assert example_shaped([(big, torch.randn(2, 5, 3))], (x, cos)) is None  # 3 pieces of one, 2 of the other
    assert example_shaped([(torch.randn(2, 6, 4), cos)], (x, cos)) is None  # another sequence length


def test_the_refit_in_order_needs_batches_of_the_example_shape(caplog: pytest.LogCaptureFixture) -> None:
    """output="module" specialises each part's graph to the example's shapes: batches of the example's length
    (any multiple of its batch size) are refitted in order (the layers after a consumer too, which only the
    sequential refit does), and the plan replays with the same example; batches of another length fall back to
    the refit on the unpruned inputs, and say so."""
    model = _tiny_llama()
    g = torch.Generator().manual_seed(0)
    cal = [torch.randint(0, 96, (4, 16), generator=g) for _ in range(3)]
    example = (cal[0][:1],)
    r = fxprune.prune(model, 0.5, example_inputs=example, calibration=cal, reconstruct=True, output="module",
                      verify=True)
    assert all(p.oracle in ("passed", "") for p in r.parts) and any(p.oracle == "passed" for p in r.parts)
    assert any(f.kept == f.inputs for f in r.reconstruction)
    assert "refitted on the unpruned model's inputs" not in caplog.text
    back = fxprune.apply(model, r.plan, example_inputs=example)  # the channels replay (the refit does not)
    assert sum(p.numel() for p in back.parameters()) == r.params_after
    other = (torch.randint(0, 96, (1, 8), generator=g),)
    r = fxprune.prune(model, 0.5, example_inputs=other, calibration=cal, reconstruct=True, output="module")
    assert r.reconstruction and all(f.kept < f.inputs and f.target == "unpruned inputs" for f in r.reconstruction)
    assert "refitted on the unpruned model's inputs" in caplog.text


class _InPlace(nn.Module):
    """A residual block written in place, as torchvision's are: ``h = w0 x; h += W2 relu(W1 h); relu_(h)``."""

    def __init__(self) -> None:
        super().__init__()
        self.w0, self.w1, self.w2, self.head = nn.Linear(16, 16), nn.Linear(16, 48), nn.Linear(48, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w0(x)
        h += self.w2(torch.relu(self.w1(h)))
        return self.head(torch.relu_(h))


def test_in_place_ops_after_the_sum_do_not_reach_the_target() -> None:
    """The residual target is the unpruned sum before the in-place ReLU, less the pruned stream before the
    in-place add wrote into it (both were read after later in-place ops had changed them): numpy on the eager
    models gives the same weights."""
    torch.manual_seed(4)
    model = _InPlace().eval()
    r = fxprune.prune(model, 0.5, example_inputs=(CAL[0][:2],), importance="activation", calibration=CAL,
                      reconstruct=True, verify=True, output="module")
    assert r.oracle.passed and "w2" in [f.name for f in r.reconstruction]
    p = r.model
    stream = next(g for g in r.plan.groups if "w0.weight[0]" in g.producers)
    kept = list(r.plan.kept[stream.id])
    with torch.no_grad():
        x = torch.cat(CAL)
        s0 = model.w0(x)
        unpruned_sum = (s0 + model.w2(torch.relu(model.w1(s0)))).double().numpy()[:, kept]
        s_p = p.w0(x)
        x_p = torch.relu(p.w1(s_p)).double().numpy()
    _assert_fit(p.w2, x_p, unpruned_sum - s_p.double().numpy())


class _Normed(nn.Module):
    """Two consumers of a LayerNorm over a pruned stream: ``cat(a(ln(w0 x)), b(ln(w0 x)))``."""

    def __init__(self) -> None:
        super().__init__()
        self.w0, self.ln, self.a, self.b = nn.Linear(12, 16), nn.LayerNorm(16), nn.Linear(16, 6), nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.w0(x))
        return torch.cat([self.a(h), self.b(h)], -1)


def test_consumers_behind_a_norm_are_fitted_on_the_pruned_norm() -> None:
    """A norm over the pruned channels normalises over the kept ones in the pruned model: every consumer behind
    it (the first included) is fitted on that, toward its unpruned output (numpy on the eager models)."""
    torch.manual_seed(5)
    model = _Normed().eval()
    cal = [torch.randn(8, 12, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    r = fxprune.prune(model, 0.5, example_inputs=(cal[0][:2],), importance="activation", calibration=cal,
                      reconstruct=True, verify=True, output="module")
    assert r.oracle.passed and r.model.ln.normalized_shape == (8,)
    p = r.model
    with torch.no_grad():
        x = torch.cat(cal)
        x_p = p.ln(p.w0(x)).double().numpy()  # the pruned model's own norm: over the kept channels
        for name in ("a", "b"):
            _assert_fit(getattr(p, name), x_p, getattr(model, name)(model.ln(model.w0(x))).double().numpy())


def test_the_independent_refit_check_sees_a_spoiled_refit() -> None:
    """``testing.refit_check`` recomputes each own-target refit from the eager models alone: a correct refit
    has no gap, a refit off its least-squares fit (here: one weight nudged) a clear one."""
    from fxprune.testing.refit_check import TOLERANCE, refit_gaps

    torch.manual_seed(5)
    model = _Normed().eval()
    cal = [torch.randn(8, 12, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    r = fxprune.prune(model, 0.5, example_inputs=(cal[0][:2],), calibration=cal, reconstruct=True)
    batches = [(b,) for b in cal]
    gaps = refit_gaps(model, r.model, r.reconstruction, batches)
    assert set(gaps) == {"a", "b"} and max(gaps.values()) < 1e-9
    with torch.no_grad():
        r.model.get_submodule("a").weight[0, 0] += 0.1
    assert refit_gaps(model, r.model, r.reconstruction, batches)["a"] > TOLERANCE
