"""Swap transformer contracts: the seed's options, weight sharing, the KV cache."""

import pytest
import torch

from parallax.config import RunConfig
from parallax.errors import ConfigError
from parallax.models import build_model, count_parameters
from parallax.models.swap import SwapTransformer

V, D = 61, 32


def tiny(**kw) -> SwapTransformer:
    torch.manual_seed(0)
    over = ["model.name=swap", "data.name=copy", f"model.vocab_size={V}", f"model.n_embd={D}", "model.n_layer=2"]
    over += [f"model.{k}={v}" for k, v in kw.items()]
    return build_model(RunConfig.from_dict({}, over).model).eval()


def per_block_parameters() -> int:
    return count_parameters(tiny(n_layer=1).tracks[0][0])


@pytest.mark.parametrize("loops", [1, 2, 3])
def test_shapes_loss_and_parameters_independent_of_loops(loops):
    model = tiny(num_loops=loops)
    ids = torch.randint(0, V, (3, 9))
    out = model(ids, targets=ids)
    assert out.logits.shape == (3, 9, V) and out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert count_parameters(model) == count_parameters(tiny(num_loops=1))
    # embedding (tied head) + 2 tracks of 2 blocks + final norm
    assert count_parameters(model) == V * D + 4 * per_block_parameters() + D


def test_loops_and_swap_change_the_output():
    ids = torch.randint(0, V, (2, 7))
    outs = {(n, s): tiny(num_loops=n, use_swap=s)(ids).logits for n in (1, 2, 3) for s in (True, False)}
    # same weights (same seed), so any difference comes from the passes and the exchange
    torch.testing.assert_close(outs[(1, True)], outs[(1, False)])  # one pass: nothing to swap
    assert not torch.allclose(outs[(2, True)], outs[(2, False)])
    assert not torch.allclose(outs[(2, True)], outs[(1, True)])
    assert not torch.allclose(outs[(3, True)], outs[(2, True)])


def test_forward_follows_the_seed_equations():
    model = tiny(num_loops=3)
    ids = torch.randint(0, V, (2, 5))
    a, b = model.tracks

    def run(track, h):
        for block in track:
            h = block(h)
        return h

    x = model.embed(ids)
    out_a, out_b = run(a, x), run(b, x)
    for _ in range(2):
        out_a, out_b = run(a, out_b + x), run(b, out_a + x)
    expected = model.lm_head(model.norm(out_a + out_b))
    torch.testing.assert_close(model(ids).logits, expected)


def test_tracks_have_independent_weights_and_head_is_tied():
    model = tiny()
    a, b = model.tracks
    ids_a = {id(p) for p in a.parameters()}
    assert ids_a.isdisjoint(id(p) for p in b.parameters())
    assert not torch.equal(a[0].attn.wq.weight, b[0].attn.wq.weight)
    assert model.lm_head.weight is model.embed.weight
    untied = tiny(tie_embeddings=False)
    assert count_parameters(untied) - count_parameters(model) == V * D


def test_each_track_gets_gradient():
    model = tiny().train()
    ids = torch.randint(0, V, (2, 6))
    model(ids, targets=ids).loss.backward()
    for track in model.tracks:
        assert track[0].attn.wq.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("loops,swap", [(1, True), (2, True), (3, False)])
def test_kv_cache_matches_full_forward(loops, swap):
    model = tiny(num_loops=loops, use_swap=swap, n_kv_heads=2, n_head=4)
    ids = torch.randint(0, V, (2, 11))
    full = model(ids).logits
    cache = model.new_cache(2, 11)
    assert len(cache.layers) == loops and all(len(p) == 2 and len(p[0]) == 2 for p in cache.layers)
    chunks = [model(ids[:, :4], cache=cache).logits]
    for t in range(4, 11):
        chunks.append(model(ids[:, t : t + 1], cache=cache).logits)
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-5)


def test_invalid_configs_are_config_errors():
    with pytest.raises(ConfigError, match="num_loops"):
        tiny(num_loops=0)
    with pytest.raises(ConfigError, match="n_head"):
        tiny(n_head=3)
