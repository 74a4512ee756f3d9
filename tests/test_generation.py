"""Generation contracts: cached == uncached greedy decoding, clear errors, seeded sampling."""

import pytest
import torch

from parallax.errors import ParallaxError
from parallax.generation import filter_logits, generate
from parallax.models.swap import SwapConfig, SwapTransformer
from parallax.models.transformer import Transformer, TransformerConfig

V = 53


def spread(model):
    """Random weights large enough that greedy decoding does not repeat one token."""
    torch.manual_seed(1)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


class Uncached(torch.nn.Module):
    """The same model without ``new_cache``, so the sampler recomputes every step."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, ids):
        return self.model(ids)


MODELS = {
    "transformer": lambda: spread(Transformer(TransformerConfig(vocab_size=V, d_model=32, n_kv_heads=2, max_seq_len=12))),
    "swap": lambda: spread(SwapTransformer(SwapConfig(vocab_size=V, n_embd=32, n_layer=2, block_size=12))),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_greedy_equals_uncached_past_the_context(name):
    model = MODELS[name]()
    prompt = [3, 1, 4, 1, 5]
    cached = [t.id for t in generate(model, prompt, 14, temperature=0)]  # 19 > context 12
    plain = [t.id for t in generate(Uncached(model), prompt, 14, temperature=0)]
    assert cached == plain and len(set(cached)) > 2


def test_bad_prompts_are_clear_errors():
    model = MODELS["swap"]()
    with pytest.raises(ParallaxError, match="empty"):
        generate(model, [], 5)
    with pytest.raises(ParallaxError, match="context of 12"):
        generate(model, list(range(13)), 5)


def test_seeded_sampling_is_deterministic_and_stops():
    model = MODELS["transformer"]()
    run = lambda seed: [t.id for t in generate(model, [1, 2], 10, temperature=1.0, top_k=5, top_p=0.9, seed=seed)]
    assert run(0) == run(0) and run(0) != run(1)
    first = run(0)[0]
    assert [t.id for t in generate(model, [1, 2], 10, temperature=1.0, top_k=5, top_p=0.9, stop_id=first)] == [first]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits[:, [3, 0, 2, 1]], top_p=0.85)).tolist() == [[True, False, False, False]]
