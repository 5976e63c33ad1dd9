"""Hidden-size (residual stream) pruning of Llama, GPT-2 and BERT, built small with random weights.

The oracle: the pruned model equals the original with the removed hidden channels zeroed where they are
written (embeddings, output projections) and every norm computed over the kept channels only. That
reference is written out here, per family, independently of fxprune's discovery.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.hidden import HiddenSizeError, prune_hidden

transformers = pytest.importorskip("transformers")

VOCAB = 100
IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 23, 7]])
CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "AutoModelForCausalLM",
              {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 128, "vocab_size": VOCAB, "max_position_embeddings": 64}),
    "gpt2": ("GPT2Config", "AutoModelForCausalLM",
             {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": VOCAB, "n_positions": 64}),
    "bert": ("BertConfig", "AutoModelForMaskedLM",
             {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
              "vocab_size": VOCAB, "max_position_embeddings": 64}),
}
# Where each family writes the residual stream: (module name suffix, dim of its weight that is the output).
WRITERS = {
    "llama": (("embed_tokens", 1), ("o_proj", 0), ("down_proj", 0)),
    "gpt2": (("wte", 1), ("wpe", 1), ("attn.c_proj", 1), ("mlp.c_proj", 1)),  # Conv1D: weight [in, out]
    "bert": (("word_embeddings", 1), ("position_embeddings", 1), ("token_type_embeddings", 1),
             ("attention.output.dense", 0), ("output.dense", 0), ("transform.dense", 0)),
}


def build(family: str) -> nn.Module:
    """The family's small model with seeded random weights, in eval mode."""
    config_name, auto, kwargs = CONFIGS[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**kwargs)
    return getattr(transformers, auto).from_config(config).eval()


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def masked_reference(model: nn.Module, family: str, kept: tuple[int, ...]) -> nn.Module:
    """The original in float64 with removed hidden channels zeroed by every writer and every norm over the kept
    channels only (zero at the removed ones)."""
    ref = copy.deepcopy(model).double()
    index = torch.tensor(kept)
    removed = torch.ones(ref.get_input_embeddings().embedding_dim, dtype=torch.bool)
    removed[index] = False
    with torch.no_grad():
        for name, mod in ref.named_modules():
            for suffix, dim in WRITERS[family]:
                if name.endswith(suffix) and isinstance(getattr(mod, "weight", None), torch.Tensor):
                    mod.weight.index_fill_(dim, removed.nonzero().flatten(), 0.0)
                    if getattr(mod, "bias", None) is not None and (dim == 0 or type(mod).__name__ == "Conv1D"):
                        mod.bias[removed] = 0.0
    for mod in ref.modules():
        if isinstance(mod, nn.LayerNorm) or type(mod).__name__ == "LlamaRMSNorm":
            mod.forward = _norm_over_kept(mod, index)  # type: ignore[method-assign]
    return ref


