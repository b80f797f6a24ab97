"""operators/dicom_input/reader.py: files and folders → studies, series, rejected and skipped inputs."""

import logging
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom import data as pydicom_data
from pydicom.uid import generate_uid

from medgemma_deploy.dev.synthetic import write_bad_inputs, write_demo_study
from medgemma_deploy.errors import UsageError
from medgemma_deploy.operators.dicom_input.reader import is_image_sop_class, load_study_input


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("demo")
    return folder, write_demo_study(folder)


def _copy(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(f, folder / f.name)) for f in files]


def _by_modality(study_input):
    return {series.modality: series for study in study_input.studies for series in study.series}


def _edit(path: Path, target: Path | None = None, **attributes) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if attributes.get("SOPInstanceUID"):
        ds.file_meta.MediaStorageSOPInstanceUID = attributes["SOPInstanceUID"]
    ds.save_as(target or path, enforce_file_format=True)
    return target or path


def test_demo_study_loads_as_one_study_with_a_cr_and_a_ct_series(demo):
    folder, files = demo
    calls = []
    study_input = load_study_input(folder, progress=lambda done, total: calls.append((done, total)))
    assert study_input.rejected == [] and study_input.skipped == []
    assert len(study_input.studies) == 1
    series = _by_modality(study_input)
    assert set(series) == {"CR", "CT"}
    assert len(series["CR"].frames) == 1 and series["CR"].body_part_examined == "CHEST"
    assert len(series["CT"].frames) == 6
    assert [c[0] for c in calls] == list(range(1, len(files) + 1)) and calls[-1] == (len(files), len(files))
    assert series["CR"].frames[0].window_source.endswith("MONOCHROME1 inverted")


def test_ct_slices_are_ordered_along_the_slice_normal_not_by_name_or_number(demo, tmp_path):
    _, files = demo
    ct = _copy([f for f in files if f.name.startswith("CT")], tmp_path)
    for path in ct:  # instance numbers now run against the slice positions
        number = int(pydicom.dcmread(path, stop_before_pixels=True).InstanceNumber)
        _edit(path, InstanceNumber=10 - number)
    (series,) = _by_modality(load_study_input(tmp_path)).values()
    z = [float(frame.dataset.ImagePositionPatient[2]) for frame in series.frames]
    assert z == sorted(z) and len(set(z)) == 6


def test_series_without_geometry_is_ordered_by_instance_number_and_each_cr_is_a_frame(demo, tmp_path):
    _, files = demo
    cr = files[0]
    for number, name in [(3, "a"), (1, "b"), (2, "c")]:
        _edit(cr, tmp_path / name, InstanceNumber=number, SOPInstanceUID=generate_uid(entropy_srcs=[name]))
    (series,) = _by_modality(load_study_input(tmp_path)).values()
    assert [int(f.dataset.InstanceNumber) for f in series.frames] == [1, 2, 3]
    assert [f.path.name for f in series.frames] == ["b", "c", "a"]
    assert all(f.frame_number == 1 for f in series.frames)


def test_two_studies_in_one_folder_are_grouped_by_study_and_series(tmp_path):
    write_demo_study(tmp_path / "one", seed=0)
    write_demo_study(tmp_path / "two", seed=1)
    study_input = load_study_input(tmp_path)
    assert len(study_input.studies) == 2
    assert len({s.study_instance_uid for s in study_input.studies}) == 2
    for study in study_input.studies:
        assert [s.modality for s in study.series] == ["CR", "CT"]  # by Series Number
        for series in study.series:
            assert {f.dataset.StudyInstanceUID for f in series.frames} == {study.study_instance_uid}
            assert {f.dataset.SeriesInstanceUID for f in series.frames} == {series.series_instance_uid}


