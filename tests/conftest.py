"""Shared test inputs: real DICOM test images (pydicom, pydicom-data) as domain ``Series``.

Each ``*_series`` fixture reads real files and, where a shape is needed that no test file has
(a CT series, a two-image CR series), derives it from a real file in memory: new SOP Instance
UIDs, shifted positions. ``make_classification`` wraps a series in a ``SeriesClassification`` with
seeded random scores and relevance maps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from medgemma_deploy.domain import (
    FindingDefinition,
    FindingScore,
    LabelSet,
    ModelIdentity,
    Series,
    SeriesClassification,
)
from medgemma_deploy.operators.medsiglip.labels import load_label_sets
from tests.support.inputs import FINDINGS, read_testdata, series_from, testdata_series


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Persisted prompt embeddings go to a folder of this session, never the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDGEMMA_DEPLOY_CACHE_DIR", str(tmp_path_factory.mktemp("medgemma-cache")))
        yield


def _small_copy(dataset: Dataset, rows: int, columns: int, sop_instance_uid: str) -> Dataset:
    """``dataset`` with a new SOP Instance UID and a small uncompressed pixel matrix."""
    derived = copy.deepcopy(dataset)
    derived.SOPInstanceUID = sop_instance_uid
    derived.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    derived.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    derived.Rows, derived.Columns = rows, columns
    derived.BitsAllocated, derived.BitsStored, derived.HighBit = 16, 12, 11
    derived.PixelRepresentation = 0
    derived.PixelData = np.zeros((rows, columns), np.uint16).tobytes()
    return derived


@pytest.fixture
def ct_series(tmp_path) -> Series:
    """Four CT slices: pydicom's real CT_small, repeated 5 mm apart with new SOP Instance UIDs."""
    path, original = read_testdata("CT_small.dcm")
    datasets = []
    for index in range(4):
        ds = copy.deepcopy(original)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["ct slice", str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        x, y, z = (float(v) for v in original.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 5.0 * index]
        ds.InstanceNumber = index + 1
        datasets.append(ds)
    return series_from(datasets, [path] * len(datasets))


@pytest.fixture
def cr_series() -> Series:
    """pydicom-data's real chest CR: MONOCHROME1, PixelSpacing 0\\0, no frame of reference."""
    return testdata_series("RG1_UNCI.dcm")


@pytest.fixture
def ct_without_frame_of_reference() -> Series:
    """pydicom-data's real 693_UNCI CT: no Frame of Reference UID, PatientIdentityRemoved YES."""
    return testdata_series("693_UNCI.dcm")


@pytest.fixture
def cr_two_image_series() -> Series:
    """Two 64x48 images derived from the real CR (same series, PixelSpacing 0\\0 kept)."""
    path, dataset = read_testdata("RG1_UNCI.dcm")
    uids = [generate_uid(entropy_srcs=["cr image", str(index)]) for index in range(2)]
    datasets = [_small_copy(dataset, 64, 48, uid) for uid in uids]
    return series_from(datasets, [path, path])


@pytest.fixture(scope="session")
def chest() -> LabelSet:
    """The packaged chest X-ray label set (``chest-xray``)."""
    return next(s for s in load_label_sets(None) if s.name == "chest-xray")


@pytest.fixture
def medsiglip_identity() -> ModelIdentity:
    return ModelIdentity(name="google/medsiglip-448", version="0" * 40, path=Path("/models/medsiglip"))


@pytest.fixture
def make_classification(medsiglip_identity) -> Callable[..., SeriesClassification]:
    """Factory: ``make_classification(series, *, seed=0, model=None, map_keys=None, threshold=0.5)``.

    Scores are seeded random per frame (series probability = max over frames); ``map_keys``
    (default: all findings) get seeded random relevance maps with values spanning [0, 1].
    """

    def make(
        series: Series,
        *,
        seed: int = 0,
        model: ModelIdentity | None = None,
        map_keys: Sequence[str] | None = None,
        threshold: float = 0.5,
    ) -> SeriesClassification:
        rng = np.random.default_rng(seed)
        findings = tuple(
            FindingDefinition(key, name, code, (f"{name.lower()}",), (f"no {name.lower()}",))
            for key, name, code in FINDINGS
        )
        label_set = LabelSet(
            name="chest-test",
            version="1",
            modalities=("CR", "DX", "CT"),
            body_parts=(),
            scoring="sigmoid",
            threshold=threshold,
            findings=findings,
        )
        n_frames = len(series.frames)
        scores = []
        for finding in findings:
            per_frame = [float(p) for p in rng.random(n_frames)]
            peak = int(np.argmax(per_frame))
            scores.append(
                FindingScore(
                    finding=finding,
                    probability=per_frame[peak],
                    present=per_frame[peak] >= threshold,
                    frame_probabilities=per_frame,
                    peak_frame_index=peak,
                )
            )
        rows, columns = int(series.frames[0].dataset.Rows), int(series.frames[0].dataset.Columns)
        keys = [finding.key for finding in findings] if map_keys is None else list(map_keys)
        maps = {}
        for key in keys:
            relevance = rng.random((n_frames, rows, columns), dtype=np.float32)
            relevance[:, 0, 0], relevance[:, 0, 1] = 0.0, 1.0
            maps[key] = relevance
        return SeriesClassification(
            series=series,
            label_set=label_set,
            model=model or medsiglip_identity,
            scores=scores,
            relevance_maps=maps,
        )

    return make


@pytest.fixture(scope="session")
def tiny_medsiglip_dir(tmp_path_factory) -> Path:
    """The tiny random MedSigLIP (real ``SiglipModel`` class), built once per test session."""
    from medgemma_deploy.dev.testmodels.siglip import make_test_medsiglip

    return make_test_medsiglip(tmp_path_factory.mktemp("models") / "medsiglip", seed=0)


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory) -> Path:
    """A models root (``medsiglip/`` + ``medgemma/``) as ``-m`` and MAPs take it, built once."""
    from medgemma_deploy.dev.testmodels import make_test_models

    root = tmp_path_factory.mktemp("models-root")
    make_test_models(root)
    return root
