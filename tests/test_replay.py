"""``fxprune.apply`` replays a saved plan: the hidden channels of ``prune(hidden=...)``, the root's groups, and
every part pruned piecewise (a Hugging Face model's layers) by its own recorded plan; a plan holding choices
it cannot make again (fused experts) is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import fxprune
from fxprune.outputs import tensors_of

transformers = pytest.importorskip("transformers")


class TinyLM(nn.Module):
    """A byte-level language model whose forward traces whole (no piecewise parts)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, width)
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 64)
        self.down = nn.Linear(64, width)
        self.head = nn.Linear(width, 64)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return self.head(h)


def _tiny(width: int = 32) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(width).eval()


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ratio", [0.5, 0.0])
def test_a_hidden_plan_replays_on_a_fresh_model(ratio: float, tmp_path: Path) -> None:
    r = fxprune.prune(_tiny(), ratio, example_inputs=(IDS,), hidden=0.25, verify=True)
    assert len(r.plan.hidden[0]) == 24 and not r.plan.pieces
    r.plan.save(tmp_path / "plan.json")
    fresh = _tiny()
    replayed = fxprune.apply(fresh, str(tmp_path / "plan.json"), verify=True)  # inputs from the plan
    mine, theirs = r.model.state_dict(), replayed.state_dict()
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # the same channels were kept
    assert replayed.up.out_features == (32 if ratio else 64)
    with torch.no_grad():
        assert torch.equal(tensors_of(r.model(IDS))[0], tensors_of(replayed(IDS))[0])
    assert fresh.embed.weight.shape == (64, 32)  # the fresh model is not touched


def test_a_hidden_plan_refuses_another_width() -> None:
    plan = fxprune.prune(_tiny(), 0.5, example_inputs=(IDS,), hidden=0.25).plan
    with pytest.raises(fxprune.PlanMismatchError):
        fxprune.apply(_tiny(width=16), plan, (IDS,))


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


TOKENS = torch.randint(1, 100, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("hidden", "output"), [(None, "graph"), (0.25, "graph"), (None, "module")])
def test_a_piecewise_plan_replays_part_by_part(hidden: float | None, output: str, tmp_path: Path,
                                               one_thread: object) -> None:
    r = fxprune.prune(_llama(), 0.5, example_inputs=(TOKENS,), hidden=hidden, output=output)
    assert r.plan.parts and not r.plan.pieces  # Llama's root is pruned piecewise
    r.plan.save(tmp_path / "plan.json")
    replayed = fxprune.apply(_llama(), str(tmp_path / "plan.json"), (TOKENS,))
    want = {k: v for k, v in r.model.state_dict().items()}
    got = replayed.state_dict()
    shared = want.keys() & got.keys()
    assert any("mlp.up_proj" in k for k in shared)
    assert all(torch.equal(want[k], got[k]) for k in shared)  # the same channels, as the plan recorded
    assert r.params_after == sum(p.numel() for p in replayed.parameters())
    with torch.no_grad():
        torch.testing.assert_close(tensors_of(replayed(TOKENS))[0], tensors_of(r.model(TOKENS))[0])


def test_a_plan_with_experts_is_refused(tmp_path: Path, one_thread: object) -> None:
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                         num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64, experts_implementation="eager")
    build = lambda: transformers.Qwen2MoeForCausalLM(config).eval()  # noqa: E731
    r = fxprune.prune(build(), 0.5, example_inputs=(TOKENS,))
    assert r.plan.pieces
    with pytest.raises(fxprune.ArgumentError, match="experts"):
        fxprune.apply(build(), r.plan, (TOKENS,))
