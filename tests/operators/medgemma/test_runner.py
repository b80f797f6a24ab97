"""MedGemma in process on the tiny random model: greedy parity, streaming, limits, errors, lifecycle.

Reports are drafted by :class:`InprocMedGemma` (the worker's decode core in this process, what
``--backend local`` runs) over a :class:`MedGemmaRunner`. The tiny model is the real
``Gemma3ForConditionalGeneration`` with the real processor classes, built once per session
(``tiny_medgemma_dir``). Parity tests compare the tokens with plain transformers ``model.generate``
(greedy) on processor inputs built here, independently of the runner.
"""

from __future__ import annotations

import json
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import highdicom
import pytest
import torch
from transformers import AutoProcessor, Gemma3ForConditionalGeneration, Gemma3Processor

from medgemma_deploy.backends.inproc import InprocMedGemma
from medgemma_deploy.dev.testmodels.gemma import TINY_MEDGEMMA_NAME, make_test_medgemma
from medgemma_deploy.domain import AlgorithmInfo, GenerationSettings, ReportRequest
from medgemma_deploy.errors import InputError, ModelLoadError
from medgemma_deploy.model_dir import model_identity
from medgemma_deploy.operators.medgemma.prompts import PromptBook
from medgemma_deploy.operators.medgemma.request import build_report_request
from medgemma_deploy.operators.medgemma.runner import MedGemmaRunner
from medgemma_deploy.operators.medgemma.text import split_report
from medgemma_deploy.operators.writers.common import RANDOM_WEIGHTS_WARNING
from medgemma_deploy.operators.writers.report_sr import build_report_sr
from tests.support.dciodvfy import requires_dciodvfy, run_dciodvfy
from tests.support.inputs import make_cr_series, make_ct_series
from tests.support.polling import wait_until
from tests.support.streaming import assert_streamed_pieces_make_the_text
from tests.support.transformers_reference import plain_greedy


@pytest.fixture(scope="session")
def tiny_medgemma_dir(tmp_path_factory) -> Path:
    """The tiny random MedGemma (real ``Gemma3ForConditionalGeneration``), built once per session."""
    return make_test_medgemma(tmp_path_factory.mktemp("models") / "medgemma", seed=0)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny model is far faster on one thread on a busy 2-core machine (no spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def medgemma(tiny_medgemma_dir):
    """The in-process client, loaded once for the module."""
    with InprocMedGemma(MedGemmaRunner(tiny_medgemma_dir, device="cpu")) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def runner(medgemma):
    return medgemma.runner


def _client(model_dir: Path, **runner_options) -> InprocMedGemma:
    """A client of its own (for tests that change the model or its stop tokens)."""
    return InprocMedGemma(MedGemmaRunner(model_dir, device="cpu", **runner_options))


def _scheduler_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "report-scheduler"]


@pytest.fixture(scope="module")
def prompts() -> PromptBook:
    return PromptBook.load()


