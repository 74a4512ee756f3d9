"""Depth-dial tasks: answers recomputed independently from the token sequence; size ranges by split."""

import pytest
import torch

from parallax.config import RunConfig
from parallax.data import DATA
from parallax.data.batch import batch_generator
from parallax.data.depth_tasks import (
    BOS, FIRST_SYMBOL, PAD, SEP, TICK, Automaton, AutomatonConfig, ChainRoot, ChainRootConfig, PointerChase,
    PointerChaseConfig,
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


def test_chain_root_answers_are_the_roots_of_the_listed_chains():
    cfg = ChainRootConfig(nodes=12, chains=3, queries=4, max_size=2, ood_size=3)
    source = ChainRoot(cfg)
    for split in ("train", "test"):
        b = source.batch(split, 6, batch_generator(0, split, 0))
        assert b.input_ids.shape == (6, source.seq_len)
        for row in range(6):
            seq = full_sequence(b, row)
            assert seq[0] == BOS
            pairs = [divmod(t - source.first_pair, cfg.nodes) for t in seq[1 : 1 + cfg.nodes]]
            parent = dict(pairs)
            assert sorted(parent) == list(range(cfg.nodes))
            roots = [a for a, p in parent.items() if a == p]
            assert len(roots) == cfg.chains
            answers, depths = [], []
            for q in range(cfg.queries):
                sep, x, y = seq[1 + cfg.nodes + 3 * q : 1 + cfg.nodes + 3 * (q + 1)]
                node, depth = x - FIRST_SYMBOL, 0
                while parent[node] != node:
                    node, depth = parent[node], depth + 1
                assert sep == SEP and y - FIRST_SYMBOL == node
                answers.append(y)
                depths.append(depth)
            assert b.targets[row][b.loss_mask[row]].tolist() == answers
            assert b.labels[row][b.loss_mask[row]].tolist() == depths
            lo, hi = (1, cfg.max_size) if split == "train" else (cfg.max_size + 1, cfg.ood_size)
            assert all(lo <= d <= hi for d in depths)


def test_chain_root_needs_chains_long_enough_for_the_deepest_query():
    with pytest.raises(ConfigError, match="ood_size"):
        RunConfig.from_dict({"model": {"name": "transformer"}, "data": {"name": "chain_root", "nodes": 12, "chains": 3, "ood_size": 4}})


def rule_step(cells, rule):
    w = len(cells)
    return [(rule >> (4 * cells[(i - 1) % w] + 2 * cells[i] + cells[(i + 1) % w])) & 1 for i in range(w)]


def read_cells(tokens, indexed):
    """Bits of a row of cell tokens; indexed tokens must name cells 0..W-1 in order."""
    if not indexed:
        assert set(tokens) <= {FIRST_SYMBOL, FIRST_SYMBOL + 1}
        return [t - FIRST_SYMBOL for t in tokens]
    cells = [divmod(t - FIRST_SYMBOL, 2) for t in tokens]
    assert [i for i, _ in cells] == list(range(len(tokens)))
    return [bit for _, bit in cells]


@pytest.mark.parametrize("indexed", [True, False])
def test_automaton_answers_are_the_evolved_cells(indexed):
    cfg = AutomatonConfig(width=6, rule=30, max_size=2, ood_size=9, indexed=indexed)
    source = Automaton(cfg)
    b = source.batch("test", 5, batch_generator(0, "test", 0))
    assert b.input_ids.shape == (5, source.seq_len)
    assert int(b.input_ids.max()) < source.vocab_size
    for row in range(5):
        seq = full_sequence(b, row)
        assert seq[0] == BOS and seq[1 + cfg.ood_size] == SEP == seq[2 + cfg.ood_size + cfg.width]
        steps = seq[1 : 1 + cfg.ood_size].count(TICK)
        cells = read_cells(seq[2 + cfg.ood_size : 2 + cfg.ood_size + cfg.width], indexed)
        assert 3 <= steps <= 9
        for _ in range(steps):
            cells = rule_step(cells, cfg.rule)
        answer = b.targets[row][b.loss_mask[row]]
        assert read_cells(answer.tolist(), indexed) == cells
        assert (b.labels[row][b.loss_mask[row]] == steps).all()


def test_rule_30_by_hand():
    # rule 30: new = left XOR (centre OR right); 100 -> 1, 110 -> 0, 011 -> 1, 000 -> 0
    assert rule_step([1, 0, 0, 0, 0], 30) == [1, 1, 0, 0, 1]  # one live cell grows to three
    source = Automaton(AutomatonConfig(width=5, rule=30, max_size=1, ood_size=2, indexed=False))
    b = source.batch("val", 64, batch_generator(3, "val", 0))
    for row in range(64):
        seq = full_sequence(b, row)
        assert read_cells(b.targets[row][b.loss_mask[row]].tolist(), False) == rule_step(read_cells(seq[4:9], False), 30)


@pytest.mark.parametrize("name", ["pointer_chase", "chain_root", "automaton"])
def test_batches_are_a_function_of_the_generator_seed(name):
    cfg = RunConfig.from_dict({"model": {"name": "transformer"}, "data": {"name": name, "size_decay": 0.5}})
    source = DATA.get(name).builder(cfg.data)
    for split in ("train", "val", "test"):
        a, b = (source.batch(split, 8, batch_generator(5, split, 7)) for _ in range(2))
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("input_ids", "targets", "loss_mask", "labels"))
    c = source.batch("train", 8, batch_generator(5, "train", 8))
    assert not torch.equal(a.input_ids, c.input_ids)


def test_size_decay_weights_small_training_sizes_only():
    def counts(split, decay):
        source = PointerChase(PointerChaseConfig(nodes=9, queries=16, max_size=4, ood_size=8, size_decay=decay))
        b = source.batch(split, 64, batch_generator(0, split, 0))
        hops = b.labels[b.loss_mask]
        return torch.bincount(hops, minlength=9)[1:].tolist()

    train = counts("train", 0.5)  # expected shares 8:4:2:1 of 1024 queries
    assert train[0] > train[1] > train[2] > train[3] > 0 and sum(train[4:]) == 0
    assert abs(train[0] / 1024 - 8 / 15) < 0.05
    assert counts("val", 0.5) == counts("val", 1.0)  # evaluation sizes stay uniform
    assert counts("test", 0.5) == counts("test", 1.0)


@pytest.mark.parametrize("name", ["pointer_chase", "chain_root", "automaton"])
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
