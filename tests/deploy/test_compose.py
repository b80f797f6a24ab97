"""``deploy/compose.yaml`` (Orthanc + listener + GPU worker + Prometheus), checked without docker.

- Compose variable interpolation is applied as ``docker compose`` does, then the result is validated
  against the Compose Specification JSON schema (vendored by the PyPI package check-jsonschema,
  ``check_jsonschema/builtin_schemas/vendor/compose-spec.json``) with ``jsonschema``.
- Every file the compose file references exists; volumes, networks and ports are consistent across
  the services, the Orthanc configuration and the Prometheus targets.
- ``deploy/prometheus/prometheus.yml`` passes ``promtool check config`` (Debian ``prometheus``).
- ``deploy/compose/orthanc.json`` is loaded by a real Orthanc (Debian ``orthanc``) on 127.0.0.1: the
  listener is registered as a modality, and the listener's AE can C-ECHO and open an association
  for the SR/SEG storage classes it sends.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from importlib import resources

import pytest
import yaml

from tests.support import REPO
from tests.support.cli_options import cli_options

DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
ORTHANC_CONFIG = DEPLOY / "compose" / "orthanc.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
SITE_ENV = {"ORTHANC_PASSWORD": "test-password"}

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.DOTALL)


class InterpolationError(ValueError):
    pass


def interpolate(value: object, env: dict[str, str]) -> object:
    """Compose's variable interpolation over every string of a loaded compose file."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("named"):
            return env.get(match.group("named"), "")
        braced = _BRACED.match(match.group("braced"))
        if braced is None:
            raise InterpolationError(f"invalid interpolation format {match.group(0)!r}")
        name, op, arg = braced.group("name"), braced.group("op"), braced.group("arg") or ""
        current = env.get(name)
        unset_or_empty = not current if op and op.startswith(":") else current is None
        if op in (":-", "-"):
            return arg if unset_or_empty else str(current)
        if op in (":?", "?"):
            if unset_or_empty:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return str(current)
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        return current or ""

    return _VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict:
    return interpolate(raw_compose, dict(SITE_ENV))


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (dev extra) vendors the compose schema")
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(schema_file.read_text())


def _validator(schema: dict):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (dev extra) is not installed")
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_compose_file_is_valid_against_the_compose_specification(compose, compose_schema):
    errors = sorted(_validator(compose_schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_schema_rejects_a_misspelt_key(compose, compose_schema):
    # Guards against a schema that accepts anything: a typo must be caught.
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["port"] = broken["services"]["worker"].pop("expose")
    assert list(_validator(compose_schema).iter_errors(broken))


def test_orthanc_password_must_be_set_by_the_site(raw_compose):
    with pytest.raises(InterpolationError, match=r"ORTHANC_PASSWORD.*env\.example"):
        interpolate(raw_compose, {})
    with pytest.raises(InterpolationError, match="ORTHANC_PASSWORD"):
        interpolate(raw_compose, {"ORTHANC_PASSWORD": ""})


def test_env_example_names_every_variable_the_compose_file_uses(raw_compose):
    used = {
        match.group("braced").split(":")[0].split("-")[0].split("?")[0]
        for match in _VARIABLE.finditer(COMPOSE_FILE.read_text())
        if match.group("braced")
    }
    example = (DEPLOY / "env.example").read_text()
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.MULTILINE))
    assert used, "no variables found: the scan is broken"
    assert used <= documented, f"not in deploy/env.example: {sorted(used - documented)}"
    gitignore = (DEPLOY / ".gitignore").read_text().split()
    assert ".env" in gitignore, "the site's .env (passwords) must never be committed"


def test_every_referenced_file_exists(compose):
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context == REPO, f"{name}: build context must be the repository root (.dockerignore)"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and "models" not in source:
                assert (DEPLOY / source).exists(), f"{name}: bind mount source {source} does not exist"


def _command(compose: dict, service: str) -> list[str]:
    return [str(arg) for arg in compose["services"][service]["command"]]


