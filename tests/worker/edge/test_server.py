"""A real worker on 127.0.0.1 (ephemeral port) serving the tiny models: parity, concurrency, bad input.

One worker for the module (started and always shut down by the fixture). The in-process models
are the reference: the same study through ``--backend local`` and ``--backend grpc://`` must give
equal probabilities, maps and greedy report tokens (and the report tokens equal plain transformers
``model.generate``'s).
"""

from __future__ import annotations

import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from medgemma_deploy._proto import worker_pb2 as pb
from medgemma_deploy._proto import worker_pb2_grpc
from medgemma_deploy.backends import wire
from medgemma_deploy.backends.local import make_backend
from medgemma_deploy.domain import GenerationSettings
from medgemma_deploy.errors import InputError
from medgemma_deploy.operators.medgemma.prompts import PromptBook
from medgemma_deploy.operators.medgemma.request import build_report_request
from medgemma_deploy.operators.medsiglip.classification import classify_series
from medgemma_deploy.operators.medsiglip.labels import load_label_sets, select_label_set
from medgemma_deploy.worker.config import WorkerConfig
from medgemma_deploy.worker.edge.server import WorkerServer
from tests.support.lowbit import needs_lowbit
from tests.support.real_size import write_large_radiograph, write_multislice_ct, write_real_cr
from tests.support.transformers_reference import plain_greedy

pytestmark = pytest.mark.network


@pytest.fixture(scope="module")
def worker(tiny_models_root):
    config = WorkerConfig(
        listen="127.0.0.1:0",
        medsiglip=tiny_models_root / "medsiglip",
        medgemma=tiny_models_root / "medgemma",
        device="cpu",
        metrics_port=0,
        max_message_bytes=2 * 1024 * 1024,
        max_images_per_request=64,
        classify_max_queue_delay=0.02,
        default_max_new_tokens=16,
        max_new_tokens=64,
        drain_timeout=10,
    )
    with WorkerServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def stub(worker):
    with grpc.insecure_channel(worker.address) as channel:
        yield worker_pb2_grpc.WorkerStub(channel)


@pytest.fixture(scope="module")
def backends(worker, tiny_models_root):
    local = make_backend("local", tiny_models_root, "cpu")
    remote = make_backend(f"grpc://{worker.address}", None, None)
    for backend in (local, remote):
        backend.medsiglip.load()
        backend.medgemma.load()
    yield local, remote
    local.close()
    remote.close()


@pytest.fixture(scope="module")
def demo_series(tmp_path_factory):
    from medgemma_deploy.dev.synthetic import write_demo_study
    from medgemma_deploy.operators.dicom_input.reader import load_study_input

    folder = tmp_path_factory.mktemp("demo-study")
    write_demo_study(folder)
    studies = load_study_input(folder).studies
    return {series.modality: series for study in studies for series in study.series}


def _label_set():
    return select_label_set(load_label_sets(), "CR", "CHEST")


