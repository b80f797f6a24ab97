"""operators/dicom_input/pixels.py: every transfer syntax, the Modality/VOI LUT, windowing, bad pixels."""

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import data as pydicom_data
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from medgemma_deploy.errors import InputError
from medgemma_deploy.operators.dicom_input import pixels
from medgemma_deploy.operators.dicom_input.pixels import check_pixel_module, render_frames
from medgemma_deploy.operators.dicom_input.voi import CT_DEFAULT_WINDOWS, apply_window, ct_default_window


def _testdata(name: str) -> Path:
    path = pydicom_data.get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data, part of the dev extra)")
    return Path(path)


def _render(name: str):
    path = _testdata(name)
    return render_frames(pydicom.dcmread(path), path)


# name, frames, shape of one frame, twin to compare with (None: no twin), largest mean |difference|
# allowed against the twin (0: lossless, exact).
REFERENCE = [
    ("CT_small.dcm", 1, (128, 128), None, 0),
    ("MR_small.dcm", 1, (64, 64), None, 0),
    ("MR_small_implicit.dcm", 1, (64, 64), "MR_small.dcm", 0),
    ("MR_small_bigendian.dcm", 1, (64, 64), "MR_small.dcm", 0),
    ("MR_small_RLE.dcm", 1, (64, 64), "MR_small.dcm", 0),
    ("MR_small_jp2klossless.dcm", 1, (64, 64), "MR_small.dcm", 0),
    ("MR_small_jpeg_ls_lossless.dcm", 1, (64, 64), "MR_small.dcm", 0),
    ("JPEG2000.dcm", 1, (1024, 256), "JPEG2000_UNC.dcm", 0),
    ("JPEG-LL.dcm", 1, (1024, 256), None, 0),
    ("JPGExtended.dcm", 1, (1024, 256), None, 0),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", 1, (768, 1024), None, 0),
    ("JPEGLSNearLossless_16.dcm", 1, (50, 10), None, 0),
    ("image_dfl.dcm", 1, (512, 512), None, 0),
    ("SC_rgb.dcm", 1, (100, 100, 3), None, 0),
    ("SC_rgb_rle.dcm", 1, (100, 100, 3), "SC_rgb.dcm", 0),
    ("SC_rgb_jpeg_gdcm.dcm", 1, (100, 100, 3), "SC_rgb.dcm", 0),
    ("SC_rgb_16bit.dcm", 1, (100, 100, 3), None, 0),
    ("SC_rgb_rle_16bit.dcm", 1, (100, 100, 3), "SC_rgb_16bit.dcm", 0),
    ("SC_rgb_rle_2frame.dcm", 2, (100, 100, 3), "SC_rgb_2frame.dcm", 0),
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", 1, (100, 100, 3), "SC_rgb_dcmtk_ebcynp_dcmd.dcm", 0.5),
    ("SC_rgb_jpeg_dcmtk.dcm", 1, (100, 100, 3), "SC_ybr_full_uncompressed.dcm", 0),
    ("SC_ybr_full_422_uncompressed.dcm", 1, (100, 100, 3), "SC_ybr_full_uncompressed.dcm", 0),
    ("SC_rgb_jls_lossy_line.dcm", 1, (100, 100, 3), "SC_rgb.dcm", 1.0),
    ("examples_ybr_color.dcm", 30, (240, 320, 3), None, 0),
    ("emri_small.dcm", 10, (64, 64), None, 0),
    ("emri_small_RLE.dcm", 10, (64, 64), "emri_small.dcm", 0),
    ("emri_small_jpeg_ls_lossless.dcm", 10, (64, 64), "emri_small.dcm", 0),
    ("emri_small_jpeg_2k_lossless.dcm", 10, (64, 64), "emri_small.dcm", 0),
    ("US1_J2KR.dcm", 1, (480, 640, 3), "US1_UNCR.dcm", 0),
    ("693_J2KR.dcm", 1, (512, 512), "693_UNCR.dcm", 0),
    ("RG3_J2KR.dcm", 1, (1760, 1760), "RG3_UNCR.dcm", 0),
    ("eCT_Supplemental.dcm", 2, (512, 512), None, 0),
    ("examples_palette.dcm", 1, (350, 800, 3), None, 0),
    ("vlut_04.dcm", 1, (512, 512), None, 0),
    ("mlut_18.dcm", 1, (512, 512), None, 0),
]


