import pytest
from omegaconf import OmegaConf

from cefam_lightning.config_rules import rule_errors
from cefam_lightning.methods.registry import get_method, method_names
from cefam_lightning.training.config import CONFIG_DIR, CROSS_RULES, RULES, ConfigError, check_values, load_config
from tests.cli import cli_error


def test_default_config_is_complete_and_read_only():
    cfg = load_config()
    assert cfg.cefam.lambda_sim == 0.001 and cfg.cefam.select_layers == "auto" and cfg.world.image_size == 64
    assert not OmegaConf.missing_keys(cfg)
    with pytest.raises(Exception):  # noqa: B017 - omegaconf's ReadonlyConfigError
        cfg.seed = 3


def test_experiment_file_changes_only_what_it_says():
    default = load_config()
    paper = load_config(CONFIG_DIR / "experiment" / "paper_schedule.yaml")
    assert paper.optimizer.name == "sgd" and paper.optimizer.lr == 0.1 and paper.trainer.max_epochs == 150
    assert paper.world == default.world and paper.data == default.data


def test_overrides_merge_last_with_types():
    cfg = load_config(CONFIG_DIR / "experiment" / "paper_schedule.yaml", ["trainer.max_epochs=3", "cefam.lambda_sim=0"])
    assert cfg.trainer.max_epochs == 3 and cfg.cefam.lambda_sim == 0.0


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match=r"invalid key 'trainer.max_epoch'"):
        load_config(overrides=["trainer.max_epoch=3"])


