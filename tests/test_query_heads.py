"""``prune_heads="query"``: query heads removed inside every key/value group, every key/value head kept.

Both ways transformers runs grouped-query attention are covered: ``repeat_kv`` (an expand and a reshape of the
keys and values, eager attention) and the kernel's own ``enable_gqa=True`` (sdpa without a mask). Each result
is proven by the float64 mask oracle, its config reloads with ``from_pretrained`` to the same logits, and the
removed query-head positions are checked against the L2 scores computed here on the eager model's weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")

HEADS, KV, HD = 8, 2, 8
REP = HEADS // KV


def _llama(impl: str, cache: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=HEADS, num_key_value_heads=KV, use_cache=cache,
                                      attn_implementation=impl)
    return transformers.LlamaForCausalLM(config).eval()


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


def _kept_positions(model: torch.nn.Module, pruned: torch.nn.Module, layer: int) -> list[list[int]]:
    """Per key/value group, the original positions (0..REP-1) of the query heads the pruned layer kept."""
    q0 = model.model.layers[layer].self_attn.q_proj.weight.detach()
    q1 = pruned.model.layers[layer].self_attn.q_proj.weight.detach()
    heads = {tuple(q0[h * HD:(h + 1) * HD].flatten().tolist()): h for h in range(HEADS)}
    kept = [heads[tuple(q1[h * HD:(h + 1) * HD].flatten().tolist())] for h in range(q1.shape[0] // HD)]
    groups: list[list[int]] = [[] for _ in range(KV)]
    for h in kept:
        groups[h // REP].append(h % REP)
    return groups


def _expected_positions(model: torch.nn.Module, layer: int, keep: int) -> list[int]:
    """The positions an L2 criterion keeps, computed here: position r's score sums, over q_proj's rows and over
    o_proj's columns, the norm of every group's head r."""
    att = model.model.layers[layer].self_attn
    q, o = att.q_proj.weight.detach().double(), att.o_proj.weight.detach().double()
    score = []
    for r in range(REP):
        heads = [g * REP + r for g in range(KV)]
        rows = torch.cat([torch.arange(h * HD, (h + 1) * HD) for h in heads])
        score.append(float(q[rows].square().sum().sqrt() + o[:, rows].square().sum().sqrt()))
    return sorted(np.argsort(score)[::-1][:keep].tolist())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cache", [False, True])
def test_query_heads_go_inside_every_group(impl: str, cache: bool, tmp_path: Path) -> None:
    model = _llama(impl, cache)
    r = fxprune.prune(model, 0.5, example_inputs=(IDS,), prune_heads="query", output="module", verify=True)
    if r.oracle is not None:
        assert r.oracle.passed
    else:  # pruned part by part (the cache on): every part that changed is proven
        changed = [p.oracle for p in r.parts if p.params_after < p.params_before]
        assert changed and set(changed) == {"passed"}
    for i, layer in enumerate(r.model.model.layers):
        att = layer.self_attn
        assert att.k_proj.out_features == att.v_proj.out_features == KV * HD  # every key/value head kept
        assert att.q_proj.out_features == att.o_proj.in_features == KV * 2 * HD
        assert att.num_key_value_groups == 2
        groups = _kept_positions(model, r.model, i)
        assert groups[0] == groups[1] == _expected_positions(model, i, 2)  # the same positions, by L2
    assert (r.model.config.num_attention_heads, r.model.config.num_key_value_heads) == (4, KV)
    r.model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(back(IDS).logits, r.model(IDS).logits, atol=1e-5)
        one = back.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True)
        two = back.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(one, two)


def test_a_model_without_shared_key_value_heads_loses_whole_heads() -> None:
    """Multi-head attention (a key/value head per query head): "query" removes whole heads, as True does."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=8, num_key_value_heads=8, use_cache=False)
    model = transformers.LlamaForCausalLM(config).eval()
    a = fxprune.prune(model, 0.5, example_inputs=(IDS,), prune_heads="query", output="module", verify=True)
    b = fxprune.prune(model, 0.5, example_inputs=(IDS,), prune_heads=True, output="module", verify=True)
    assert a.oracle.passed and a.model.config.num_attention_heads == a.model.config.num_key_value_heads == 4
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(),
                                                  strict=True))


def _gqa_block() -> torch.nn.Module:
    from tests.test_gqa import GQA  # one attention calling the kernel with enable_gqa=True, traced whole

    torch.manual_seed(0)
    model = GQA(dim=32, kv=2, rep=4, d=8).eval()
    with torch.no_grad():  # group 0's query heads the weakest
        model.q.weight[:32].mul_(0.01)
        model.o.weight[:, :32].mul_(0.01)
    return model


def test_query_heads_of_a_traced_kernel() -> None:
    model = _gqa_block()
    x = torch.randn(2, 5, 32)
    r = fxprune.prune(model, 0.5, example_inputs=(x,), prune_heads="query", verify=True)
    assert r.oracle.passed
    assert (r.model.get_submodule("q").out_features, r.model.get_submodule("k").out_features) == (32, 16)


def test_a_wrong_grouping_fails_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule that pairs query heads inside one group ({0, 1}, {2, 3}, ...) instead of across groups lets the
    selection empty group 0 (its heads are the weakest): the rewritten kernel then regroups the query heads
    that are left, and the oracle finds the result differs from the masked original."""
    from fxprune.rules import attention

    def wrong(ctx, q, kv):  # type: ignore[no-untyped-def]
        index = np.arange(ctx.shape_of(q)[-3], dtype=np.int64)
        for t in kv:
            ctx.pin(t, "test", [ctx.ndim(t) - 3])
        ctx.mapped(q, ctx.ndim(q) - 3, index, q, ctx.ndim(q) - 3, index ^ 1)

    monkeypatch.setattr(attention, "_gqa_heads", wrong)
    with pytest.raises(fxprune.InvariantError, match="mask oracle"):
        fxprune.prune(_gqa_block(), 0.5, example_inputs=(torch.randn(2, 5, 32),), prune_heads="query", verify=True)


@pytest.mark.parametrize("bad", ["kv", "Query", 2, None])
def test_a_bad_policy_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="prune_heads"):
        fxprune.prune(_llama("sdpa"), 0.5, example_inputs=(IDS,), prune_heads=bad)


@pytest.mark.parametrize("cache", [False, True])
def test_a_saved_plan_replays_the_policy(cache: bool, tmp_path: Path) -> None:
    model = _llama("eager", cache)
    r = fxprune.prune(model, 0.5, example_inputs=(IDS,), prune_heads="query", output="module")
    r.plan.save(tmp_path / "plan.json")
    again = fxprune.apply(model, fxprune.PruningPlan.load(tmp_path / "plan.json"), example_inputs=(IDS,))
    again.load_state_dict(r.model.state_dict())  # the replay has exactly the pruned shapes
    with torch.no_grad():
        want = r.model(IDS).logits
        got = again(IDS)
    got = got.logits if hasattr(got, "logits") else got["logits"] if isinstance(got, dict) else got
    assert torch.allclose(got, want, atol=1e-5)


def test_the_command_line_names_the_policy() -> None:
    from fxprune.cli.parser import build_parser

    p = build_parser()
    assert p.parse_args(["compile", "resnet18", "--prune-query-heads"]).prune_heads == "query"
    assert p.parse_args(["compile", "--prune-heads", "resnet18"]).prune_heads is True  # a flag, before the model too
    assert p.parse_args(["compile", "resnet18"]).prune_heads is False