def _option(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def test_volumes_and_networks_are_declared_and_used(compose):
    declared_volumes = set(compose.get("volumes", {}))
    declared_networks = set(compose.get("networks", {}))
    used_volumes, used_networks = set(), set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith(("/", ".", "$")):
                assert source in declared_volumes, f"{name}: volume {source} is not declared"
                used_volumes.add(source)
        networks = service.get("networks", [])
        assert networks, f"{name}: attach every service to a named network"
        assert set(networks) <= declared_networks, f"{name}: undeclared network"
        used_networks.update(networks)
    assert declared_volumes == used_volumes, f"declared but unused: {declared_volumes - used_volumes}"
    assert declared_networks == used_networks


def _shares_network(compose: dict, a: str, b: str) -> bool:
    return bool(set(compose["services"][a]["networks"]) & set(compose["services"][b]["networks"]))


def test_the_worker_gets_the_gpu_and_read_only_models(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    model_mounts = [v for v in worker["volumes"] if v.split(":")[1] == "/models"]
    assert model_mounts and model_mounts[0].endswith(":ro"), "models are mounted read-only"
    argv = _command(compose, "worker")
    assert _option(argv, "--medsiglip").startswith("/models/")
    assert _option(argv, "--medgemma").startswith("/models/")
    assert "--require-all-models" in argv, "a missing model must stop the worker, not halve it"
    assert worker["environment"]["MEDGEMMA_DEPLOY_DEVICE"] == "cuda"
    for other in ("listener", "orthanc", "prometheus"):
        assert "deploy" not in compose["services"][other], f"only the worker reserves the GPU ({other})"


def test_the_listener_reaches_the_worker_it_waits_for(compose):
    worker_port = _host_port(_option(_command(compose, "worker"), "--listen"))[1]
    backend = _option(_command(compose, "listener"), "--backend")
    assert backend == f"grpc://worker:{worker_port}"
    assert str(worker_port) in compose["services"]["worker"]["expose"]
    assert _shares_network(compose, "listener", "worker")
    health = compose["services"]["worker"]["healthcheck"]["test"]
    assert health[-1] == f"127.0.0.1:{worker_port}" and "grpc" in health
    assert compose["services"]["listener"]["depends_on"]["worker"]["condition"] == "service_healthy"
    # gRPC stays on an internal network: nothing outside the box reaches the worker.
    inference = set(compose["services"]["worker"]["networks"])
    assert all(compose["networks"][net].get("internal") for net in inference)
    assert "ports" not in compose["services"]["worker"]


def test_the_listener_spool_is_a_volume_at_its_spool_path(compose):
    spool = _option(_command(compose, "listener"), "--spool")
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["listener"]["volumes"]}
    assert spool in mounts and mounts[spool] in compose["volumes"]


def _published(service: dict) -> dict[int, str]:
    published = {}
    for mapping in service.get("ports", []):
        address, host_port, container_port = mapping.rsplit(":", 2)
        assert host_port == container_port
        published[int(container_port)] = address
    return published


def test_published_ports_match_the_commands_and_bind_to_the_site_address(compose, raw_compose):
    listener_port = int(_option(_command(compose, "listener"), "--port"))
    assert listener_port in _published(compose["services"]["listener"])
    orthanc = json.loads(ORTHANC_CONFIG.read_text())
    assert {orthanc["DicomPort"], orthanc["HttpPort"]} <= set(_published(compose["services"]["orthanc"]))
    for name, service in raw_compose["services"].items():
        for mapping in service.get("ports", []):
            assert mapping.startswith("${MEDGEMMA_BIND_ADDRESS:-127.0.0.1}:"), (
                f"{name}: {mapping} would listen on every interface; default to 127.0.0.1"
            )


def test_the_listener_and_orthanc_know_each_other(compose):
    orthanc = json.loads(ORTHANC_CONFIG.read_text())
    listener = _command(compose, "listener")
    aet, _, address = _option(listener, "--destination").partition("@")
    host, port = _host_port(address)
    assert (aet, host, port) == (orthanc["DicomAet"], "orthanc", orthanc["DicomPort"])
    assert _shares_network(compose, "listener", "orthanc")
    modality = orthanc["DicomModalities"]["medgemma"]
    assert modality["AET"] == _option(listener, "--ae-title")
    assert modality["Host"] == "listener"
    assert modality["Port"] == int(_option(listener, "--port"))
    assert orthanc["AuthenticationEnabled"] is True
    assert "RegisteredUsers" not in orthanc, "credentials come from the environment, not from a file"


def test_prometheus_scrapes_the_worker_and_the_listener(compose):
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    for service in ("worker", "listener"):
        port = int(_option(_command(compose, service), "--metrics-port"))
        assert f"{service}:{port}" in targets
        assert str(port) in compose["services"][service]["expose"]
        assert _shares_network(compose, "prometheus", service)
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_promtool_accepts_the_prometheus_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    proc = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("service", "subcommand"), [("worker", "worker"), ("listener", "listen")])
def test_compose_commands_use_only_flags_the_cli_accepts(compose, service, subcommand):
    argv = _command(compose, service)
    if argv[0] == subcommand:  # the app image's entrypoint is `medgemma-deploy`
        argv = argv[1:]
    flags = {arg for arg in argv if arg.startswith("--")}
    unknown = flags - cli_options(subcommand)
    assert not unknown, f"{service}: `medgemma-deploy {subcommand}` rejects {sorted(unknown)}"


