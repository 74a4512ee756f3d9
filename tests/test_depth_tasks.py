"""Depth-dial tasks: answers recomputed independently from the token sequence; size ranges by split."""

import pytest

from parallax.config import RunConfig
from parallax.data import DATA
from parallax.data.batch import batch_generator
from parallax.data.depth_tasks import (
    BOS, FIRST_SYMBOL, PAD, SEP, TICK, Automaton, AutomatonConfig, PointerChase, PointerChaseConfig,
)
from parallax.errors import ConfigError


def full_sequence(b, row):
    return [b.input_ids[row, 0].item()] + b.targets[row].tolist()


def test_pointer_chase_answers_follow_the_listed_map():
    cfg = PointerChaseConfig(nodes=7, queries=3, max_size=2, ood_size=5)
    source = PointerChase(cfg)
    b = source.batch("train", 6, batch_generator(0, "train", 0))
    assert b.input_ids.shape == (6, source.seq_len)
    for row in range(6):
        seq = full_sequence(b, row)
        assert seq[0] == BOS
        pairs = [divmod(t - source.first_pair, cfg.nodes) for t in seq[1 : 1 + cfg.nodes]]  # one token per pair
        table = {a + FIRST_SYMBOL: fa + FIRST_SYMBOL for a, fa in pairs}
        assert sorted(table) == sorted(table.values()) == list(range(FIRST_SYMBOL, FIRST_SYMBOL + cfg.nodes))
        rest, answers, sizes = seq[1 + cfg.nodes :], [], []
        for q in range(cfg.queries):
            sep, *ticks, x, y = rest[q * (cfg.ood_size + 3) : (q + 1) * (cfg.ood_size + 3)]
            hops = ticks.count(TICK)
            assert sep == SEP and set(ticks) <= {TICK, PAD} and ticks[:hops] == [TICK] * hops
            node = x
            for _ in range(hops):
                node = table[node]
            assert y == node
            answers.append(y)
            sizes.append(hops)
        assert b.targets[row][b.loss_mask[row]].tolist() == answers
        assert b.labels[row][b.loss_mask[row]].tolist() == sizes
        assert (b.labels[row][~b.loss_mask[row]] == 0).all()


def rule_step(cells, rule):
    w = len(cells)
    return [(rule >> (4 * cells[(i - 1) % w] + 2 * cells[i] + cells[(i + 1) % w])) & 1 for i in range(w)]


def test_automaton_answers_are_the_evolved_cells():
    cfg = AutomatonConfig(width=6, rule=30, max_size=2, ood_size=9)
    source = Automaton(cfg)
    b = source.batch("test", 5, batch_generator(0, "test", 0))
    assert b.input_ids.shape == (5, source.seq_len)
    for row in range(5):
        seq = full_sequence(b, row)
        cells = [t - FIRST_SYMBOL for t in seq[1 : 1 + cfg.width]]
        steps = seq[2 + cfg.width : 2 + cfg.width + cfg.ood_size].count(TICK)
        assert 3 <= steps <= 9
        for _ in range(steps):
            cells = rule_step(cells, cfg.rule)
        answer = b.targets[row][b.loss_mask[row]]
        assert [t - FIRST_SYMBOL for t in answer.tolist()] == cells
        assert (b.labels[row][b.loss_mask[row]] == steps).all()


@pytest.mark.parametrize("name", ["pointer_chase", "automaton"])
def test_splits_draw_in_and_out_of_distribution_sizes(name):
    cfg = RunConfig.from_dict({"model": {"name": "transformer"}, "data": {"name": name}})
    source = DATA.get(name).builder(cfg.data)
    max_size, ood_size = cfg.data.max_size, cfg.data.ood_size

    def sizes(split, source):
        b = source.batch(split, 64, batch_generator(1, split, 0))
        return set(b.labels[b.loss_mask].tolist())

    assert sizes("train", source) == set(range(1, max_size + 1))
    assert sizes("val", source) <= set(range(1, max_size + 1))
    assert sizes("test", source) <= set(range(max_size + 1, ood_size + 1))
    cfg.data.ood = True
    assert min(sizes("val", DATA.get(name).builder(cfg.data))) > max_size
    assert len(source.label_names) == ood_size + 1


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError):
        RunConfig.from_dict({"model": {"name": "transformer"}, "data": {"name": "pointer_chase", "nodes": 5, "ood_size": 8}})
