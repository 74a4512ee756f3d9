import warnings

import torch

from parallax.config import RunConfig
from parallax.models import build_model, count_parameters
from parallax.models.layers import Attention, RMSNorm, RotaryEmbedding


def tiny(**kw):
    over = ["model.name=transformer", "data.name=copy", "model.d_model=32", "model.n_heads=4", "model.vocab_size=50"]
    over += [f"model.{k}={v}" for k, v in kw.items()]
    return build_model(RunConfig.from_dict({}, over).model).eval()


def test_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = tiny(n_kv_heads=2, n_layers=3)
    ids = torch.randint(0, 50, (2, 13))
    full = model(ids).logits
    cache = model.new_cache(2, 16)
    chunks = [model(ids[:, :5], cache=cache).logits]
    for t in range(5, 13):
        chunks.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-5)


def test_kv_cache_under_autocast_is_kept_in_the_autocast_dtype():
    torch.manual_seed(0)
    model = tiny(n_kv_heads=2, n_layers=2)
    ids = torch.randint(0, 50, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids).logits.float()
        cache = model.new_cache(2, 16)
        chunks = [model(ids[:, t : t + 1], cache=cache).logits.float() for t in range(9)]
    assert {c.k.dtype for c in cache.layers} == {c.v.dtype for c in cache.layers} == {torch.bfloat16}
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=0.05, atol=0.05)  # bf16 rounding only
    assert model.new_cache(2, 16).layers[0].k.dtype == torch.float32  # no autocast: the weights' dtype


def test_rmsnorm_on_bf16_input_takes_the_fused_path_and_matches_fp32():
    """A bf16 input with the fp32 weight made torch warn and fall back to a composite kernel."""
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = norm(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), norm(x), rtol=2e-2, atol=2e-2)


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny()
    ids = torch.randint(0, 50, (1, 10))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 50
    torch.testing.assert_close(model(ids).logits[:, :7], model(changed).logits[:, :7])


def test_embeddings_are_tied_and_loss_is_masked():
    model = tiny()
    assert model.lm_head.weight is model.embed.weight
    untied = tiny(tie_embeddings=False)
    assert count_parameters(untied) - count_parameters(model) == 50 * 32
    ids = torch.randint(0, 50, (2, 6))
    targets = torch.randint(0, 50, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, -1] = True
    out = model(ids, targets, mask)
    ref = torch.nn.functional.cross_entropy(out.logits[:, -1], targets[:, -1])
    torch.testing.assert_close(out.loss, ref)


def test_gqa_equals_repeated_kv_heads():
    torch.manual_seed(1)
    attn = Attention(32, n_heads=4, n_kv_heads=2).eval()
    x = torch.randn(2, 7, 32)
    b, t = 2, 7
    q = attn.wq(x).view(b, t, 4, 8).transpose(1, 2)
    k = attn.wk(x).view(b, t, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    v = attn.wv(x).view(b, t, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    q, k = attn.rope(q, 0), attn.rope(k, 0)
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    ref = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, 32))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-6)


def test_rope_is_relative():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def score(i, j):
        return (rope(q, i) * rope(k, j)).sum()
    torch.testing.assert_close(score(3, 1), score(10, 8), rtol=1e-5, atol=1e-5)


def test_sliding_window_ignores_distant_tokens():
    attn = Attention(16, n_heads=2, window=3).eval()
    x = torch.randn(1, 8, 16)
    changed = x.clone()
    changed[0, 0] += 5.0
    torch.testing.assert_close(attn(x)[:, 3:], attn(changed)[:, 3:])
    assert not torch.allclose(attn(x)[:, 2], attn(changed)[:, 2])
