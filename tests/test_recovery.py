"""Recovery: the distillation loss by hand, the fine-tuning loop, BatchNorm recalibration, iterative pruning.

The digits test is a shortened version of ``examples/recover_digits.py`` on real data.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxprune
from fxprune.metrics import count_params
from fxprune.recovery import finetune, iterative, kd_loss, recalibrate_batchnorm, step_ratio


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _softmax(row: list[float], t: float) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def test_kd_loss_matches_hand_computation():
    student = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    teacher = torch.tensor([[1.0, 1.5, -0.5], [-1.0, 0.0, 4.0]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    alpha, t = 0.3, 2.0
    kl = ce = 0.0
    for s_row, t_row, y in zip(student.tolist(), teacher.tolist(), targets.tolist(), strict=True):
        p_s, p_t = _softmax(s_row, t), _softmax(t_row, t)
        kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True)) / 2
        ce += -math.log(_softmax(s_row, 1.0)[y]) / 2
    terms = kd_loss(student, targets, teacher, alpha=alpha, temperature=t)
    assert terms.kd is not None
    assert terms.kd.item() == pytest.approx(t * t * kl, rel=1e-12)
    assert terms.ce.item() == pytest.approx(ce, rel=1e-12)
    assert terms.total.item() == pytest.approx(alpha * t * t * kl + (1 - alpha) * ce, rel=1e-12)


def test_kd_loss_without_teacher_is_cross_entropy():
    logits, targets = torch.randn(8, 5), torch.randint(0, 5, (8,))
    terms = kd_loss(logits, targets, alpha=0.9, temperature=7.0)
    assert terms.kd is None
    assert torch.equal(terms.total, F.cross_entropy(logits, targets))


def test_kd_loss_rejects_bad_arguments():
    logits, targets = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(logits, targets, logits, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(logits, targets, logits, temperature=0.0)
    with pytest.raises(ValueError, match="same classes"):
        kd_loss(logits, targets, torch.randn(4, 5))


def _linear_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long())


def test_finetune_without_teacher_equals_a_plain_cross_entropy_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    manual = copy.deepcopy(model)
    data = _linear_data()
    history = finetune(model, DataLoader(data, batch_size=16), epochs=2, lr=0.1, schedule="constant", progress=False)
    opt = torch.optim.SGD(manual.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for x, y in DataLoader(data, batch_size=16):
            opt.zero_grad()
            F.cross_entropy(manual(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [h.epoch for h in history] == [1, 2]
    assert all(h.kd_loss is None and h.loss == pytest.approx(h.ce_loss) and h.metric is None for h in history)


def test_finetune_restores_flags_and_leaves_teacher_alone():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).eval()
    teacher = nn.Sequential(nn.Linear(6, 3)).train()
    teacher_state = copy.deepcopy(teacher.state_dict())
    modes: list[bool] = []
    history = finetune(student, DataLoader(_linear_data(), batch_size=16), teacher=teacher, epochs=1, lr=0.05,
                       eval_fn=lambda m: modes.append(m.training) or 1.0, progress=False)
    assert modes == [False] and history[0].metric == 1.0 and history[0].kd_loss is not None
    assert not any(m.training for m in student.modules())
    assert teacher.training
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())


def test_finetune_rejects_bad_input():
    model = nn.Linear(6, 3)
    with pytest.raises(ValueError, match="inputs, targets"):
        finetune(model, [torch.randn(4, 6)], epochs=1, lr=0.1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        finetune(model, [], epochs=-1, lr=0.1)
    with pytest.raises(ValueError, match="ddp=True"):
        finetune(model, [], epochs=1, lr=0.1, ddp=True)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs the gloo backend")
def test_finetune_ddp_single_process(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        plain = copy.deepcopy(model)
        loader = DataLoader(_linear_data(), batch_size=16)
        got = finetune(model, loader, epochs=2, lr=0.1, ddp=True, progress=False)
    finally:
        dist.destroy_process_group()
    want = finetune(plain, loader, epochs=2, lr=0.1, progress=False)
    assert [h.loss for h in got] == pytest.approx([h.loss for h in want], rel=1e-5)
    assert not isinstance(model, nn.parallel.DistributedDataParallel)


def test_recalibrate_batchnorm_recovers_the_data_statistics():
    bn = nn.BatchNorm1d(3, momentum=0.1).train()
    x = torch.randn(96, 3) * torch.tensor([1.0, 2.0, 0.5]) + torch.tensor([5.0, -1.0, 0.0])
    assert recalibrate_batchnorm(bn, DataLoader(TensorDataset(x, torch.zeros(96)), batch_size=32)) == 1
    torch.testing.assert_close(bn.running_mean, x.mean(0), rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.1 and bn.training
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_batchnorm(bn, [])
    torch.testing.assert_close(bn.running_mean, x.mean(0), rtol=1e-5, atol=1e-5)  # an error restores them


def test_step_ratio():
    assert step_ratio(0.75, 2) == pytest.approx(0.5)
    assert step_ratio(0.7, 1) == pytest.approx(0.7)
    assert (1 - step_ratio(0.7, 3)) ** 3 == pytest.approx(0.3)
    for bad in ((1.0, 2), (0.5, 0), (-0.1, 1)):
        with pytest.raises(ValueError):
            step_ratio(*bad)


def _cnn(widths: tuple[int, int] = (16, 32)) -> nn.Module:
    a, b = widths
    return nn.Sequential(
        nn.Conv2d(1, a, 3, padding=1, bias=False), nn.BatchNorm2d(a), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(b, 10),
    )


def test_iterative_history_shrinks_step_by_step():
    torch.manual_seed(0)
    model = _cnn()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    tuned: list[int] = []
    result = iterative(model, x, target_ratio=0.7, steps=3, finetune_fn=lambda m: tuned.append(count_params(m)),
                       eval_fn=lambda m: float(m(x).sum()))
    assert len(result.history) == 3 and tuned == [h.params for h in result.history]
    params = [result.params_before] + [h.params for h in result.history]
    macs = [result.macs_before] + [h.macs for h in result.history]
    assert all(a > b for a, b in zip(params, params[1:], strict=False))
    assert all(a > b for a, b in zip(macs, macs[1:], strict=False))
    assert [h.step for h in result.history] == [1, 2, 3]
    assert result.history[-1].ratio == pytest.approx(0.7)
    assert result.model.get_submodule("9").in_features < 32
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="target_ratio"):
        iterative(model, x, target_ratio=0.7, steps=2, finetune_fn=print, eval_fn=len, ratio=0.5)


def _digits(seed: int = 0) -> tuple[TensorDataset, torch.Tensor, torch.Tensor]:
    sklearn = pytest.importorskip("sklearn.datasets")
    digits = sklearn.load_digits()
    x = (torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:1400], perm[1400:]
    return TensorDataset(x[train], y[train]), x[test], y[test]


def test_digits_kd_recovers_accuracy_after_the_cut(one_thread):
    torch.manual_seed(0)
    train, x_test, y_test = _digits()

    def loader() -> DataLoader:
        return DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))

    def acc(m: nn.Module) -> float:
        return float((m(x_test).argmax(1) == y_test).float().mean())

    teacher = _cnn()
    finetune(teacher, loader(), epochs=8, lr=0.05, progress=False)
    teacher.eval()
    teacher_acc = acc(teacher)
    assert teacher_acc > 0.9
    pruned = fxprune.prune(teacher, 0.6, example_inputs=(x_test[:1],)).model.eval()
    cut_acc = acc(pruned)
    recal = copy.deepcopy(pruned)
    recalibrate_batchnorm(recal, loader(), batches=5)
    history = finetune(pruned, loader(), teacher=teacher, epochs=4, lr=0.02, eval_fn=acc, progress=False)
    losses = [h.loss for h in history]
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False)), losses
    assert all(h.kd_loss is not None and h.kd_loss > 0 for h in history)
    assert history[-1].metric is not None and history[-1].metric > cut_acc + 0.2
    assert history[-1].metric > teacher_acc - 0.15
    assert acc(recal.eval()) > cut_acc
    assert isinstance(pruned, torch.fx.GraphModule) and not pruned.training
