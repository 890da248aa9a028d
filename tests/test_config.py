import pytest
from omegaconf import OmegaConf

from cefam_lightning.config import CONFIG_DIR, ConfigError, load_config


def test_default_config_is_complete_and_read_only():
    cfg = load_config()
    assert cfg.model.lambda_sim == 0.001 and cfg.world.image_size == 64
    assert not OmegaConf.missing_keys(cfg)
    with pytest.raises(Exception):  # noqa: B017 - omegaconf's ReadonlyConfigError
        cfg.seed = 3


def test_experiment_file_changes_only_what_it_says():
    default = load_config()
    paper = load_config(CONFIG_DIR / "experiment" / "paper_schedule.yaml")
    assert paper.optimizer.name == "sgd" and paper.optimizer.lr == 0.1 and paper.trainer.max_epochs == 150
    assert paper.world == default.world and paper.data == default.data


def test_overrides_merge_last_with_types():
    cfg = load_config(CONFIG_DIR / "experiment" / "paper_schedule.yaml", ["trainer.max_epochs=3", "model.lambda_sim=0"])
    assert cfg.trainer.max_epochs == 3 and cfg.model.lambda_sim == 0.0


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match=r"invalid key 'trainer.max_epoch'"):
        load_config(overrides=["trainer.max_epoch=3"])


def test_unknown_key_in_a_file_names_file_and_key(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("model:\n  lamda_sim: 0.1\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: invalid key 'model.lamda_sim'"):
        load_config(f)


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"trainer.max_epochs"):
        load_config(overrides=["trainer.max_epochs=many"])


def test_bad_world_value_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="mauve"):
        load_config(overrides=["world.colors=[red,mauve]"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["trainer.max_epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/file.yaml")
