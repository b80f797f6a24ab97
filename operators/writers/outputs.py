"""Writing derived DICOM objects to an output folder, one file each, named by kind and UID."""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom.dataset import Dataset

from medgemma_deploy.results import WrittenObject

__all__ = ["save_dicom"]

logger = logging.getLogger(__name__)


def save_dicom(dataset: Dataset, out_dir: Path, kind: str, source_series_instance_uid: str) -> WrittenObject:
    """Save ``dataset`` as ``out_dir/<kind>-<SOPInstanceUID>.dcm`` (DICOM Part 10, with preamble).

    The file name comes from the SOP Instance UID, which the writers derive deterministically from
    the inputs and the model version, so a re-run overwrites its own earlier result instead of
    adding a duplicate.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    sop_instance_uid = str(dataset.SOPInstanceUID)
    path = out_dir / f"{kind.lower()}-{sop_instance_uid}.dcm"
    tmp = path.with_suffix(".dcm.tmp")
    dataset.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    logger.info("wrote %s %s", kind, path)
    return WrittenObject(
        path=path,
        kind=kind,
        sop_class_uid=str(dataset.SOPClassUID),
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=str(dataset.SeriesInstanceUID),
        study_instance_uid=str(dataset.StudyInstanceUID),
        source_series_instance_uid=source_series_instance_uid,
    )
