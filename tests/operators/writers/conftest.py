"""Series fixtures that several writer tests use, beside the repository-wide ones in ``tests/conftest.py``.

Each reads a real multi-frame or MR file from pydicom or pydicom-data; a two-frame file is
classified on both of its frames, as the DICOM reader would give it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from medgemma_deploy.domain import Series, SeriesClassification
from tests.support.inputs import testdata_series


def _both_frames(name: str) -> Series:
    """The two-frame test file ``name`` as one series of its two frames."""
    series = testdata_series(name)
    series.frames.append(dataclasses.replace(series.frames[0], frame_number=2))
    return series


@pytest.fixture
def enhanced_ct_series() -> Series:
    """pydicom-data's real 2-frame Enhanced CT (eCT_Supplemental), both frames classified."""
    return _both_frames("eCT_Supplemental.dcm")


@pytest.fixture
def two_frame_secondary_capture() -> Series:
    """pydicom's real SC_rgb_rle_2frame: a valid 2-frame instance of a single-frame SOP class."""
    return _both_frames("SC_rgb_rle_2frame.dcm")


@pytest.fixture
def mr_series() -> Series:
    """pydicom's real MR_small: one 64x64 slice with a frame of reference."""
    return testdata_series("MR_small.dcm")


@pytest.fixture
def damaged_ct_classification(ct_series, make_classification) -> Callable[..., SeriesClassification]:
    """A classification of ``ct_series`` changed in place by ``damage`` (``None``: left as made).

    For the writers' tables of invalid inputs: each row damages one thing the writer must refuse.
    """

    def make(damage: Callable[[SeriesClassification], object] | None) -> SeriesClassification:
        classification = make_classification(ct_series)
        if damage is not None:
            damage(classification)
        return classification

    return make
