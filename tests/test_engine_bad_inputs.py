"""Regression tests for issue 12's findings: one bad file never costs the rest of a run.

Each test builds the input the issue's reporter used (from a real sample file), runs it next to a
good CT slice, and checks that the bad one is rejected or skipped with one line naming the file,
the stage and the reason, while the good one is still written. Worker-side findings (10) are in
``tests/worker/edge/test_server.py``; the listener's (three good slices and a bad neighbour) in
``tests/listener/test_scp.py``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from medgemma_deploy.domain import Rejection, Series
from medgemma_deploy.engine import EngineOptions, PipelineEngine
from medgemma_deploy.operators.dicom_input import pixels
from medgemma_deploy.operators.dicom_input.reader import load_study_input
from medgemma_deploy.results import series_rejection
from tests.support.dciodvfy import assert_dciodvfy_clean, requires_dciodvfy
from tests.support.inputs import read_testdata

# The tests set invalid values on purpose; pydicom's warning about each one is expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning"),
    pytest.mark.filterwarnings("ignore:The value length:UserWarning"),
]


def _fresh(dataset: pydicom.Dataset, label: str) -> pydicom.Dataset:
    """A copy with its own SOP Instance and Series UIDs (so it never joins the good slice's series)."""
    copied = copy.deepcopy(dataset)
    copied.SOPInstanceUID = generate_uid(entropy_srcs=["issue 12", label])
    copied.SeriesInstanceUID = generate_uid(entropy_srcs=["issue 12 series", label])
    copied.file_meta.MediaStorageSOPInstanceUID = copied.SOPInstanceUID
    return copied


def _only_rejection(dataset: pydicom.Dataset, folder: Path, keyword: str, value: object) -> Rejection:
    """The one rejection of a fresh copy of ``dataset`` whose ``keyword`` is set to ``value``."""
    bad = _fresh(dataset, f"{keyword} {value}")
    setattr(bad, keyword, value)
    (entry,) = load_study_input(_save(bad, folder / "bad.dcm")).rejected
    return entry


def _save(dataset: pydicom.Dataset, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each invalid value: writing them is the point
        dataset.save_as(path, enforce_file_format=False)
    return path


@pytest.fixture(scope="module")
def ct() -> pydicom.Dataset:
    return read_testdata("CT_small.dcm")[1]


@pytest.fixture(scope="module")
def engine(tiny_models_root):
    with PipelineEngine("classify", tiny_models_root, EngineOptions(device="cpu")) as loaded:
        yield loaded


def _run(engine: PipelineEngine, bad: Path, ct: pydicom.Dataset, tmp_path: Path) -> dict:
    """Classify ``bad`` next to a good CT slice; returns results.json, having checked the good one."""
    folder = bad.parent
    _save(_fresh(ct, "good neighbour"), folder / "good.dcm")
    results = engine.process(folder, tmp_path / "out")
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    written_sources = {o["source_series_instance_uid"] for o in document["outputs"]}
    good_series = pydicom.dcmread(folder / "good.dcm").SeriesInstanceUID
    assert good_series in written_sources, "the good neighbour's SR/SEG must still be written"
    assert results.exit_code == (3 if document["rejected"] else 0)
    return document


def _entry(document: dict, path: Path, kind: str = "rejected") -> dict:
    (entry,) = [e for e in document[kind] if e["source"] == str(path)]
    return entry


# Finding 1: unknown or private SOP Class UID → KeyError in highdicom's SEG writer.
@pytest.mark.parametrize("sop_class", ["1.2.826.0.1.3680043.9.9999.77", "abc"])
def test_unknown_sop_class_is_skipped_as_unsupported_and_named(engine, ct, tmp_path, sop_class):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = _fresh(ct, sop_class)
    bad.SOPClassUID = sop_class
    path = _save(bad, folder / "private.dcm")
    entry = _entry(_run(engine, path, ct, tmp_path), path, "skipped")
    assert entry["stage"] == "sop-class"
    assert sop_class in entry["reason"] and "unsupported" in entry["reason"]


# Finding 2: a valid multi-frame instance of a single-frame SOP class crashed the SR writer.
def test_multi_frame_secondary_capture_never_ends_the_run(engine, ct, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    source, _ = read_testdata("SC_rgb_rle_2frame.dcm")
    path = Path(folder / "sc_2frame.dcm")
    path.write_bytes(source.read_bytes())
    document = _run(engine, path, ct, tmp_path)
    # Either written (once the SR writer handles it) or rejected naming the file; never a crash.
    series_files = {f for s in document["series"] for f in s["files"]}
    rejected_sources = {e["source"] for e in document["rejected"]}
    assert str(path) in series_files | rejected_sources


# Finding 3: a Transfer Syntax UID that is not one.
@pytest.mark.parametrize("uid", ["1.2.3.4.5", "abc"])
def test_transfer_syntax_that_is_not_one_is_rejected(engine, ct, tmp_path, uid):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = _fresh(ct, uid)
    bad.file_meta.TransferSyntaxUID = uid
    path = _save(bad, folder / "ts.dcm")
    entry = _entry(_run(engine, path, ct, tmp_path), path)
    assert entry["stage"] == "pixels" and "not a transfer syntax" in entry["reason"]


# Finding 4: an empty Number of Frames (int(None) in the SEG writer).
def test_empty_number_of_frames_is_rejected_at_read_time(engine, ct, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = _fresh(ct, "empty frames")
    bad.NumberOfFrames = None
    path = _save(bad, folder / "frames.dcm")
    entry = _entry(_run(engine, path, ct, tmp_path), path)
    assert entry["stage"] == "pixels" and "'Number of Frames' is present but empty" in entry["reason"]


# Finding 5: a Modality LUT that overflows once Pixel Representation is flipped.
def test_modality_lut_overflow_is_rejected(tmp_path):
    _, source = read_testdata("mlut_18.dcm")
    bad = _fresh(source, "mlut")
    assert bad.PixelRepresentation == 1 and bad.ModalityLUTSequence[0].LUTDescriptor[1] < 0
    bad.PixelRepresentation = 0  # the LUT's negative first mapped value no longer fits unsigned pixels
    path = _save(bad, tmp_path / "mlut.dcm")
    study_input = load_study_input(path)
    (entry,) = study_input.rejected
    assert entry.source == str(path) and entry.stage == "pixels"
    assert "Modality, VOI or palette LUT of frame 1 cannot be applied" in entry.reason
    assert "out of bounds" in entry.reason


# Finding 6: byte flips giving an unknown VR (NotImplementedError in a writer, much later).
def test_unknown_vr_from_a_byte_flip_is_rejected_at_read(ct, tmp_path):
    path = _save(_fresh(ct, "vr"), tmp_path / "vr.dcm")
    data = bytearray(path.read_bytes())
    position = data.find(b"DA", 200)  # the first date element's explicit VR
    data[position : position + 2] = b"ZZ"
    path.write_bytes(bytes(data))
    (entry,) = load_study_input(path).rejected
    assert entry.stage == "read" and "Unknown Value Representation 'ZZ'" in entry.reason


# Finding 7: memory — sizes declared in the header are refused before any decode.
def _no_decode(monkeypatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixel data was decoded although the header is beyond the budget")

    monkeypatch.setattr(pixels, "_decode_frame", refuse)


def test_tiny_rle_file_declaring_32768_squared_rgb_is_refused_before_decode(monkeypatch, tmp_path):
    _, source = read_testdata("SC_rgb_rle_2frame.dcm")
    bad = _fresh(source, "rle huge")
    bad.Rows = bad.Columns = 32768
    bad.NumberOfFrames = 1
    bad.PixelData = encapsulate([bytes(64) + b"\x81\x00" * 30])
    path = _save(bad, tmp_path / "huge.dcm")
    assert path.stat().st_size < 4096
    _no_decode(monkeypatch)
    (entry,) = load_study_input(path).rejected
    assert "max_frame_megapixels" in entry.reason and "32768 × 32768" in entry.reason


def test_one_bit_16384_squared_is_refused_before_decode(ct, monkeypatch, tmp_path):
    bad = _fresh(ct, "one bit")
    bad.Rows = bad.Columns = 16384
    bad.BitsAllocated, bad.BitsStored, bad.HighBit, bad.PixelRepresentation = 1, 1, 0, 0
    bad.PixelData = bytes(16384 * 16384 // 8)
    path = _save(bad, tmp_path / "onebit.dcm")
    _no_decode(monkeypatch)
    (entry,) = load_study_input(path).rejected
    assert "max_frame_megapixels" in entry.reason


def test_ten_thousand_frames_are_refused_before_decode(ct, monkeypatch, tmp_path):
    bad = _fresh(ct, "10000 frames")
    bad.Rows = bad.Columns = 64
    bad.NumberOfFrames = 10000
    bad.PixelData = bytes(10000 * 64 * 64 * 2)
    path = _save(bad, tmp_path / "frames.dcm")
    _no_decode(monkeypatch)
    (entry,) = load_study_input(path).rejected
    assert "max_series_frames" in entry.reason and "10000" in entry.reason


def test_a_series_beyond_the_budget_is_refused_as_a_whole(ct, monkeypatch, tmp_path):
    budget = pixels.MemoryBudget(max_series_decoded_bytes=3 * 128 * 128 * pixels.DECODED_BYTES_PER_SAMPLE)
    series_uid = generate_uid(entropy_srcs=["budget series"])
    paths = []
    for index in range(4):
        slice_ = _fresh(ct, f"slice {index}")
        slice_.SeriesInstanceUID = series_uid
        paths.append(_save(slice_, tmp_path / f"slice{index}.dcm"))
    _no_decode(monkeypatch)
    study_input = load_study_input(tmp_path, budget=budget)
    assert study_input.studies == []
    assert sorted(e.source for e in study_input.rejected) == sorted(str(p) for p in paths)
    assert all("max_series_decoded_mib" in e.reason for e in study_input.rejected)


# Finding 8: invalid UIDs, degenerate orientation, and a NUL in Patient's Name copied into outputs.
@pytest.mark.parametrize("uid", ["1.2 3.4", "1.2.3..4", "1.02.3", "1." + "2" * 70, "1.2.\u00e9"])
@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"])
def test_invalid_uids_reject_the_instance(ct, tmp_path, keyword, uid):
    entry = _only_rejection(ct, tmp_path, keyword, uid)
    assert entry.stage == "header" and "is not a valid UID" in entry.reason


@pytest.mark.parametrize("orientation", [[0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], [1, 0, 0, 2, 0, 0]])
def test_zero_or_parallel_orientation_is_rejected(ct, tmp_path, orientation):
    entry = _only_rejection(ct, tmp_path, "ImageOrientationPatient", orientation)
    assert entry.stage == "header" and "'Image Orientation (Patient)'" in entry.reason


@requires_dciodvfy
def test_nul_in_patient_name_never_reaches_an_output(engine, ct, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = _fresh(ct, "nul name")
    bad.PatientName = "AB\x00CD"
    path = _save(bad, folder / "nul.dcm")
    document = _run(engine, path, ct, tmp_path)
    outputs = [o for o in document["outputs"] if o["source_series_instance_uid"] == bad.SeriesInstanceUID]
    # The default relevance format writes the maps as SEG and Parametric Map.
    assert {o["kind"] for o in outputs} == {"SR", "SEG", "PMAP"}
    for output in outputs:
        written = pydicom.dcmread(tmp_path / "out" / output["path"])
        assert str(written.PatientName) == "ABCD"
        assert_dciodvfy_clean(tmp_path / "out" / output["path"])


# Finding 9: absurd or non-finite rescale was classified without a word.
@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("RescaleSlope", "inf"),
        ("RescaleSlope", "-inf"),
        ("RescaleSlope", "1e30"),
        ("RescaleSlope", "0"),
        ("RescaleIntercept", "inf"),
        ("RescaleIntercept", "-inf"),
        ("RescaleIntercept", "1e308"),
    ],
)
def test_non_finite_or_absurd_rescale_is_rejected(ct, tmp_path, keyword, value):
    entry = _only_rejection(ct, tmp_path, keyword, value)
    assert entry.stage == "pixels" and "Rescale" in entry.reason


# Finding 11: SEG-stage rejections named a SOP Instance UID; warnings went raw to stderr.
def test_series_rejection_names_the_file_of_the_instance_an_error_names(ct, tmp_path):
    from medgemma_deploy.domain import ImageFrame
    from medgemma_deploy.errors import InputError

    path = tmp_path / "slice.dcm"
    frame = ImageFrame(path, ct, 1, np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32), "test")
    series = Series(str(ct.StudyInstanceUID), str(ct.SeriesInstanceUID), "CT", None, [frame])
    rejection = series_rejection(series, "seg", InputError(str(ct.SOPInstanceUID), "no frame of reference"))
    assert rejection.source == str(path) and rejection.stage == "seg"
    unexpected = series_rejection(series, "seg", TypeError("int() argument must be a string"))
    assert unexpected.source == str(path)
    assert unexpected.reason == "unexpected error: TypeError: int() argument must be a string"


def test_cli_stderr_has_only_log_lines_for_hostile_inputs(ct, tiny_models_root, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for index, uid in enumerate(["1.2 3.4", "abc", "1.02.3"]):
        bad = _fresh(ct, f"cli {uid}")
        bad.StudyInstanceUID = uid
        _save(bad, folder / f"uid{index}.dcm")
    _save(_fresh(ct, "cli good"), folder / "good.dcm")
    command = [sys.executable, "-m", "medgemma_deploy", "classify", "-i", str(folder), "-o"]
    completed = subprocess.run(
        [*command, str(tmp_path / "out"), "-m", str(tiny_models_root), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "default"},
        check=False,
    )
    assert completed.returncode == 3, completed.stderr
    raw = [
        line
        for line in completed.stderr.splitlines()
        if not line.startswith(("INFO ", "WARNING ")) and "input(s) rejected" not in line
    ]
    assert raw == []
    assert completed.stderr.count("WARNING rejected") == 3


# Finding 2 (isolation): any exception in one series' step rejects that series; a worker outage stops.
def test_a_failing_step_rejects_its_series_only_and_a_service_error_propagates(ct, tmp_path):
    from medgemma_deploy.domain import ImageFrame
    from medgemma_deploy.errors import ServiceError
    from medgemma_deploy.results import RunResults

    path = tmp_path / "slice.dcm"
    frame = ImageFrame(path, ct, 1, np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32), "test")
    series = Series(str(ct.StudyInstanceUID), str(ct.SeriesInstanceUID), "CT", None, [frame])
    results = RunResults(command="classify", disclaimer="test")

    def broken() -> None:
        raise KeyError("1.2.826.0.1.3680043.9.9999.77")

    assert results.isolated(series, "seg", broken) is None
    [rejection] = results.rejected
    assert rejection.source == str(path) and rejection.stage == "seg" and "KeyError" in rejection.reason
    assert results.isolated(series, "sr", lambda: "written") == "written"

    def outage() -> None:
        raise ServiceError("worker grpc://127.0.0.1:1: UNAVAILABLE")

    with pytest.raises(ServiceError):
        results.isolated(series, "classify", outage)
    assert len(results.rejected) == 1


# Finding 8 (sanitising): the derivation copy holds no control characters and no invalid Type 2 value.
def test_derivation_copies_drop_control_characters_and_invalid_inherited_values(ct):
    from medgemma_deploy.operators.writers.common import prepare_sources

    source = copy.deepcopy(ct)
    source.PatientName = "AB\x00CD^E\x07F"
    source.StudyDate = "20241399"  # no such month
    source.AccessionNumber = "A" * 40  # SH allows 16 characters
    [prepared] = prepare_sources([source])
    assert str(prepared.PatientName) == "ABCD^EF"
    assert prepared.StudyDate in (None, "") and prepared.AccessionNumber in (None, "")
    assert str(source.PatientName) == "AB\x00CD^E\x07F"  # the caller's dataset is untouched


def test_the_default_budget_takes_an_85_slice_ct(tmp_path):
    """The budget refuses what is absurd, not the real-size CT every path is built for."""
    from tests.support.real_size import write_multislice_ct

    write_multislice_ct(tmp_path / "ct", 85)
    study_input = load_study_input(tmp_path / "ct")
    assert not study_input.rejected
    (series,) = study_input.studies[0].series
    assert len(series.frames) == 85


def test_a_series_past_the_default_budget_is_rejected_naming_the_setting(tmp_path):
    from tests.support.real_size import write_multislice_ct

    write_multislice_ct(tmp_path / "ct", 89)
    study_input = load_study_input(tmp_path / "ct")
    assert not study_input.studies or not study_input.studies[0].series
    assert study_input.rejected and all("max_series_decoded_mib" in r.reason for r in study_input.rejected)
