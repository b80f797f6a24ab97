"""MedSigLIP preprocessing on torch against transformers' SiglipImageProcessor (its PIL backend).

Tolerances, in normalised units (MedSigLIP: (x - 0.5) / 0.5, so 1/255 of the [0, 1] range is
2/255 ≈ 0.0078 here):

- With the same 8-bit input, PIL's resize rounds to 8 bits after each of its two separable passes
  (horizontal, then vertical), at most 1/255 in [0, 1] together, while torch stays in float32; the
  filter (bilinear with PIL's antialias support) is the same. Bound: 2/255 + 1e-3 for arithmetic.
- From the float display image, the reference also rounds the input to 8 bits first (0.5/255,
  which a convex bilinear filter does not amplify): bound 3/255 + 1e-3.
- The mean absolute difference must stay below 1/255, so a systematic offset cannot hide under
  the per-pixel bound.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import SiglipImageProcessor

from medgemma_deploy.errors import ModelLoadError
from medgemma_deploy.operators.medsiglip.preprocess import MedSigLIPPreprocessor, PadGeometry

MEAN = STD = [0.5, 0.5, 0.5]
QUANTISED_BOUND = 2 / 255 + 1e-3
FLOAT_BOUND = 3 / 255 + 1e-3
MEAN_BOUND = 1 / 255

# (shape, model size): a full-size chest radiograph shrunk to MedSigLIP's 448, a small RGB photo
# enlarged to it, and a portrait image shrunk to the tiny test model's 64.
CASES = [
    ((2500, 2048), 448),
    ((37, 53, 3), 448),
    ((300, 200), 64),
]


def _display_image(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A smooth pattern plus noise in [0, 1]: structure for the filter and detail to average."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0 : shape[0], 0 : shape[1]]
    base = 0.5 + 0.3 * np.sin(rows / 17.0) * np.cos(columns / 23.0) + 0.1 * rng.standard_normal(shape[:2])
    grey = np.clip(base, 0.0, 1.0).astype(np.float32)
    return np.stack([grey, grey**2, 1.0 - grey], axis=-1) if len(shape) == 3 else grey


def _reference(image_u8: np.ndarray, size: int) -> np.ndarray:
    """transformers' SigLIP processing of the image, zero-padded the same way first."""
    geometry = PadGeometry.for_shape(*image_u8.shape[:2])
    padding = [(geometry.top, geometry.bottom), (geometry.left, geometry.right)]
    if image_u8.ndim == 2:
        image_u8 = np.stack([image_u8] * 3, axis=-1)
    padded = np.pad(image_u8, [*padding, (0, 0)])
    processor = SiglipImageProcessor(
        size={"height": size, "width": size}, resample=2, image_mean=MEAN, image_std=STD
    )
    return processor(images=[padded], return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize(
    ("shape", "size"), CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else None
)
def test_matches_siglip_image_processor(shape, size):
    image = _display_image(shape, seed=size)
    image_u8 = np.round(image * 255).astype(np.uint8)
    reference = _reference(image_u8, size)
    preprocessor = MedSigLIPPreprocessor((size, size), MEAN, STD, resample=2)

    from_u8 = preprocessor([image_u8.astype(np.float32) / 255]).pixel_values[0].numpy()
    from_float = preprocessor([image]).pixel_values[0].numpy()

    assert from_u8.shape == reference.shape == (3, size, size)
    assert np.abs(from_u8 - reference).max() <= QUANTISED_BOUND
    assert np.abs(from_u8 - reference).mean() <= MEAN_BOUND
    assert np.abs(from_float - reference).max() <= FLOAT_BOUND
    assert np.abs(from_float - reference).mean() <= MEAN_BOUND


def test_without_antialias_the_reference_is_missed():
    # Proves the parity test can fail: shrinking 2500 -> 448 without PIL's low-pass filter aliases.
    image = _display_image((2500, 2048), seed=1)
    image_u8 = np.round(image * 255).astype(np.uint8)
    reference = _reference(image_u8, 448)
    plain = MedSigLIPPreprocessor((448, 448), MEAN, STD, antialias=False)([image_u8 / np.float32(255)])
    assert np.abs(plain.pixel_values[0].numpy() - reference).max() > 10 * QUANTISED_BOUND


@pytest.mark.parametrize(
    ("rows", "columns", "top", "bottom", "left", "right"),
    [(4, 7, 1, 2, 0, 0), (7, 4, 0, 0, 1, 2), (5, 5, 0, 0, 0, 0), (2, 6, 2, 2, 0, 0)],
    ids=["wide-odd", "tall-odd", "square", "wide-even"],
)
def test_padding_is_centred_with_the_odd_row_after(rows, columns, top, bottom, left, right):
    geometry = PadGeometry.for_shape(rows, columns)
    assert (geometry.top, geometry.bottom, geometry.left, geometry.right) == (top, bottom, left, right)
    assert geometry.side == max(rows, columns)


def test_padding_is_zero_before_normalisation():
    # A white wide image: the padded rows above and below are black, i.e. (0 - 0.5) / 0.5 = -1.
    batch = MedSigLIPPreprocessor((8, 8), MEAN, STD)([np.ones((4, 8), np.float32)])
    pixels = batch.pixel_values[0]
    assert batch.geometry[0] == PadGeometry(rows=4, columns=8, top=2, left=0, side=8)
    assert torch.allclose(pixels[:, :2], torch.tensor(-1.0))
    assert torch.allclose(pixels[:, 2:6], torch.tensor(1.0))
    assert torch.allclose(pixels[:, 6:], torch.tensor(-1.0))


def test_grey_becomes_three_equal_channels_and_rgb_keeps_its_channels():
    preprocessor = MedSigLIPPreprocessor((16, 16), MEAN, STD)
    grey = _display_image((20, 30), seed=2)
    rgb = _display_image((20, 30, 3), seed=2)
    grey_pixels = preprocessor([grey]).pixel_values[0]
    rgb_pixels = preprocessor([rgb]).pixel_values[0]
    assert torch.equal(grey_pixels[0], grey_pixels[1]) and torch.equal(grey_pixels[1], grey_pixels[2])
    assert not torch.allclose(rgb_pixels[0], rgb_pixels[2])
    assert torch.allclose(rgb_pixels[0], grey_pixels[0])  # channel 0 of the RGB image is the grey one


def test_to_source_crops_the_padding_away():
    geometry = PadGeometry.for_shape(3, 6)  # two zero rows above, one below in a 6x6 square
    square = torch.zeros((2, 6, 6))
    square[:, geometry.top : geometry.top + 3, :] = torch.arange(18.0).view(3, 6)
    restored = geometry.to_source(square)
    assert restored.shape == (2, 3, 6)
    assert torch.equal(restored[0], torch.arange(18.0).view(3, 6))

    coarse = geometry.to_source(torch.rand((4, 2, 2)))
    assert coarse.shape == (4, 3, 6)


def test_batch_of_mixed_sizes_keeps_order_and_geometry():
    images = [_display_image((30, 50), 3), _display_image((64, 64, 3), 4), _display_image((90, 20), 5)]
    preprocessor = MedSigLIPPreprocessor((32, 32), MEAN, STD)
    batch = preprocessor(images)
    assert batch.pixel_values.shape == (3, 3, 32, 32)
    assert [(g.rows, g.columns) for g in batch.geometry] == [(30, 50), (64, 64), (90, 20)]
    for index, image in enumerate(images):
        assert torch.equal(batch.pixel_values[index], preprocessor([image]).pixel_values[0])


def test_dtype_and_empty_batch():
    preprocessor = MedSigLIPPreprocessor((16, 16), MEAN, STD).to(dtype=torch.bfloat16)
    assert preprocessor([np.zeros((5, 5), np.float32)]).pixel_values.dtype == torch.bfloat16
    empty = preprocessor([])
    assert empty.pixel_values.shape == (0, 3, 16, 16) and empty.geometry == []


def test_from_pretrained_reads_the_model_config(tiny_medsiglip_dir):
    preprocessor = MedSigLIPPreprocessor.from_pretrained(tiny_medsiglip_dir)
    config = json.loads((tiny_medsiglip_dir / "preprocessor_config.json").read_text())
    assert preprocessor.size == (config["size"]["height"], config["size"]["width"])
    assert preprocessor.image_mean == tuple(config["image_mean"])
    assert preprocessor.resample == config["resample"] == 2

    processor = SiglipImageProcessor.from_pretrained(tiny_medsiglip_dir)
    same = MedSigLIPPreprocessor.from_image_processor(processor)
    assert (same.size, same.image_mean, same.image_std, same.resample) == (
        preprocessor.size,
        preprocessor.image_mean,
        preprocessor.image_std,
        preprocessor.resample,
    )


def test_from_pretrained_without_config_names_the_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"preprocessor_config\.json"):
        MedSigLIPPreprocessor.from_pretrained(tmp_path)


