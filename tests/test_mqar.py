"""MQAR: the Zoology layout at the scale of the paper's sweeps (seq 256, 16 pairs, vocab 8192)."""

import pytest
import torch

from parallax.config import build_run_config
from parallax.data import build_data
from parallax.data.batch import batch_generator
from parallax.data.mqar import MQARConfig, MQARTask
from parallax.errors import ConfigError


@pytest.fixture(scope="module")
def big():
    task = MQARTask(MQARConfig(seq_len=256, num_kv_pairs=16, vocab_size=8192))
    return task, task.batch("train", 32, batch_generator(3, "train", 0))


def test_shapes_and_mask(big):
    task, batch = big
    assert batch.input_ids.shape == batch.targets.shape == batch.labels.shape == (32, 256)
    assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])
    assert torch.equal(batch.loss_mask, batch.labels == task.label_names.index("recall"))
    assert torch.equal(batch.loss_mask.sum(1), torch.full((32,), 16))
    assert int(batch.input_ids.min()) >= 0 and int(batch.input_ids.max()) < 8192
    assert (batch.labels[:, :31] == task.label_names.index("context")).all()


def test_context_holds_distinct_keys_and_values(big):
    _, batch = big
    keys, values = batch.input_ids[:, 0:32:2], batch.input_ids[:, 1:32:2]
    assert ((keys >= 1) & (keys < 4096)).all() and ((values >= 4096) & (values < 8192)).all()
    assert all(row.unique().numel() == 16 for row in keys)
    assert all(row.unique().numel() == 16 for row in values)


def test_every_recall_answer_is_the_value_bound_in_context(big):
    _, batch = big
    for row in range(32):
        ids = batch.input_ids[row].tolist()
        table = dict(zip(ids[0:32:2], ids[1:32:2]))
        positions = batch.loss_mask[row].nonzero().flatten().tolist()
        assert all(p >= 32 and p % 2 == 0 for p in positions)  # queries sit at even offsets
        queried = [ids[p] for p in positions]
        assert sorted(queried) == sorted(table)  # each key is queried exactly once
        assert all(batch.targets[row, p].item() == table[ids[p]] for p in positions)


def test_power_law_favours_short_gaps():
    def mean_query_position(power_a):
        task = MQARTask(MQARConfig(seq_len=128, num_kv_pairs=8, vocab_size=512, power_a=power_a))
        batch = task.batch("train", 64, batch_generator(0, "train", 0))
        return batch.loss_mask.nonzero()[:, 1].float().mean()

    assert mean_query_position(0.01) < mean_query_position(1.0) - 10


def test_deterministic_and_registered():
    task = build_data(build_run_config({}, ["data.name=mqar", "model.name=transformer"]).data)
    assert isinstance(task, MQARTask) and task.seq_len == 64
    a = task.batch("val", 4, batch_generator(0, "val", 5))
    b = task.batch("val", 4, batch_generator(0, "val", 5))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert task.chance_accuracy() == {"recall_uniform": 1 / 4096, "recall_live": 1 / 4}
    with pytest.raises(ConfigError, match="num_kv_pairs"):
        build_run_config({}, ["data.name=mqar", "data.num_kv_pairs=17"])
