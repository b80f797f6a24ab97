"""MedGemma inputs: prompt book validation, slice sampling, CT three-window rendering, requests.

Series are built here by hand from pydicom's real ``CT_small.dcm`` (cloned into slices with
known Hounsfield values), so these tests need no DICOM loader and no model.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import yaml

from medgemma_deploy.domain import GenerationSettings
from medgemma_deploy.errors import UsageError
from medgemma_deploy.operators.medgemma.prompts import PromptBook
from medgemma_deploy.operators.medgemma.request import (
    CT_WINDOWS,
    build_report_request,
    render_ct_three_window,
    sample_evenly,
)
from tests.support.inputs import PACKAGED_PROMPTS, make_cr_series, make_ct_series


@pytest.fixture(scope="module")
def prompts() -> PromptBook:
    return PromptBook.load()


def _texts(request) -> list[str]:
    return [item["text"] for item in request.messages[1]["content"] if item["type"] == "text"]


# -- prompt book -------------------------------------------------------------------------------


def test_packaged_prompt_book_covers_the_modality_families(prompts):
    by_modality = {modality: spec for spec in prompts.families for modality in spec.modalities}
    assert by_modality["CR"].instruction == "Describe this X-ray"
    assert by_modality["CR"].system == "You are an expert radiologist."
    assert by_modality["CR"] is by_modality["DX"]
    assert by_modality["CT"].max_images == 85
    assert by_modality["CT"].rendering == "ct_three_window"
    assert by_modality["CT"].instruction_position == "after"
    for modality in ("MR", "XC", "OP", "SM"):
        assert modality in by_modality
    ids = [spec.id for spec in prompts.families]
    assert len(ids) == len(set(ids))
    assert all(spec.version for spec in prompts.families)
    assert prompts.for_modality("US")[1] is False
    assert prompts.for_modality("ct")[0].family == "ct"


def _write_prompts(tmp_path: Path, mutate) -> Path:
    document = yaml.safe_load(PACKAGED_PROMPTS.read_text())
    mutate(document)
    path = tmp_path / "site-prompts.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True))
    return path


BAD_PROMPT_BOOKS = {
    "missing id": (lambda d: d["families"]["ct"].pop("id"), "families.ct is missing id"),
    "empty instruction": (lambda d: d["families"]["mr"].update(instruction="  "), "families.mr.instruction"),
    "empty system": (lambda d: d["families"]["chest_xray"].update(system=""), "families.chest_xray.system"),
    "unknown key": (lambda d: d["families"]["ct"].update(instuction="x"), "unknown key(s) instuction"),
    "repeated id": (
        lambda d: d["families"]["mr"].update(id=d["families"]["ct"]["id"]),
        "families.mr.id",
    ),
    "modality twice": (lambda d: d["families"]["mr"]["modalities"].append("CT"), "modality CT"),
    "no generic": (lambda d: d["families"].pop("generic"), "families.generic is missing"),
    "bad rendering": (lambda d: d["families"]["ct"].update(rendering="mip"), "families.ct.rendering"),
    "zero images": (lambda d: d["families"]["ct"].update(max_images=0), "families.ct.max_images"),
    "label without number": (lambda d: d["families"]["ct"].update(image_label="SLICE"), "image_label"),
    "context without findings": (lambda d: d.update(findings_context="Screening says"), "{findings}"),
    "bad position": (
        lambda d: d["families"]["ct"].update(instruction_position="middle"),
        "instruction_position",
    ),
    "no families": (lambda d: d.update(families={}), "families must be"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPT_BOOKS), ids=list(BAD_PROMPT_BOOKS))
def test_prompt_book_validation_names_file_and_key(tmp_path, case):
    mutate, expected = BAD_PROMPT_BOOKS[case]
    path = _write_prompts(tmp_path, mutate)
    with pytest.raises(UsageError) as raised:
        PromptBook.load(path)
    assert str(path) in str(raised.value)
    assert expected in str(raised.value)


def test_prompt_book_unreadable_or_not_yaml(tmp_path):
    with pytest.raises(UsageError, match=r"missing\.yaml"):
        PromptBook.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("families: [unclosed\n")
    with pytest.raises(UsageError, match=r"broken\.yaml"):
        PromptBook.load(broken)


def test_site_prompt_file_overrides_the_instruction(tmp_path):
    german = {"instruction": "Beschreiben Sie dieses Röntgenbild", "version": 7}
    path = _write_prompts(tmp_path, lambda d: d["families"]["chest_xray"].update(german))
    book = PromptBook.load(path)
    request = build_report_request(make_cr_series(), book, settings=GenerationSettings())
    assert _texts(request) == ["Beschreiben Sie dieses Röntgenbild"]
    assert request.prompt_version == "7"


# -- sampling and rendering ------------------------------------------------------------------


def test_sample_evenly_keeps_first_and_last_with_even_gaps():
    indices = sample_evenly(200, 85)
    assert len(indices) == 85
    assert indices[0] == 0
    assert indices[-1] == 199
    gaps = np.diff(indices)
    assert gaps.min() >= 1  # strictly increasing: no slice twice
    assert gaps.max() - gaps.min() <= 1  # even spacing up to rounding
    assert sample_evenly(12, 85) == list(range(12))
    assert sample_evenly(7, 1) == [3]
    with pytest.raises(ValueError, match="n_frames"):
        sample_evenly(0, 85)


def test_three_window_rendering_of_known_hounsfield_units():
    hounsfield = np.array([[-2000, -1024, -135, 0], [40, 80, 215, 3000]], dtype=np.float32)
    image = np.asarray(render_ct_three_window(hounsfield))
    assert image.shape == (2, 4, 3)
    assert image.dtype == np.uint8
    # Independent expectation: each channel maps its window's [lower, upper] HU linearly to
    # [0, 255] (the DICOM LINEAR formula differs by half a HU step, hence the tolerance).
    for channel, (_, center, width) in enumerate(CT_WINDOWS):
        lower = center - width / 2
        expected = np.clip((hounsfield - lower) / width, 0, 1) * 255
        assert np.abs(image[..., channel].astype(float) - expected).max() <= 2.0, CT_WINDOWS[channel]
    assert image[0, 0].tolist() == [0, 0, 0]  # below every window
    assert image[1, 3].tolist() == [255, 255, 255]  # above every window
    # 0 HU: mid-grey in the wide window, lower bound of the brain window.
    assert abs(int(image[0, 3, 0]) - 128) <= 1
    assert image[0, 3, 2] <= 1


# -- requests ---------------------------------------------------------------------------------


def test_ct_request_samples_85_of_200_slices_with_labels_and_instruction_last(prompts):
    series = make_ct_series(200)
    request = build_report_request(series, prompts, settings=GenerationSettings(max_new_tokens=64))
    content = request.messages[1]["content"]
    images = [item for item in content if item["type"] == "image"]
    assert len(images) == request.n_images == 85
    assert request.frames[0] is series.frames[0]
    assert request.frames[-1] is series.frames[-1]
    expected_numbers = [index + 1 for index in sample_evenly(200, 85)]
    assert [frame.dataset.InstanceNumber for frame in request.frames] == expected_numbers
    assert any("85 of 200 slices sampled evenly" in note for note in request.notes)
    # Images interleaved with their labels; the instruction after the last label.
    assert content[1]["type"] == "image"
    assert content[2]["text"] == "SLICE 1"
    assert content[-1]["text"].startswith("SLICE 85")
    assert "write a draft radiology report" in content[-1]["text"]
    assert all(a["type"] != "text" or b["type"] != "text" for a, b in itertools.pairwise(content))
    # The sampled slice is rendered from its own HU values, channel by channel.
    rendered = np.asarray(images[-1]["image"])
    assert rendered.shape == (*series.frames[-1].values.shape, 3)
    np.testing.assert_array_equal(rendered, np.asarray(render_ct_three_window(series.frames[-1].values)))
    system_text = {"type": "text", "text": "You are an expert radiologist."}
    assert request.messages[0] == {"role": "system", "content": [system_text]}
    assert request.findings_grounded is False
    assert request.source == series.series_instance_uid


def test_chest_xray_request_follows_googles_example(prompts):
    series = make_cr_series(grey=0.5)
    request = build_report_request(series, prompts, settings=GenerationSettings())
    system, user = request.messages
    assert system["content"][0]["text"] == "You are an expert radiologist."
    assert [item["type"] for item in user["content"]] == ["text", "image"]
    assert user["content"][0]["text"] == "Describe this X-ray"
    image = user["content"][1]["image"]
    assert image.mode == "RGB"
    assert np.asarray(image).shape == (48, 40, 3)
    assert set(np.unique(np.asarray(image)).tolist()) == {round(0.5 * 255)}
    assert request.prompt_id == prompts.for_modality("CR")[0].id
    assert request.warnings == []


def test_findings_grounded_request_carries_the_screening_context(prompts):
    series = make_cr_series()
    request = build_report_request(
        series,
        prompts,
        settings=GenerationSettings(),
        findings_context=[("pneumothorax", 0.912), ("pleural effusion", 0.5)],
    )
    text = _texts(request)[0]
    assert text.startswith("Describe this X-ray")
    assert "Automated screening suggests: pneumothorax (p=0.91), pleural effusion (p=0.50)" in text
    assert request.findings_grounded is True
    assert request.findings_context == (("pneumothorax", 0.912), ("pleural effusion", 0.5))


@pytest.mark.parametrize(
    ("findings", "error"),
    [
        ([("pneumothorax", 1.5)], ValueError),
        ([("", 0.5)], ValueError),
        ("pneumothorax", TypeError),
        ([("pneumothorax",)], TypeError),
    ],
    ids=["probability>1", "empty name", "string", "not a pair"],
)
def test_findings_context_is_validated(prompts, findings, error):
    with pytest.raises(error, match="findings_context"):
        build_report_request(
            make_cr_series(), prompts, settings=GenerationSettings(), findings_context=findings
        )


def test_unknown_modality_gets_the_generic_prompt_and_a_warning(prompts):
    series = make_cr_series(modality="US")
    request = build_report_request(series, prompts, settings=GenerationSettings())
    assert request.prompt_id == prompts.for_modality("US")[0].id
    assert request.prompt_id == next(spec.id for spec in prompts.families if spec.family == "generic")
    assert len(request.warnings) == 1
    assert "modality US" in request.warnings[0]


def test_request_arguments_are_checked(prompts):
    with pytest.raises(TypeError, match="settings"):
        build_report_request(make_cr_series(), prompts, settings={"max_new_tokens": 5})
    empty = make_cr_series()
    empty.frames = []
    with pytest.raises(ValueError, match="no frames"):
        build_report_request(empty, prompts, settings=GenerationSettings())


def test_generation_settings_validation_and_parameters():
    assert GenerationSettings().as_parameters() == (("decoding", "greedy"), ("max_new_tokens", "512"))
    sampled = GenerationSettings(max_new_tokens=10, do_sample=True, temperature=0.7, top_p=0.9, seed=3)
    assert dict(sampled.as_parameters()) == {
        "decoding": "sampling",
        "max_new_tokens": "10",
        "temperature": "0.7",
        "top_p": "0.9",
        "seed": "3",
    }
    with pytest.raises(ValueError, match="temperature"):
        GenerationSettings(temperature=0.5)  # ignored by greedy decoding: refuse, don't pretend
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(do_sample=True, top_p=1.5)