EXPECTED_BAD = {
    "truncated": ("rejected", "read", "truncated"),
    "not-dicom": (
        "rejected",
        "read",
        "not a DICOM file (no DICM preamble/prefix and not parseable as implicit VR)",
    ),
    "non-image-sr": (
        "skipped",
        "sop-class",
        "Basic Text SR Storage (1.2.840.10008.5.1.4.1.1.88.11) is not an image",
    ),
    "no-pixel-data": ("rejected", "pixels", "missing (7FE0,0010) 'Pixel Data'"),
    "zero-rows": ("rejected", "pixels", "'Rows' value of 0 is invalid"),
    "buffer-mismatch": ("rejected", "pixels", "the file may be truncated"),
    "undecodable-jpeg2000": ("rejected", "pixels", "'JPEG 2000 Image Compression (Lossless Only)'"),
    "inconsistent-series": ("rejected", "series", "Rows × Columns 32 × 32 differ from 64 × 64"),
}


def test_each_bad_input_is_reported_once_by_name_and_the_good_files_still_load(demo, tmp_path, caplog):
    _, files = demo
    _copy(files, tmp_path)
    bad = write_bad_inputs(tmp_path / "bad", tmp_path / "CT_0003.dcm")
    assert set(bad) == set(EXPECTED_BAD)
    with caplog.at_level(logging.WARNING, logger="medgemma_deploy.operators.dicom_input.reader"):
        study_input = load_study_input(tmp_path)
    reported = study_input.rejected + study_input.skipped
    assert len(reported) == len(bad)
    for case, path in bad.items():
        kind, stage, reason = EXPECTED_BAD[case]
        (entry,) = [r for r in reported if r.source == str(path)]
        assert entry in getattr(study_input, kind), case
        assert entry.stage == stage, case
        assert reason in entry.reason, (case, entry.reason)
        assert "DEMO^SYNTHETIC" not in entry.reason and "DEMO-0001" not in entry.reason
        assert sum(str(path) in message for message in caplog.messages) == 1, case
    assert "Traceback" not in caplog.text
    series = _by_modality(study_input)
    assert len(series["CT"].frames) == 6 and len(series["CR"].frames) == 1


def test_the_majority_geometry_is_kept_and_a_different_modality_is_named(demo, tmp_path):
    _, files = demo
    ct = _copy([f for f in files if f.name.startswith("CT")], tmp_path)
    _edit(ct[0], Modality="MR")
    study_input = load_study_input(tmp_path)
    (rejection,) = study_input.rejected
    assert rejection.source == str(ct[0]) and rejection.stage == "series"
    assert "Modality 'MR' differs from 'CT'" in rejection.reason
    assert len(_by_modality(study_input)["CT"].frames) == 5


def test_duplicates_hidden_files_and_dicomdir_are_skipped_with_reasons(demo, tmp_path):
    _, files = demo
    _copy(files[:1], tmp_path)
    shutil.copy(files[0], tmp_path / "zz-copy-of-cr")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01junk")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    (tmp_path / "DICOMDIR").write_bytes(b"\x00" * 200)
    study_input = load_study_input(tmp_path)
    reasons = {Path(r.source).name: r.reason for r in study_input.skipped}
    assert study_input.rejected == []
    assert (
        "duplicate SOP Instance UID" in reasons["zz-copy-of-cr"]
        and str(tmp_path / files[0].name) in reasons["zz-copy-of-cr"]
    )
    assert reasons[".DS_Store"] == "hidden file; skipped"
    assert reasons[".git"] == "hidden folder; skipped" and "HEAD" not in reasons
    assert reasons["DICOMDIR"].startswith("DICOMDIR")
    assert len(_by_modality(study_input)["CR"].frames) == 1


@pytest.mark.parametrize(
    ("name", "sop_class"),
    [
        ("test-SR.dcm", "Comprehensive SR Storage"),
        ("rtdose.dcm", "RT Dose Storage"),
        ("liver.dcm", "Segmentation Storage"),
    ],
    ids=["SR", "RTDOSE-with-pixels", "SEG-with-pixels"],
)
def test_non_image_objects_are_skipped_even_with_pixel_data(name, sop_class, tmp_path):
    source = pydicom_data.get_testdata_file(name)
    if source is None:
        pytest.skip(f"{name} not installed (pydicom-data)")
    target = Path(shutil.copy(source, tmp_path / name))
    study_input = load_study_input(target)
    assert study_input.studies == [] and study_input.rejected == []
    (skip,) = study_input.skipped
    assert (
        skip.stage == "sop-class"
        and skip.reason.startswith(f"{sop_class} (")
        and "is not an image" in skip.reason
    )