def test_unknown_key_in_a_file_names_file_and_key(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("cefam:\n  lamda_sim: 0.1\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: invalid key 'cefam.lamda_sim'"):
        load_config(f)


def test_each_method_brings_its_own_section_and_defaults():
    for name in method_names():
        spec = get_method(name)
        cfg = load_config(overrides=[f"method={name}"])
        assert spec.section in cfg and spec.defaults.is_file()
        others = {get_method(m).section for m in method_names()} - {spec.section}
        assert not others & set(cfg)  # another method's section is not there
    assert load_config(overrides=["method=lcam_img"]).lcam.label_source == "prediction"
    with pytest.raises(ConfigError, match=r"invalid key 'lcam'"):  # L-CAM's keys with CE-FAM
        load_config(overrides=["lcam.layer=layer3"])
    with pytest.raises(ConfigError, match=r"unknown method 'lcam'; did you mean 'lcam_fm'"):
        load_config(overrides=["method=lcam"])


def test_keys_of_the_earlier_layout_say_where_they_went(tmp_path):
    with pytest.raises(ConfigError, match=r"command-line override: 'model' is now 'cefam'"):
        load_config(overrides=["model.lambda_sim=0.1"])
    f = tmp_path / "old.yaml"
    f.write_text("evaluation:\n  select_layers: all\n")
    with pytest.raises(ConfigError, match=r"old.yaml: 'evaluation.select_layers' is now 'cefam.select_layers'"):
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


# One override that breaks each value rule, and the error it must give (the key and the value named).
BAD_VALUES = [
    ("optimizer.lr=-0.01", "optimizer.lr must be > 0, got -0.01"),
    ("optimizer.lr=0", "optimizer.lr must be > 0, got 0.0"),
    ("optimizer.lr=inf", "optimizer.lr must be a finite number > 0, got inf"),
    ("optimizer.lr=nan", "optimizer.lr must be a finite number > 0, got nan"),
    ("classifier.fit.lr=-1", "classifier.fit.lr must be > 0, got -1.0"),
    ("lcam.bias_lr_factor=0", "lcam.bias_lr_factor must be > 0, got 0.0"),
    ("lcam.area_power=0", "lcam.area_power must be > 0, got 0.0"),
    ("world.logit_scale=0", "world.logit_scale must be > 0, got 0.0"),
    ("data.batch_size=0", "data.batch_size must be >= 1, got 0"),
    ("classifier.fit.batch_size=0", "classifier.fit.batch_size must be >= 1, got 0"),
    ("evaluation.batch_size=-4", "evaluation.batch_size must be >= 1, got -4"),
    ("classifier.fit.epochs=0", "classifier.fit.epochs must be >= 1, got 0"),
    ("world.n_train=0", "world.n_train must be >= 1, got 0"),
    ("world.n_val=0", "world.n_val must be >= 1, got 0"),
    ("world.n_test=-5", "world.n_test must be >= 1, got -5"),
    ("cefam.k=0", "cefam.k must be >= 1, got 0"),
    ("trainer.num_nodes=0", "trainer.num_nodes must be >= 1, got 0"),
    ("demo.top_k=0", "demo.top_k must be >= 1, got 0"),
    ("siam.n_templates=0", "siam.n_templates must be >= 1, got 0"),
    ("callbacks.region_maps.num_images=0", "callbacks.region_maps.num_images must be >= 1, got 0"),
    ("callbacks.region_maps.top_k=0", "callbacks.region_maps.top_k must be >= 1, got 0"),
    ("callbacks.contributions.num_images=0", "callbacks.contributions.num_images must be >= 1, got 0"),
    ("callbacks.contributions.top_n=0", "callbacks.contributions.top_n must be >= 1, got 0"),
    ("callbacks.contributions.top=0", "callbacks.contributions.top must be >= 1, got 0"),
    ("callbacks.region_maps.every_n_epochs=0", "callbacks.region_maps.every_n_epochs must be >= 1, got 0"),
    ("callbacks.contributions.every_n_epochs=0", "callbacks.contributions.every_n_epochs must be >= 1, got 0"),
    ("callbacks.region_metrics.every_n_epochs=0", "callbacks.region_metrics.every_n_epochs must be >= 1, got 0"),
    ("classifier.fit.widths=[16,0,64,128]", "classifier.fit.widths[1] must be >= 1, got 0"),
    ("cefam.hidden_dims=[64,-1]", "cefam.hidden_dims[1] must be >= 1, got -1"),
    ("classifier.num_classes=0", "classifier.num_classes must be >= 1, got 0"),
    ("classifier.image_size=0", "classifier.image_size must be >= 1, got 0"),
    ("siam.grid=0", "siam.grid must be >= 1, got 0"),
    ("evaluation.max_images=0", "evaluation.max_images must be >= 1, got 0"),
    ("callbacks.region_metrics.max_images=0", "callbacks.region_metrics.max_images must be >= 1, got 0"),
    ("cefam.auroc_thresholds=1", "cefam.auroc_thresholds must be >= 2, got 1"),
    ("siam.auroc_thresholds=1", "siam.auroc_thresholds must be >= 2, got 1"),
    ("cefam.select_layers=some", "cefam.select_layers must be 'auto', 'all' or a non-empty list of layer names"),
    ("cefam.select_layers=[]", "cefam.select_layers must be 'auto', 'all' or a non-empty list of layer names"),
    ("cefam.holdout_concepts=[yellow,'']", "cefam.holdout_concepts[1] must be a concept name, got ''"),
    ("classifier.layers=[]", "classifier.layers must be a non-empty list of layer names, got []"),
    ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
    ("demo.num_figures=-1", "demo.num_figures must be >= 0, got -1"),
    ("trainer.log_every_n_steps=-1", "trainer.log_every_n_steps must be >= 0, got -1"),
    ("scheduler.patience=-1", "scheduler.patience must be >= 0, got -1"),
    ("scheduler.warmup_epochs=-1", "scheduler.warmup_epochs must be >= 0, got -1"),
    ("early_stopping.patience=-1", "early_stopping.patience must be >= 0, got -1"),
    ("siam.border=-1", "siam.border must be >= 0, got -1"),
    ("seed=-1", "seed must be in [0, 4294967295], got -1"),
    ("seed=4294967296", "seed must be in [0, 4294967295], got 4294967296"),
    ("world.seed=-1", "world.seed must be >= 0, got -1"),
    ("classifier.fit.seed=-1", "classifier.fit.seed must be >= 0, got -1"),
    ("evaluation.seed=-1", "evaluation.seed must be >= 0, got -1"),
    (
        "trainer.max_epochs=0",
        "trainer.max_epochs must be >= 1, or -1 for no limit (early stopping ends the run), got 0",
    ),
    ("trainer.max_epochs=-2", "trainer.max_epochs must be >= 1, or -1 for no limit"),
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches must be a fraction in (0.0, 1.0] or a number of"),
    ("trainer.limit_val_batches=1.5", "trainer.limit_val_batches must be a fraction in (0.0, 1.0] or a number of"),
    ("trainer.limit_test_batches=0.0", "trainer.limit_test_batches must be a fraction in (0.0, 1.0] or a number of"),
    ("trainer.fast_dev_run=-1", "trainer.fast_dev_run must be true, false or a number of batches >= 0, got -1"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay must be >= 0, got -0.1"),
    ("classifier.fit.weight_decay=-0.1", "classifier.fit.weight_decay must be >= 0, got -0.1"),
    ("cefam.lambda_sim=-0.001", "cefam.lambda_sim must be >= 0, got -0.001"),
    ("lcam.ce_weight=-1", "lcam.ce_weight must be >= 0, got -1.0"),
    ("lcam.area_weight=-1", "lcam.area_weight must be >= 0, got -1.0"),
    ("lcam.tv_weight=-1", "lcam.tv_weight must be >= 0, got -1.0"),
    ("lcam.area_eps=-1", "lcam.area_eps must be >= 0, got -1.0"),
    ("lcam.tv_border=-1", "lcam.tv_border must be >= 0, got -1.0"),
    ("siam.template_init=-1", "siam.template_init must be >= 0, got -1.0"),
    ("siam.w_attr=-1", "siam.w_attr must be >= 0, got -1.0"),
    ("siam.w_tmpl=-1", "siam.w_tmpl must be >= 0, got -1.0"),
    ("world.background_noise=-0.1", "world.background_noise must be >= 0, got -0.1"),
    ("world.embedding_noise=-0.1", "world.embedding_noise must be >= 0, got -0.1"),
    ("optimizer.momentum=1.0", "optimizer.momentum must be in [0, 1), got 1.0"),
    ("optimizer.momentum=-0.5", "optimizer.momentum must be in [0, 1), got -0.5"),
    ("scheduler.factor=1.0", "scheduler.factor must be in (0, 1), got 1.0"),
    ("scheduler.factor=0", "scheduler.factor must be in (0, 1), got 0.0"),
    ("scheduler.warmup_factor=0.5", "scheduler.warmup_factor must be >= 1, got 0.5"),
    ("world.min_radius=0", "world.min_radius must be in (0, 0.5), got 0.0"),
    ("world.max_radius=0.5", "world.max_radius must be in (0, 0.5), got 0.5"),
    ("optimizer.name=rmsprop", "optimizer.name must be one of ('sgd', 'adam', 'adamw'), got 'rmsprop'"),
    ("scheduler.name=step", "scheduler.name must be one of ('plateau', 'cosine', 'none'), got 'step'"),
    ("cefam.activation=sigmoid", "cefam.activation must be one of ('tanh', 'relu', 'gelu'), got 'sigmoid'"),
    ("lcam.label_source=truth", "lcam.label_source must be one of ('prediction', 'target'), got 'truth'"),
    ("siam.task=ranking", "siam.task must be one of ('classification', 'regression'), got 'ranking'"),
    ("cefam.fill=mean", "cefam.fill must be one of ('spatial_mean', 'zero'), got 'mean'"),
    ("cefam.gradient=total", "cefam.gradient must be one of ('direct', 'full'), got 'total'"),
    ("cefam.region_weights=abs", "cefam.region_weights must be one of ('signed', 'positive'), got 'abs'"),
    ("cefam.relevance=softmax", "cefam.relevance must be one of ('paper', 'map'), got 'softmax'"),
    ("early_stopping.mode=minimum", "early_stopping.mode must be one of ('min', 'max'), got 'minimum'"),
    ("world.vlm_kind=blip", "world.vlm_kind must be one of ('clip', 'siglip'), got 'blip'"),
    ("trainer.precision=fp16", "trainer.precision must be one of ("),
    ("method=gradcam", "method: unknown method 'gradcam' (registered: cefam, lcam_fm, lcam_img, siam)"),
    ("data.source=pictures", "data.source must be one of ('shapes', 'images'), got 'pictures'"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer must be >= 0, got -1"),
]
# Values that break no rule alone but do together.
BAD_COMBINATIONS = [
    (
        ["trainer.max_epochs=-1", "early_stopping.enabled=false"],
        "trainer.max_epochs=-1 (no limit) needs early_stopping.enabled=true, or the run never ends",
    ),
    (
        ["trainer.max_epochs=-1", "scheduler.name=cosine"],
        "scheduler.name=cosine needs a finite trainer.max_epochs (its period), got -1",
    ),
    (["world.min_radius=0.3", "world.max_radius=0.2"], "world.min_radius must be <= world.max_radius, got 0.3 > 0.2"),
    (
        ["optimizer.name=sgd", "optimizer.nesterov=true", "optimizer.momentum=0"],
        "optimizer.nesterov=true needs optimizer.momentum > 0 with SGD, got 0",
    ),
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_a_value_out_of_range_is_refused_naming_key_and_value(override, message):
    method = {"lcam": ["method=lcam_img"], "siam": ["method=siam"]}.get(override.split(".")[0], [])
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[*method, override])
    assert str(err.value).startswith(message)


@pytest.mark.parametrize(("overrides", "message"), BAD_COMBINATIONS, ids=[m[:30] for _, m in BAD_COMBINATIONS])
def test_values_that_do_not_go_together_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert str(err.value) == message


def test_every_rule_key_has_a_bad_value_case():
    tested = {o.split("=")[0] for o, _ in BAD_VALUES}
    method_rules = [rule for name in method_names() for rule in get_method(name).rules]
    assert {key for rule in [*RULES, *method_rules] for key in rule.keys} <= tested


def test_every_bad_value_is_named_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["optimizer.lr=-0.01", "data.batch_size=0"])
    assert str(err.value) == "data.batch_size must be >= 1, got 0; optimizer.lr must be > 0, got -0.01"


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.max_epochs=-1"],  # no limit: early stopping (on by default) ends the run
        ["trainer.limit_train_batches=0.25", "trainer.limit_val_batches=3", "trainer.limit_test_batches=1"],
        ["trainer.fast_dev_run=true"],
        ["trainer.fast_dev_run=2"],
        ["optimizer.name=SGD", "optimizer.momentum=0.9", "optimizer.nesterov=true", "scheduler.name=Cosine"],
        ["cefam.lambda_sim=0", "cefam.hidden_dims=[]", "demo.num_figures=0"],
        ["method=siam", "siam.border=0"],
        ["trainer.precision=bf16-mixed"],
        ["seed=4294967295", "world.min_radius=0.2", "world.max_radius=0.2"],
    ],
)
def test_values_at_the_edges_of_their_ranges_are_accepted(overrides):
    load_config(overrides=overrides)


@pytest.mark.parametrize(
    "file", [None, *sorted((CONFIG_DIR / "experiment").glob("*.yaml"))], ids=lambda p: p.name if p else "default"
)
def test_every_shipped_config_passes_the_rules(file):
    cfg = load_config(file)
    assert not rule_errors(cfg, [*RULES, *get_method(cfg.method).rules], CROSS_RULES)
    check_values(cfg)


def test_train_py_with_a_negative_lr_ends_with_one_error_line_before_building_anything(tmp_path, capsys):
    from cefam_lightning.cli.train import main

    argv = [f"output_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}", "optimizer.lr=-0.01"]
    assert cli_error(main, argv, capsys) == "optimizer.lr must be > 0, got -0.01"
    assert list(tmp_path.iterdir()) == []  # no run folder, no world, no classifier