def _image(seed: int, shape=(48, 40)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


# -- serving basics ------------------------------------------------------------------------------


def test_health_reflection_and_model_info(worker, stub):
    with grpc.insecure_channel(worker.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "medgemma_deploy.v1.Worker"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for answer in answers for s in answer.list_services_response.service}
        assert {"medgemma_deploy.v1.Worker", "grpc.health.v1.Health"} <= names
    info = stub.ModelInfo(pb.ModelInfoRequest(), timeout=5)
    assert info.api_version == "medgemma_deploy.v1" and info.state == "serving"
    kinds = {m.kind: m for m in info.models}
    assert kinds["medsiglip"].loaded and kinds["medsiglip"].model.random_weights
    assert kinds["medsiglip"].embedding_dim > 0
    # What a client needs to send images at the model input (the tiny model: 64 px, 8 px patches).
    medsiglip = kinds["medsiglip"]
    assert (medsiglip.input_rows, medsiglip.input_columns, medsiglip.patch_grid) == (64, 64, 8)
    assert (medsiglip.resample, medsiglip.antialias) == ("bilinear", True)
    assert kinds["medgemma"].loaded and kinds["medgemma"].max_context_tokens > 0
    assert {"chest-xray", "ct"} <= {ls.name for ls in info.label_sets}
    assert info.limits.max_message_bytes == 2 * 1024 * 1024


@needs_lowbit
@pytest.mark.parametrize("precision", ["int4"])
def test_the_worker_serves_low_bit_reports_on_llama_cpp_as_in_process(
    tiny_models_root, demo_series, precision, monkeypatch
):
    """At int4 the worker drafts on llama.cpp under the same scheduler: a report alone has the
    tokens, text and SR parameters (engine, precision, weight digests) of the same report in
    process, and concurrent reports share llama.cpp decode steps."""
    from medgemma_deploy.operators.medgemma.gguf_runner import GgufMedGemmaRunner

    request = build_report_request(
        demo_series["CR"], PromptBook.load(), settings=GenerationSettings(max_new_tokens=12)
    )
    local = make_backend("local", tiny_models_root, "cpu", precision=precision)
    try:
        expected = local.medgemma.load().generate(request)
    finally:
        local.close()
    rows: list[int] = []
    step = GgufMedGemmaRunner.decode_step

    def counted(runner, tokens, positions, seq_ids):
        rows.append(len(tokens))
        return step(runner, tokens, positions, seq_ids)

    monkeypatch.setattr(GgufMedGemmaRunner, "decode_step", counted)
    config = WorkerConfig(
        listen="127.0.0.1:0",
        medgemma=tiny_models_root / "medgemma",
        device="cpu",
        precision=precision,
        report_max_running=3,
        drain_timeout=10,
    )
    with WorkerServer(config) as server:
        remote = make_backend(f"grpc://{server.address}", None, None)
        try:
            got = remote.medgemma.load().generate(request)
            assert (got.token_ids, got.text, got.n_prompt_tokens) == (
                expected.token_ids,
                expected.text,
                expected.n_prompt_tokens,
            )
            parameters = dict(got.engine_parameters)
            assert parameters == dict(expected.engine_parameters)
            assert parameters["precision"] == precision and parameters["engine"].startswith("llama.cpp")
            assert len(parameters["weights_sha256"]) == 64
            rows.clear()
            with ThreadPoolExecutor(3) as pool:
                together = list(pool.map(remote.medgemma.generate, [request] * 3))
        finally:
            remote.close()
    assert [result.token_ids for result in together] == [expected.token_ids] * 3
    assert max(rows) >= 2  # decoded together


# -- parity with the in-process runners ----------------------------------------------------------


def test_classify_parity_local_and_remote(backends, demo_series):
    local, remote = backends
    label_sets = load_label_sets()
    for modality, series in sorted(demo_series.items()):
        label_set = select_label_set(label_sets, modality, series.body_part_examined)
        results = []
        for backend in (local, remote):
            model = backend.medsiglip
            model.load()
            results.append(
                classify_series(
                    model, series, label_set, relevance_top_k=2, with_embeddings=True, model=model.identity
                )
            )
        here, there = results
        assert here.model == there.model, "the remote result must name the same model"
        for a, b in zip(here.scores, there.scores, strict=True):
            assert a.frame_probabilities == b.frame_probabilities, f"{modality} {a.finding.key}"
            assert (a.probability, a.present, a.peak_frame_index) == (
                b.probability,
                b.present,
                b.peak_frame_index,
            )
        np.testing.assert_array_equal(here.embeddings, there.embeddings)
        assert here.relevance_maps.keys() == there.relevance_maps.keys() and here.relevance_maps
        for key, maps in here.relevance_maps.items():
            np.testing.assert_array_equal(maps, there.relevance_maps[key])


def test_embed_parity(backends):
    local, remote = backends
    images = [_image(1), np.stack([_image(2)] * 3, axis=-1)]
    np.testing.assert_array_equal(local.medsiglip.embed_images(images), remote.medsiglip.embed_images(images))


def test_report_parity_greedy_tokens_text_and_stream(backends, demo_series):
    local, remote = backends
    prompts = PromptBook.load()
    for modality in ("CR", "CT"):
        request = build_report_request(
            demo_series[modality], prompts, settings=GenerationSettings(max_new_tokens=20)
        )
        local_pieces: list[str] = []
        expected = local.medgemma.load().generate(request, on_token=local_pieces.append)
        runner = local.medgemma.runner
        reference, n_prompt = plain_greedy(runner.model, runner.processor, request.messages, 20)
        assert expected.token_ids == reference, f"{modality}: in process differs from model.generate"
        assert expected.n_prompt_tokens == n_prompt
        pieces: list[str] = []
        got = remote.medgemma.generate(request, on_token=pieces.append)
        assert got.token_ids == expected.token_ids, modality
        assert got.text == expected.text
        # Tokens that queue up while the client reads travel together: same text, maybe fewer pieces.
        assert "".join(pieces) == "".join(local_pieces) and pieces
        assert (got.n_prompt_tokens, got.finish_reason, got.warnings) == (
            expected.n_prompt_tokens,
            expected.finish_reason,
            expected.warnings,
        )
        assert remote.medgemma.identity == local.medgemma.identity


# -- real-size studies --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_size_series(tmp_path_factory):
    """The real CR (1,955 x 1,841, JPEG 2000), a 3,000 x 3,000 CR, a 4,280 x 3,520 DX, an 85-slice CT."""
    from medgemma_deploy.operators.dicom_input.reader import load_study_input

    folder = tmp_path_factory.mktemp("real-size")
    write_real_cr(folder)
    write_large_radiograph(folder, 3000, 3000)
    write_large_radiograph(folder, 4280, 3520, modality="DX")
    write_multislice_ct(folder, 85)
    series = [s for study in load_study_input(folder).studies for s in study.series]
    shapes = sorted((s.modality, len(s.frames), s.frames[0].display.shape[:2]) for s in series)
    assert shapes == [
        ("CR", 1, (1955, 1841)),
        ("CR", 1, (3000, 3000)),
        ("CT", 85, (512, 512)),
        ("DX", 1, (4280, 3520)),
    ]
    return series


@pytest.fixture
def wire_bytes(backends, monkeypatch):
    """Bytes of every request and response the remote backend exchanges with the worker."""
    client = backends[1].medsiglip.client
    sizes: list[tuple[str, int, int]] = []
    original = client.call

    def recording(method, request):
        response = original(method, request)
        sizes.append((method, request.ByteSize(), response.ByteSize()))
        return response

    monkeypatch.setattr(client, "call", recording)
    return sizes


def test_real_size_studies_classify_equal_to_in_process_in_messages_under_the_limit(
    backends, real_size_series, wire_bytes, worker
):
    local, remote = backends
    label_sets = load_label_sets()
    for series in real_size_series:
        label_set = select_label_set(label_sets, series.modality, series.body_part_examined)
        here, there = (
            classify_series(
                backend.medsiglip.load(),
                series,
                label_set,
                relevance_top_k=2,
                with_embeddings=True,
                model=backend.medsiglip.identity,
            )
            for backend in (local, remote)
        )
        name = f"{series.modality} {len(series.frames)}x{series.frames[0].display.shape}"
        for a, b in zip(here.scores, there.scores, strict=True):
            assert a.frame_probabilities == b.frame_probabilities, f"{name} {a.finding.key}"
        np.testing.assert_array_equal(here.embeddings, there.embeddings)
        assert here.relevance_maps.keys() == there.relevance_maps.keys() and here.relevance_maps
        for key, maps in here.relevance_maps.items():
            np.testing.assert_array_equal(maps, there.relevance_maps[key], err_msg=f"{name} {key}")
            assert np.shape(maps)[-2:] == series.frames[0].display.shape[:2], "maps on the source pixels"
    limit = worker.config.max_message_bytes
    assert wire_bytes and all(sent < limit and got < limit for _, sent, got in wire_bytes), wire_bytes
    # At the tiny model's 64 x 64 input the CT goes 64 slices to a request (this worker's image-count
    # limit), 1 MiB, where full-resolution float32 slices needed 1 MiB each.
    assert max(sent for _, sent, _ in wire_bytes) > 64 * 64 * 64 * 4


def test_a_prompt_over_the_message_limit_is_refused_in_one_line_naming_the_setting(
    backends, real_size_series
):
    _, remote = backends
    dx = next(s for s in real_size_series if s.modality == "DX")
    request = build_report_request(dx, PromptBook.load(), settings=GenerationSettings(max_new_tokens=4))
    with pytest.raises(InputError, match=r"over the .* MiB .* --max-message-mb") as caught:
        remote.medgemma.generate(request)
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def default_limits_backends(tiny_models_root):
    """A second worker, with the default 64 MiB message limit, and its client."""
    config = WorkerConfig(
        listen="127.0.0.1:0",
        medsiglip=None,
        medgemma=tiny_models_root / "medgemma",
        device="cpu",
        metrics_port=0,
        default_max_new_tokens=8,
        drain_timeout=10,
    )
    with WorkerServer(config) as server:
        remote = make_backend(f"grpc://{server.address}", None, None)
        yield remote
        remote.close()


def test_real_size_studies_report_equal_to_in_process(backends, default_limits_backends, real_size_series):
    local = backends[0]
    remote = default_limits_backends
    prompts = PromptBook.load()
    for series in real_size_series:
        request = build_report_request(series, prompts, settings=GenerationSettings(max_new_tokens=6))
        expected = local.medgemma.load().generate(request)
        got = remote.medgemma.load().generate(request)
        assert (got.token_ids, got.text) == (expected.token_ids, expected.text), series.modality
        assert got.n_prompt_tokens == expected.n_prompt_tokens


# -- many clients at once ------------------------------------------------------------------------


def test_32_concurrent_classify_clients_are_all_answered_correctly(worker, backends):
    local, _ = backends
    label_set = _label_set()
    images = [_image(100 + i, shape=(32 + i, 40)) for i in range(32)]
    expected = [local.medsiglip.score([image], label_set).probabilities[0] for image in images]
    barrier = threading.Barrier(32)

    def client(index: int) -> np.ndarray:
        remote = make_backend(f"grpc://{worker.address}", None, None)
        try:
            model = remote.medsiglip.load()
            barrier.wait(timeout=30)
            return model.score([images[index]], label_set).probabilities[0]
        finally:
            remote.close()

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(client, range(32)))
    for index, (answer, reference) in enumerate(zip(answers, expected, strict=True)):
        # Batched with other clients' images: same numbers up to float32 summation order.
        np.testing.assert_allclose(answer, reference, rtol=0, atol=1e-5, err_msg=f"client {index}")
    metrics = worker.metrics.exposition().decode()
    batch_sizes = [
        line
        for line in metrics.splitlines()
        if line.startswith('medgemma_worker_batch_size_sum{queue="medsiglip"}')
    ]
    batch_counts = [
        line
        for line in metrics.splitlines()
        if line.startswith('medgemma_worker_batch_size_count{queue="medsiglip"}')
    ]
    assert float(batch_sizes[0].split()[-1]) / float(batch_counts[0].split()[-1]) > 1, "nothing was batched"