def test_missing_uids_are_rejected(demo, tmp_path):
    _, files = demo
    target = _edit(files[0], tmp_path / "no-study.dcm", StudyInstanceUID=None)
    (rejection,) = load_study_input(target).rejected
    assert rejection.stage == "read" and "(0020,000D) 'Study Instance UID'" in rejection.reason


def test_raw_dataset_without_preamble_is_read(demo, tmp_path):
    _, files = demo
    ds = pydicom.dcmread(files[1])
    del ds.file_meta
    ds.preamble = None
    target = tmp_path / "raw-implicit"
    pydicom.dcmwrite(target, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert target.read_bytes()[128:132] != b"DICM"
    study_input = load_study_input(target)
    assert study_input.rejected == []
    (series,) = _by_modality(study_input).values()
    assert series.frames[0].values.shape == (64, 64)


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.95, 0.999])
def test_a_file_cut_anywhere_is_rejected_not_loaded(demo, tmp_path, fraction):
    _, files = demo
    data = files[1].read_bytes()
    target = tmp_path / "cut.dcm"
    target.write_bytes(data[: int(len(data) * fraction)])
    study_input = load_study_input(target)
    assert study_input.studies == []
    (rejection,) = study_input.rejected + study_input.skipped
    assert rejection.source == str(target)
    assert "truncated" in rejection.reason or "not a DICOM file" in rejection.reason


def test_enhanced_multiframe_instance_gives_one_frame_per_frame(tmp_path):
    source = pydicom_data.get_testdata_file("emri_small_jpeg_2k_lossless.dcm")
    if source is None:
        pytest.skip("emri_small_jpeg_2k_lossless.dcm not installed (pydicom-data)")
    study_input = load_study_input(Path(shutil.copy(source, tmp_path / "emri")))
    (series,) = _by_modality(study_input).values()
    assert [f.frame_number for f in series.frames] == list(range(1, 11))
    assert len(series.datasets) == 1


def test_missing_input_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_study_input(tmp_path / "nowhere")


def test_image_sop_classes_are_told_from_non_image_ones():
    assert is_image_sop_class("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    assert is_image_sop_class("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
    assert not is_image_sop_class("1.2.840.10008.5.1.4.1.1.88.22")  # Enhanced SR
    assert not is_image_sop_class("1.2.840.10008.5.1.4.1.1.66.4")  # Segmentation Storage
    assert not is_image_sop_class("1.2.3.4.5")


def test_a_file_ending_inside_an_element_header_is_truncated_not_missing_pixel_data(demo, tmp_path):
    _, files = demo
    data = files[1].read_bytes()
    pixel_data_start = pydicom.dcmread(files[1]).get_item(0x7FE00010).value_tell - 12  # OW header: 12 bytes
    target = tmp_path / "cut-in-header.dcm"
    target.write_bytes(data[: pixel_data_start + 4])
    (rejection,) = load_study_input(target).rejected
    assert rejection.stage == "read" and "4 bytes of an incomplete element" in rejection.reason


def test_encapsulated_pixel_data_cut_short_is_truncated(tmp_path):
    source = pydicom_data.get_testdata_file("emri_small_jpeg_2k_lossless_too_short.dcm")
    if source is None:
        pytest.skip("emri_small_jpeg_2k_lossless_too_short.dcm not installed (pydicom-data)")
    target = Path(shutil.copy(source, tmp_path / "short.dcm"))
    (rejection,) = load_study_input(target).rejected
    assert rejection.stage == "read"
    assert "the file is truncated: End of file reached before delimiter (FFFE,E0DD)" in rejection.reason
