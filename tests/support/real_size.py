"""Test helper: real-size studies built from pydicom-data files, as the demo builds its study.

Synthetic 64x48 images hide what breaks with real files (issue 11: a 1,955 x 1,841 CR overflowed
the worker's 64 MiB message). These builders write, into a folder:

* :func:`write_real_cr` — pydicom-data's chest CR as shipped, JPEG 2000 lossless (RG1_J2KR.dcm,
  1,955 x 1,841, 15-bit, MONOCHROME1);
* :func:`write_large_radiograph` — that CR's pixels resampled to any size (e.g. a 3,000 x 3,000 CR
  or a 4,280 x 3,520 DX), uncompressed, new UIDs;
* :func:`write_multislice_ct` — pydicom-data's 512 x 512 CT slice (693_UNCI.dcm) repeated as a
  series of ``n`` slices 5 mm apart in one frame of reference, each slice's pixels shifted so the
  slices differ.

Every builder skips the test, with the reason, when pydicom-data is not installed.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = ["write_large_radiograph", "write_multislice_ct", "write_real_cr"]

#: SOP Classes of the radiographs written here.
_CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def _testdata(name: str) -> Path:
    found = get_testdata_file(name)
    if found is None:
        pytest.skip(f"test file {name} not available (pip install pydicom-data, part of the dev extra)")
    return Path(str(found))


def write_real_cr(folder: Path) -> Path:
    """pydicom-data's RG1_J2KR.dcm copied into ``folder`` unchanged (1,955 x 1,841 CR, JPEG 2000)."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(_testdata("RG1_J2KR.dcm"), folder / "cr-rg1-j2kr.dcm"))


def write_large_radiograph(folder: Path, rows: int, columns: int, *, modality: str = "CR") -> Path:
    """The real CR's pixels resampled (nearest neighbour) to ``rows`` x ``columns``; CR or DX.

    The study stays the source's; series, instance and SOP Class are new, so one folder may hold
    several of these next to the source.
    """
    if modality not in ("CR", "DX"):
        raise ValueError(f"modality must be CR or DX, got {modality!r}")
    source = pydicom.dcmread(_testdata("RG1_UNCI.dcm"))
    pixels = source.pixel_array
    row_index = (np.arange(rows) * pixels.shape[0]) // rows
    column_index = (np.arange(columns) * pixels.shape[1]) // columns
    resampled = np.ascontiguousarray(pixels[row_index][:, column_index])
    ds = copy.deepcopy(source)
    ds.SOPClassUID = _CR_STORAGE if modality == "CR" else _DX_FOR_PRESENTATION
    ds.Modality = modality
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    _new_identity(ds, f"{modality} {rows}x{columns}")
    ds.SeriesNumber = 900 + (rows % 97)
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = resampled.astype(np.uint16).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{modality.lower()}-{rows}x{columns}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_multislice_ct(folder: Path, n_slices: int) -> list[Path]:
    """``n_slices`` 512 x 512 CT slices of one series, 5 mm apart, from pydicom-data's 693_UNCI.dcm."""
    source = pydicom.dcmread(_testdata("693_UNCI.dcm"))
    pixels = source.pixel_array
    series_uid = generate_uid(entropy_srcs=["real-size ct", str(n_slices)])
    # 693_UNCI.dcm has lost its Frame of Reference UID (de-identified); a scanner's series has one,
    # and a SEG of the series needs it.
    frame_of_reference = generate_uid(entropy_srcs=["real-size ct frame of reference", str(n_slices)])
    folder.mkdir(parents=True, exist_ok=True)
    x, y, z = (float(v) for v in source.get("ImagePositionPatient", [0.0, 0.0, 0.0]))
    paths = []
    for index in range(n_slices):
        ds = copy.deepcopy(source)
        _new_identity(ds, f"ct slice {index}", series_uid=series_uid)
        ds.ImagePositionPatient = [x, y, z + 5.0 * index]
        ds.ImageOrientationPatient = source.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])
        ds.InstanceNumber = index + 1
        ds.FrameOfReferenceUID = frame_of_reference
        # Slices must differ, or a per-slice bug (wrong order, one slice scored n times) hides.
        ds.PixelData = np.ascontiguousarray(np.roll(pixels, 3 * index, axis=1)).tobytes()
        path = folder / f"ct-{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _new_identity(ds: Dataset, seed: str, *, series_uid: str | None = None) -> None:
    ds.SeriesInstanceUID = series_uid or generate_uid(entropy_srcs=["real-size series", seed])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["real-size instance", seed])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