def test_concurrent_reports_are_decoded_together_with_single_stream_tokens(worker, backends, demo_series):
    local, _ = backends
    prompts = PromptBook.load()
    requests = [
        build_report_request(
            demo_series["CR"], prompts, settings=GenerationSettings(max_new_tokens=8 + 4 * i)
        )
        for i in range(8)
    ]
    expected = [local.medgemma.load().generate(request).token_ids for request in requests]

    def client(index: int) -> list[int]:
        remote = make_backend(f"grpc://{worker.address}", None, None)
        try:
            return remote.medgemma.generate(requests[index]).token_ids
        finally:
            remote.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(client, range(8))) == expected


# -- bad input: a clear status, and the worker keeps serving --------------------------------------


def _classify(**fields) -> pb.ClassifyRequest:
    request = pb.ClassifyRequest(label_set_name="chest-xray", images=[wire.image_to_proto(_image(0))])
    for name, value in fields.items():
        if name == "images":
            del request.images[:]
            request.images.extend(value)
        elif isinstance(value, pb.LabelSet):
            request.label_set.CopyFrom(value)
        elif isinstance(value, list):
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    return request


def _label_set_without_prompts() -> pb.LabelSet:
    definition = wire.label_set_to_proto(_label_set())
    del definition.findings[0].positive_prompts[:]
    return definition


