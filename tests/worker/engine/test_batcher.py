"""The worker's batching cores without gRPC: the dynamic batcher and the continuous-batching scheduler.

The scheduler is checked against plain transformers ``model.generate`` (greedy, on the processor's
inputs) on the tiny random MedGemma in float32: greedy tokens must be identical whatever the batch
around a sequence, including sequences joining mid-decode, prompts longer than the sliding window,
images, and a repetition penalty.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from medgemma_deploy.domain import GenerationSettings, ReportRequest
from medgemma_deploy.worker.engine.batcher import MicroBatcher
from medgemma_deploy.worker.engine.errors import (
    DeadlineExpiredError,
    NotReadyError,
    QueueFullError,
    RequestCancelledError,
)
from medgemma_deploy.worker.engine.events import Admitted, Finished, Tokens
from tests.support.polling import wait_until
from tests.support.transformers_reference import plain_greedy

# -- dynamic batcher ----------------------------------------------------------------------------


class Recorder:
    """A run_group that records the batches it gets and can be held until released."""

    def __init__(self, *, hold: bool = False) -> None:
        self.groups: list[list[object]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, requests):
        self.started.set()
        assert self.release.wait(timeout=10)
        payloads = [r.payload for r in requests]
        self.groups.append(payloads)
        if "explode" in payloads and len(payloads) > 1:
            raise RuntimeError("the whole batch failed")
        return [ValueError(f"bad {p}") if p in ("bad", "explode") else f"done {p}" for p in payloads]


def _batcher(run_group, **kwargs) -> MicroBatcher:
    options = {"max_batch_size": 8, "max_queue_delay": 0.2, "max_queued": 64} | kwargs
    batcher = MicroBatcher("test", run_group, **options)
    batcher.start()
    return batcher


def test_concurrent_requests_are_coalesced_into_one_batch():
    recorder = Recorder()
    batcher = _batcher(recorder)
    try:
        requests = [batcher.submit(i, cost=1, group_key="a") for i in range(5)]
        assert [r.future.result(timeout=10) for r in requests] == [f"done {i}" for i in range(5)]
        assert recorder.groups == [[0, 1, 2, 3, 4]]
        assert {r.batch_size for r in requests} == {5}
    finally:
        batcher.stop()


def test_a_lone_client_never_waits_for_the_queue_delay():
    """After a batch of one, the next lone request runs at once (a delay of an hour never starts)."""
    recorder = Recorder()
    batcher = _batcher(recorder, max_queue_delay=3600.0)
    try:
        # A full batch runs without waiting; it held one request, so one is what the batcher expects.
        assert batcher.submit("full", cost=8, group_key="a").future.result(timeout=10) == "done full"
        for name in ("next", "and next"):
            assert batcher.submit(name, cost=1, group_key="a").future.result(timeout=10) == f"done {name}"
        assert recorder.groups == [["full"], ["next"], ["and next"]]
    finally:
        batcher.stop(timeout=0)


def test_steady_clients_are_batched_without_waiting_the_full_delay():
    """After a batch of three, the batcher runs as soon as three requests are back, all together."""
    recorder = Recorder()
    batcher = _batcher(recorder, max_queue_delay=3600.0)
    try:
        # First batch: waits until full (8 images in three requests), as there is no history yet.
        first = [batcher.submit(p, cost=c, group_key="a") for p, c in (("a", 3), ("b", 3), ("c", 2))]
        assert [r.future.result(timeout=10) for r in first] == ["done a", "done b", "done c"]
        second = [batcher.submit(p, cost=1, group_key="a") for p in ("x", "y", "z")]
        assert [r.future.result(timeout=10) for r in second] == ["done x", "done y", "done z"]
        assert recorder.groups == [["a", "b", "c"], ["x", "y", "z"]]
    finally:
        batcher.stop(timeout=0)


def test_batches_respect_max_batch_size_and_groups():
    recorder = Recorder(hold=True)
    batcher = _batcher(recorder, max_batch_size=4, max_queue_delay=0.0)
    try:
        first = batcher.submit("first", cost=1, group_key="a")
        assert recorder.started.wait(timeout=10)  # "first" is running alone; the rest queue up
        requests = [batcher.submit(i, cost=1, group_key="a" if i % 2 else "b") for i in range(8)]
        recorder.release.set()
        for request in [first, *requests]:
            request.future.result(timeout=10)
        sizes = [len(group) for group in recorder.groups]
        assert sum(sizes) == 9 and max(sizes) <= 4
        for group in recorder.groups[1:]:
            assert len({p % 2 for p in group}) == 1, f"group mixes label sets: {group}"
    finally:
        batcher.stop()


def test_a_full_queue_refuses_and_cancelled_or_expired_requests_are_never_run():
    recorder = Recorder(hold=True)
    batcher = _batcher(recorder, max_batch_size=1, max_queue_delay=0.0, max_queued=3)
    try:
        running = batcher.submit("running", cost=1, group_key="a")
        assert recorder.started.wait(timeout=10)
        cancelled = batcher.submit("cancelled", cost=1, group_key="a")
        expired = batcher.submit("expired", cost=1, group_key="a", deadline=time.monotonic() - 1)
        kept = batcher.submit("kept", cost=1, group_key="a")
        with pytest.raises(QueueFullError, match="test queue is full"):
            batcher.submit("one too many", cost=1, group_key="a")
        cancelled.cancel()
        recorder.release.set()
        assert running.future.result(timeout=10) == "done running"
        assert kept.future.result(timeout=10) == "done kept"
        with pytest.raises(RequestCancelledError):
            cancelled.future.result(timeout=10)
        with pytest.raises(DeadlineExpiredError):
            expired.future.result(timeout=10)
        assert [p for group in recorder.groups for p in group] == ["running", "kept"]
    finally:
        batcher.stop()


def test_one_bad_request_fails_alone():
    recorder = Recorder(hold=True)
    batcher = _batcher(recorder, max_queue_delay=0.0)
    try:
        blocker = batcher.submit("blocker", cost=1, group_key="a")
        assert recorder.started.wait(timeout=10)
        requests = {p: batcher.submit(p, cost=1, group_key="a") for p in ("ok1", "explode", "ok2", "bad")}
        recorder.release.set()
        blocker.future.result(timeout=10)
        assert requests["ok1"].future.result(timeout=10) == "done ok1"
        assert requests["ok2"].future.result(timeout=10) == "done ok2"
        for name in ("explode", "bad"):
            with pytest.raises(ValueError, match=f"bad {name}"):
                requests[name].future.result(timeout=10)
        # The failed batch was retried request by request.
        assert ["explode"] in recorder.groups and ["ok1"] in recorder.groups
    finally:
        batcher.stop()


def test_stop_drains_the_queue_then_refuses_new_work():
    recorder = Recorder()
    batcher = _batcher(recorder, max_batch_size=2, max_queue_delay=0.05)
    requests = [batcher.submit(i, cost=1, group_key="a") for i in range(6)]
    batcher.stop(timeout=10)
    assert [r.future.result(timeout=0) for r in requests] == [f"done {i}" for i in range(6)]
    with pytest.raises(NotReadyError):
        batcher.submit("late", cost=1, group_key="a")


# -- continuous batching of reports -------------------------------------------------------------


@pytest.fixture(scope="module")
def medgemma(tiny_models_root):
    from medgemma_deploy.operators.medgemma.runner import MedGemmaRunner

    runner = MedGemmaRunner(tiny_models_root / "medgemma").load()
    yield runner
    runner.close()


def _chat(seed: int, n_images: int, words: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    content = [
        {
            "type": "image",
            "image": Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), np.uint8), "RGB"),
        }
        for i in range(n_images)
    ]
    text = " ".join(rng.choice(["lungs", "clear", "effusion", "heart", "size", "normal"], words))
    content.append({"type": "text", "text": f"Describe this X-ray. {text}"})
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
        {"role": "user", "content": content},
    ]


def _request(messages, settings: GenerationSettings) -> ReportRequest:
    return ReportRequest(
        source="test",
        messages=messages,
        prompt_id="test",
        prompt_version="1",
        settings=settings,
        frames=[],
        modality="CR",
    )


def _prepared(service, messages, settings: GenerationSettings):
    return service.prepare(_request(messages, settings))


def _plain_generate(runner, chat: list[dict], settings: GenerationSettings) -> tuple[list[int], int]:
    return plain_greedy(
        runner.model,
        runner.processor,
        chat,
        settings.max_new_tokens,
        repetition_penalty=settings.repetition_penalty,
    )


def _collect(stream) -> tuple[list[int], Finished, Admitted]:
    tokens: list[int] = []
    admitted = finished = None
    for event in stream:
        if isinstance(event, Admitted):
            admitted = event
        elif isinstance(event, Tokens):
            tokens.extend(event.token_ids)
        elif isinstance(event, Finished):
            finished = event
    return tokens, finished, admitted


def _service(runner, **kwargs):
    from medgemma_deploy.worker.engine.report_service import ReportService

    service = ReportService(
        runner, **({"max_running": 3, "max_waiting": 16, "max_prefills_per_step": 1} | kwargs)
    )
    service.start()
    return service


@pytest.mark.parametrize(
    ("repetition_penalty", "prefills", "stagger"),
    [(None, 1, 0.02), (None, 4, 0.0), (1.3, 2, 0.01)],
    ids=["greedy-joining-one-by-one", "greedy-batched-prefill", "repetition-penalty"],
)
def test_continuous_batching_gives_the_single_stream_greedy_tokens(
    medgemma, repetition_penalty, prefills, stagger
):
    settings = GenerationSettings(max_new_tokens=24, repetition_penalty=repetition_penalty)
    chats = [_chat(seed, n_images=seed % 3, words=3 + 5 * seed) for seed in range(6)]
    expected = [_plain_generate(medgemma, chat, settings) for chat in chats]
    assert max(n_prompt for _, n_prompt in expected) > medgemma.model.config.text_config.sliding_window
    service = _service(medgemma, max_prefills_per_step=prefills)
    results: dict[int, tuple] = {}
    try:

        def run(index: int) -> None:
            time.sleep(stagger * index)  # spread arrivals: later ones join running batches
            prepared = _prepared(service, chats[index], settings)
            tokens, finished, admitted = _collect(service.submit(prepared))
            results[index] = (tokens, finished, admitted, service.finish(prepared, tokens, finished))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(chats))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        service.stop()
    assert sorted(results) == list(range(len(chats)))
    eos = set(medgemma.eos_token_ids)
    for index, (reference, n_prompt) in enumerate(expected):
        tokens, finished, admitted, result = results[index]
        assert len(reference) >= 20 or reference[-1] in eos
        assert tokens == reference, f"request {index} decoded differently in the batch"
        assert finished.finish_reason == ("stop" if reference[-1] in eos else "length")
        assert admitted.n_prompt_tokens == n_prompt == result.n_prompt_tokens
        assert result.token_ids == tokens
        assert result.text == medgemma.processor.tokenizer.decode(reference, skip_special_tokens=True)
        cut = ["cut off at max_new_tokens=24: the draft may be incomplete"] if len(reference) == 24 else []
        assert [w for w in result.warnings if "generated no text" not in w] == cut
    assert max(finished.mean_batch_size for _, finished, _, _ in results.values()) > 1, "nothing was batched"


def test_an_idle_scheduler_waits_for_reports_still_being_prepared(medgemma):
    """A burst is prefilled as one batch: the first report waits for the one still being prepared."""
    settings = GenerationSettings(max_new_tokens=4)
    service = _service(medgemma, max_prefills_per_step=4)
    service.scheduler.admission_window_s = 3600.0  # only the arrivals can end the wait
    chats = [_chat(seed, n_images=1, words=3) for seed in (21, 22)]
    try:
        with service.arriving():
            first = service.submit(_prepared(service, chats[0], settings))
            with service.arriving():  # a second request arrives while the first is queued
                second = service.submit(_prepared(service, chats[1], settings))
        results = [_collect(first), _collect(second)]
    finally:
        service.stop()
    assert [admitted.running for _, _, admitted in results] == [2, 2], "not prefilled together"
    assert all(len(tokens) == 4 for tokens, _, _ in results)


def test_prompts_prefilled_together_decode_like_single_streams(medgemma):
    from medgemma_deploy.worker.engine.decode import DecodeBatch

    settings = GenerationSettings(max_new_tokens=12)
    chats = [_chat(seed, n_images=n, words=w) for seed, n, w in ((11, 1, 2), (12, 2, 9), (13, 0, 25))]
    expected = [_plain_generate(medgemma, chat, settings)[0] for chat in chats]
    service = _service(medgemma)
    service.stop()
    prompts = [_prepared(service, chat, settings).prompt for chat in chats]
    assert len({p.n_tokens for p in prompts}) == 3  # different lengths: the prefill is padded
    batch = DecodeBatch(
        medgemma.model, medgemma.model.device, pad_token_id=medgemma.processor.tokenizer.pad_token_id
    )
    prefilled = batch.prefill(prompts)
    assert prefilled.attention_mask.shape == (3, max(p.n_tokens for p in prompts))
    tokens = [[int(t)] for t in prefilled.logits.argmax(-1)]
    batch.join(prefilled)
    for _ in range(settings.max_new_tokens - 1):
        step = batch.step(torch.tensor([row[-1] for row in tokens])).argmax(-1)
        for row, token in zip(tokens, step.tolist(), strict=True):
            row.append(token)
    for got, want in zip(tokens, expected, strict=True):
        assert got[: len(want)] == want  # a single stream may stop early at <end_of_turn>


def test_a_cancelled_report_frees_its_row_for_the_next(medgemma):
    service = _service(medgemma, max_running=1)
    service.scheduler.eos_token_ids = frozenset()  # the long report must not stop by chance
    try:
        long = service.submit(_prepared(service, _chat(1, 1, 4), GenerationSettings(max_new_tokens=4000)))
        short = service.submit(_prepared(service, _chat(2, 0, 4), GenerationSettings(max_new_tokens=5)))
        received = 0
        for event in long:
            received += isinstance(event, Tokens)
            if received == 3:
                break
        assert service.scheduler.running == 1 and service.scheduler.waiting == 1  # short waits for the row
        long.cancel()
        tokens, finished, _ = _collect(short)
        assert len(tokens) == 5 and finished.finish_reason == "length"
        with pytest.raises(RequestCancelledError):
            for _ in long:
                pass
        wait_until(lambda: service.scheduler.running == 0, 10.0, what="the scheduler to drain")
    finally:
        service.stop()


def test_sampling_is_reproducible_with_a_seed_and_deadlines_are_enforced(medgemma):
    service = _service(medgemma)
    try:
        settings = GenerationSettings(
            max_new_tokens=12, do_sample=True, temperature=0.9, top_k=50, top_p=0.9, seed=7
        )
        runs = [_collect(service.submit(_prepared(service, _chat(3, 1, 5), settings)))[0] for _ in range(2)]
        assert runs[0] == runs[1] and len(runs[0]) >= 1
        vocabulary = medgemma.model.config.text_config.vocab_size
        assert all(0 <= token < vocabulary for token in runs[0])
        expired = service.submit(
            _prepared(service, _chat(4, 0, 3), GenerationSettings(max_new_tokens=5)),
            deadline=time.monotonic() - 1,
        )
        with pytest.raises(DeadlineExpiredError):
            _collect(expired)
    finally:
        service.stop()


def test_a_failing_prefill_fails_only_its_own_request(medgemma):
    from medgemma_deploy.worker.engine.decode import PreparedPrompt

    service = _service(medgemma)
    try:
        good = _prepared(service, _chat(5, 1, 3), GenerationSettings(max_new_tokens=4))
        broken = _prepared(service, _chat(6, 1, 3), GenerationSettings(max_new_tokens=4))
        inputs = dict(broken.prompt.model_inputs)
        inputs["pixel_values"] = inputs["pixel_values"][:, :2]  # two channels: the vision tower needs three
        broken.prompt = PreparedPrompt(broken.prompt.input_ids, inputs)
        bad_stream, good_stream = service.submit(broken), service.submit(good)
        with pytest.raises(Exception, match=r"\S"):
            _collect(bad_stream)
        tokens, finished, _ = _collect(good_stream)
        assert len(tokens) == finished.n_generated_tokens >= 1
    finally:
        service.stop()


def test_report_queue_bound_and_draining(medgemma):
    service = _service(medgemma, max_running=1, max_waiting=1)
    service.scheduler.eos_token_ids = frozenset()
    try:
        prepared = _prepared(service, _chat(7, 0, 3), GenerationSettings(max_new_tokens=40))
        first = service.submit(prepared)
        assert isinstance(next(iter(first)), Admitted)  # running; the next one waits
        second = service.submit(prepared)
        with pytest.raises(QueueFullError, match="report queue is full"):
            service.submit(prepared)
    finally:
        service.stop(timeout=30)  # drains: both finish
    assert len(_collect(second)[0]) == 40
    with pytest.raises(NotReadyError):
        service.submit(prepared)
