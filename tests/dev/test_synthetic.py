"""medgemma_deploy/dev/synthetic.py: a valid, deterministic, patient-free demo study and the bad-input set."""

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medgemma_deploy.dev.synthetic import (
    DEMO_PATIENT_ID,
    DEMO_PATIENT_NAME,
    write_bad_inputs,
    write_demo_study,
)
from medgemma_deploy.operators.dicom_input.reader import load_study_input
from tests.support.dciodvfy import requires_dciodvfy, run_dciodvfy


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> list[Path]:
    return write_demo_study(tmp_path_factory.mktemp("demo"))


@requires_dciodvfy
def test_every_file_is_valid_for_its_iod(demo):
    for path in demo:
        assert run_dciodvfy(path) == [], path.name


def test_same_seed_gives_identical_files_and_another_seed_new_uids(demo, tmp_path):
    again = write_demo_study(tmp_path / "again", seed=0)
    assert [p.name for p in again] == [p.name for p in demo]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(again, demo, strict=True))
    other = write_demo_study(tmp_path / "other", seed=1)
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in demo}
    assert uids.isdisjoint({pydicom.dcmread(p).SOPInstanceUID for p in other})


def test_study_is_synthetic_and_identifies_no_patient(demo):
    datasets = [pydicom.dcmread(p) for p in demo]
    assert {str(ds.PatientName) for ds in datasets} == {DEMO_PATIENT_NAME}
    assert {ds.PatientID for ds in datasets} == {DEMO_PATIENT_ID}
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert all("SYNTHETIC" in ds.ImageComments for ds in datasets)
    assert all(ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian for ds in datasets)


def test_chest_cr_is_a_monochrome1_12_bit_portrait_with_window_and_spacing(demo):
    cr = pydicom.dcmread(demo[0])
    assert cr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1" and cr.Modality == "CR"
    assert cr.PhotometricInterpretation == "MONOCHROME1"
    assert (cr.Rows, cr.Columns) == (320, 256)
    assert (cr.BitsAllocated, cr.BitsStored, cr.HighBit) == (16, 12, 11)
    assert cr.pixel_array.max() < 4096
    assert "WindowCenter" in cr and "WindowWidth" in cr
    assert all(float(v) > 0 for v in cr.ImagerPixelSpacing)


def test_chest_cr_shows_dark_lungs_and_a_bright_spine(demo):
    study = load_study_input(demo[0])
    frame = study.studies[0].series[0].frames[0]
    rows, columns = frame.display.shape
    lung = frame.display[int(rows * 0.45), int(columns * 0.25)]
    spine = frame.display[int(rows * 0.45), columns // 2]
    outside = frame.display[2, 2]
    assert spine > lung + 0.3 and lung >= outside


def test_ct_series_is_a_stack_of_hounsfield_slices_in_one_frame_of_reference(demo):
    slices = [pydicom.dcmread(p) for p in demo[1:]]
    assert len(slices) == 6
    assert len({ds.SeriesInstanceUID for ds in slices}) == 1
    assert len({ds.FrameOfReferenceUID for ds in slices}) == 1
    z = [float(ds.ImagePositionPatient[2]) for ds in slices]
    assert np.allclose(np.diff(z), float(slices[0].SliceThickness))
    for ds in slices:
        assert (ds.Rows, ds.Columns, ds.PixelRepresentation) == (64, 64, 1)
        assert float(ds.RescaleIntercept) == -1024 and ds.pixel_array.dtype == np.int16
        hounsfield = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hounsfield[0, 0] == pytest.approx(-1000, abs=50)  # air outside the body
        assert (hounsfield < -700).sum() > 200  # lungs
        assert (hounsfield > 400).sum() > 10  # spine and ribs
        assert (np.abs(hounsfield - 40) < 40).sum() > 300  # soft tissue


def test_bad_inputs_are_one_file_per_case_with_their_own_uids(demo, tmp_path):
    bad = write_bad_inputs(tmp_path, demo[1])
    assert set(bad) == {
        "truncated",
        "not-dicom",
        "non-image-sr",
        "no-pixel-data",
        "zero-rows",
        "buffer-mismatch",
        "undecodable-jpeg2000",
        "inconsistent-series",
    }
    assert len({p.name for p in bad.values()}) == len(bad) and all(p.is_file() for p in bad.values())
    assert bad["truncated"].stat().st_size == demo[1].stat().st_size // 2
    good = pydicom.dcmread(demo[1])
    readable = [k for k in bad if k not in ("truncated", "not-dicom")]
    sop_uids = {pydicom.dcmread(bad[k]).SOPInstanceUID for k in readable}
    assert len(sop_uids) == len(readable) and good.SOPInstanceUID not in sop_uids
    odd = pydicom.dcmread(bad["inconsistent-series"])
    assert odd.SeriesInstanceUID == good.SeriesInstanceUID and (odd.Rows, odd.Columns) == (32, 32)
    assert pydicom.dcmread(bad["undecodable-jpeg2000"]).file_meta.TransferSyntaxUID.is_compressed