def _label_set_with_prompt(prompt: str) -> pb.LabelSet:
    definition = wire.label_set_to_proto(_label_set())
    definition.version = "huge prompt"
    definition.findings[0].positive_prompts.append(prompt)
    return definition


def _other_definition_same_version() -> pb.LabelSet:
    definition = wire.label_set_to_proto(_label_set())
    definition.findings[0].positive_prompts.append("a changed prompt")
    return definition


BAD_CLASSIFY = [
    ("no-images", {"images": []}, "images: is empty"),
    ("bad-dtype", {"images": [pb.Array(shape=[2, 2], dtype=99, data=bytes(16))]}, "images[0].dtype"),
    (
        "byte-count",
        {"images": [pb.Array(shape=[4, 4], dtype=pb.DTYPE_FLOAT32, data=bytes(10))]},
        "images[0].data: 10 bytes",
    ),
    ("zero-dimension", {"images": [pb.Array(shape=[0, 4], dtype=pb.DTYPE_FLOAT32)]}, "images[0].shape"),
    ("four-channels", {"images": [wire.array_to_proto(np.zeros((4, 4, 4), np.float32))]}, "not an image"),
    ("not-windowed", {"images": [wire.array_to_proto(np.full((4, 4), 1000.0, np.float32))]}, "windowed"),
    ("nan", {"images": [wire.array_to_proto(np.full((4, 4), np.nan, np.float32))]}, "NaN"),
    ("unknown-label-set", {"label_set_name": "no-such-set"}, "'no-such-set' is not known"),
    ("unknown-finding", {"relevance_finding_keys": ["no_such_finding"]}, "relevance_finding_keys[0]"),
    ("label-set-without-prompts", {"label_set": _label_set_without_prompts()}, "positive_prompts: is empty"),
    ("changed-label-set-same-version", {"label_set": _other_definition_same_version()}, "new version"),
    # Issue 12: a 1 × 100000 image was INTERNAL ("tried to allocate 40000000000 bytes") after padding.
    (
        "one-by-100000",
        {"images": [wire.array_to_proto(np.zeros((1, 100_000), np.float32))]},
        "padded to a 100000 × 100000 square",
    ),
    # Issue 12: a 10 MB label prompt was accepted and logged as one 10.5 MB line.
    ("huge-label-prompt", {"label_set": _label_set_with_prompt("x" * 100_000)}, "exceed the limit of 2048"),
    (
        "not-at-the-model-input",
        {"images_at_model_input": True},
        "images[0].shape: [48, 40] is not at the model's input of 64x64",
    ),
]


