"""Unstructured and N:M masks: exact zero counts, the right weights zeroed, the caller's model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from fxprune import sparsity


def _model() -> nn.Module:
    torch.manual_seed(0)
    # Even weight counts everywhere, so 50% is an exact number of weights.
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 4))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["l1", "random"])
def test_unstructured_per_layer_is_half_zeros_in_every_layer(method):
    model = _model()
    before = _state(model)
    sparse = sparsity.unstructured(model, 0.5, method=method)
    report = sparsity.sparsity_report(sparse)
    assert [r.name for r in report] == ["0", "3", "5"]
    assert all(r.zeros * 2 == r.total and r.fraction == 0.5 for r in report)
    # The caller's model: same tensors, no masks, no hooks.
    assert _state(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())
    assert not prune.is_pruned(model)
    assert all(r.zeros == 0 for r in sparsity.sparsity_report(model))


def test_l1_zeroes_the_smallest_magnitudes():
    model = _model()
    sparse = sparsity.unstructured(model, 0.5)
    for dense, masked in zip(model.modules(), sparse.modules(), strict=True):
        if isinstance(dense, (nn.Conv2d, nn.Linear)):
            w, mask = dense.weight.detach().abs(), masked.weight_mask.bool()
            assert w[~mask].max() <= w[mask].min()


def test_global_is_half_zeros_overall_but_not_per_layer():
    sparse = sparsity.unstructured(_model(), 0.5, global_=True)
    report = sparsity.sparsity_report(sparse)
    assert sum(r.zeros for r in report) * 2 == sum(r.total for r in report)
    assert len({round(r.fraction, 3) for r in report}) > 1  # layers with larger weights keep more


def test_layers_selects_what_is_masked():
    sparse = sparsity.unstructured(_model(), 0.25, layers=(nn.Linear,))
    fractions = {r.name: r.fraction for r in sparsity.sparsity_report(sparse)}
    assert fractions == {"0": 0.0, "3": 0.25, "5": 0.25}


def test_two_four_keeps_the_two_largest_in_every_group_of_four():
    weight = torch.tensor([[1.0, -4.0, 3.0, 2.0, 0.5, 0.1, -0.2, 9.0]])
    expected = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0]])
    assert torch.equal(sparsity.n_m_mask(weight, 2, 4), expected)

    model = _model()
    before = _state(model)
    sparse = sparsity.n_m(model, 2, 4)
    for name, module in sparse.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            groups = module.weight.detach().movedim(1, -1).reshape(-1, 4)  # along the input dim
            assert torch.equal((groups == 0).sum(1), torch.full((groups.shape[0],), 2)), name
            kept = groups.abs().sort(1).values
            assert (kept[:, :2] == 0).all()
    assert all(r.fraction == 0.5 and r.zeros * 2 == r.total for r in sparsity.sparsity_report(sparse))
    assert all(torch.equal(v, before[k]) for k, v in _state(model).items())


def test_n_m_skips_layers_whose_input_dim_does_not_divide():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1))
    report = {r.name: r.fraction for r in sparsity.sparsity_report(sparsity.n_m(model, 1, 4))}
    assert report == {"0": 0.0, "1": 0.75}
    with pytest.raises(ValueError, match="n must be <= m"):
        sparsity.n_m(model, 5, 4)
    with pytest.raises(ValueError, match="divisible"):
        sparsity.n_m(nn.Linear(3, 2), 2, 4)


def test_make_permanent_folds_masks_and_keeps_outputs():
    x = torch.randn(2, 4, 6, 6)
    masked = sparsity.n_m(_model(), 2, 4)
    permanent = sparsity.make_permanent(masked)
    assert not prune.is_pruned(permanent)
    assert not any(n.endswith(("_orig", "_mask")) for n, _ in permanent.named_parameters())
    assert not any(n.endswith("_mask") for n, _ in permanent.named_buffers())
    torch.testing.assert_close(permanent(x), masked(x), rtol=0, atol=0)
    assert prune.is_pruned(masked)  # inplace=False: the masked input keeps its masks
    assert [r.fraction for r in sparsity.sparsity_report(permanent)] == [0.5, 0.5, 0.5]


def test_masking_a_masked_model_copies_it():
    masked = sparsity.n_m(_model(), 2, 4)
    before = _state(masked)
    again = sparsity.unstructured(masked, 0.5)  # half of the remaining weights: 75% zeros
    assert [r.fraction for r in sparsity.sparsity_report(again)] == [0.75, 0.75, 0.75]
    assert [r.fraction for r in sparsity.sparsity_report(masked)] == [0.5, 0.5, 0.5]
    assert all(torch.equal(v, before[k]) for k, v in _state(masked).items())
    with torch.no_grad():
        again.get_submodule("0").weight_orig.zero_()
    again(torch.randn(1, 4, 6, 6))  # the copy's weights follow the copy's own parameters
    assert again.get_submodule("0").weight.abs().sum() == 0
    assert masked.get_submodule("0").weight.abs().sum() > 0


def test_inplace_modifies_and_returns_the_same_model():
    model = _model()
    assert sparsity.unstructured(model, 0.5, inplace=True) is model
    assert prune.is_pruned(model)
    assert sparsity.make_permanent(model, inplace=True) is model
    assert not prune.is_pruned(model)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        sparsity.unstructured(_model(), 0.5, method="l2")
    with pytest.raises(ValueError, match="amount"):
        sparsity.unstructured(_model(), 1.5)
    with pytest.raises(ValueError, match="no Conv2d"):
        sparsity.unstructured(nn.ReLU(), 0.5, layers=(nn.Conv2d,))