def test_deployment_docs_name_only_files_that_exist():
    docs = (REPO / "docs" / "deployment.md").read_text()
    paths = set(re.findall(r"`((?:deploy|apps|docs)/[\w./-]+)`", docs))
    assert paths, "the deployment page names no files: the scan is broken"
    missing = sorted(p for p in paths if not (REPO / p.rstrip("/")).exists())
    assert not missing, f"docs/deployment.md names missing files: {missing}"
    assert "docker compose up" in docs


# ---- a real Orthanc with the compose configuration --------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, background_process):
    binary = shutil.which("Orthanc")
    if binary is None:
        pytest.skip("Orthanc not installed (Debian package orthanc)")
    folder = tmp_path_factory.mktemp("orthanc")
    config = json.loads(ORTHANC_CONFIG.read_text())
    dicom_port, http_port = _free_port(), _free_port()
    # What the compose file changes at run time: ports on 127.0.0.1, storage, the user from .env.
    config.update(
        DicomPort=dicom_port,
        HttpPort=http_port,
        RemoteAccessAllowed=False,
        StorageDirectory=str(folder / "db"),
        IndexDirectory=str(folder / "db"),
        RegisteredUsers={"orthanc": SITE_ENV["ORTHANC_PASSWORD"]},
    )
    config_file = folder / "orthanc.json"
    config_file.write_text(json.dumps(config))
    process, _ = background_process(
        [binary, str(config_file)], folder / "orthanc.log", stop_timeout_s=15, cwd=folder
    )
    auth = base64.b64encode(f"orthanc:{SITE_ENV['ORTHANC_PASSWORD']}".encode()).decode()

    def get(path: str) -> object:
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}")
        request.add_header("Authorization", f"Basic {auth}")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited with {process.returncode}: {(folder / 'orthanc.log').read_text()}")
        try:
            get("/system")
            break
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail("Orthanc did not answer within 30 s")
            time.sleep(0.2)
    return {"dicom_port": dicom_port, "get": get, "aet": config["DicomAet"]}


def test_orthanc_registers_the_listener_as_a_modality(orthanc, compose):
    modalities = orthanc["get"]("/modalities?expand")
    listener = _command(compose, "listener")
    assert modalities["medgemma"]["AET"] == _option(listener, "--ae-title")
    assert modalities["medgemma"]["Host"] == "listener"
    assert int(modalities["medgemma"]["Port"]) == int(_option(listener, "--port"))


def test_the_listener_ae_can_deliver_sr_and_seg_to_orthanc(orthanc, compose):
    pynetdicom = pytest.importorskip("pynetdicom", reason="pynetdicom (the network extra) is not installed")
    from pynetdicom.sop_class import (
        Comprehensive3DSRStorage,
        EnhancedSRStorage,
        SegmentationStorage,
        Verification,
    )

    listener_aet = _option(_command(compose, "listener"), "--ae-title")
    destination_aet = _option(_command(compose, "listener"), "--destination").partition("@")[0]
    ae = pynetdicom.AE(ae_title=listener_aet)
    for context in (Verification, Comprehensive3DSRStorage, EnhancedSRStorage, SegmentationStorage):
        ae.add_requested_context(context)
    assoc = ae.associate("127.0.0.1", orthanc["dicom_port"], ae_title=destination_aet)
    assert assoc.is_established, "Orthanc refused the listener's association"
    try:
        accepted = {context.abstract_syntax for context in assoc.accepted_contexts}
        assert {Comprehensive3DSRStorage, SegmentationStorage} <= accepted
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()
    # DicomCheckCalledAet is on: a misconfigured destination AE title is refused, not ignored.
    wrong = ae.associate("127.0.0.1", orthanc["dicom_port"], ae_title="NOT-ORTHANC")
    assert not wrong.is_established
    if wrong.is_established:
        wrong.release()


def test_interpolation_helper_follows_compose_rules():
    env = {"SET": "value", "EMPTY": ""}
    assert (
        interpolate("${SET:-x}|${EMPTY:-d}|${EMPTY-d}|${UNSET-d}|$$SET|$SET", env) == "value|d||d|$SET|value"
    )
    with pytest.raises(InterpolationError, match="UNSET is missing a value: why"):
        interpolate("${UNSET?why}", env)
