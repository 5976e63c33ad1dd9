"""``hidden=`` alone decides the residual stream's width, however the model was traced (issue 29).

With the cache on, Hugging Face models are pruned part by part; with it off, the root traces as one graph in
which the residual stream is one more coupled group: ``ratio=`` must not prune it a second time.
"""

from __future__ import annotations

import pytest
import torch

import fxprune

transformers = pytest.importorskip("transformers")


def _gpt2(use_cache: bool) -> tuple[torch.nn.Module, int]:
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, use_cache=use_cache,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval(), 64


def _llama(use_cache: bool) -> tuple[torch.nn.Module, int]:
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=use_cache)
    return transformers.LlamaForCausalLM(config).eval(), 64


def _bert(use_cache: bool) -> tuple[torch.nn.Module, int]:
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, use_cache=use_cache)
    return transformers.BertForMaskedLM(config).eval(), 64


@pytest.mark.parametrize("family", [_gpt2, _llama, _bert], ids=["gpt2", "llama", "bert"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("output", ["graph", "module"])
def test_hidden_half_is_half(family, use_cache: bool, output: str) -> None:
    torch.manual_seed(0)
    model, width = family(use_cache)
    ids = torch.randint(1, 100, (1, 8))
    r = fxprune.prune(model, 0.5, example_inputs=(ids,), hidden=0.5, verify=True, output=output)
    embedding = next(m for n, m in r.model.named_modules() if isinstance(m, torch.nn.Embedding)
                     and m.num_embeddings == 100)
    assert embedding.embedding_dim == width // 2
    assert r.params_after < r.params_before
    assert r.oracle is None or not r.oracle.applicable or r.oracle.passed
    with torch.no_grad():
        out = r.model(ids)
    logits = out["logits"] if isinstance(out, dict) else out.logits
    assert logits.shape == (1, 8, 100)
