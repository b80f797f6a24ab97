"""The CPU benchmark's study and the precision comparison (medgemma_deploy/dev/bench/cpu.py, precision.py).

Not timed: the figures live in docs/performance.md. These check what the tables stand on: the
copies are distinct series of the same pixels, and the comparison measures the precisions it names
against float32 and refuses a run without the reference.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pydicom
import pytest

from medgemma_deploy.dev.bench.cpu import SOURCE_CR, make_study
from medgemma_deploy.dev.bench.precision import compare_precisions
from tests.support.real_size import write_real_cr


def test_the_study_is_distinct_series_of_the_same_cr(tmp_path):
    write_real_cr(tmp_path / "skip-check")  # skips the test, with the reason, without pydicom-data
    paths = make_study(tmp_path / "study", 3)
    datasets = [pydicom.dcmread(path) for path in paths]
    assert len({d.SeriesInstanceUID for d in datasets}) == 3
    assert len({d.SOPInstanceUID for d in datasets}) == 3
    assert all(d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID for d in datasets)
    source = pydicom.dcmread(pydicom.data.get_testdata_file(SOURCE_CR))
    assert all(d.PixelData == source.PixelData for d in datasets)
    assert (datasets[0].Rows, datasets[0].Columns) == (source.Rows, source.Columns)


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime missing: pip install '.[cpu-int8]'"
)
def test_the_comparison_measures_each_precision_against_fp32(tiny_medsiglip_dir, tmp_path):
    write_real_cr(tmp_path / "study")
    rows = compare_precisions(tiny_medsiglip_dir, tmp_path / "study", ["fp32", "int8"], cache_dir=tmp_path)
    assert [row.precision for row in rows] == ["fp32", "int8"]
    assert rows[0].max_probability_change is None and rows[0].within_limits is None
    assert rows[1].images == rows[0].images == 1
    assert 0 < rows[1].max_probability_change <= 0.02
    assert 0.99 <= rows[1].min_embedding_cosine < 1.0 + 1e-6
    assert rows[1].within_limits is True
    assert all(np.isfinite(row.median_image_s) and row.median_image_s > 0 for row in rows)


def test_the_comparison_needs_fp32_first(tiny_medsiglip_dir, tmp_path):
    with pytest.raises(ValueError, match="the first precision must be fp32"):
        compare_precisions(tiny_medsiglip_dir, tmp_path, ["bf16", "fp32"])
