"""Test helper: run PixelMed's validators (the ones IHE Connectathon uses) on DICOM objects we write.

* SR documents go through ``DicomSRValidator`` (templates, context groups and the IOD);
* every other object (SEG, Parametric Map) through ``DicomInstanceValidator`` (the IOD):
  ``DicomInstanceValidator`` answers "IOD (SOP Class) unrecognized" for SR storage classes.

Starting a JVM and compiling PixelMed's XSLT costs several seconds on a small machine, so
:func:`run_pixelmed` validates a whole batch in one JVM with ``pixelmed_batch/PixelMedBatch.java``
(run by the JDK's source launcher). Where the Java runtime has no compiler (a headless JRE), it
falls back to one JVM per file with PixelMed's own command-line mains.

PixelMed comes from the Debian packages ``pixelmed-apps`` / ``libpixelmed-java`` and needs a JRE.
Tests that need it use :data:`requires_pixelmed`: it skips them, with the reason, on a developer
machine without them, and fails them when ``CI=true``, where a missing validator must not turn into
a silently green run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

__all__ = [
    "PIXELMED_JAR",
    "PIXELMED_SEG_WITHOUT_GEOMETRY_ERROR",
    "PIXELMED_UNKNOWN_SOP_CLASS_ERROR",
    "PixelMedReport",
    "assert_pixelmed_clean",
    "known_pixelmed_defects",
    "requires_pixelmed",
    "run_pixelmed",
]

#: Where Debian's libpixelmed-java installs the jar (``dpkg -L libpixelmed-java``).
_DEBIAN_JAR = Path("/usr/share/java/pixelmed.jar")

#: PixelMed's SR templates are large XPath programs; JDK 17's default XPath limits refuse them.
_JVM_OPTIONS = (
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)

#: The one error PixelMed 20220618 gives every SEG without plane geometry (a projection image's):
#: its rules require Derivation Image Sequence in the shared and in every per-frame functional group
#: item when Pixel Measures, Plane Position or Plane Orientation is missing, and forbid it in both;
#: dciodvfy forbids both too. docs/dicom-conformance.md, "Validator findings".
PIXELMED_SEG_WITHOUT_GEOMETRY_ERROR = (
    "Error: DerivationImageMacro/DerivationImageSequence/: SharedFunctionalGroupsSequence/Item[1]/: "
    "Missing required sequence attribute (Type 2)"
)

#: What :func:`run_pixelmed` reports for an IOD that PixelMed's DicomInstanceValidator does not know
#: (PixelMed 20220618 knows 7, not the Parametric Map): nothing was validated, dciodvfy must be.
PIXELMED_UNKNOWN_SOP_CLASS_ERROR = (
    "Error: DicomInstanceValidator does not know this SOP Class: nothing was validated"
)

_BATCH_SOURCE = Path(__file__).parent / "pixelmed_batch" / "PixelMedBatch.java"
_MARKER = "@@@ "


def _find_jar() -> Path | None:
    configured = os.environ.get("PIXELMED_JAR")
    if configured:
        return Path(configured) if Path(configured).is_file() else None
    return _DEBIAN_JAR if _DEBIAN_JAR.is_file() else None


#: The PixelMed jar, or None when it is not installed.
PIXELMED_JAR = _find_jar()
_JAVA = shutil.which("java")


def _missing_reason() -> str | None:
    if _JAVA is None:
        return "no Java runtime (apt-get install default-jre-headless)"
    if PIXELMED_JAR is None:
        return f"PixelMed not installed: no {_DEBIAN_JAR} (apt-get install pixelmed-apps)"
    return None


_MISSING = _missing_reason()
#: Skips a test when PixelMed cannot run, except with CI=true: there the test runs and
#: :func:`run_pixelmed` fails it with the reason, because a skipped validator would turn
#: "0 errors" into "never checked".
requires_pixelmed = pytest.mark.skipif(
    _MISSING is not None and os.environ.get("CI", "").lower() != "true",
    reason=_MISSING or "PixelMed available",
)


@dataclass
class PixelMedReport:
    """What PixelMed said about one file."""

    path: Path
    validator: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    text: str = ""


def _validator_for(path: Path) -> str:
    dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    return "sr" if str(dataset.get("Modality", "")) == "SR" else "instance"


def run_pixelmed(objects: Sequence[Path | Dataset], *, timeout: float = 600) -> list[PixelMedReport]:
    """Validate DICOM files or datasets with PixelMed; one report per object, in order.

    Datasets are written to temporary Part 10 files first. SR documents get ``DicomSRValidator``,
    everything else ``DicomInstanceValidator``; each batch runs in one JVM when the runtime can.

    Raises
    ------
    RuntimeError
        Java or PixelMed is missing, or the JVM failed without reporting on every file.
    """
    if _MISSING is not None:
        raise RuntimeError(f"PixelMed cannot run: {_MISSING}")
    with tempfile.TemporaryDirectory(prefix="pixelmed-") as folder:
        paths: list[Path] = []
        for index, item in enumerate(objects):
            if isinstance(item, Dataset):
                path = Path(folder) / f"object-{index}.dcm"
                item.save_as(path, enforce_file_format=True)
            else:
                path = Path(item)
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: no such file to validate")
            paths.append(path)
        kinds = [_validator_for(path) for path in paths]
        reports: dict[tuple[str, str], PixelMedReport] = {}
        for kind in ("sr", "instance"):
            batch = [str(path) for path, found in zip(paths, kinds, strict=True) if found == kind]
            if batch:
                for report in _run_batch(kind, batch, timeout):
                    reports[(kind, str(report.path))] = report
        return [reports[(kind, str(path))] for path, kind in zip(paths, kinds, strict=True)]


def known_pixelmed_defects(dataset: Dataset) -> list[str]:
    """The errors PixelMed gives ``dataset`` that are PixelMed's limits, not the object's (see above)."""
    if dataset.SOPClassUID == pydicom.uid.ParametricMapStorage:
        return [PIXELMED_UNKNOWN_SOP_CLASS_ERROR]
    if dataset.SOPClassUID == pydicom.uid.SegmentationStorage:
        first_frame = dataset.get("PerFrameFunctionalGroupsSequence", [Dataset()])[0]
        shared = dataset.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        if "PlanePositionSequence" not in first_frame and "PlanePositionSequence" not in shared:
            return [PIXELMED_SEG_WITHOUT_GEOMETRY_ERROR]
    return []


def assert_pixelmed_clean(objects: Sequence[Path | Dataset]) -> list[PixelMedReport]:
    """Fail the test, listing every error, unless PixelMed's errors on each object are exactly its
    :func:`known_pixelmed_defects` (none for an SR or a SEG with plane geometry)."""
    reports = run_pixelmed(objects)
    problems = []
    for item, report in zip(objects, reports, strict=True):
        dataset = item if isinstance(item, Dataset) else pydicom.dcmread(item, stop_before_pixels=True)
        if report.errors != known_pixelmed_defects(dataset):
            problems.extend(f"{report.path.name} ({report.validator}): {error}" for error in report.errors)
            problems.append(f"{report.path.name}: expected exactly {known_pixelmed_defects(dataset)}")
    assert not problems, "PixelMed reported errors:\n" + "\n".join(problems)
    return reports


def _run_batch(kind: str, paths: list[str], timeout: float) -> list[PixelMedReport]:
    assert _JAVA is not None and PIXELMED_JAR is not None
    if _has_source_launcher():
        command = [_JAVA, *_JVM_OPTIONS, "-cp", str(PIXELMED_JAR), str(_BATCH_SOURCE), kind, *paths]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        reports = _parse_batch(completed.stdout)
        if "@@@ END" not in completed.stdout or len(reports) != len(paths):
            raise RuntimeError(
                f"PixelMed batch ({kind}) exited with {completed.returncode} after {len(reports)} of "
                f"{len(paths)} file(s): {completed.stderr.strip()[-2000:]}"
            )
        return reports
    main_class = {
        "sr": "com.pixelmed.validate.DicomSRValidator",
        "instance": "com.pixelmed.validate.DicomInstanceValidator",
    }[kind]
    reports = []
    for path in paths:
        command = [_JAVA, *_JVM_OPTIONS, "-cp", str(PIXELMED_JAR), main_class, path]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        reports.append(_report(Path(path), main_class.rsplit(".", 1)[1], completed.stdout + completed.stderr))
    return reports


def _has_source_launcher() -> bool:
    """Whether ``java File.java`` works: it needs the jdk.compiler module, absent from some JREs."""
    assert _JAVA is not None
    completed = subprocess.run(
        [_JAVA, "--list-modules"], capture_output=True, text=True, timeout=60, check=False
    )
    return any(line.startswith("jdk.compiler@") for line in completed.stdout.splitlines())


def _parse_batch(stdout: str) -> list[PixelMedReport]:
    reports: list[PixelMedReport] = []
    header: tuple[str, str] | None = None
    lines: list[str] = []
    for line in stdout.splitlines():
        if line.startswith(_MARKER):
            if header is not None:
                reports.append(_report(Path(header[1]), header[0], "\n".join(lines)))
            lines = []
            parts = line[len(_MARKER) :].split(" ", 1)
            header = (parts[0], parts[1]) if len(parts) == 2 else None
        else:
            lines.append(line)
    return reports


def _report(path: Path, validator: str, text: str) -> PixelMedReport:
    lines = text.splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    if any("IOD (SOP Class) unrecognized" in line for line in lines):
        # PixelMed could not check the object at all: that is not "0 errors".
        errors.append(f"Error: {validator} does not know this SOP Class: nothing was validated")
    finished = any("Root Template Validation Complete" in line for line in lines)
    if validator == "DicomSRValidator" and not finished:
        errors.append("Error: DicomSRValidator did not finish validating the SR templates")
    return PixelMedReport(
        path=path,
        validator=validator,
        errors=errors,
        warnings=[line for line in lines if line.startswith("Warning")],
        text=text,
    )