def test_from_pretrained_refuses_a_resample_it_cannot_reproduce(tiny_medsiglip_dir, tmp_path):
    shutil.copy(tiny_medsiglip_dir / "preprocessor_config.json", tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config["resample"] = 0  # PIL nearest
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"preprocessor_config.json: unsupported .*resample 0"):
        MedSigLIPPreprocessor.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((4, 4, 2), np.float32), r"images\[7\] has shape \(4, 4, 2\)"),
        (np.zeros((0, 4), np.float32), r"images\[7\] is empty"),
        (np.full((4, 4), np.nan, np.float32), r"images\[7\] holds NaN"),
        (np.full((4, 4), 255.0, np.float32), r"images\[7\] has values in \[255, 255\]"),
        ([[0.0, 1.0]], r"images\[7\] is a list"),
    ],
    ids=["two-channels", "empty", "nan", "not-windowed", "not-an-array"],
)
def test_bad_images_are_named_by_index(image, message):
    preprocessor = MedSigLIPPreprocessor((8, 8), MEAN, STD)
    with pytest.raises(ValueError, match=message):
        preprocessor([np.zeros((4, 4), np.float32), image], indices=[3, 7])


def test_rounding_overshoot_is_clipped_not_refused():
    image = np.array([[-1e-5, 1.0 + 1e-5]], np.float32)
    pixels = MedSigLIPPreprocessor((4, 4), MEAN, STD)([image]).pixel_values
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": (0, 8)}, "size"),
        ({"image_mean": [0.5]}, "one value per RGB channel"),
        ({"image_std": [0.5, 0.0, 0.5]}, "positive"),
        ({"resample": 1}, "resample 1"),
    ],
    ids=["size", "mean", "std", "resample"],
)
def test_bad_settings_are_refused(kwargs, message):
    arguments = {"size": (8, 8), "image_mean": MEAN, "image_std": STD, **kwargs}
    with pytest.raises(ValueError, match=message):
        MedSigLIPPreprocessor(**arguments)


