"""Worker lifecycle on 127.0.0.1: health transitions, drain, retries, queue bounds, cancellation,
a model that does not load, mutual TLS, and the command line with SIGTERM.

Every worker here is started on an ephemeral port and shut down in ``finally``/fixture teardown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from medgemma_deploy._proto import worker_pb2 as pb
from medgemma_deploy._proto import worker_pb2_grpc
from medgemma_deploy.backends import wire
from medgemma_deploy.backends.grpc_client import RetryPolicy, WorkerClient, WorkerUnavailableError
from medgemma_deploy.backends.local import make_backend
from medgemma_deploy.backends.tls import ClientTLS, ServerTLS
from medgemma_deploy.errors import ModelLoadError, UsageError
from medgemma_deploy.worker.config import WorkerConfig
from medgemma_deploy.worker.edge.server import WorkerServer

pytestmark = pytest.mark.network

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _config(root: Path, **overrides) -> WorkerConfig:
    options = {
        "listen": "127.0.0.1:0",
        "medsiglip": root / "medsiglip",
        "medgemma": root / "medgemma",
        "device": "cpu",
        "drain_timeout": 30,
        "max_new_tokens": 4000,
    }
    return WorkerConfig(**(options | overrides))


def _classify_request() -> pb.ClassifyRequest:
    image = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    return pb.ClassifyRequest(label_set_name="chest-xray", images=[wire.image_to_proto(image)])


def _long_report(max_new_tokens: int) -> pb.GenerateReportRequest:
    return pb.GenerateReportRequest(
        messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="Describe this X-ray")])],
        settings=pb.GenerationSettings(max_new_tokens=max_new_tokens),
    )


def _never_stop(server: WorkerServer) -> None:
    # Reports in these tests must run to max_new_tokens: a random model may emit <end_of_turn> early.
    server.report_service().scheduler.eos_token_ids = frozenset()


def _eventually(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_health_goes_not_serving_serving_not_serving_and_shutdown_drains(tiny_models_root):
    server = WorkerServer(_config(tiny_models_root))
    statuses: list[int] = []
    try:
        server.start()
        channel = grpc.insecure_channel(server.address)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=120
        )

        def follow() -> None:
            with contextlib.suppress(grpc.RpcError):  # the stream ends with the server
                statuses.extend(response.status for response in watch)

        watcher = threading.Thread(target=follow, daemon=True)
        watcher.start()
        assert _eventually(lambda: statuses == [NOT_SERVING])
        stub = worker_pb2_grpc.WorkerStub(channel)
        with pytest.raises(grpc.RpcError) as loading:
            stub.Classify(_classify_request(), timeout=10)
        assert loading.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in loading.value.details()

        server.load()
        assert _eventually(lambda: statuses == [NOT_SERVING, SERVING])
        _never_stop(server)
        in_flight = stub.GenerateReport(_long_report(200), timeout=120)
        assert next(in_flight).WhichOneof("event") == "admitted"

        stopper = threading.Thread(target=server.shutdown)
        stopper.start()
        assert _eventually(lambda: statuses == [NOT_SERVING, SERVING, NOT_SERVING])
        assert server.state == "draining"
        with pytest.raises(grpc.RpcError) as draining:
            stub.Classify(_classify_request(), timeout=10)
        assert draining.value.code() == grpc.StatusCode.UNAVAILABLE
        events = list(in_flight)  # the report admitted before the shutdown is finished, not cut
        assert events[-1].WhichOneof("event") == "final"
        assert events[-1].final.n_generated_tokens == 200
        stopper.join(timeout=60)
        assert server.state == "stopped"
        channel.close()
    finally:
        server.shutdown()


def test_clients_retry_while_the_worker_loads(tiny_models_root, caplog):
    server = WorkerServer(_config(tiny_models_root, medgemma=None))
    try:
        server.start()
        client = WorkerClient(
            server.address, retry=RetryPolicy(max_attempts=30, initial_backoff=0.05, max_backoff=0.5)
        )
        answer: list[pb.ClassifyResponse] = []
        caller = threading.Thread(target=lambda: answer.append(client.call("Classify", _classify_request())))
        with caplog.at_level(logging.WARNING, logger="medgemma_deploy.backends.grpc_client"):
            caller.start()
            assert _eventually(lambda: "UNAVAILABLE" in caplog.text)  # refused while loading, retrying
            server.load()
            caller.join(timeout=60)
        assert answer and answer[0].probabilities.shape
        assert "retry 1/" in caplog.text
        client.close()
    finally:
        server.shutdown()


def test_an_unreachable_worker_fails_after_backoff():
    client = WorkerClient("127.0.0.1:1", retry=RetryPolicy(max_attempts=3, initial_backoff=0.01), timeout=20)
    with pytest.raises(WorkerUnavailableError, match="UNAVAILABLE"):
        client.call("ModelInfo", pb.ModelInfoRequest())
    client.close()


def test_queue_full_and_cancellation_free_capacity(tiny_models_root):
    server = WorkerServer(
        _config(tiny_models_root, medsiglip=None, report_max_running=1, report_max_waiting=1)
    )
    try:
        server.start()
        server.load()
        _never_stop(server)
        with grpc.insecure_channel(server.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            running = stub.GenerateReport(_long_report(3000), timeout=120)
            assert next(running).WhichOneof("event") == "admitted"
            waiting = stub.GenerateReport(_long_report(5), timeout=120)
            assert _eventually(lambda: server.report_service().scheduler.waiting == 1)
            with pytest.raises(grpc.RpcError) as full:
                list(stub.GenerateReport(_long_report(5), timeout=30))
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "report queue is full" in full.value.details()
            assert ("grpc-retry-pushback-ms", "250") in tuple(full.value.trailing_metadata())

            tokens_before_cancel = sum(1 for _ in zip(range(5), running, strict=False))
            running.cancel()  # the client goes away: its decode row goes to the waiting report
            events = list(waiting)
            assert events[0].WhichOneof("event") == "admitted"
            assert events[-1].final.n_generated_tokens == 5
            assert tokens_before_cancel == 5
            assert _eventually(lambda: server.report_service().scheduler.running == 0)

            with pytest.raises(grpc.RpcError) as late:  # a deadline shorter than the report
                list(stub.GenerateReport(_long_report(3000), timeout=1.0))
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert _eventually(lambda: server.report_service().scheduler.running == 0)  # its row is freed
            counted = [
                f'medgemma_worker_requests_total{{code="{code}",method="GenerateReport"}} 1.0'
                for code in ("CANCELLED", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
            ]  # each is recorded once its handler has noticed that the client is gone
            assert _eventually(lambda: all(line in server.metrics.exposition().decode() for line in counted))
    finally:
        server.shutdown()


def test_a_model_that_does_not_load_is_reported_and_the_other_keeps_serving(tiny_models_root, tmp_path):
    broken = tmp_path / "broken-medgemma"
    shutil.copytree(tiny_models_root / "medgemma", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    server = WorkerServer(_config(tiny_models_root, medgemma=broken))
    try:
        server.start()
        server.load()
        with grpc.insecure_channel(server.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            info = {m.kind: m for m in stub.ModelInfo(pb.ModelInfoRequest(), timeout=10).models}
            assert info["medsiglip"].loaded
            assert not info["medgemma"].loaded and str(broken) in info["medgemma"].load_error
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.GenerateReport(_long_report(4), timeout=30))
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"the model at {broken} did not load" in caught.value.details()
            assert stub.Classify(_classify_request(), timeout=30).probabilities.shape
        backend = make_backend(f"grpc://{server.address}", None, None)
        with pytest.raises(ModelLoadError, match="did not load"):
            backend.medgemma.load()
        backend.close()
    finally:
        server.shutdown()


def test_plaintext_is_refused_off_loopback():
    with pytest.raises(UsageError, match="only allowed on a loopback address"):
        WorkerConfig(listen="0.0.0.0:50051", medsiglip=Path("m")).validate()
    WorkerConfig(listen="0.0.0.0:50051", medsiglip=Path("m"), allow_insecure=True).validate()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    folder = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca")
    for name, extensions in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (folder / f"{name}.ext").write_text(extensions)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=test-{name}")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {
        name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    }


def test_mutual_tls_admits_certified_clients_only(tiny_models_root, certificates):
    tls = ServerTLS(certificates["server.pem"], certificates["server.key"], certificates["ca.pem"])
    server = WorkerServer(_config(tiny_models_root, medgemma=None, tls=tls))
    try:
        server.start()
        server.load()
        client_tls = ClientTLS(certificates["ca.pem"], certificates["client.pem"], certificates["client.key"])
        backend = make_backend(f"grpcs://{server.address}", None, None, tls=client_tls)
        image = np.random.default_rng(1).random((24, 24), dtype=np.float32)
        from medgemma_deploy.operators.medsiglip.labels import load_label_sets

        scores = backend.medsiglip.load().score([image], load_label_sets()[0])
        assert scores.probabilities.shape[0] == 1
        backend.close()

        refused = {
            "no client certificate": grpc.ssl_channel_credentials(
                root_certificates=certificates["ca.pem"].read_bytes()
            ),
        }
        for why, credentials in refused.items():
            with grpc.secure_channel(server.address, credentials) as channel:
                with pytest.raises(grpc.RpcError) as caught:
                    worker_pb2_grpc.WorkerStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, why
        with grpc.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                worker_pb2_grpc.WorkerStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(UsageError, match="both a certificate and a key"):
            ClientTLS(certificates["ca.pem"], certificates["client.pem"]).credentials()
    finally:
        server.shutdown()


def _worker_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "medgemma_deploy.apps.worker", *args]


def test_the_worker_command_serves_until_sigterm(tiny_models_root):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        _worker_command("--listen", "127.0.0.1:0", "-m", str(tiny_models_root), "--device", "cpu"),
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
        reader.start()
        assert _eventually(lambda: any("worker serving on" in line for line in lines), timeout=90), "".join(
            lines
        )
        address = next(line for line in lines if "worker serving on" in line).split()[-1]
        with grpc.insecure_channel(address) as channel:
            status = (
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            )
            assert status == SERVING
            info = worker_pb2_grpc.WorkerStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=10)
            assert sorted(m.kind for m in info.models if m.loaded) == ["medgemma", "medsiglip"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        reader.join(timeout=10)
        assert any("draining" in line for line in lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_the_worker_command_refuses_bad_usage_with_one_line(tiny_models_root):
    done = subprocess.run(
        _worker_command("--listen", "0.0.0.0:0", "-m", str(tiny_models_root)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert (
        done.stderr.strip().splitlines()[-1].startswith("medgemma-deploy worker: error: --listen 0.0.0.0:0")
    )
    assert "Traceback" not in done.stderr
