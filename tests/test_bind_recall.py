"""BIND/RECALL: answers, labels, mask and difficulty knobs, checked by re-reading the tokens."""

import pytest
import torch

from parallax.config import build_run_config
from parallax.data import build_data
from parallax.data.batch import batch_generator
from parallax.data.bind_recall import QUERY, SEP, BindRecallConfig, BindRecallTask
from parallax.errors import ConfigError


def draw(task, n=64, step=0):
    return task.batch("train", n, batch_generator(7, "train", step))


def read_back(task, batch):
    """Independently parse each sequence: for every scored token, the label it should have."""
    names = task.label_names
    cfg = task.cfg
    expected = []
    for row in range(batch.input_ids.shape[0]):
        seq = [*batch.input_ids[row].tolist(), batch.targets[row, -1].item()]
        latest, bound_at, times = {}, {}, {}
        row_labels = ["unpredictable"] * (len(seq) - 1)
        for start in range(1, len(seq), 3):
            first, second, third = seq[start : start + 3]
            if first == QUERY:  # recall "? k v": the answer is the latest value of k
                assert third == latest[second], "recall target is not the latest bound value"
                distance = start + 2 - bound_at[second]
                if times[second] > 1:
                    row_labels[start + 1] = "recall_rebound"
                else:
                    row_labels[start + 1] = "recall_far" if distance > cfg.far_distance else "recall_near"
                continue
            assert third == SEP  # binds and fillers end in ";"
            row_labels[start + 1] = "structural"
            if first < task.first_value:  # bind "k v ;"
                assert latest.get(first) != second, "a re-binding must change the value"
                latest[first], bound_at[first], times[first] = second, start + 1, times.get(first, 0) + 1
            else:  # filler: the symbol repeats
                assert second == first
                row_labels[start] = "easy"
        expected.append([names.index(n) for n in row_labels])
    return torch.tensor(expected)


def recall_distances(task, batch):
    out = []
    for row in range(batch.input_ids.shape[0]):
        seq = [*batch.input_ids[row].tolist(), batch.targets[row, -1].item()]
        bound_at = {}
        for start in range(1, len(seq), 3):
            if seq[start] == QUERY:
                out.append(start + 2 - bound_at[seq[start + 1]])
            elif seq[start] < task.first_value:
                bound_at[seq[start]] = start + 1
    return torch.tensor(out, dtype=torch.float)


def test_default_is_registered_and_sized_for_a_cpu_run():
    cfg = build_run_config({}, ["model.name=transformer"])
    task = build_data(cfg.data)
    assert isinstance(task, BindRecallTask)
    assert task.seq_len == 63 and task.vocab_size == 35
    assert task.chance_accuracy()["recall_uniform"] == pytest.approx(1 / 16)
    assert task.chance_accuracy()["recall_live"] == pytest.approx(1 / 8)


def test_deterministic_for_a_generator_and_varies_with_it():
    task = BindRecallTask(BindRecallConfig())
    a, b, c = draw(task), draw(task), draw(task, step=1)
    for name in ("input_ids", "targets", "loss_mask", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.input_ids, c.input_ids)


def test_targets_are_shifted_inputs_and_labels_match_an_independent_reading():
    task = BindRecallTask(BindRecallConfig())
    batch = draw(task, n=128)
    assert batch.input_ids.shape == (128, task.seq_len)
    assert torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])
    assert int(batch.input_ids.max()) < task.vocab_size
    assert torch.equal(batch.labels, read_back(task, batch))
    unpredictable = task.label_names.index("unpredictable")
    assert torch.equal(batch.loss_mask, batch.labels != unpredictable)
    for name in task.label_names[1:]:  # every scored label occurs at the defaults
        assert (batch.labels == task.label_names.index(name)).any(), name


def test_counts_follow_the_config():
    cfg = BindRecallConfig(n_bindings=5, n_rebinds=3, n_queries=4, n_fillers=2, gap=2)
    task = BindRecallTask(cfg)
    batch = draw(task, n=16)
    names = task.label_names
    recalls = sum((batch.labels == names.index(n)).sum(1) for n in ("recall_near", "recall_far", "recall_rebound"))
    assert torch.equal(recalls, torch.full((16,), 4))
    assert torch.equal((batch.labels == names.index("easy")).sum(1), torch.full((16,), 4))
    binds_and_fillers = cfg.events - cfg.n_queries
    assert torch.equal((batch.labels == names.index("structural")).sum(1), torch.full((16,), binds_and_fillers))
    keys = (batch.input_ids > QUERY) & (batch.input_ids < task.first_value)
    assert torch.equal(keys.sum(1), torch.full((16,), 8 + 4))  # 5 bindings + 3 re-bindings + 4 recalls


def test_gap_and_fillers_push_recalls_further_away():
    base = recall_distances(t := BindRecallTask(BindRecallConfig()), draw(t, 256)).mean()
    gapped = recall_distances(t := BindRecallTask(BindRecallConfig(gap=6)), draw(t, 256)).mean()
    filled = recall_distances(t := BindRecallTask(BindRecallConfig(n_fillers=16)), draw(t, 256)).mean()
    assert gapped > base + 3 * 5 - 1  # each gap event adds exactly 3 tokens to every recall
    assert filled > base + 6


def test_rebinding_and_distance_knobs_change_the_label_mix():
    def share(cfg, name):
        task = BindRecallTask(cfg)
        return (draw(task, 256).labels == task.label_names.index(name)).float().mean()

    assert share(BindRecallConfig(n_rebinds=0), "recall_rebound") == 0
    rebound = [share(BindRecallConfig(n_rebinds=n), "recall_rebound") for n in (1, 6)]
    far = [share(BindRecallConfig(far_distance=d), "recall_far") for d in (12, 48)]
    assert rebound[1] > rebound[0] and far[0] > far[1]


def test_more_bindings_means_more_live_keys():
    for n in (4, 12):
        task = BindRecallTask(BindRecallConfig(n_bindings=n, n_rebinds=0, n_queries=4))
        batch = draw(task, 8)
        for row in batch.input_ids:
            keys = row[(row > QUERY) & (row < task.first_value)]
            assert keys.unique().numel() == n


def test_decode_and_bad_config():
    task = BindRecallTask(BindRecallConfig())
    text = task.decode(draw(task, 1).input_ids[0].tolist())
    assert text.startswith("<s> ") and " ? k" in text and " ; " in text
    with pytest.raises(ConfigError, match="n_queries"):
        build_run_config({}, ["data.n_queries=9"])
    with pytest.raises(ValueError, match="n_values"):
        BindRecallConfig(n_values=4).validate()
