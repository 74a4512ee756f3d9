import pytest
import torch

from parallax.config import RunConfig
from parallax.data import build_data
from parallax.data.batch import batch_generator
from parallax.data.tasks import FIRST_SYMBOL, SEP


def make(name, **kw):
    over = [f"data.name={name}"] + [f"data.{k}={v}" for k, v in kw.items()]
    return build_data(RunConfig.from_dict({}, ["model.name=transformer", *over]).data)


@pytest.mark.parametrize("name", ["copy", "reverse", "sort"])
def test_answers_are_right_and_masked(name):
    task = make(name, length=6, vocab=10)
    b = task.batch("train", 32, batch_generator(0, "train", 0))
    assert b.input_ids.shape == (32, 13) == b.targets.shape == b.loss_mask.shape
    x = b.input_ids[:, 1:7] - FIRST_SYMBOL
    y = b.targets[b.loss_mask].view(32, 6) - FIRST_SYMBOL
    expected = {"copy": x, "reverse": x.flip(1), "sort": x.sort(1).values}[name]
    assert torch.equal(y, expected)
    assert (b.input_ids[:, 7] == SEP).all()
    assert b.targets.max() < task.vocab_size
    assert torch.equal(b.labels, b.loss_mask.long())


def test_deterministic_for_a_seed_and_different_across_steps_and_splits():
    task = make("sort")
    a = task.batch("train", 8, batch_generator(3, "train", 5))
    b = task.batch("train", 8, batch_generator(3, "train", 5))
    c = task.batch("train", 8, batch_generator(3, "train", 6))
    d = task.batch("val", 8, batch_generator(3, "val", 5))
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert not torch.equal(a.input_ids, d.input_ids)