@pytest.mark.parametrize(
    ("name", "n_frames", "shape", "twin", "tolerance"), REFERENCE, ids=[row[0] for row in REFERENCE]
)
def test_reference_files_decode_to_display_ready_frames(name, n_frames, shape, twin, tolerance):
    frames = _render(name)
    assert len(frames) == n_frames
    assert [f.frame_number for f in frames] == list(range(1, n_frames + 1))
    for frame in frames:
        assert frame.values.shape == shape and frame.display.shape == shape
        assert frame.values.dtype == np.float32 and frame.display.dtype == np.float32
        assert 0.0 <= frame.display.min() <= frame.display.max() <= 1.0
        assert frame.display.max() > frame.display.min(), "a flat display would show nothing"
        assert frame.window_source
        assert frame.is_rgb == (len(shape) == 3)
    if twin is not None:
        reference = _render(twin)
        assert len(reference) == len(frames)
        for decoded, expected in zip(frames, reference, strict=True):
            difference = np.abs(decoded.values - expected.values)
            if tolerance == 0:
                np.testing.assert_array_equal(decoded.values, expected.values)
                np.testing.assert_array_equal(decoded.display, expected.display)
            else:
                assert difference.mean() <= tolerance


def test_ct_values_are_hounsfield_units_and_default_window_is_soft_tissue():
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    (frame,) = render_frames(ds, path)
    stored = ds.pixel_array.astype(np.float32)
    np.testing.assert_allclose(frame.values, stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    center, width = CT_DEFAULT_WINDOWS["soft_tissue"]
    assert frame.window_source == f"CT default soft tissue {center}/{width}"
    np.testing.assert_array_equal(frame.display, apply_window(frame.values, center, width))


@pytest.mark.parametrize(
    ("body_part", "window"),
    [
        ("HEAD", "brain"),
        ("CHEST", "lung"),
        ("KNEE", "bone"),
        ("ABDOMEN", "soft_tissue"),
        (None, "soft_tissue"),
    ],
)
def test_ct_default_window_follows_body_part(body_part, window):
    name, center, width = ct_default_window(body_part)
    assert name == window
    assert ct_default_window(body_part.lower() if body_part else body_part)[0] == window
    assert (center, width) == CT_DEFAULT_WINDOWS[window]
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    if body_part is not None:
        ds.BodyPartExamined = body_part
    (frame,) = render_frames(ds, path)
    assert frame.window_source.startswith(f"CT default {window.replace('_', ' ')}")
    np.testing.assert_array_equal(frame.display, apply_window(frame.values, center, width))


def test_instance_window_wins_over_the_default():
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    ds.WindowCenter = [-500, 40]  # the first pair is used
    ds.WindowWidth = [1200, 400]
    (frame,) = render_frames(ds, path)
    assert frame.window_source == "instance window -500/1200"
    np.testing.assert_array_equal(frame.display, apply_window(frame.values, -500, 1200))


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_function_is_honoured(function):
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 40, 400, function
    (frame,) = render_frames(ds, path)
    assert frame.window_source == f"instance window 40/400 {function}"
    x = frame.values.astype(np.float64)
    if function == "LINEAR_EXACT":
        expected = np.clip((x - 40) / 400 + 0.5, 0, 1)  # PS3.3 C.11.2.1.3.2
    else:
        expected = 1 / (1 + np.exp(-4 * (x - 40) / 400))  # PS3.3 C.11.2.1.3.1
    np.testing.assert_allclose(frame.display, expected, atol=1e-6)


def test_unusable_instance_window_falls_back_to_the_default():
    path = _testdata("CT_small.dcm")
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 40, 0
    (frame,) = render_frames(ds, path)
    assert frame.window_source.startswith("CT default")


def test_grey_image_without_window_is_min_max():
    path = _testdata("MR_small.dcm")
    ds = pydicom.dcmread(path)
    del ds.WindowCenter, ds.WindowWidth
    (frame,) = render_frames(ds, path)
    assert frame.window_source == "min-max"
    expected = (frame.values - frame.values.min()) / (frame.values.max() - frame.values.min())
    np.testing.assert_allclose(frame.display, expected, atol=1e-6)


def test_voi_lut_sequence_is_used_and_scaled_to_its_bit_depth():
    path = _testdata("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    (frame,) = render_frames(ds, path)
    assert frame.window_source == "instance VOI LUT"
    item = ds.VOILUTSequence[0]
    mapped = pydicom.pixels.apply_voi(ds.pixel_array, ds).astype(np.float64)
    expected = mapped / (2 ** int(item.LUTDescriptor[2]) - 1)  # PS3.3 C.11.2.1.1: output range 2**n
    np.testing.assert_allclose(frame.display, expected, atol=1e-6)


def test_enhanced_ct_uses_functional_group_rescale_and_window():
    frames = _render("eCT_Supplemental.dcm")
    shared = pydicom.dcmread(_testdata("eCT_Supplemental.dcm")).SharedFunctionalGroupsSequence[0]
    window = shared.FrameVOILUTSequence[0]
    center, width = float(window.WindowCenter), float(window.WindowWidth)
    assert frames[0].window_source == f"instance window {center:g}/{width:g}"
    assert frames[0].values.min() == float(shared.PixelValueTransformationSequence[0].RescaleIntercept)


def _monochrome1(stored: np.ndarray, **attributes) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientName = "SECRET^PATIENT"
    ds.Modality = "CR"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.astype("<u2").tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_monochrome1_is_inverted_after_windowing_so_higher_is_brighter():
    stored = np.array([[0, 1000], [3000, 4095]])
    ds = _monochrome1(stored, WindowCenter=2048, WindowWidth=4096)
    (frame,) = render_frames(ds, Path("mono1.dcm"))
    # MONOCHROME1: the lowest stored value is white.
    assert frame.display[0, 0] == pytest.approx(1.0 - apply_window(np.array(0.0), 2048, 4096), abs=1e-6)
    assert frame.display[0, 0] > frame.display[0, 1] > frame.display[1, 0] > frame.display[1, 1]
    assert frame.display[0, 0] == pytest.approx(1.0, abs=1e-3)
    assert frame.display[1, 1] == pytest.approx(0.0, abs=1e-3)
    assert frame.window_source == "instance window 2048/4096, MONOCHROME1 inverted"
    np.testing.assert_array_equal(frame.values, stored.astype(np.float32))


def test_apply_window_follows_the_linear_formula_of_ps3_3():
    c, w = 40.0, 400.0
    x = np.array([-1000, -160, -159.5, 39.5, 40, 238.5, 239, 239.5, 3000], dtype=np.float64)
    lower, upper = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    expected = np.where(x <= lower, 0.0, np.where(x > upper, 1.0, (x - (c - 0.5)) / (w - 1) + 0.5))
    result = apply_window(x, c, w)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, atol=1e-6)
    assert result[3] == pytest.approx(0.5)  # c - 0.5 is the middle of the ramp
    assert np.all(np.diff(apply_window(np.linspace(-500, 500, 101), c, w)) >= 0)


def test_apply_window_of_width_one_is_a_threshold_and_below_one_is_refused():
    np.testing.assert_array_equal(apply_window(np.array([9.0, 9.5, 10.0]), 10, 1), [0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"width 0\.5"):
        apply_window(np.zeros(3), 10, 0.5)


def _good(tmp_path):
    return _monochrome1(np.arange(16, dtype=np.uint16).reshape(4, 4)), tmp_path / "x.dcm"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ds: delattr(ds, "PixelData"), "missing (7FE0,0010) 'Pixel Data'"),
        (lambda ds: setattr(ds, "Rows", 0), "'Rows' value of 0 is invalid"),
        (lambda ds: setattr(ds, "Columns", 40000), "'Columns' value of 40000 is invalid"),
        (lambda ds: setattr(ds, "NumberOfFrames", 20000), "'NumberOfFrames' value of 20000 is invalid"),
        (lambda ds: setattr(ds, "Rows", 8), "the file may be truncated"),
        (lambda ds: setattr(ds, "Rows", 2), "'Number of Frames' or the image size"),
        (lambda ds: setattr(ds, "BitsAllocated", 12), "'Bits Allocated' value of 12 is invalid"),
        (lambda ds: setattr(ds, "BitsStored", 17), "'Bits Stored' value of 17 is invalid"),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "HSV"), "'Photometric Interpretation' of 'HSV'"),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "RGB"), "'Samples per Pixel' value of 1"),
        (lambda ds: delattr(ds, "SamplesPerPixel"), "missing (0028,0002) 'SamplesPerPixel'"),
        (
            lambda ds: (
                setattr(ds.file_meta, "TransferSyntaxUID", "1.2.840.10008.1.2.4.100")
                or setattr(ds, "PixelData", encapsulate([b"\x00" * 10]))
            ),
            "'MPEG2 Main Profile / Main Level' (1.2.840.10008.1.2.4.100) cannot be decoded",
        ),
        (
            lambda ds: (
                setattr(ds.file_meta, "TransferSyntaxUID", JPEG2000Lossless)
                or setattr(ds, "PixelData", encapsulate([b"\xff\x4f\xff\x51" + b"\x13" * 300]))
            ),
            "(1.2.840.10008.1.2.4.90) cannot be decoded: Unable to decode",
        ),
    ],
    ids=[
        "no-pixel-data",
        "zero-rows",
        "huge-columns",
        "too-many-frames",
        "short-buffer",
        "excess-buffer",
        "bits-allocated",
        "bits-stored",
        "unsupported-photometric",
        "samples-mismatch",
        "missing-samples",
        "no-decoder",
        "garbage-jpeg2000",
    ],
)
def test_bad_pixel_data_raises_input_error_with_file_and_reason(tmp_path, change, message, caplog):
    ds, path = _good(tmp_path)
    change(ds)
    with pytest.raises(InputError) as raised:
        render_frames(ds, path)
    assert raised.value.source == str(path)
    assert message in raised.value.reason
    assert "\n" not in raised.value.reason
    assert "SECRET" not in raised.value.reason
    assert "Traceback" not in caplog.text  # pydicom's per-plugin tracebacks are not passed on


