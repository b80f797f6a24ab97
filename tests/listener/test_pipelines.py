"""Every run setting reaches the listener's pipelines (issue 11: PipelineOptions dropped two of them).

The settings come the way a deployment gives them, as ``MEDGEMMA_DEPLOY_*`` environment variables,
through ``medgemma-deploy listen``'s own configuration (``build_config``) into the pipeline the
listener builds. The table below must name every setting of ``settings.SETTINGS_TABLE``: a setting
added later fails here until the listener's pipelines receive it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import medgemma_deploy.config
from medgemma_deploy.cli import listen as listen_command
from medgemma_deploy.dev.synthetic import write_demo_study
from medgemma_deploy.listener.pipelines import make_pipeline
from medgemma_deploy.settings import SETTINGS_TABLE

CONFIG_DIR = Path(medgemma_deploy.config.__file__).parent
LABELS = CONFIG_DIR / "labels" / "chest_xray.yaml"
PROMPTS = CONFIG_DIR / "prompts.yaml"
#: Where results would go (nothing is sent: no listener is started here).
PACS = ("--destination", "PACS@127.0.0.1:104")

#: setting → (environment value, what the built pipeline (and its engine) must then hold). Every
#: value differs from the setting's default, so a dropped setting fails.
SETTING_EFFECTS = {
    "backend": ("grpc://127.0.0.1:1", lambda built: built.engine.backend == "grpc://127.0.0.1:1"),
    "device": ("cpu", lambda built: built.engine.options.device == "cpu"),
    "precision": ("bf16", lambda built: built.engine.options.precision == "bf16"),
    "labels": (str(LABELS), lambda built: built.engine.options.label_files == (LABELS,)),
    "relevance_top_k": ("1", lambda built: built.engine.classify_options.relevance_top_k == 1),
    "relevance_format": ("seg", lambda built: built.engine.classify_options.relevance_format == "seg"),
    "write_embeddings": ("true", lambda built: built.engine.classify_options.write_embeddings is True),
    "prompts": (str(PROMPTS), lambda built: built.engine.options.prompts_file == PROMPTS),
    "max_new_tokens": ("7", lambda built: built.engine.report_options.settings.max_new_tokens == 7),
    "with_findings": ("true", lambda built: built.engine.report_options.with_findings is True),
    "max_frame_megapixels": (
        "7",
        lambda built: built.engine.classify_options.budget.max_frame_megapixels == 7,
    ),
    "max_series_frames": ("9", lambda built: built.engine.classify_options.budget.max_series_frames == 9),
    "max_series_decoded_mib": (
        "11",
        lambda built: built.engine.classify_options.budget.max_series_decoded_bytes == 11 * 2**20,
    ),
    "cache_dir": (
        "/tmp/medgemma-cache-elsewhere",
        lambda built: built.engine.options.cache_dir == Path("/tmp/medgemma-cache-elsewhere"),
    ),
    # Where the listener indexes: the default store once index is on, or the store named.
    "index": ("true", lambda built: built.index_store == "sqlite:///medgemma-index.db"),
    "store": ("sqlite:///elsewhere.db", lambda built: built.index_store == "sqlite:///elsewhere.db"),
}
#: Other variables a setting needs to show its effect (a store is used only with index on).
CONTEXT = {"store": {"MEDGEMMA_DEPLOY_INDEX": "true"}}


def _listen_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    listen_command.add_arguments(parser)
    return parser.parse_args(argv)


def test_the_table_covers_every_setting():
    assert set(SETTING_EFFECTS) == set(SETTINGS_TABLE)


@pytest.mark.parametrize("pipeline", ["classify", "report", "study"])
@pytest.mark.parametrize("setting", sorted(SETTINGS_TABLE))
def test_each_setting_set_by_environment_reaches_the_listener_pipeline(tmp_path, setting, pipeline):
    variable = SETTINGS_TABLE[setting][0]
    value, took_effect = SETTING_EFFECTS[setting]
    spool = str(tmp_path / "spool")
    args = _listen_args("--spool", spool, "-m", str(tmp_path), "--pipeline", pipeline, *PACS)
    context = CONTEXT.get(setting, {})
    config = listen_command.build_config(args, {**context, variable: value})
    built = make_pipeline(config.pipeline, config.pipeline_options)  # built, not loaded
    assert took_effect(built), f"{variable}={value} did not reach the {pipeline} pipeline"
    # And without the variable the engine holds something else: the check above can fail.
    default = make_pipeline(config.pipeline, listen_command.build_config(args, context).pipeline_options)
    assert not took_effect(default)


def test_the_listener_flag_and_variable_win_over_the_run_settings(tmp_path):
    flag = ("--backend", "grpc://127.0.0.1:2")
    args = _listen_args("--spool", str(tmp_path), *flag, "--pipeline", "report", *PACS)
    environ = {"MEDGEMMA_DEPLOY_BACKEND": "grpc://127.0.0.1:1"}
    assert (
        listen_command.build_config(args, environ).pipeline_options.settings.backend == "grpc://127.0.0.1:2"
    )
    args = _listen_args("--spool", str(tmp_path), "--pipeline", "report", *PACS)
    environ["MEDGEMMA_LISTENER_BACKEND"] = "grpc://127.0.0.1:3"
    assert (
        listen_command.build_config(args, environ).pipeline_options.settings.backend == "grpc://127.0.0.1:3"
    )


def test_report_settings_from_the_environment_shape_the_listener_s_reports(tmp_path, tiny_models_root):
    """Through a loaded pipeline: report length, findings grounding and embeddings, in results.json."""
    study = tmp_path / "study"
    write_demo_study(study)
    args = _listen_args(
        "--spool", str(tmp_path / "spool"), "-m", str(tiny_models_root), "--pipeline", "study", *PACS
    )
    environ = {
        "MEDGEMMA_DEPLOY_MAX_NEW_TOKENS": "3",
        "MEDGEMMA_DEPLOY_WITH_FINDINGS": "true",
        "MEDGEMMA_DEPLOY_EMBEDDINGS": "true",
        "MEDGEMMA_DEPLOY_DEVICE": "cpu",
    }
    config = listen_command.build_config(args, environ)
    pipeline = make_pipeline(config.pipeline, config.pipeline_options)
    pipeline.open()
    try:
        pipeline.process(study, tmp_path / "out", result_version=1)
    finally:
        pipeline.close()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    series = results["series"]
    assert series and all(s["report"]["settings"]["max_new_tokens"] == 3 for s in series)
    assert all(s["report"]["n_generated_tokens"] <= 3 for s in series)
    assert all(s["report"]["findings_grounded"] for s in series)
    assert all("embeddings_file" in s for s in series)
    segmentations = [o for o in results["outputs"] if o["kind"] == "SEG"]
    assert segmentations, "relevance SEGs are written"
    assert all((tmp_path / "out" / o["path"]).is_file() for o in results["outputs"])