def test_a_one_by_100000_image_never_builds_its_full_size_square(monkeypatch):
    """Issue 12: 1 × N images were zero-padded to N × N at full resolution (1 × 100000: 40 GB)."""
    from medgemma_deploy.operators.medsiglip import preprocess as module

    widest = []
    real_pad = module.F.pad

    def recording_pad(tensor, pad, *args, **kwargs):
        padded = real_pad(tensor, pad, *args, **kwargs)
        widest.append(max(padded.shape[-2:]))
        return padded

    monkeypatch.setattr(module.F, "pad", recording_pad)
    preprocessor = module.MedSigLIPPreprocessor(size=(32, 32), image_mean=[0.5] * 3, image_std=[0.5] * 3)
    batch = preprocessor([np.full((1, 100_000), 0.5, np.float32)])
    assert batch.pixel_values.shape == (1, 3, 32, 32)
    assert max(widest) <= module.MAX_PADDED_SIDE
    assert batch.geometry[0].side == 100_000 and batch.geometry[0].rows == 1  # maps still go to the source


def test_shrinking_before_padding_stays_close_to_the_exact_recipe():
    from medgemma_deploy.operators.medsiglip import preprocess as module

    ramp = np.linspace(0.0, 1.0, 64, dtype=np.float32)[:, None]  # smooth, so halving loses nothing
    image = np.repeat(ramp, module.MAX_PADDED_SIDE + 2000, axis=1)
    preprocessor = module.MedSigLIPPreprocessor(size=(32, 32), image_mean=[0.5] * 3, image_std=[0.5] * 3)
    shrunk = preprocessor([image]).pixel_values  # shrunk by 2 before padding
    exact = preprocessor([image[::2, ::2]]).pixel_values  # the same picture at half size, exact recipe
    assert float((shrunk - exact).abs().max()) < 0.05


@pytest.mark.parametrize("shape", [(120, 90), (70, 100, 3), (64, 64), (1, 300), (448, 448)])
def test_model_input_images_give_exactly_the_pixels_of_the_source(shape):
    """What a worker's client sends (to_model_input) is normalised into the very same pixels."""
    rng = np.random.default_rng(sum(shape))
    image = rng.random(shape, dtype=np.float32)
    preprocessor = MedSigLIPPreprocessor((64, 64), [0.5] * 3, [0.5] * 3)
    resized, geometry = preprocessor.to_model_input(image)
    assert resized.shape == (64, 64, *shape[2:]) and resized.dtype == np.float32
    assert geometry == PadGeometry.for_shape(*shape[:2])
    direct = preprocessor([image]).pixel_values
    sent = preprocessor([resized], at_model_input=True).pixel_values
    assert torch.equal(direct, sent)
    # The client's copy knows only the resize (as a worker publishes it) and gives the same image.
    client = MedSigLIPPreprocessor.from_resize((64, 64), preprocessor.resample_mode, preprocessor.antialias)
    np.testing.assert_array_equal(client.to_model_input(image)[0], resized)


def test_a_model_input_image_of_another_size_is_refused():
    preprocessor = MedSigLIPPreprocessor((64, 64), [0.5] * 3, [0.5] * 3)
    refused = r"images\[0\] has shape \(32, 32\): a model-input image must be 64x64"
    with pytest.raises(ValueError, match=refused):
        preprocessor([np.zeros((32, 32), np.float32)], at_model_input=True)


def test_an_unknown_resize_filter_is_refused():
    with pytest.raises(ValueError, match="'lanczos' is not one of bilinear, bicubic"):
        MedSigLIPPreprocessor.from_resize((64, 64), "lanczos", True)
