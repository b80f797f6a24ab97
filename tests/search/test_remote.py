"""Search through a real gRPC worker (``--like`` and text) gives the local backend's hits.

The worker serves the tiny models on 127.0.0.1 (ephemeral port); the index is made locally with the
same model directory, so both backends carry the same model identity.
"""

import json

import numpy as np
import pydicom
import pytest

from medgemma_deploy.cli.main import main
from medgemma_deploy.dev.synthetic import write_demo_study
from medgemma_deploy.worker.config import WorkerConfig
from medgemma_deploy.worker.edge.server import WorkerServer

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def worker(tiny_models_root):
    config = WorkerConfig(
        listen="127.0.0.1:0",
        medsiglip=tiny_models_root / "medsiglip",
        medgemma=tiny_models_root / "medgemma",
        device="cpu",
        metrics_port=0,
        drain_timeout=10,
    )
    with WorkerServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def indexed(tiny_models_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    files = write_demo_study(folder)
    url = f"sqlite:///{tmp_path_factory.mktemp('index') / 'index.db'}"
    assert main(["index", "-i", str(folder), "-m", str(tiny_models_root), "--store", url]) == 0
    return url, files


def test_like_search_through_the_worker_matches_the_local_backend(worker, indexed, tiny_models_root, capsys):
    url, files = indexed
    example = str(files[2])
    capsys.readouterr()
    assert main(["search", "--like", example, "--store", url, "-m", str(tiny_models_root), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert (
        main(["search", "--like", example, "--store", url, "--backend", f"grpc://{worker.address}", "--json"])
        == 0
    )
    remote = json.loads(capsys.readouterr().out)
    assert (
        remote["hits"][0]["sop_instance_uid"]
        == pydicom.dcmread(files[2], stop_before_pixels=True).SOPInstanceUID
    )
    assert [h["sop_instance_uid"] for h in remote["hits"]] == [h["sop_instance_uid"] for h in local["hits"]]
    for a, b in zip(remote["hits"], local["hits"], strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_text_search_through_the_worker_matches_the_local_backend(worker, indexed, tiny_models_root, capsys):
    url, _ = indexed
    query = "a chest x-ray showing a pneumothorax"
    capsys.readouterr()
    assert main(["search", query, "--store", url, "-m", str(tiny_models_root), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert main(["search", query, "--store", url, "--backend", f"grpc://{worker.address}", "--json"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert local["hits"], "the index holds the demo study"
    assert [h["sop_instance_uid"] for h in remote["hits"]] == [h["sop_instance_uid"] for h in local["hits"]]
    for a, b in zip(remote["hits"], local["hits"], strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_worker_text_embeddings_equal_the_in_process_ones(worker, tiny_models_root):
    from medgemma_deploy.backends.local import make_backend

    texts = ["a chest x-ray showing a pneumothorax", "Пневмоторакс", "normal study"]
    with (
        make_backend("local", tiny_models_root, "cpu") as local,
        make_backend(f"grpc://{worker.address}", None, None) as remote,
    ):
        local.medsiglip.load()
        remote.medsiglip.load()
        expected = local.medsiglip.embed_texts(texts)
        got = remote.medsiglip.embed_texts(texts)
        dim = local.medsiglip.embedding_dim
    assert got.shape == expected.shape == (3, dim)
    np.testing.assert_allclose(got, expected, atol=1e-6)
