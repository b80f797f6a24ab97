"""The MONAI Application Package (MAP) contract, without docker.

``deploy/map/map_layout.py`` lays out what ``monai-deploy package`` (holoscan-cli <= 4.2) puts in a
MAP image: ``/opt/holoscan/app``, ``/opt/holoscan/models/<name>``, ``/etc/holoscan/app.json`` and
``pkg.json``, ``/var/holoscan/{input,output}``, under a temporary root. The apps then run from that
layout with only the MAP's ``HOLOSCAN_*`` variables, as the MAP entry point runs them: locally, with
``--backend grpc://`` to a worker on 127.0.0.1, and in the bad cases a MAP meets (no models, an
empty input folder), which must end with a clear message and a non-zero exit, never a hang.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

APPS = ("classify", "report", "study")
#: What each app needs under /opt/holoscan/models.
APP_MODELS = {"classify": ("medsiglip",), "report": ("medgemma",), "study": ("medsiglip", "medgemma")}
#: The keys holoscan-cli 4.2 writes into each manifest (packager/manifest_files.py).
APP_JSON_KEYS = {
    "apiVersion", "command", "environment", "input", "liveness", "output", "readiness", "sdk", "sdkVersion",
    "timeout", "version", "workingDirectory",
}  # fmt: skip
PKG_JSON_KEYS = {
    "apiVersion",
    "applicationRoot",
    "modelRoot",
    "models",
    "resources",
    "version",
    "platformConfig",
}
APP_TIMEOUT_S = 300


def _load_map_layout():
    spec = importlib.util.spec_from_file_location("map_layout", REPO / "deploy" / "map" / "map_layout.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["map_layout"] = module
    spec.loader.exec_module(module)
    return module


map_layout = _load_map_layout()


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement_name(line: str) -> str:
    return re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


# ---- app.yaml and requirements.txt ------------------------------------------------------------


@pytest.mark.parametrize("app", APPS)
def test_app_yaml_is_what_the_packager_needs(app):
    config = map_layout.read_app_config(REPO / "apps" / app / "app.yaml")
    assert str(config["application"]["version"]) == _pyproject()["project"]["version"]
    resources = config["resources"]
    assert resources["gpu"] >= 1
    for key in ("memory", "gpuMemory", "sharedMemory"):
        assert re.fullmatch(r"\d+(\.\d+)?(Mi|Gi)", str(resources[key])), f"{app}: {key}={resources[key]}"
    assert config["application"]["input-formats"] == ["file"]


def _gib(quantity: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(Mi|Gi)", quantity).groups()
    return float(value) / (1024 if unit == "Mi" else 1)


def test_gpu_memory_follows_the_models_each_app_loads():
    gpu = {
        app: _gib(map_layout.read_app_config(REPO / "apps" / app / "app.yaml")["resources"]["gpuMemory"])
        for app in APPS
    }
    # MedGemma 4B (~8.6 GB bf16) needs far more than MedSigLIP (~1.8 GB); study holds both.
    assert gpu["classify"] < gpu["report"] < gpu["study"]
    assert gpu["report"] >= 9 and gpu["classify"] >= 2


@pytest.mark.parametrize("app", APPS)
def test_requirements_cover_the_package_dependencies(app):
    listed = {
        _requirement_name(line)
        for line in (REPO / "apps" / app / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    needed = {_requirement_name(r) for r in project["dependencies"] + extras["compression"]}
    needed |= {"grpcio", "protobuf"}  # the client side of --backend grpc://
    assert needed <= listed, f"{app}/requirements.txt misses {sorted(needed - listed)}"
    assert "medgemma-deploy" not in listed, "the package is not on PyPI: build-map.sh adds it with --add"


def test_build_script_uses_the_packager_contract():
    script = (REPO / "deploy" / "map" / "build-map.sh").read_text()
    assert "monai-deploy" in script and "package" in script
    for flag in ("--config", "--add", "--tag", "--platform"):
        assert flag in script
    map_build = _pyproject()["project"]["optional-dependencies"]["map-build"]
    assert any(re.fullmatch(r"holoscan-cli>=4,?<=4\.2(\.0)?", r.replace(" ", "")) for r in map_build), (
        map_build
    )
    proc = subprocess.run(
        ["bash", "-n", str(REPO / "deploy" / "map" / "build-map.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    usage = subprocess.run(
        ["bash", str(REPO / "deploy" / "map" / "build-map.sh"), "nosuchapp"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_workflow_manager_example_runs_the_map_as_packaged():
    workflow = json.loads((REPO / "deploy" / "map" / "workflow-classify.json").read_text())
    tasks = {task["id"]: task for task in workflow["tasks"]}
    docker = [task for task in workflow["tasks"] if task["type"] == "docker"]
    assert len(docker) == 1
    args = docker[0]["args"]
    manifest = map_layout.app_manifest(map_layout.read_app_config(REPO / "apps" / "classify" / "app.yaml"))
    command = args["command"].split()
    packaged = json.loads(manifest["command"])
    # The packaged command (python3 /opt/holoscan/app), with our flags after it.
    assert command[0] == packaged[0]
    assert packaged[1] in [word.rstrip("/") for word in command]
    assert command[command.index("--backend") + 1].startswith(("grpc://", "grpcs://"))
    folders = {
        "HOLOSCAN_INPUT_PATH": "input",
        "HOLOSCAN_OUTPUT_PATH": "output",
        "HOLOSCAN_MODEL_PATH": "models",
    }
    for variable, folder in folders.items():
        assert args[f"env_{variable}"].rstrip("/") == str(map_layout.MAP_PATHS[folder])
    # The output artifact goes to an export task that sends it to a destination the gateway knows.
    export = tasks[docker[0]["task_destinations"][0]["name"]]
    assert export["type"] == "export"
    assert (
        f"executions.{docker[0]['id']}.artifacts.env_HOLOSCAN_OUTPUT_PATH"
        in export["artifacts"]["input"][0]["value"]
    )
    destinations = {d["Name"] for d in export["export_destinations"]}
    assert destinations <= set(workflow["informatics_gateway"]["export_destinations"])


# ---- the layout -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory) -> list[Path]:
    from medgemma_deploy.dev.synthetic import write_demo_study

    return write_demo_study(tmp_path_factory.mktemp("study"))


@pytest.fixture
def chest_cr(demo_study) -> Path:
    """Only the chest CR of the synthetic study: what every app handles, and quick to run."""
    import pydicom

    found = [p for p in demo_study if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CR"]
    assert found, "the synthetic study has no CR"
    return found[0]


def _fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_layout_follows_the_map_contract(tmp_path):
    model = _fake_model(tmp_path / "medsiglip-448")
    input_file = tmp_path / "in" / "image.dcm"
    input_file.parent.mkdir()
    input_file.write_bytes(b"\0" * 132)
    layout = map_layout.lay_out_map(
        tmp_path / "root",
        REPO / "apps" / "classify",
        models={"medsiglip": model},
        input_path=input_file.parent,
    )
    root = tmp_path / "root"
    assert (root / "opt/holoscan/app/__main__.py").is_file()
    assert (root / "opt/holoscan/app/app.yaml").is_file()
    assert (root / "opt/holoscan/models/medsiglip/config.json").is_file()
    assert (root / "var/holoscan/input/image.dcm").is_file()
    assert (root / "var/holoscan/output").is_dir() and not any((root / "var/holoscan/output").iterdir())
    assert (root / "var/holoscan/app.yaml").read_text() == (REPO / "apps/classify/app.yaml").read_text()

    app_json = json.loads((root / "etc/holoscan/app.json").read_text())
    assert set(app_json) == APP_JSON_KEYS
    assert json.loads(app_json["command"]) == ["python3", "/opt/holoscan/app"]
    assert app_json["environment"]["HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models"
    assert app_json["workingDirectory"] == "/var/holoscan"
    assert app_json["input"]["path"] == "input/" and app_json["output"]["path"] == "output/"

    pkg_json = json.loads((root / "etc/holoscan/pkg.json").read_text())
    assert set(pkg_json) == PKG_JSON_KEYS
    assert pkg_json["models"] == {"medsiglip": "/opt/holoscan/models/medsiglip"}
    assert pkg_json["resources"] == yaml.safe_load((REPO / "apps/classify/app.yaml").read_text())["resources"]

    env = layout.environment()
    assert env["HOLOSCAN_INPUT_PATH"] == str(root / "var/holoscan/input")
    assert env["HOLOSCAN_MODEL_PATH"] == str(root / "opt/holoscan/models")
    assert layout.command() == [sys.executable, str(root / "opt/holoscan/app")]


def test_layout_refuses_what_the_packager_refuses(tmp_path):
    not_an_app = tmp_path / "lib"
    not_an_app.mkdir()
    (not_an_app / "app.yaml").write_text("application: {title: x, version: 1}\nresources: {}\n")
    with pytest.raises(map_layout.MapConfigError, match=r"no __main__\.py"):
        map_layout.lay_out_map(tmp_path / "r1", not_an_app)
    (not_an_app / "__main__.py").write_text("")
    (not_an_app / "app.yaml").write_text("application: {version: 1}\nresources: {}\n")
    with pytest.raises(map_layout.MapConfigError, match=r"application>title"):
        map_layout.lay_out_map(tmp_path / "r2", not_an_app)
    (not_an_app / "app.yaml").write_text("application: {title: x, version: 1}\n")
    with pytest.raises(map_layout.MapConfigError, match="resources"):
        map_layout.lay_out_map(tmp_path / "r3", not_an_app)
    with pytest.raises(FileNotFoundError, match="medsiglip"):
        map_layout.lay_out_map(
            tmp_path / "r4", REPO / "apps/classify", models={"medsiglip": tmp_path / "none"}
        )


# ---- running the apps from the layout ---------------------------------------------------------


def _app_available(app: str) -> None:
    pytest.importorskip("holoscan", reason="the MONAI Deploy extra (holoscan) is not installed")
    if not (REPO / "apps" / app / "__main__.py").is_file():
        pytest.skip(f"apps/{app}/__main__.py does not exist yet (the {app} app is being written)")
    if importlib.util.find_spec(f"medgemma_deploy.apps.{app}") is None:
        pytest.skip(f"medgemma_deploy.apps.{app} is not importable yet")


@pytest.fixture(scope="module")
def models_root(request, tmp_path_factory) -> Path:
    """The tiny random models (shared with the suite's ``tiny_models_root`` when conftest has it)."""
    try:
        return Path(request.getfixturevalue("tiny_models_root"))
    except pytest.FixtureLookupError:
        from medgemma_deploy.dev.testmodels import make_test_models

        root = tmp_path_factory.mktemp("models")
        make_test_models(root)
        return root


def _map(tmp_path: Path, app: str, models_root: Path | None, input_path: Path | None):
    models = {name: models_root / name for name in APP_MODELS[app]} if models_root else {}
    return map_layout.lay_out_map(tmp_path / "map", REPO / "apps" / app, models=models, input_path=input_path)


def _check_results(layout, app: str) -> dict:
    import pydicom

    output = layout.path("output")
    results = json.loads((output / "results.json").read_text())
    assert results["status"] == "complete", results.get("rejected")
    assert results["outputs"], "the app wrote nothing"
    for written in results["outputs"]:
        path = output / written["path"]
        assert path.is_file()
        if path.suffix == ".dcm":
            dataset = pydicom.dcmread(path, stop_before_pixels=True)
            assert dataset.SOPInstanceUID == written["sop_instance_uid"]
    kinds = {written["kind"] for written in results["outputs"]}
    if app in ("classify", "study"):
        assert "SR" in kinds
    if app in ("report", "study"):
        assert "REPORT-SR" in kinds
    return results


@pytest.mark.holoscan
@pytest.mark.parametrize("app", APPS)
def test_app_runs_from_the_map_layout(app, tmp_path, request, chest_cr):
    _app_available(app)
    models_root = request.getfixturevalue("models_root")  # after the skip: making models costs time
    # One CR keeps each run short; tests/test_classify_app.py runs whole studies through the apps.
    layout = _map(tmp_path, app, models_root, chest_cr)
    proc = layout.run(timeout=APP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_results(layout, app)


@pytest.mark.holoscan
def test_map_without_models_exits_2_with_one_line(tmp_path, chest_cr):
    _app_available("classify")
    layout = _map(tmp_path, "classify", None, chest_cr)
    proc = layout.run(timeout=APP_TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [
        line for line in proc.stderr.splitlines() if line.startswith("medgemma_deploy.apps.classify: error:")
    ]
    assert len(errors) == 1 and "medsiglip" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not any(layout.path("output").iterdir()), "nothing is written when the models are missing"


@pytest.mark.holoscan
def test_map_with_an_empty_input_folder_exits_non_zero_naming_it(tmp_path, request):
    _app_available("classify")
    models_root = request.getfixturevalue("models_root")
    layout = _map(tmp_path, "classify", models_root, None)
    proc = layout.run(timeout=APP_TIMEOUT_S)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [
        line for line in proc.stderr.splitlines() if line.startswith("medgemma_deploy.apps.classify: error:")
    ]
    assert len(errors) == 1 and str(layout.path("input")) in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


# ---- --backend grpc:// to a worker on 127.0.0.1 -----------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_available() -> None:
    from medgemma_deploy.cli.main import build_parser

    choices = build_parser()._subparsers._group_actions[0].choices
    if "worker" not in choices:
        pytest.skip("`medgemma-deploy worker` does not exist yet (the gRPC worker is being written)")


def _backend_flag_available() -> None:
    import argparse

    from medgemma_deploy.apps import holoscan_runtime

    if hasattr(holoscan_runtime, "_our_arguments"):
        parser = holoscan_runtime._our_arguments()
    else:
        parser = argparse.ArgumentParser()
        holoscan_runtime.add_run_arguments(parser)
    if "--backend" not in parser._option_string_actions:
        pytest.skip("the apps have no --backend flag yet (apps/holoscan_runtime.py)")


@pytest.fixture(scope="module")
def worker(models_root, tmp_path_factory, background_process):
    pytest.importorskip("grpc", reason="grpcio (the worker extra) is not installed")
    _worker_available()
    port, metrics_port = _free_port(), _free_port()
    process, log = background_process(
        [
            sys.executable, "-m", "medgemma_deploy", "worker", "--listen", f"127.0.0.1:{port}",
            "--medsiglip", str(models_root / "medsiglip"), "--medgemma", str(models_root / "medgemma"),
            "--metrics-port", str(metrics_port),
        ],
        tmp_path_factory.mktemp("worker") / "worker.log",
        stop_timeout_s=30,
        env={**os.environ, "MEDGEMMA_DEPLOY_DEVICE": "cpu"},
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    probe = [
        sys.executable,
        str(REPO / "deploy" / "docker" / "healthcheck.py"),
        "--timeout",
        "2",
        "grpc",
        address,
    ]
    deadline = time.monotonic() + 180
    while subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"the worker exited with {process.returncode}: {log.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail("the worker did not become SERVING within 180 s")
        time.sleep(0.5)
    return address


@pytest.mark.holoscan
@pytest.mark.network
@pytest.mark.parametrize("app", APPS)
def test_app_runs_from_the_map_layout_with_a_grpc_backend(app, tmp_path, request, chest_cr):
    _app_available(app)
    _backend_flag_available()
    _worker_available()
    worker = request.getfixturevalue("worker")
    # A MAP that uses the shared worker carries no models and needs no GPU of its own.
    layout = _map(tmp_path, app, None, chest_cr)
    proc = layout.run(["--backend", f"grpc://{worker}"], timeout=APP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _check_results(layout, app)
    assert results["models"], "results.json names the models the worker ran"