def _norm_over_kept(norm: nn.Module, index: torch.Tensor) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        kept = x[..., index]
        if isinstance(norm, nn.LayerNorm):
            y = F.layer_norm(kept, (len(index),), norm.weight[index], norm.bias[index], norm.eps)
        else:  # Llama's RMSNorm (in float32, as it computes): the mean square over the kept channels
            k32 = kept.float()
            y = norm.weight[index] * (k32 * torch.rsqrt(k32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(x.dtype)
        out = torch.zeros_like(x)
        out[..., index] = y
        return out
    return forward


@pytest.fixture(scope="module")
def hidden_only() -> dict[str, tuple[nn.Module, Any]]:
    """Each family and its ``prune_hidden(..., 0.5)`` result."""
    return {family: (model, prune_hidden(model, 0.5)) for family in CONFIGS for model in [build(family)]}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_pruned_model_equals_the_masked_original(hidden_only: Any, family: str) -> None:
    model, result = hidden_only[family]
    kept = result.plan.kept[0]
    assert result.plan.new_size == len(kept) == 32
    got = logits(copy.deepcopy(result.model).double(), IDS)
    want = logits(masked_reference(model, family, kept), IDS)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9), (got - want).abs().max()
    unmasked = logits(copy.deepcopy(model).double(), IDS)
    assert not torch.allclose(unmasked, want, atol=1e-3)  # the reference does remove something


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_found_dims_are_the_residual_stream_and_nothing_else(hidden_only: Any, family: str) -> None:
    _, result = hidden_only[family]
    spaces = dict(result.plan.streams[0].spaces)
    if family == "llama":
        layer = "model.layers.0."
        assert {f"{layer}self_attn.{p}_proj.weight" for p in "qkv"} <= {n for n, d in spaces.items() if d == 1}
        assert spaces[f"{layer}self_attn.o_proj.weight"] == 0 and spaces[f"{layer}mlp.down_proj.weight"] == 0
        assert spaces["lm_head.weight"] == 1 and spaces["model.norm.weight"] == 0
        attn = result.model.model.layers[0].self_attn
        assert (attn.q_proj.out_features, attn.k_proj.out_features) == (64, 32)  # GQA 4/2 heads of 16: untouched
    if family == "gpt2":
        assert spaces["transformer.wpe.weight"] == 1 and spaces["transformer.h.0.attn.c_attn.weight"] == 0
        assert "lm_head.weight" not in spaces  # tied to wte: one tensor, one entry
    if family == "bert":
        assert {"bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.bias",
                "cls.predictions.transform.dense.weight"} <= set(spaces)
        assert result.plan.config_modules == ("cls.predictions.transform.LayerNorm", "cls.predictions.transform.dense")


def test_parameters_shrink_to_a_model_built_at_the_new_size(hidden_only: Any) -> None:
    for family, (model, result) in hidden_only.items():
        config_name, _, kwargs = CONFIGS[family]
        small = {"llama": {"hidden_size": 32, "head_dim": 16}, "gpt2": {"n_embd": 32, "n_head": 2},
                 "bert": {"hidden_size": 32, "num_attention_heads": 2}}[family]
        built = type(model)(getattr(transformers, config_name)(**{**kwargs, **small}))
        if family == "llama":  # hidden only: the config describes it, the count is exactly a small model's
            assert result.config == ""
            assert result.params_after == sum(p.numel() for p in built.parameters())
        else:  # the attention still reads 32 and writes 64 wide (GPT-2 and BERT size it from the hidden size)
            assert "prune_heads=True" in result.config
            assert result.params_after < result.params_before * 0.55


def test_llama_hidden_only_reloads_bit_identical(hidden_only: Any, tmp_path: Any) -> None:
    _, result = hidden_only["llama"]
    result.model.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.hidden_size == 32 and back.config.head_dim == 16
    assert all(torch.equal(a, b) for a, b in zip(result.model.state_dict().values(), back.state_dict().values(),
                                                  strict=True))
    assert torch.equal(logits(back), logits(result.model))


@pytest.fixture(scope="module")
def combined() -> dict[str, Any]:
    """Hidden size, whole heads and MLPs at 0.5: the configs of all three families describe the result."""
    return {family: fxprune.prune(model, 0.5, hidden=0.5, prune_heads=True, output="module", example_inputs=(IDS,))
            for family in CONFIGS for model in [build(family)]}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_combined_pruning_round_trips_through_save_pretrained(combined: Any, family: str, tmp_path: Any) -> None:
    result = combined[family]
    pruned = result.model
    assert result.params_after < 0.4 * result.params_before
    cfg = pruned.config
    assert (cfg.hidden_size, cfg.num_attention_heads) == (32, 2)
    pruned.save_pretrained(tmp_path)
    back = getattr(transformers, CONFIGS[family][1]).from_pretrained(tmp_path).eval()
    assert all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), back.state_dict().values(), strict=True))
    assert torch.equal(logits(back), logits(pruned))
    if family != "bert":
        gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        with torch.no_grad():
            cached = pruned.generate(IDS, use_cache=True, **gen)
            assert torch.equal(cached, pruned.generate(IDS, use_cache=False, **gen))
            assert torch.equal(cached, back.generate(IDS, use_cache=True, **gen))
        assert cached.shape == (1, IDS.shape[1] + 6)


def test_tied_embedding_and_lm_head_stay_one_tensor(hidden_only: Any, combined: Any, tmp_path: Any) -> None:
    for pruned in (hidden_only["gpt2"][1].model, combined["gpt2"].model):
        assert pruned.lm_head.weight is pruned.transformer.wte.weight
        assert pruned.lm_head.weight.shape == (VOCAB, 32)
    bert = combined["bert"].model
    assert bert.cls.predictions.decoder.weight is bert.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_nothing_removed_is_bit_identical(family: str) -> None:
    model = build(family)
    pruned = fxprune.compile(model, 0.0, hidden=0.0, output="module", example_inputs=(IDS,))
    assert torch.equal(logits(pruned), logits(model))
    gen = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        assert torch.equal(pruned.generate(IDS, **gen), model.generate(IDS, **gen))
    assert pruned.config.to_dict() == model.config.to_dict()


def test_the_callers_model_is_never_run_or_written() -> None:
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[nn.Module] = []
    model.register_forward_pre_hook(lambda mod, _args: calls.append(mod))  # copied with the model: runs of the copy
    prune_hidden(model, 0.5)
    assert calls and all(m is not model for m in calls)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.hidden_size == 64


def test_activation_aware_importance_runs_on_calibration_batches() -> None:
    model = build("llama")
    batches = [(torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    l2 = prune_hidden(model, 0.5)
    act = prune_hidden(model, 0.5, importance="activation", calibration=batches)
    assert act.plan.new_size == 32 and act.plan.kept != l2.plan.kept
    same = fxprune.compile(model, 0.0, hidden=0.5, importance="activation", calibration=batches,
                           example_inputs=(IDS,), output="module")  # the option: the same selection
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), act.model.state_dict().values(),
                                                  strict=True))
    got = logits(copy.deepcopy(act.model).double())
    assert torch.allclose(got, logits(masked_reference(model, "llama", act.plan.kept[0])), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "half", [0.5]])
