import pytest

from parallax.config import RunConfig, TrainConfig, load_toml
from parallax.errors import ConfigError


def test_overrides_are_typed_and_applied():
    cfg = RunConfig.from_dict({}, ["model.name=transformer", "data.name=sort", "model.d_model=256", "train.lr=1e-4", "train.compile=true"])
    assert cfg.model.d_model == 256 and isinstance(cfg.model.d_model, int)
    assert cfg.train.lr == 1e-4 and cfg.train.compile is True


def test_file_then_override_precedence(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[model]\nname = "transformer"\nn_layers = 3\n[train]\nsteps = 7\nlr = 1\n')
    cfg = RunConfig.from_dict(load_toml(path), ["train.steps=9", "data.name=sort"])
    assert cfg.model.n_layers == 3 and cfg.train.steps == 9
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # TOML int accepted for float


def test_unknown_key_names_valid_keys():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({}, ["model.name=transformer", "model.d_modl=3"])
    msg = str(err.value)
    assert "d_modl" in msg and "d_model" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "override, fragment",
    [("train.steps=abc", "train.steps must be int"), ("train.compile=maybe", "must be bool"),
     ("nosection.x=1", "unknown config section"), ("train.steps", "section.key=value"),
     ("model.name=nonexistent", "unknown model"), ("train.compile_mode=fast", "compile_mode must be one of"),
     ("train.eval_every=0", "eval_every must be at least 1"), ("train.batch_size=0", "batch_size must be at least 1"),
     ("model.d_model=-4", "model.d_model must not be negative"), ("model.n_heads=0", "model.n_heads must be at least 1"),
     ("model.n_layers=0", "model.n_layers must be at least 1"), ("model.dropout=2", "dropout must be below 1"),
     ("train.lr=nan", "train.lr must be a finite number"), ("train.lr=0", "lr must be positive"),
     ("data.length=-1", "data.length must not be negative"), ("train.eval_batches=0", "eval_batches must be at least 1"),
     ("train.beta1=1", r"beta1 must be in \[0, 1\)"), ("train.beta2=1.5", r"beta2 must be in \[0, 1\)"),
     ("train.min_lr_ratio=5", r"min_lr_ratio must be in \[0, 1\]"), ("train.seed=9223372036854775808", "seed must be below"),
     ("model.d_model=12", "head dimension d_model / n_heads must be even"), ("model.rope_base=0", "rope_base must be positive")],
)
def test_bad_values_are_one_line_errors(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_dict({}, ["model.name=transformer", "data.name=copy", override])


@pytest.mark.parametrize(
    "override, fragment",
    [("model.decoder_heads=0", "model.decoder_heads must be at least 1"),
     ("model.siren_omega=0", "siren_omega and rope_base must be positive"),
     ("model.rope_base=0", "siren_omega and rope_base must be positive")],
)
def test_bad_cws_values_are_one_line_errors(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_dict({}, ["model.name=cws", override])


@pytest.mark.parametrize("text, fragment", [(b"model = 3\n", "section 'model' must be a table of keys, got 3"),
                                            (b"\xff\xfe[model]\n", "is not valid TOML")])
def test_malformed_config_files_are_one_line_errors(tmp_path, text, fragment):
    path = tmp_path / "p.toml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=fragment):
        RunConfig.from_dict(load_toml(path))


def test_wrong_type_in_file_is_rejected(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[train]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match="train.steps must be int"):
        RunConfig.from_dict(load_toml(path), ["model.name=transformer", "data.name=copy"])


def test_validate_hook_runs():
    with pytest.raises(ConfigError, match="n_heads"):
        RunConfig.from_dict({}, ["model.name=transformer", "model.d_model=30", "model.n_heads=4"])


def test_round_trip_through_dict():
    cfg = RunConfig.from_dict({}, ["model.name=transformer", "data.name=reverse", "data.length=11"])
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.data_name == "reverse"
    assert TrainConfig().precision == "auto"
