"""A seeded generator of hostile DICOM inputs, mutated from real sample files (pydicom, pydicom-data).

The mutations are the ones a hostile or broken sender produces, and the ones issue 12 found to end
a run: attribute values that break their rules (UIDs, transfer syntax, Number of Frames, rescale,
orientation, SOP class, control characters), headers that declare far more pixels than the file
holds, and raw byte damage (flipped bytes that give unknown VRs or lengths, truncation). Each
mutated file is written with the mutation's name in its file name, so a failing run says which
mutation of which source caused it. The same seed always gives the same files.
"""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

__all__ = ["SOURCE_FILES", "Mutant", "available_sources", "good_copy", "write_mutants"]

#: Real sample files covering the transfer syntaxes, photometric interpretations and multi-frame
#: layouts the loader supports (names resolved with ``pydicom.data.get_testdata_file``).
SOURCE_FILES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_bigendian.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_small_odd.dcm",
    "mlut_18.dcm",
    "emri_small.dcm",
    "US1_J2KR.dcm",
    "OBXXXX1A.dcm",
    "693_J2KI.dcm",
)

_PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.9999.77"
_BAD_UIDS = ("1.2 3.4", "1.2.3..4", "1.02.3", "1." + "2" * 70, "1.2.\u00e9", "abc", "")
_BAD_NUMBERS = ("inf", "-inf", "1e30", "0", "1e308", "nan", "-1e308", "abc")


@dataclass(frozen=True)
class Mutant:
    """One mutated file: where it is, which real file it came from and what was done to it."""

    path: Path
    source: str
    mutation: str


def available_sources() -> list[tuple[str, Path]]:
    """The :data:`SOURCE_FILES` that are installed, as ``(name, path)``."""
    found = []
    for name in SOURCE_FILES:
        path = get_testdata_file(name)
        if path is not None:
            found.append((name, Path(str(path))))
    return found


def _set(keyword: str, values: tuple[object, ...]) -> Callable[[Dataset, random.Random], str]:
    def mutate(ds: Dataset, rng: random.Random) -> str:
        value = rng.choice(values)
        try:
            setattr(ds, keyword, value)
        except ValueError:  # not a number at all: written as text under the tag, as a broken sender does
            ds.add_new(keyword, "LO", value)
        return f"{keyword}={value!r}"[:40]

    return mutate


def _uid(keyword: str) -> Callable[[Dataset, random.Random], str]:
    def mutate(ds: Dataset, rng: random.Random) -> str:
        value = rng.choice(_BAD_UIDS)
        setattr(ds, keyword, value)
        return f"{keyword}-invalid"

    return mutate


def _transfer_syntax(ds: Dataset, rng: random.Random) -> str:
    ds.file_meta.TransferSyntaxUID = rng.choice(("1.2.3.4.5", "abc", "1.2.840.10008.1.2.4.999"))
    return "TransferSyntaxUID-not-a-transfer-syntax"


def _number_of_frames(ds: Dataset, rng: random.Random) -> str:
    ds.NumberOfFrames = rng.choice((None, 0, 3, 10000, 2**31 - 1))
    return f"NumberOfFrames={ds.NumberOfFrames!r}"


def _orientation(ds: Dataset, rng: random.Random) -> str:
    ds.ImageOrientationPatient = rng.choice(([0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], [1, 0, 0, 0, "inf", 0]))
    return "ImageOrientationPatient-degenerate"


def _sop_class(ds: Dataset, rng: random.Random) -> str:
    ds.SOPClassUID = rng.choice((_PRIVATE_SOP_CLASS, "abc", "1.2.840.10008.5.1.4.1.1.88.22"))
    return "SOPClassUID-unsupported"


def _patient_name(ds: Dataset, rng: random.Random) -> str:
    ds.PatientName = rng.choice(("AB\x00CD", "A\x07B^C", "\x00"))
    return "PatientName-control-characters"


def _declared_size(ds: Dataset, rng: random.Random) -> str:
    size = rng.choice((16384, 32768, 65535))
    ds.Rows = ds.Columns = size
    return f"Rows=Columns={size}"


def _bits(ds: Dataset, rng: random.Random) -> str:
    ds.BitsAllocated = rng.choice((1, 3, 64, 0))
    return f"BitsAllocated={ds.BitsAllocated}"


def _pixel_representation(ds: Dataset, rng: random.Random) -> str:
    ds.PixelRepresentation = 1 - int(ds.get("PixelRepresentation", 0) or 0)
    if "ModalityLUTSequence" in ds:
        ds.ModalityLUTSequence[0].LUTDescriptor = [4096, rng.choice((32768, 65535)), 16]
    return "PixelRepresentation-flipped"


