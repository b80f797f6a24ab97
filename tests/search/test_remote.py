"""Search through a real gRPC worker (``--like`` and text) gives the local backend's hits.

The worker serves the tiny models on 127.0.0.1 (ephemeral port); the index is made locally with the
same model directory, so both backends carry the same model identity.
"""

import json

import numpy as np
import pydicom
import pytest

from medgemma_deploy.cli.main import main
from medgemma_deploy.worker.edge.server import WorkerServer
from tests.support.demo_index import index_demo_study
from tests.support.loopback_worker import loopback_worker_config

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def worker(tiny_models_root):
    with WorkerServer(loopback_worker_config(tiny_models_root)) as server:
        yield server


@pytest.fixture(scope="module")
def indexed(tiny_models_root, tmp_path_factory):
    return index_demo_study(tiny_models_root, tmp_path_factory.mktemp("search"))


def test_like_search_through_the_worker_matches_the_local_backend(worker, indexed, tiny_models_root, capsys):
    url, files = indexed.url, indexed.files
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
    url = indexed.url
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
