"""Model directories: given directly or as a models root, checked by model_type, versioned."""

import json

import pytest

from medgemma_deploy.errors import ModelLoadError
from medgemma_deploy.model_dir import MODEL_MARKER, model_identity, resolve_model_dir


def _config(path, model_type, **extra):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type, **extra}))
    return path


def test_directory_itself_and_models_root_resolve_to_the_same_dir(tmp_path):
    siglip = _config(tmp_path / "medsiglip", "siglip")
    gemma = _config(tmp_path / "medgemma", "gemma3")
    assert resolve_model_dir(siglip, "medsiglip") == siglip
    assert resolve_model_dir(tmp_path, "medsiglip") == siglip
    assert resolve_model_dir(tmp_path, "medgemma") == gemma


def test_wrong_model_type_is_refused_with_both_types_named(tmp_path):
    gemma = _config(tmp_path / "model", "gemma3")
    with pytest.raises(ModelLoadError, match=r"model_type is 'gemma3'.*'siglip'"):
        resolve_model_dir(gemma, "medsiglip")


def test_missing_path_and_missing_config_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_dir(tmp_path / "nowhere", "medsiglip")
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_model_dir(tmp_path, "medsiglip")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot be read as JSON"):
        resolve_model_dir(tmp_path, "medsiglip")


def test_version_from_hub_download_metadata(tmp_path):
    model = _config(tmp_path / "medsiglip-448", "siglip", _name_or_path="google/medsiglip-448")
    commit = "0123456789abcdef0123456789abcdef01234567"
    metadata = model / ".cache" / "huggingface" / "download"
    metadata.mkdir(parents=True)
    (metadata / "model.safetensors.metadata").write_text(f"{commit}\netag\n1700000000.0\n")
    identity = model_identity(model)
    assert identity.name == "google/medsiglip-448"
    assert identity.version == commit
    assert identity.random_weights is False


def test_version_from_hub_cache_snapshot_folder(tmp_path):
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    model = _config(tmp_path / "snapshots" / commit, "siglip")
    assert model_identity(model).version == commit


def test_version_falls_back_to_config_digest_that_differs_per_config(tmp_path):
    a = model_identity(_config(tmp_path / "a", "siglip", hidden_size=1))
    b = model_identity(_config(tmp_path / "b", "siglip", hidden_size=2))
    assert a.version.startswith("config-") and b.version.startswith("config-")
    assert a.version != b.version


def test_marker_file_names_random_weight_models(tmp_path):
    model = _config(tmp_path / "tiny", "siglip")
    (model / MODEL_MARKER).write_text(json.dumps({"name": "tiny", "version": "v1", "random_weights": True}))
    identity = model_identity(model)
    assert (identity.name, identity.version, identity.random_weights) == ("tiny", "v1", True)