def _plain_generate(model_dir: Path, request: ReportRequest, max_new_tokens: int) -> list[int]:
    """Token ids from a fresh processor and model, the way a Hugging Face user would do it."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Gemma3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return plain_greedy(model, processor, request.messages, max_new_tokens)[0]


# -- the tiny model ----------------------------------------------------------------------------


def test_tiny_model_is_deterministic_and_marked_random(tiny_medgemma_dir, tmp_path):
    identity = model_identity(tiny_medgemma_dir)
    assert identity.name == TINY_MEDGEMMA_NAME
    assert identity.random_weights is True
    again = make_test_medgemma(tmp_path / "again", seed=0)
    assert model_identity(again).version == identity.version
    weights = (tiny_medgemma_dir / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    other = make_test_medgemma(tmp_path / "other", seed=1)
    assert model_identity(other).version != identity.version
    generation = json.loads((tiny_medgemma_dir / "generation_config.json").read_text())
    processor = AutoProcessor.from_pretrained(tiny_medgemma_dir)
    eos = processor.tokenizer.convert_tokens_to_ids(["<eos>", "<end_of_turn>"])
    assert generation["eos_token_id"] == eos


def test_tiny_processor_expands_images_and_folds_the_system_prompt(tiny_medgemma_dir, prompts):
    processor = AutoProcessor.from_pretrained(tiny_medgemma_dir)
    assert isinstance(processor, Gemma3Processor)
    config = json.loads((tiny_medgemma_dir / "config.json").read_text())
    tokenizer = processor.tokenizer
    for token in (
        "<bos>",
        "<eos>",
        "<pad>",
        "<start_of_turn>",
        "<end_of_turn>",
        "<start_of_image>",
        "<end_of_image>",
        "<image_soft_token>",
    ):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id, token
    assert config["image_token_index"] == tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert config["boi_token_index"] == tokenizer.convert_tokens_to_ids("<start_of_image>")
    request = build_report_request(make_ct_series(3), prompts, settings=GenerationSettings())
    inputs = processor.apply_chat_template(
        request.messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(config["image_token_index"]) == 3 * config["mm_tokens_per_image"]
    assert ids.count(config["boi_token_index"]) == 3
    assert ids.count(tokenizer.bos_token_id) == 1
    assert inputs["pixel_values"].shape[0] == 3
    text = processor.decode(ids)
    assert text.startswith("<bos><start_of_turn>user\nYou are an expert radiologist.\n\nYou are analyzing")
    assert text.endswith("<end_of_turn>\n<start_of_turn>model\n")


# -- generation --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cr", "ct"])
def test_greedy_generation_matches_plain_transformers(medgemma, runner, tiny_medgemma_dir, prompts, kind):
    series = make_cr_series(grey=0.3) if kind == "cr" else make_ct_series(3)
    settings = GenerationSettings(max_new_tokens=24)
    request = build_report_request(series, prompts, settings=settings)
    if kind == "ct":
        assert request.n_images == 3  # three slices, each rendered in the three CT windows
    result = medgemma.generate(request)
    expected = _plain_generate(tiny_medgemma_dir, request, 24)
    assert len(expected) >= 20, "the reference stopped early: parity over too few tokens"
    assert result.token_ids == expected
    assert result.n_generated_tokens == len(expected)
    assert result.n_prompt_tokens == runner.prepare_inputs(request)["input_ids"].shape[1]
    assert result.text == runner.processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert result.settings is settings
    assert result.prompt_id == request.prompt_id
    assert result.prompt_version == request.prompt_version
    assert result.engine_parameters == runner.engine_parameters
    if result.finish_reason == "length":
        assert result.n_generated_tokens == 24
        assert any("max_new_tokens=24" in warning for warning in result.warnings)
    else:
        assert result.token_ids[-1] in runner.eos_token_ids
    assert result.seconds > 0 and 0 < result.first_token_seconds < result.seconds
    assert result.preprocess_seconds > 0
    assert result.tokens_per_second == pytest.approx(result.n_generated_tokens / result.seconds)


def test_the_image_changes_the_report(medgemma, prompts):
    """The projector is random, not zero: different pixels give different greedy tokens."""
    settings = GenerationSettings(max_new_tokens=16)
    dark = medgemma.generate(build_report_request(make_cr_series(grey=0.0), prompts, settings=settings))
    bright = medgemma.generate(build_report_request(make_cr_series(grey=1.0), prompts, settings=settings))
    assert dark.token_ids != bright.token_ids


def test_streamed_pieces_concatenate_to_the_final_text(medgemma, prompts):
    request = build_report_request(make_ct_series(3), prompts, settings=GenerationSettings(max_new_tokens=24))
    result = assert_streamed_pieces_make_the_text(medgemma, request)
    assert result.token_ids == medgemma.generate(request).token_ids  # streaming changes nothing


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_exception_in_on_token_cancels_the_report_in_the_scheduler(tiny_medgemma_dir, prompts, error):
    settings = GenerationSettings(max_new_tokens=4000)
    request = build_report_request(make_cr_series(), prompts, settings=settings)
    calls: list[str] = []

    def cancel(piece: str) -> None:
        calls.append(piece)
        raise error(piece)

    with _client(tiny_medgemma_dir) as medgemma:
        scheduler = medgemma.service.scheduler
        scheduler.eos_token_ids = frozenset()  # the report could only end at 4000 tokens
        with pytest.raises(error):
            medgemma.generate(request, on_token=cancel)
        assert len(calls) == 1
        # The row is dropped at the next step, long before 4000 tokens.
        wait_until(
            lambda: scheduler.running == 0 and scheduler.waiting == 0, 10.0, what="the scheduler to drain"
        )
        short = build_report_request(make_cr_series(), prompts, settings=GenerationSettings(max_new_tokens=3))
        assert medgemma.generate(short).n_generated_tokens == 3  # the client still works afterwards


def test_concurrent_reports_decode_together_with_their_single_stream_tokens(medgemma, prompts):
    settings = GenerationSettings(max_new_tokens=12)
    series = [make_cr_series(grey=grey) for grey in (0.1, 0.5, 0.9)]
    requests = [build_report_request(one, prompts, settings=settings) for one in series]
    alone = [medgemma.generate(request).token_ids for request in requests]
    results: dict[int, list[int]] = {}

    def draft(index: int) -> None:
        results[index] = medgemma.generate(requests[index]).token_ids

    threads = [threading.Thread(target=draft, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [results[index] for index in range(len(requests))] == alone


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(medgemma, tiny_medgemma_dir, prompts):
    settings = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, seed=7)
    request = build_report_request(make_cr_series(), prompts, settings=settings)
    state = torch.random.get_rng_state()
    first = medgemma.generate(request)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert medgemma.generate(request).token_ids == first.token_ids
    other_seed = build_report_request(make_cr_series(), prompts, settings=replace(settings, seed=8))
    assert medgemma.generate(other_seed).token_ids != first.token_ids
    # What was set is kept; what was not comes from the checkpoint and is recorded as used.
    checkpoint = json.loads((tiny_medgemma_dir / "generation_config.json").read_text())
    assert first.settings.do_sample is True
    assert (first.settings.temperature, first.settings.top_k, first.settings.seed) == (1.5, 50, 7)
    assert first.settings.top_p == checkpoint["top_p"]
    greedy = medgemma.generate(
        build_report_request(make_cr_series(), prompts, settings=GenerationSettings(max_new_tokens=10))
    )
    assert greedy.settings.top_p is None


def test_stop_token_gives_finish_reason_stop(tiny_medgemma_dir, prompts):
    request = build_report_request(make_cr_series(), prompts, settings=GenerationSettings(max_new_tokens=8))
    with _client(tiny_medgemma_dir) as forced:
        first_token = forced.generate(request).token_ids[0]
        # Make the first greedy token a stop token: generation must end there with "stop".
        forced.service.scheduler.eos_token_ids = frozenset({first_token})
        result = forced.generate(request)
    assert result.token_ids == [first_token]
    assert result.finish_reason == "stop"
    assert not any("cut off" in warning for warning in result.warnings)


def test_a_report_cut_at_max_new_tokens_says_so(medgemma, prompts):
    request = build_report_request(make_cr_series(), prompts, settings=GenerationSettings(max_new_tokens=4))
    medgemma.service.scheduler.eos_token_ids = frozenset()
    try:
        result = medgemma.generate(request)
    finally:
        medgemma.service.scheduler.eos_token_ids = frozenset(medgemma.runner.eos_token_ids)
    assert (result.n_generated_tokens, result.finish_reason) == (4, "length")
    assert "cut off at max_new_tokens=4: the draft may be incomplete" in result.warnings


def test_the_checkpoints_suppressed_tokens_are_never_chosen(tiny_medgemma_dir, prompts, tmp_path):
    """``suppress_tokens`` of generation_config.json apply as in ``generate`` (parity holds)."""
    model_dir = tmp_path / "medgemma"
    shutil.copytree(tiny_medgemma_dir, model_dir)
    settings = GenerationSettings(max_new_tokens=24)
    request = build_report_request(make_cr_series(grey=0.3), prompts, settings=settings)
    suppressed = sorted(set(_plain_generate(tiny_medgemma_dir, request, 24)[:3]))
    config_path = model_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "suppress_tokens": suppressed}))
    with _client(model_dir) as medgemma:
        result = medgemma.generate(request)
    assert not set(result.token_ids) & set(suppressed)
    assert result.token_ids == _plain_generate(model_dir, request, 24)


def test_empty_generation_is_flagged(tiny_medgemma_dir, prompts):
    request = build_report_request(make_cr_series(), prompts, settings=GenerationSettings(max_new_tokens=1))
    with _client(tiny_medgemma_dir) as forced:
        # Force <end_of_turn> as the first (here: only) token: the model says nothing.
        end_of_turn = forced.runner.processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")
        bias = torch.zeros(forced.runner.model.config.text_config.vocab_size)
        bias[end_of_turn] = 1e4
        hook = forced.runner.model.lm_head.register_forward_hook(lambda module, args, logits: logits + bias)
        try:
            result = forced.generate(request)
        finally:
            hook.remove()
    assert result.token_ids == [end_of_turn]
    assert result.text == ""
    assert result.finish_reason == "stop"
    assert any("generated no text" in warning for warning in result.warnings)


def test_prompt_longer_than_the_context_is_an_input_error(medgemma, prompts):
    series = make_ct_series(5)
    request = build_report_request(series, prompts, settings=GenerationSettings(max_new_tokens=50))
    runner = medgemma.runner
    n_prompt = runner.prepare_inputs(request)["input_ids"].shape[1]
    context = runner.context_length
    try:
        runner.context_length = n_prompt - 1
        with pytest.raises(InputError) as raised:
            medgemma.generate(request)
        assert raised.value.source == series.series_instance_uid
        assert f"the prompt is {n_prompt} tokens" in raised.value.reason
        assert "5 images" in raised.value.reason
        # Fits, but not with 50 new tokens: the budget shrinks, and the result says so.
        runner.context_length = n_prompt + 3
        result = medgemma.generate(request)
    finally:
        runner.context_length = context
    assert result.n_generated_tokens <= 3
    assert any("max_new_tokens reduced from 50 to 3" in warning for warning in result.warnings)
    assert result.warnings[: len(request.warnings)] == request.warnings  # the request's come first


def test_a_processor_refusal_is_an_input_error_naming_the_series(medgemma, prompts):
    request = build_report_request(make_cr_series(), prompts, settings=GenerationSettings(max_new_tokens=2))
    request.messages[-1]["content"].append({"type": "image", "image": 42})  # not an image
    with pytest.raises(InputError) as raised:
        medgemma.generate(request)
    assert raised.value.source == request.source
    assert "the MedGemma processor cannot build the prompt" in raised.value.reason


# -- lifecycle and errors ------------------------------------------------------------------------


def test_lifecycle(tiny_medgemma_dir, prompts):
    runner = MedGemmaRunner(tiny_medgemma_dir, device="cpu")
    assert runner.identity.random_weights is True
    assert runner.load() is runner
    assert runner.is_loaded
    assert runner.device == "cpu"
    assert runner.model.dtype == torch.float32
    assert runner.model.config._attn_implementation == "sdpa"
    assert runner.context_length == runner.model.config.text_config.max_position_embeddings
    runner.close()
    assert not runner.is_loaded
    with pytest.raises(RuntimeError, match="not loaded"):
        runner.prepare_inputs(build_report_request(make_cr_series(), prompts, settings=GenerationSettings()))


def test_the_client_starts_its_thread_on_load_and_leaves_none_after_close(tiny_medgemma_dir, prompts):
    request = build_report_request(make_cr_series(), prompts, settings=GenerationSettings(max_new_tokens=2))
    before = _scheduler_threads()
    medgemma = _client(tiny_medgemma_dir)
    assert medgemma.identity.random_weights is True
    with pytest.raises(RuntimeError, match="not loaded"):
        medgemma.generate(request)
    assert medgemma.load() is medgemma
    assert medgemma.load() is medgemma  # once
    assert len(_scheduler_threads()) == len(before) + 1
    assert medgemma.generate(request).n_generated_tokens >= 1
    medgemma.close()
    assert _scheduler_threads() == before
    assert not medgemma.is_loaded and not medgemma.runner.is_loaded
    with pytest.raises(RuntimeError, match="not loaded"):
        medgemma.generate(request)
    medgemma.close()  # twice is fine
    with medgemma:  # and it loads again
        assert medgemma.generate(request).n_generated_tokens >= 1
    assert _scheduler_threads() == before
    with pytest.raises(TypeError, match="ReportRequest"):
        medgemma.generate("a request")  # type: ignore[arg-type]


def test_models_root_is_accepted(tiny_medgemma_dir):
    runner = MedGemmaRunner(tiny_medgemma_dir.parent, device="cpu")
    assert runner.model_dir == tiny_medgemma_dir


def test_load_errors_name_the_directory(tmp_path, tiny_medgemma_dir):
    with pytest.raises(ModelLoadError, match="does not exist"):
        MedGemmaRunner(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_medgemma_dir / "config.json").read_text())
    runner = MedGemmaRunner(broken, device="cpu")
    with pytest.raises(ModelLoadError) as raised:
        runner.load()
    assert str(broken) in str(raised.value)
    assert not runner.is_loaded
    with pytest.raises(ModelLoadError, match="dtype"):
        MedGemmaRunner(tiny_medgemma_dir, dtype="int8")


def test_bfloat16_on_cpu_when_asked(tiny_medgemma_dir, prompts):
    request = build_report_request(make_cr_series(), prompts, settings=GenerationSettings(max_new_tokens=3))
    with _client(tiny_medgemma_dir, dtype=torch.bfloat16) as medgemma:
        assert medgemma.runner.model.dtype == torch.bfloat16
        result = medgemma.generate(request)
    assert 1 <= result.n_generated_tokens <= 3
    assert dict(result.engine_parameters)["precision"] == "auto (bfloat16)"


# -- end to end ----------------------------------------------------------------------------------


@requires_dciodvfy
def test_generated_draft_becomes_a_validator_clean_report_sr(medgemma, runner, prompts, tmp_path):
    series = make_ct_series(6)
    request = build_report_request(
        series,
        prompts,
        settings=GenerationSettings(max_new_tokens=40),
        findings_context=[("pulmonary nodule", 0.7)],
    )
    result = medgemma.generate(request)
    sections = split_report(result.text)
    if sections.is_empty:
        pytest.skip("the random model generated no text for this input; nothing to write")
    algorithm = AlgorithmInfo(runner.identity.name, runner.identity.version)
    path = tmp_path / "draft.dcm"
    document = build_report_sr(series, result, request, runner.identity, algorithm)
    document.save_as(path, enforce_file_format=True)
    assert run_dciodvfy(path) == []
    read = highdicom.sr.srread(path)
    section_texts = [
        str(child.TextValue)
        for item in read.ContentSequence
        if item.ValueType == "CONTAINER"
        for child in item.ContentSequence
    ]
    assert section_texts == [text for text in (sections.findings, sections.impression) if text]
    comments = " ".join(str(item.TextValue) for item in read.ContentSequence if item.ValueType == "TEXT")
    assert RANDOM_WEIGHTS_WARNING in comments
    assert "pulmonary nodule (p=0.70)" in comments
