import pytest

from studio.config import ConfigError, RunConfig, field_help, leaf_fields

pytestmark = pytest.mark.unit


def test_defaults_are_valid_without_data_file():
    assert RunConfig().validate(check_data_file=False) == []


def test_validate_reports_every_problem_with_field_names(tmp_path):
    cfg = RunConfig.from_dict({"method": "ia3", "lora": {"r": 512}, "training": {"learning_rate": 0, "batch_size": 0}})
    problems = cfg.validate()
    text = "\n".join(problems)
    for field in ("`method`", "`data.path`", "`training.learning_rate`", "`training.batch_size`"):
        assert field in text
    # lora.r is only checked for LoRA methods; method is invalid here, so it is not a LoRA run
    assert "`lora.r`" not in text
    lora = RunConfig.from_dict({"lora": {"r": 512}}).validate(check_data_file=False)
    assert lora == ["`lora.r` must be between 1 and 256 (got 512)."]


def test_unknown_and_mistyped_keys_are_named():
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"trainig": {}, "training": {"epochs": "many", "batch_size": 2.5}})
    msg = str(err.value)
    assert "`trainig` is not a setting" in msg
    assert "`training.epochs` must be float" in msg
    assert "`training.batch_size` must be int" in msg


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = RunConfig.from_dict({"method": "qlora", "lora": {"targets": "q_proj,v_proj"}, "training": {"seed": 7}})
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    loaded = RunConfig.from_yaml(path)
    assert loaded == cfg
    assert loaded.lora.target_modules() == ["q_proj", "v_proj"]
    over = loaded.with_overrides({"training.seed": 9, "training.epochs": None, "lora.r": 4})
    assert (over.training.seed, over.training.epochs, over.lora.r) == (9, cfg.training.epochs, 4)


def test_yaml_errors_are_sentences(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        RunConfig.from_yaml(bad)


def test_every_field_documents_itself():
    names = [name for name, _, _ in leaf_fields()]
    assert "training.learning_rate" in names and "lora.r" in names
    for name in names:
        assert field_help(name), f"{name} has no docstring"