def test_missing_decoding_plugin_is_named(tmp_path, monkeypatch):
    class _Unavailable:
        is_available = False
        missing_dependencies = ("pylibjpeg - requires numpy, pylibjpeg and pylibjpeg-openjpeg",)

    monkeypatch.setattr(pixels, "get_decoder", lambda uid: _Unavailable())
    ds, path = _good(tmp_path)
    with pytest.raises(InputError, match="requires numpy, pylibjpeg and pylibjpeg-openjpeg"):
        render_frames(ds, path)


def test_check_pixel_module_counts_frames_without_decoding():
    path = _testdata("emri_small_jpeg_2k_lossless.dcm")
    assert check_pixel_module(pydicom.dcmread(path), path) == 10


def test_render_does_not_cache_a_decoded_copy_on_the_dataset():
    path = _testdata("emri_small.dcm")
    ds = pydicom.dcmread(path)
    before = copy.copy(ds.PixelData)
    render_frames(ds, path)
    assert getattr(ds, "_pixel_array", None) is None
    assert ds.PixelData == before


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("examples_palette.dcm", lambda ds: delattr(ds, "RedPaletteColorLookupTableDescriptor"), "palette"),
        ("vlut_04.dcm", lambda ds: setattr(ds.VOILUTSequence[0], "LUTDescriptor", [256, 0, 9]), "VOI"),
    ],
    ids=["palette-without-descriptor", "voi-lut-of-9-bits"],
)
def test_unusable_lookup_tables_raise_input_error(name, change, message):
    path = _testdata(name)
    ds = pydicom.dcmread(path)
    change(ds)
    with pytest.raises(InputError, match=message) as raised:
        render_frames(ds, path)
    assert raised.value.source == str(path)
