"""Recurrent-depth transformer contracts: the test-time dial, O(1)-in-r memory, MoE, KV cache."""

import pytest
import torch

from parallax.bench.memory import saved_tensor_bytes
from parallax.data.batch import batch_generator
from parallax.data.tasks import CopyTask, SequenceTaskConfig
from parallax.models.moe import MixtureOfExperts
from parallax.models.output import lm_loss
from parallax.models.recurrent import RecurrentConfig, RecurrentDepthTransformer

SOURCE = CopyTask(SequenceTaskConfig(length=4, vocab=6))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> RecurrentDepthTransformer:
    torch.manual_seed(0)
    fields = dict(vocab_size=SOURCE.vocab_size, d_model=32, n_heads=4, n_kv_heads=2)
    return RecurrentDepthTransformer(RecurrentConfig(**(fields | kw)))


def batch(size: int = 4):
    return SOURCE.batch("train", size, batch_generator(0, "train", 0))


def test_test_time_iterations_change_compute_and_output():
    model, b = tiny().eval(), batch()
    model.config.test_iterations = 2
    two = model(b.input_ids, loss_mask=b.loss_mask)
    model.config.test_iterations = 7
    seven = model(b.input_ids, loss_mask=b.loss_mask)
    assert (two.diagnostics["k_used"] == 2).all() and (seven.diagnostics["k_used"] == 7).all()
    assert two.diagnostics["k_used"].shape == b.input_ids.shape
    assert seven.diagnostics["residual"].shape == (7,)
    assert not torch.allclose(two.logits, seven.logits)
    torch.testing.assert_close(model(b.input_ids, iterations=7).logits, seven.logits)


@pytest.mark.parametrize("backprop_depth, supervised", [(0, [1, 2, 3]), (2, [2, 3])])
def test_supervising_iterations_averages_the_loss_of_each_live_iteration(backprop_depth, supervised):
    """The prediction after live iteration i is the model's output at r = i."""
    b = batch()
    model = tiny(supervise_iterations=True, backprop_depth=backprop_depth).train()
    got = model(b.input_ids, b.targets, b.loss_mask, iterations=3).loss
    model.config.supervise_iterations = False
    each = [model(b.input_ids, b.targets, b.loss_mask, iterations=r).loss for r in supervised]
    torch.testing.assert_close(got, torch.stack(each).mean())
    assert not torch.allclose(got, each[-1])


@pytest.mark.parametrize("reground", ["adapter", "add", "none"])
def test_regrounding_modes_train(reground):
    model, b = tiny(reground=reground, window=3, moe_experts=4), batch()
    out = model(b.input_ids, b.targets, b.loss_mask)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert (model.adapter is not None) == (reground == "adapter")
    assert model.core[0].attn.wq.weight.grad is not None


def saved_bytes(model, b) -> int:
    return saved_tensor_bytes(lambda: model(b.input_ids, b.targets, b.loss_mask).loss)


def test_truncated_backprop_memory_is_independent_of_iterations():
    b = batch()
    shallow = saved_bytes(tiny(iterations="fixed", mean_iterations=3, max_iterations=32, backprop_depth=2), b)
    deep = saved_bytes(tiny(iterations="fixed", mean_iterations=12, max_iterations=32, backprop_depth=2), b)
    deeper_tail = saved_bytes(tiny(iterations="fixed", mean_iterations=12, max_iterations=32, backprop_depth=4), b)
    assert shallow == deep
    assert deeper_tail > deep
    full = saved_bytes(tiny(iterations="fixed", mean_iterations=12, max_iterations=32, backprop_depth=0), b)
    assert full > deeper_tail  # 0: gradient through every iteration


@pytest.mark.parametrize("sampling", ["poisson_lognormal", "uniform"])
def test_training_iterations_are_sampled_within_bounds(sampling):
    model = tiny(iterations=sampling, min_iterations=2, mean_iterations=4, max_iterations=9)
    torch.manual_seed(0)
    draws = [model.sample_iterations() for _ in range(300)]
    assert min(draws) >= 2 and max(draws) <= 9 and len(set(draws)) > 3


def test_moe_routing_shapes_aux_loss_and_dense_twin():
    torch.manual_seed(0)
    moe = MixtureOfExperts(16, n_experts=4, top_k=2)
    x = torch.randn(3, 5, 16)
    experts, weights = moe.route(x.view(-1, 16))
    assert experts.shape == weights.shape == (15, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(15))
    assert (experts[:, 0] != experts[:, 1]).all()
    out = moe(x)
    assert out.shape == x.shape and moe.aux_loss.dim() == 0 and moe.aux_loss > 0
    torch.testing.assert_close(out, moe.forward_reference(x))
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_moe_model_adds_the_balance_loss():
    model, b = tiny(moe_experts=4, moe_aux_weight=0.5, iterations="fixed", mean_iterations=2), batch()
    out = model(b.input_ids, b.targets, b.loss_mask)
    assert out.loss > lm_loss(out.logits, b.targets, b.loss_mask) + 0.25  # aux ~ 1 per call


def test_kv_cached_decoding_equals_the_full_forward():
    model, b = tiny(window=4, moe_experts=3).eval(), batch(2)
    full = model(b.input_ids, iterations=3).logits
    cache = model.new_cache(2, b.input_ids.shape[1], iterations=3)
    steps = [model(b.input_ids[:, :5], cache=cache).logits]
    steps += [model(b.input_ids[:, t : t + 1], cache=cache).logits for t in range(5, b.input_ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_state_stays_finite_far_beyond_the_trained_iterations_in_bf16():
    """Regression: nothing bounded the state, so with an adapter that amplifies it |s| grew
    geometrically (~1e22 at r=64 here), the final RMSNorm's mean square overflowed, the logits
    came out all zero and argmax picked token 0 (accuracy exactly 0.000 at large r). The core's
    output is now RMS-normalised every iteration."""
    model, b = tiny().eval(), batch()
    with torch.no_grad():
        model.adapter.weight.mul_(20.0)  # an amplifying adapter, as training can produce
        with torch.autocast("cpu", dtype=torch.bfloat16):
            e = model.embed(b.input_ids)
            for block in model.prelude:
                e = block(e)
            s = torch.zeros_like(e)
            for _ in range(64):
                s = model.core_step(s, e)
            out = model(b.input_ids, iterations=64)
    assert torch.isfinite(s).all() and s.float().abs().max() < 100
    assert torch.isfinite(out.logits).all() and out.logits.float().std() > 0
