"""Several CT slices made from one real slice, for tests that need a CT series and have one file."""

from __future__ import annotations

import copy

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid


def stacked_slices(original: Dataset, count: int, uid_tag: str) -> list[Dataset]:
    """``count`` copies of ``original`` 5 mm apart along z, numbered 1…count, with new SOP Instance UIDs.

    The UIDs derive from ``uid_tag`` and the slice index, so a test gets the same ones on every run.
    """
    slices = []
    for index in range(count):
        ct_slice = copy.deepcopy(original)
        ct_slice.SOPInstanceUID = generate_uid(entropy_srcs=[uid_tag, str(index)])
        ct_slice.file_meta.MediaStorageSOPInstanceUID = ct_slice.SOPInstanceUID
        x, y, z = (float(v) for v in original.ImagePositionPatient)
        ct_slice.ImagePositionPatient = [x, y, z + 5.0 * index]
        ct_slice.InstanceNumber = index + 1
        slices.append(ct_slice)
    return slices