@pytest.mark.parametrize(
    ("fields", "message"), [c[1:] for c in BAD_CLASSIFY], ids=[c[0] for c in BAD_CLASSIFY]
)
def test_bad_classify_requests_get_invalid_argument(stub, fields, message):
    if "label_set" in fields and "new version" in message:
        stub.Classify(_classify(label_set=wire.label_set_to_proto(_label_set())), timeout=30)  # registers it
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(_classify(**fields), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert stub.Classify(_classify(), timeout=30).probabilities.shape  # still serving


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([], "texts: is empty"),
        (["a pneumothorax", "   "], "texts[1]: is blank"),
        (["x" * 2049], "texts[0]: 2049 characters exceed the limit of 2048"),
        (["q"] * (wire.MAX_TEXTS_PER_REQUEST + 1), "texts exceed the limit of"),
    ],
    ids=["none", "blank", "too-long", "too-many"],
)
def test_bad_embed_text_requests_get_invalid_argument(stub, texts, message):
    with pytest.raises(grpc.RpcError) as caught:
        stub.EmbedText(pb.EmbedTextRequest(texts=texts), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    served = stub.EmbedText(pb.EmbedTextRequest(texts=["a chest x-ray"]), timeout=30)
    assert wire.array_from_proto(served.embeddings, "embeddings").shape[0] == 1  # still serving


def _report(**settings) -> pb.GenerateReportRequest:
    return pb.GenerateReportRequest(
        messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="Describe this X-ray")])],
        settings=pb.GenerationSettings(**({"max_new_tokens": 4} | settings)),
    )


