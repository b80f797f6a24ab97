"""``results.json``: what a run processed, what it wrote and what it rejected, and its exit code.

One document per run, shared by the CLI and the MONAI Deploy apps, so a PACS integration can read
the same shape whichever way the study went through.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydicom.uid import UID

from medgemma_deploy.domain import ModelIdentity, Rejection, Series, SeriesClassification
from medgemma_deploy.errors import InputError, ServiceError, describe_exception, warnings_logged
from medgemma_deploy.triage import StudyTriage

__all__ = [
    "EXIT_OK",
    "EXIT_PARTIAL",
    "EXIT_SERVICE_UNAVAILABLE",
    "EXIT_USAGE",
    "RunResults",
    "WrittenObject",
    "series_rejection",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Everything usable was processed and written.
EXIT_OK = 0
#: Bad usage (missing paths, unloadable model): one line on stderr, nothing processed.
EXIT_USAGE = 2
#: Some inputs were rejected; the rest was processed and written.
EXIT_PARTIAL = 3
#: A service the run needs (the model worker) stopped answering: no input's fault; retry later.
EXIT_SERVICE_UNAVAILABLE = 4


@dataclass(frozen=True)
class WrittenObject:
    """A DICOM (or sidecar) file a run wrote."""

    path: Path
    kind: str  # "SR", "SEG", "REPORT-SR", "EMBEDDINGS"
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    source_series_instance_uid: str | None = None

    def to_json(self, root: Path) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if v is not None and k != "path"}
        data["path"] = os.path.relpath(self.path, root)
        if self.sop_class_uid:
            data["sop_class_name"] = UID(self.sop_class_uid).name
        return data


@dataclass
class RunResults:
    """Collects one run's outcome; ``write`` saves it as ``results.json``."""

    command: str
    disclaimer: str
    models: list[ModelIdentity] = field(default_factory=list)
    series: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[WrittenObject] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    skipped: list[Rejection] = field(default_factory=list)
    #: Each study's triage level and reasons, by Study Instance UID (studies whose label sets have
    #: triage rules only): ``results.json`` ``triage``.
    triage: dict[str, StudyTriage] = field(default_factory=dict)
    #: The run's classified series (not written to results.json: the listener builds its HL7
    #: message from them).
    classifications: list[SeriesClassification] = field(default_factory=list)

    def reject(self, rejection: Rejection, *, log: bool = True) -> None:
        """Record a rejected input; logged as one WARNING line naming the file and the reason.

        ``log=False`` for rejections their producer already logged (the DICOM loader does).
        """
        self.rejected.append(rejection)
        if log:
            logger.warning("rejected: %s: %s", rejection.source, rejection.reason)

    def skip(self, rejection: Rejection, *, log: bool = True, expected: bool = False) -> None:
        """Record an object that is not processed by design (SR, PR, KO…), with the reason.

        ``expected`` logs it at INFO: a skip that every such input gets (a CR/DX cannot carry a
        Parametric Map) is no warning for the operator, and is still named in results.json.
        """
        self.skipped.append(rejection)
        if log:
            logger.log(
                logging.INFO if expected else logging.WARNING,
                "skipped: %s: %s",
                rejection.source,
                rejection.reason,
            )

    def isolated(
        self,
        series: Series,
        stage: str,
        step: Callable[[], T],
        *,
        passthrough: tuple[type[Exception], ...] = (),
    ) -> T | None:
        """Run one step of one series; a failure rejects that series and returns ``None``.

        Whatever goes wrong while classifying, drafting or writing one series (a damaged source
        attribute, a writer's or a library's bug) is that series' rejection, named by file, and
        the run goes on with the others. Only a :class:`ServiceError` (the worker failed; no input
        caused it) propagates, so that the caller retries the run instead. Warnings raised inside
        go to the log, naming the series. Exceptions in ``passthrough`` also propagate: they are
        outcomes the caller records itself (e.g. a series whose images cannot carry an object).
        """
        try:
            with warnings_logged(logger, f"series {series.series_instance_uid}"):
                return step()
        except (ServiceError, *passthrough):
            raise
        except Exception as error:  # isolation: one series' failure never costs the others
            self.reject(series_rejection(series, stage, error))
            return None

    def series_entry(self, series: Series) -> dict[str, Any]:
        """The ``series`` entry of ``series`` (created on first use), shared by findings and report."""
        for entry in self.series:
            if entry["series_instance_uid"] == series.series_instance_uid:
                return entry
        entry: dict[str, Any] = {
            "study_instance_uid": series.study_instance_uid,
            "series_instance_uid": series.series_instance_uid,
            "modality": series.modality,
            "body_part_examined": series.body_part_examined,
            "n_frames": len(series.frames),
            "files": _series_files(series),
            "windows": sorted({frame.window_source for frame in series.frames}),
        }
        self.series.append(entry)
        return entry

    def add_classification(
        self, classification: SeriesClassification, embeddings_file: Path | None = None
    ) -> None:
        series = classification.series
        entry = self.series_entry(series)
        entry["label_set"] = {
            "name": classification.label_set.name,
            "version": classification.label_set.version,
            "scoring": classification.label_set.scoring,
            "threshold": classification.label_set.threshold,
        }
        entry["classification_model"] = {
            "name": classification.model.name,
            "version": classification.model.version,
        }
        entry["findings"] = [
            {
                "key": score.finding.key,
                "name": score.finding.display_name,
                "code": {
                    "value": score.finding.code.value,
                    "scheme": score.finding.code.scheme_designator,
                    "meaning": score.finding.code.meaning,
                },
                "probability": round(float(score.probability), 6),
                "present": bool(score.present),
                "peak_frame": {
                    "sop_instance_uid": series.frames[score.peak_frame_index].sop_instance_uid,
                    "frame_number": series.frames[score.peak_frame_index].frame_number,
                },
                "frame_probabilities": [round(float(p), 6) for p in score.frame_probabilities],
                "relevance_map": score.finding.key in classification.relevance_maps,
            }
            for score in classification.scores
        ]
        if embeddings_file is not None:
            entry["embeddings_file"] = embeddings_file.name

    def add_report(self, series: Series, report: dict[str, Any]) -> None:
        """Record a series' draft report (text, prompt, settings, stats) under ``report``."""
        self.series_entry(series)["report"] = report

    @property
    def random_weights(self) -> bool:
        return any(model.random_weights for model in self.models)

    @property
    def exit_code(self) -> int:
        return EXIT_PARTIAL if self.rejected else EXIT_OK

    def to_json(self, root: Path) -> dict[str, Any]:
        from medgemma_deploy import __version__

        document: dict[str, Any] = {
            "tool": "medgemma-deploy",
            "tool_version": __version__,
            "command": self.command,
            "status": "partial" if self.rejected else "complete",
            "ai_generated": True,
            "verified": False,
            "disclaimer": self.disclaimer,
            "random_weights": self.random_weights,
            "models": [
                {
                    "name": m.name,
                    "version": m.version,
                    "path": str(m.path),
                    "random_weights": m.random_weights,
                }
                for m in self.models
            ],
            "series": self.series,
            "outputs": [o.to_json(root) for o in self.outputs],
            "rejected": [r.to_json() for r in self.rejected],
            "skipped": [r.to_json() for r in self.skipped],
        }
        if self.triage:
            document["triage"] = [
                {"study_instance_uid": study, **triage.to_json()} for study, triage in self.triage.items()
            ]
        if self.random_weights:
            document["warning"] = (
                "RANDOM WEIGHTS: the model is a tiny randomly-initialised test model; "
                "every finding and probability here is meaningless."
            )
        return document

    def write(self, out_dir: Path) -> Path:
        """Write ``out_dir/results.json`` atomically (a reader never sees half a file)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / "results.json"
        text = json.dumps(self.to_json(out_dir), indent=2, ensure_ascii=False)
        with tempfile.NamedTemporaryFile(
            "w", dir=out_dir, delete=False, suffix=".tmp", encoding="utf-8"
        ) as f:
            f.write(text + "\n")
            tmp = Path(f.name)
        tmp.replace(target)
        logger.info("wrote %s", target)
        return target


def series_rejection(series: Series, stage: str, error: Exception) -> Rejection:
    """A series-level failure as a rejection naming files, never only a UID.

    An :class:`InputError` naming one instance (by file or SOP Instance UID) becomes a rejection of
    that file; any other failure is the series': its first file is the ``source`` and ``files``
    lists every file of it. Errors that are not ``InputError``/``ValueError`` are our own bugs or
    a library's, so their traceback is logged at DEBUG for the developers.
    """
    files = _series_files(series)
    by_uid = {frame.sop_instance_uid: str(frame.path) for frame in series.frames}
    sop_instance_uid = None
    if isinstance(error, InputError):
        reason = error.reason
        source = by_uid.get(error.source, error.source)
        if source in files:
            files = [source]
            # The instance is named by file; its UID goes beside it for the listener's records.
            sop_instance_uid = next((uid for uid, path in by_uid.items() if path == source), None)
    else:
        reason = " ".join(str(error).split()) if isinstance(error, ValueError) else ""
        if not reason:
            reason = f"unexpected error: {describe_exception(error)}"
            logger.debug("series %s, stage %s", series.series_instance_uid, stage, exc_info=error)
        source = files[0] if files else f"series {series.series_instance_uid}"
        if len(files) > 1:
            reason = f"series {series.series_instance_uid} ({len(files)} files): {reason}"
    return Rejection(
        source=source,
        reason=reason,
        stage=stage,
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        files=tuple(files) if len(files) > 1 else (),
    )


def _series_files(series: Series) -> list[str]:
    """The distinct files of ``series`` in frame order."""
    return list(dict.fromkeys(str(frame.path) for frame in series.frames))
