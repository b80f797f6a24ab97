"""grid_to_source: where relevance maps leave the patch grid, in process and in the worker's client."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from medgemma_deploy.operators.medsiglip.preprocess import PadGeometry
from medgemma_deploy.operators.medsiglip.relevance import grid_to_source


@pytest.mark.parametrize("shape", [(120, 90), (90, 120), (64, 64), (7, 300), (1955, 1841)])
def test_grid_to_source_is_the_bilinear_resize_of_the_padded_square_cropped(shape):
    grid = torch.rand((3, 8, 8), generator=torch.Generator().manual_seed(sum(shape)))
    reference = PadGeometry.for_shape(*shape).to_source(grid).numpy()
    maps = grid_to_source(grid, *shape)
    assert maps.shape == (3, *shape) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, reference, rtol=0, atol=2e-6)


def test_a_one_pixel_strip_costs_its_own_pixels_not_a_square():
    # Padding 1 x 200,000 to a square would need 200,000² floats (160 GB) per map.
    grid = np.linspace(0.0, 1.0, 64, dtype=np.float32).reshape(1, 8, 8)
    started = time.perf_counter()
    maps = grid_to_source(grid, 1, 200_000)
    assert maps.shape == (1, 1, 200_000)
    assert time.perf_counter() - started < 5.0
    # The strip is the square's middle row: about half grid row 3 and half row 4, first to last column.
    expected = [(grid[0, 3, 0] + grid[0, 4, 0]) / 2, (grid[0, 3, 7] + grid[0, 4, 7]) / 2]
    np.testing.assert_allclose(maps[0, 0, [0, -1]], expected, atol=1e-4)


def test_grid_to_source_keeps_maps_in_0_1_and_refuses_a_non_square_grid():
    maps = grid_to_source(np.full((2, 4, 4), 1.0, np.float32), 10, 20)
    assert float(maps.max()) <= 1.0 and float(maps.min()) >= 0.0
    with pytest.raises(ValueError, match=r"grid must have shape \(n_maps, g, g\), got \(2, 4, 5\)"):
        grid_to_source(np.zeros((2, 4, 5), np.float32), 10, 20)
