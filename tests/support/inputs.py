"""Test inputs shared by many test modules: real DICOM test files as domain objects.

``read_testdata`` finds pydicom / pydicom-data files by name; ``series_from`` wraps datasets in a
``Series``; ``make_ct_series`` / ``make_cr_series`` clone pydicom's real ``CT_small.dcm`` into
series with known pixel values (no DICOM loader, no model); ``ALGORITHM`` and ``FINDINGS`` are the
writer tests' TID 4019 identification and chest findings.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import medgemma_deploy.config
from medgemma_deploy.domain import AlgorithmInfo, Code, ImageFrame, Series

#: The packaged prompt book.
PACKAGED_PROMPTS = Path(medgemma_deploy.config.__file__).parent / "prompts.yaml"
#: The packaged label sets.
PACKAGED_LABELS = Path(medgemma_deploy.config.__file__).parent / "labels"

#: The TID 4019 identification the writer tests use.
ALGORITHM = AlgorithmInfo(
    name="google/medsiglip-448",
    version="0" * 40,
    parameters=(("label_set", "chest-test 1"), ("threshold", "0.5")),
)

#: Three chest findings with their SNOMED CT codes.
FINDINGS = (
    ("pneumothorax", "Pneumothorax", Code("36118008", "SCT", "Pneumothorax")),
    ("pleural_effusion", "Pleural effusion", Code("60046008", "SCT", "Pleural effusion")),
    ("cardiomegaly", "Cardiomegaly", Code("8186001", "SCT", "Cardiomegaly")),
)


def read_testdata(name: str) -> tuple[Path, Dataset]:
    """A pydicom / pydicom-data test file by name; skips the test if the data is not installed."""
    found = get_testdata_file(name)
    if found is None:
        pytest.skip(f"test file {name} not available (pip install pydicom-data)")
    path = Path(str(found))
    return path, pydicom.dcmread(path)


def testdata_series(name: str) -> Series:
    """The pydicom / pydicom-data test file ``name`` as a series of its first frame."""
    path, dataset = read_testdata(name)
    return series_from([dataset], [path])


def series_from(datasets: Sequence[Dataset], paths: Sequence[Path]) -> Series:
    """A ``Series`` with one ``ImageFrame`` per single-frame dataset (pixel arrays are placeholders)."""
    frames = []
    for dataset, path in zip(datasets, paths, strict=True):
        shape = (int(dataset.Rows), int(dataset.Columns))
        frames.append(
            ImageFrame(
                path=path,
                dataset=dataset,
                frame_number=1,
                values=np.zeros(shape, np.float32),
                display=np.zeros(shape, np.float32),
                window_source="test",
            )
        )
    first = datasets[0]
    return Series(
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        modality=str(first.Modality),
        body_part_examined=first.get("BodyPartExamined"),
        frames=frames,
    )


def _ct_small() -> tuple[Path, pydicom.Dataset]:
    found = get_testdata_file("CT_small.dcm")
    if found is None:
        pytest.skip("pydicom's CT_small.dcm is not available")
    return Path(str(found)), pydicom.dcmread(str(found))


def make_ct_series(n_slices: int, *, hounsfield: np.ndarray | None = None, seed: int = 0) -> Series:
    """``n_slices`` clones of CT_small 5 mm apart, with new UIDs; ``values`` are HU.

    Slice ``k`` holds ``hounsfield + 10 * k`` (default: CT_small's own HU), so each slice differs.
    """
    path, original = _ct_small()
    if hounsfield is None:
        hounsfield = original.pixel_array.astype(np.float32) * float(original.RescaleSlope) + float(
            original.RescaleIntercept
        )
    series_uid = generate_uid(entropy_srcs=["test ct series", str(n_slices), str(seed)])
    frames = []
    for index in range(n_slices):
        dataset = copy.deepcopy(original)
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid(entropy_srcs=[series_uid, str(index)])
        x, y, z = (float(value) for value in original.ImagePositionPatient)
        dataset.ImagePositionPatient = [x, y, z + 5.0 * index]
        dataset.InstanceNumber = index + 1
        values = (np.asarray(hounsfield, dtype=np.float32) + 10.0 * index).astype(np.float32)
        display = np.clip((values + 160.0) / 400.0, 0.0, 1.0).astype(np.float32)
        frames.append(ImageFrame(path, dataset, 1, values, display, "CT default soft tissue 40/400"))
    return Series(str(original.StudyInstanceUID), series_uid, "CT", "CHEST", frames)


def make_cr_series(*, grey: float = 0.5, modality: str = "CR", size: tuple[int, int] = (48, 40)) -> Series:
    """One uniformly grey image (display value ``grey``) in a CT_small clone relabelled ``modality``."""
    path, original = _ct_small()
    dataset = copy.deepcopy(original)
    dataset.Modality = modality
    dataset.SeriesInstanceUID = generate_uid(entropy_srcs=["test 2d series", modality, str(grey)])
    dataset.SOPInstanceUID = generate_uid(entropy_srcs=[dataset.SeriesInstanceUID, "1"])
    display = np.full(size, grey, dtype=np.float32)
    frame = ImageFrame(path, dataset, 1, display * 4095.0, display, "instance window 2048/4096")
    return Series(str(original.StudyInstanceUID), str(dataset.SeriesInstanceUID), modality, "CHEST", [frame])