BAD_REPORTS = [
    ("no-messages", pb.GenerateReportRequest(), "messages: is empty"),
    (
        "empty-prompt",
        pb.GenerateReportRequest(messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="  ")])]),
        "text: is empty",
    ),
    (
        "no-user-text",
        pb.GenerateReportRequest(
            messages=[pb.ChatMessage(role="system", content=[pb.ContentPart(text="You are a radiologist.")])]
        ),
        "the prompt is empty",
    ),
    (
        "bad-role",
        pb.GenerateReportRequest(
            messages=[pb.ChatMessage(role="doctor", content=[pb.ContentPart(text="hi")])]
        ),
        "messages[0].role",
    ),
    ("too-many-tokens", _report(max_new_tokens=100_000), "exceeds the worker's limit of 64"),
    # Issue 12: 200 consecutive user turns were INTERNAL (a TemplateError from the chat template).
    (
        "200-user-turns",
        pb.GenerateReportRequest(
            messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="hi")])] * 200
        ),
        "200 messages exceed the limit of 32",
    ),
    (
        "consecutive-user-turns",
        pb.GenerateReportRequest(
            messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="hi")])] * 2
        ),
        "messages[1].role: 'user' where 'assistant' is expected",
    ),
    # Issue 12: a 10 MB report text took 75 s (and 5 GB) to be refused; now refused before tokenizing.
    (
        "huge-text",
        pb.GenerateReportRequest(
            messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="word " * 60_000)])]
        ),
        "300000 characters of text exceed the limit of 262144",
    ),
    ("sampling-option-when-greedy", _report(top_k=5), "only apply with do_sample=True"),
    (
        "uint16-chat-image",
        pb.GenerateReportRequest(
            messages=[
                pb.ChatMessage(
                    role="user",
                    content=[
                        pb.ContentPart(image=wire.array_to_proto(np.zeros((8, 8), np.uint16))),
                        pb.ContentPart(text="Describe"),
                    ],
                )
            ]
        ),
        "send UINT8",
    ),
]


@pytest.mark.parametrize(
    ("request_message", "message"), [c[1:] for c in BAD_REPORTS], ids=[c[0] for c in BAD_REPORTS]
)
def test_bad_report_requests_get_invalid_argument(stub, request_message, message):
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.GenerateReport(request_message, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    events = list(stub.GenerateReport(_report(), timeout=30))
    assert events[-1].WhichOneof("event") == "final"


def test_an_oversized_message_is_refused_by_size_and_the_worker_keeps_serving(stub):
    big = wire.array_to_proto(np.zeros((1024, 1024), np.float32))  # 4 MiB > the 2 MiB limit
    with pytest.raises(grpc.RpcError) as caught:
        stub.Classify(_classify(images=[big]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in caught.value.details()
    assert stub.Classify(_classify(), timeout=30).probabilities.shape


def test_the_remote_client_splits_what_does_not_fit_one_message(backends, wire_bytes):
    local, remote = backends
    label_set = _label_set()
    # 150 images: over the worker's 64 images per request, so three requests.
    images = [_image(200 + i, shape=(256, 256)) for i in range(150)]
    np.testing.assert_allclose(
        remote.medsiglip.score(images, label_set).probabilities,
        local.medsiglip.score(images, label_set).probabilities,
        rtol=0,
        atol=1e-5,
    )
    assert [method for method, _, _ in wire_bytes] == ["Classify"] * 3
    maps = remote.medsiglip.relevance_maps(images[:3], label_set, [label_set.findings[0].key])
    assert [m.shape for m in maps] == [(1, 256, 256)] * 3


def test_remote_report_errors_are_input_errors(backends, demo_series):
    _, remote = backends
    request = build_report_request(
        demo_series["CR"], PromptBook.load(), settings=GenerationSettings(max_new_tokens=500)
    )
    with pytest.raises(InputError, match="exceeds the worker's limit"):
        remote.medgemma.generate(request)


def test_metrics_endpoint(worker, stub):
    stub.ModelInfo(pb.ModelInfoRequest(), timeout=5)
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=10).read().decode()
    )
    for name in (
        'medgemma_worker_requests_total{code="OK",method="ModelInfo"}',
        "medgemma_worker_queue_seconds_bucket",
        "medgemma_worker_batch_size_bucket",
        "medgemma_worker_generated_tokens_total",
        "medgemma_worker_tokens_per_second",
        'medgemma_worker_state{medgemma_worker_state="serving"} 1.0',
        'medgemma_worker_model_info{device="cpu"',
    ):
        assert name in text, name


def test_status_messages_are_cut_to_a_bounded_length():
    from medgemma_deploy.worker.edge.servicer import MAX_STATUS_MESSAGE_CHARS, status_for
    from medgemma_deploy.worker.engine.errors import BadRequestError

    code, message = status_for(BadRequestError("label_set_name", "x" * 1_000_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message) < MAX_STATUS_MESSAGE_CHARS + 60 and message.endswith("characters in all)")
