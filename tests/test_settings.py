"""Settings resolve by precedence CLI > environment > YAML > default, and bad values say where."""

from pathlib import Path

import pytest

from medgemma_deploy.errors import UsageError
from medgemma_deploy.settings import CONFIG_ENV, RunSettings, resolve_settings


def test_defaults_without_any_source():
    assert resolve_settings({}, environ={}) == RunSettings()


def test_precedence_cli_over_env_over_yaml(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("relevance_top_k: 7\nwrite_embeddings: true\ndevice: cpu\n")
    env = {CONFIG_ENV: str(config), "MEDGEMMA_DEPLOY_RELEVANCE_TOP_K": "5"}
    from_yaml_and_env = resolve_settings({}, environ=env)
    assert from_yaml_and_env.relevance_top_k == 5  # env beats YAML
    assert from_yaml_and_env.write_embeddings is True  # only in YAML
    assert from_yaml_and_env.device == "cpu"
    with_cli = resolve_settings({"relevance_top_k": 1, "write_embeddings": None}, environ=env)
    assert with_cli.relevance_top_k == 1  # CLI beats env
    assert with_cli.write_embeddings is True  # None on the CLI means "not given"


def test_label_paths_from_environment_are_split(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    settings = resolve_settings({}, environ={"MEDGEMMA_DEPLOY_LABELS": f"{a}:{b}"})
    assert settings.labels == (a, b)
    assert resolve_settings({"labels": [str(a)]}, environ={}).labels == (Path(a),)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MEDGEMMA_DEPLOY_RELEVANCE_TOP_K": "many"}, "MEDGEMMA_DEPLOY_RELEVANCE_TOP_K"),
        ({"MEDGEMMA_DEPLOY_EMBEDDINGS": "perhaps"}, "MEDGEMMA_DEPLOY_EMBEDDINGS"),
        ({"MEDGEMMA_DEPLOY_DEVICE": "tpu"}, "device must be"),
        ({"MEDGEMMA_DEPLOY_RELEVANCE_TOP_K": "-1"}, "relevance_top_k must be >= 0"),
    ],
)
def test_bad_environment_values_name_the_source(env, message):
    with pytest.raises(UsageError, match=message):
        resolve_settings({}, environ=env)


def test_yaml_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(UsageError, match=r"missing\.yaml"):
        resolve_settings({}, environ={CONFIG_ENV: str(missing)})
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("colour: blue\n")
    with pytest.raises(UsageError, match=r"unknown setting.*colour"):
        resolve_settings({}, environ={CONFIG_ENV: str(unknown)})
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- a\n- b\n")
    with pytest.raises(UsageError, match="must be a mapping"):
        resolve_settings({}, environ={CONFIG_ENV: str(not_mapping)})


def test_relevance_format_resolves_from_flag_environment_and_yaml(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("relevance_format: seg\n")
    assert resolve_settings({}, environ={}).relevance_format == "both"
    assert resolve_settings({}, environ={CONFIG_ENV: str(config)}).relevance_format == "seg"
    env = {CONFIG_ENV: str(config), "MEDGEMMA_DEPLOY_RELEVANCE_FORMAT": "pmap"}
    assert resolve_settings({}, environ=env).relevance_format == "pmap"
    assert resolve_settings({"relevance_format": "both"}, environ=env).relevance_format == "both"
    with pytest.raises(UsageError, match="relevance_format must be seg, pmap or both, got 'png'"):
        resolve_settings({}, environ={"MEDGEMMA_DEPLOY_RELEVANCE_FORMAT": "png"})