def _photometric(ds: Dataset, rng: random.Random) -> str:
    ds.PhotometricInterpretation = rng.choice(("RGB", "MONOCHROME1", "YBR_FULL_422", "PALETTE COLOR", "HSV"))
    return f"Photometric={ds.PhotometricInterpretation}"


def _window(ds: Dataset, rng: random.Random) -> str:
    ds.WindowCenter = rng.choice(("nan", "1e308", "-5"))
    ds.WindowWidth = rng.choice(("0", "-1", "inf", "1e-300"))
    return "Window-absurd"


def _drop(ds: Dataset, rng: random.Random) -> str:
    keyword = rng.choice(("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation"))
    if keyword in ds:
        delattr(ds, keyword)
    return f"no-{keyword}"


#: Attribute mutations applied to a parsed copy of a real file.
ATTRIBUTE_MUTATIONS: tuple[Callable[[Dataset, random.Random], str], ...] = (
    _sop_class,
    _transfer_syntax,
    _number_of_frames,
    _uid("StudyInstanceUID"),
    _uid("SeriesInstanceUID"),
    _uid("SOPInstanceUID"),
    _uid("FrameOfReferenceUID"),
    _orientation,
    _patient_name,
    _set("RescaleSlope", _BAD_NUMBERS),
    _set("RescaleIntercept", _BAD_NUMBERS),
    _declared_size,
    _bits,
    _pixel_representation,
    _photometric,
    _window,
    _drop,
)


def _flip_bytes(data: bytearray, rng: random.Random) -> str:
    # Damage the header (after the preamble and file meta), where VRs and lengths live.
    start = min(300, len(data) - 1)
    end = min(len(data), 1500)
    for _ in range(rng.randint(1, 6)):
        position = rng.randrange(start, end)
        data[position] = rng.randrange(256)
    return "bytes-flipped"


def _truncate(data: bytearray, rng: random.Random) -> str:
    del data[rng.randrange(132, len(data)) :]
    return "truncated"


def _garbage(data: bytearray, rng: random.Random) -> str:
    position = rng.randrange(132, len(data))
    data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return "garbage-inserted"


#: Byte mutations applied to the encoded file.
BYTE_MUTATIONS: tuple[Callable[[bytearray, random.Random], str], ...] = (_flip_bytes, _truncate, _garbage)


def write_mutants(folder: Path, count: int, seed: int) -> list[Mutant]:
    """Write ``count`` mutated files into ``folder`` (seeded); returns them in order.

    About two thirds are attribute mutations (one or two per file), one third byte mutations of an
    encoded file. Every mutant gets its own SOP Instance UID (before any mutation that may replace
    it), so that valid survivors are distinct instances, and its own series, so that one mutant's
    fate never depends on another's.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each invalid value set: that is the point
        return _write_mutants(folder, count, seed)


def _write_mutants(folder: Path, count: int, seed: int) -> list[Mutant]:
    rng = random.Random(seed)
    sources = available_sources()
    if not sources:
        raise RuntimeError("no sample files available: install pydicom-data")
    parsed = {name: pydicom.dcmread(path) for name, path in sources}
    folder.mkdir(parents=True, exist_ok=True)
    mutants: list[Mutant] = []
    for index in range(count):
        name, _ = sources[index % len(sources)]
        ds = copy.deepcopy(parsed[name])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["fuzz", str(seed), str(index)])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=["fuzz series", str(seed), str(index)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        labels: list[str] = []
        data = None
        if rng.random() < 0.67:
            for mutation in rng.sample(ATTRIBUTE_MUTATIONS, rng.choice((1, 1, 2))):
                labels.append(mutation(ds, rng))
            try:
                data = _encode(ds)
            except (OSError, TypeError, ValueError, OverflowError):  # pydicom refused to write it
                labels, ds = [], copy.deepcopy(parsed[name])
        if data is None:
            data = _encode(ds)
            labels.append(rng.choice(BYTE_MUTATIONS)(data, rng))
        label = "+".join(labels).replace("/", "_").replace(" ", "")
        safe = "".join(ch if ch.isalnum() or ch in "-_=+.'" else "_" for ch in label)[:80]
        path = folder / f"{index:04d}-{Path(name).stem}-{safe}.dcm"
        path.write_bytes(bytes(data))
        mutants.append(Mutant(path=path, source=name, mutation=label))
    return mutants


def _encode(ds: Dataset) -> bytearray:
    from io import BytesIO

    buffer = BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each invalid value it writes: the point here
        ds.save_as(buffer, enforce_file_format=False)
    return bytearray(buffer.getvalue())


def good_copy(name: str, folder: Path, index: int) -> Path:
    """An unmutated copy of a real sample file with its own UIDs (a good neighbour)."""
    path = get_testdata_file(name)
    ds = pydicom.dcmread(str(path))
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["fuzz good", name, str(index)])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    target = folder / f"good-{index:02d}-{name}"
    ds.save_as(target, enforce_file_format=False)
    return target
