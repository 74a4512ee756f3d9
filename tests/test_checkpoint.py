import json

import pytest
import torch

from parallax.checkpoint import LATEST, RUN_FORMAT_VERSION, latest_checkpoint, load_run, save_checkpoint
from parallax.config import RunConfig
from parallax.errors import CheckpointError
from parallax.train import resume_config, train


@pytest.fixture
def run_dir(tmp_path, tiny_sort_overrides):
    out = tmp_path / "run"
    train(RunConfig.from_dict({}, tiny_sort_overrides), out)
    return out


def test_load_run_restores_the_trained_model(run_dir):
    run = load_run(run_dir)
    assert run.step == 12 and run.config.model_name == "transformer"
    ids = torch.randint(3, run.source.vocab_size, (2, run.source.seq_len))
    again = load_run(run_dir)
    torch.testing.assert_close(run.model(ids).logits, again.model(ids).logits)
    assert run.model.lm_head.weight is run.model.embed.weight  # tying survives the round trip


def test_only_the_newest_checkpoints_are_kept(run_dir):
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert steps == ["step_00000006", "step_00000012"]
    assert (run_dir / "checkpoints" / LATEST).read_text().strip() == "step_00000012"


def test_a_later_checkpoint_never_named_latest_does_not_outlive_the_next_save(run_dir):
    """A run killed between renaming checkpoint 20 into place and naming it latest, then resumed
    from 12 and saved at 16: the orphan 20 goes (pruning by name kept it and dropped 16, the one
    latest named), and so do the temporary files of an interrupted write of latest."""
    root = run_dir / "checkpoints"
    orphan = root / "step_00000020"
    orphan.mkdir()
    (root / f".{LATEST}.tmp-999").write_text("step_00000020\n")
    run = load_run(run_dir)
    save_checkpoint(run_dir, 16, run.model, "transformer", {}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == [LATEST, "step_00000012", "step_00000016"]
    assert load_run(run_dir).step == 16


def test_meta_that_is_not_an_object_is_reported(run_dir):
    (latest_checkpoint(run_dir) / "meta.json").write_text("[]")
    with pytest.raises(CheckpointError, match="no readable meta.json"):
        load_run(run_dir)


def test_truncated_weights_are_reported(run_dir):
    weights = latest_checkpoint(run_dir) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_run(run_dir)


def test_flipped_byte_is_reported(run_dir):
    state = latest_checkpoint(run_dir) / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="trainer_state.pt is corrupt"):
        load_run(run_dir)


def test_checkpoint_of_another_shape_is_reported(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["model"]["d_model"] = 64
    (run_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit|do not match"):
        load_run(run_dir)


def test_checkpoint_of_another_architecture_is_reported(run_dir):
    meta_path = latest_checkpoint(run_dir) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model"] = "cws"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="holds a 'cws' model"):
        load_run(run_dir)


def set_format_version(run_dir, version):
    """Rewrite every kept checkpoint's ``meta.json`` as a run of another format would have it."""
    for meta_path in (run_dir / "checkpoints").glob("step_*/meta.json"):
        meta = json.loads(meta_path.read_text())
        assert meta["format_version"] == RUN_FORMAT_VERSION
        if version is None:
            del meta["format_version"]
        else:
            meta["format_version"] = version
        meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("version", "described"),
    [(None, "none (written before run formats were versioned)"), (RUN_FORMAT_VERSION + 1, str(RUN_FORMAT_VERSION + 1))],
)
def test_run_of_another_format_is_refused_with_its_version(run_dir, tiny_sort_overrides, version, described):
    set_format_version(run_dir, version)
    expected = (
        f"run directory {str(run_dir)!r} records run format version {described}, but this version of parallax "
        f"reads only version {RUN_FORMAT_VERSION}; re-train the run, or load it with the version of parallax that wrote it"
    )
    for load in (
        lambda: load_run(run_dir),
        lambda: resume_config(run_dir, []),
        lambda: train(RunConfig.from_dict({}, tiny_sort_overrides), run_dir, resume=True),
    ):
        with pytest.raises(CheckpointError) as info:
            load()
        assert str(info.value) == expected


def test_old_run_whose_config_no_longer_parses_reports_its_format(run_dir):
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["model"]["renamed_since"] = 1
    (run_dir / "config.json").write_text(json.dumps(cfg))
    set_format_version(run_dir, None)
    with pytest.raises(CheckpointError, match=r"^run directory .* records run format version none \("):
        load_run(run_dir)


def test_missing_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a run directory"):
        load_run(tmp_path)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_sort_overrides, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-way through
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise OSError("disk full")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(RunConfig.from_dict({}, tiny_sort_overrides), out)
    monkeypatch.setattr(torch, "save", real_save)
    run = load_run(out)
    assert run.step == 6