def test_bad_hidden_values_raise_a_typed_error(bad: Any) -> None:
    model = build("gpt2")
    with pytest.raises(fxprune.ArgumentError, match="hidden"):
        fxprune.compile(model, 0.5, hidden=bad, example_inputs=(IDS,))
    with pytest.raises(ValueError):
        prune_hidden(model, bad)


def test_hidden_with_a_budget_or_an_ignored_reader_is_refused() -> None:
    with pytest.raises(fxprune.ArgumentError, match="target_params"):
        fxprune.compile(build("gpt2"), hidden=0.5, target_params=0.5, example_inputs=(IDS,))
    with pytest.raises(fxprune.ArgumentError, match="'lm_head' keeps lm_head whole"):
        fxprune.compile(build("llama"), 0.0, hidden=0.5, ignore=["lm_head"], example_inputs=(IDS,))


class _SlicesItsStream(nn.Module):
    """A toy LM whose block reads half of the hidden dim: the stream cannot be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.block = nn.Linear(8, 16)
        self.head = nn.Linear(16, VOCAB)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.head(h + self.block(h[..., :8]))


def test_unsupported_ops_and_models_are_named() -> None:
    with pytest.raises(HiddenSizeError, match=r"__getitem__ in the root reshapes or slices"):
        prune_hidden(_SlicesItsStream(), 0.5, example_inputs=(IDS,))
    with pytest.raises(fxprune.FxPruneError, match="Linear has no token embedding"):
        prune_hidden(nn.Linear(4, 4), 0.5, example_inputs=(torch.randn(1, 4),))


_GQA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": VOCAB, "max_position_embeddings": 64}
_MHA = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": VOCAB,
        "max_position_embeddings": 64}


@pytest.mark.parametrize(("config_name", "kwargs", "heads"), [
    ("MistralConfig", _GQA, False),
    ("Qwen2Config", _GQA, False),  # no head_dim field: the config gets one (it would derive 8 from 32 / 4)
    ("GPTNeoXConfig", {**_MHA, "intermediate_size": 128}, True),  # head size derived from the hidden size
    ("OPTConfig", {**_MHA, "ffn_dim": 128, "word_embed_proj_dim": 64}, True),  # embedding width follows
])
def test_more_families_round_trip(config_name: str, kwargs: dict[str, Any], heads: bool, tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_name)(**kwargs)).eval()
    if heads:  # the config derives the attention width from the hidden size: whole heads go with it
        pruned = fxprune.compile(model, 0.5, hidden=0.5, prune_heads=True, output="module", example_inputs=(IDS,))
    else:
        pruned = prune_hidden(model, 0.5).model
    assert pruned.config.hidden_size == 32
    pruned.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(back), logits(pruned))


def test_a_config_that_cannot_describe_the_result_is_left_and_named() -> None:
    torch.manual_seed(0)
    gemma = transformers.AutoModelForCausalLM.from_config(transformers.GemmaConfig(**_GQA, head_dim=16)).eval()
    result = prune_hidden(gemma, 0.5)  # Gemma scales its embeddings by sqrt(hidden_size), fixed when built
    assert "scalar_embed_scale" in result.config
    assert result.model.config.hidden_size == 64 and result.model.get_input_embeddings().embedding_dim == 32


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_verify_proves_the_hidden_pass_with_fxprunes_own_oracle(family: str) -> None:
    """``verify=True`` runs the hidden pass's oracle (found streams, norms over kept channels), which must
    agree with the per-family reference written above."""
    model = build(family)
    result = fxprune.prune(model, 0.0, hidden=0.5, verify=True, output="module", example_inputs=(IDS,))
    assert result.oracle is not None and result.oracle.applicable and result.oracle.passed, result.oracle
    both = fxprune.prune(model, 0.5, hidden=0.5, prune_heads=True, verify=True, output="module",
                         example_inputs=(IDS,))
    assert both.oracle is not None and both.oracle.passed, both.oracle


def test_the_hidden_oracle_catches_a_wrong_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    import fxprune.hidden as hidden_mod

    real = hidden_mod._slice

    def off_by_one(work: nn.Module, plan: Any) -> None:  # slices the right dims, then spoils one norm weight
        real(work, plan)
        with torch.no_grad():
            work.model.norm.weight[0] += 0.5

    monkeypatch.setattr(hidden_mod, "_slice", off_by_one)
    with pytest.raises(fxprune.InvariantError, match="hidden-size oracle failed"):
        fxprune.prune(build("llama"), 0.0, hidden=0.5, verify=True, output="module", example_inputs=(IDS,))


def test_min_channels_holds_after_rounding() -> None:
    """The hidden size keeps ``min_channels`` after ``round_to`` too, as every other group does: 64 channels at
    hidden=0.9 keep 7, raised to 17, rounded to a multiple of 16 that is at least 17: 32 (not 16)."""
    model = build("llama")
    pruned = fxprune.compile(model, 0.0, hidden=0.9, min_channels=17, round_to=16, output="module",
                             example_inputs=(IDS,))
    assert pruned.config.hidden_size == 32
