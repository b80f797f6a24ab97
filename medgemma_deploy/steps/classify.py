"""The classification pipeline as plain steps: study input → findings → SEG + SR files.

Each step is one function over the domain types, so the MONAI Deploy operators (one step per
operator), the CLI (all steps in a row) and the listener (later) run the very same code. Any failure
in one series, at any step, is recorded as a rejection naming its files and the reason
(:meth:`RunResults.isolated`), and the other series go on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
from highdicom.pm import ParametricMap
from highdicom.seg import Segmentation

from medgemma_deploy.domain import (
    AlgorithmInfo,
    ImageModel,
    LabelSet,
    ModelIdentity,
    Series,
    SeriesClassification,
    StudyInput,
)
from medgemma_deploy.operators.dicom_input.pixels import MemoryBudget
from medgemma_deploy.operators.medsiglip.classification import classify_series
from medgemma_deploy.operators.medsiglip.labels import select_label_set
from medgemma_deploy.operators.writers.findings_sr import build_findings_sr
from medgemma_deploy.operators.writers.outputs import save_dicom
from medgemma_deploy.operators.writers.pmap import NoPatientGeometryError, build_relevance_parametric_maps
from medgemma_deploy.operators.writers.seg import build_relevance_segmentations
from medgemma_deploy.results import RunResults, WrittenObject, series_rejection
from medgemma_deploy.triage import StudyTriage

__all__ = [
    "RELEVANCE_FORMATS",
    "ClassificationOutcome",
    "ClassifyOptions",
    "algorithm_for",
    "classify_study_input",
    "record_input",
    "write_findings_reports",
    "write_parametric_maps",
    "write_segmentations",
]

logger = logging.getLogger(__name__)

#: What one relevance-map writer returns for a series: its SEGs, or its Parametric Maps by finding.
_Objects = TypeVar("_Objects", list[Segmentation], dict[str, list[ParametricMap]])


#: How relevance maps are written: FRACTIONAL SEG, Parametric Map, or both (README explains the default).
RELEVANCE_FORMATS = ("seg", "pmap", "both")


@dataclass(frozen=True)
class ClassifyOptions:
    """Settings of the classification pipeline (resolved from CLI/env/YAML by the caller)."""

    relevance_top_k: int = 3
    write_embeddings: bool = False
    result_version: int = 1
    relevance_format: str = "both"
    #: Memory limits checked from the headers before any pixel is decoded.
    budget: MemoryBudget = field(default_factory=MemoryBudget)
    #: Keep each frame's embedding in the classification without writing it (the search index needs it).
    keep_embeddings: bool = False
    #: Compute relevance maps (False: scores only, for the listener's triage stage).
    relevance_maps: bool = True

    def __post_init__(self) -> None:
        if self.relevance_format not in RELEVANCE_FORMATS:
            raise ValueError(
                f"relevance_format must be one of {', '.join(RELEVANCE_FORMATS)}, "
                f"got {self.relevance_format!r}"
            )

    @property
    def writes_seg(self) -> bool:
        return self.relevance_format in ("seg", "both")

    @property
    def writes_pmap(self) -> bool:
        return self.relevance_format in ("pmap", "both")


@dataclass
class ClassificationOutcome:
    """What travels between the pipeline's operators: the run's results so far and its findings."""

    results: RunResults
    study_input: StudyInput
    classifications: list[SeriesClassification]
    segmentations: dict[str, list[Segmentation]] = field(default_factory=dict)
    #: By Series Instance UID, then finding key.
    parametric_maps: dict[str, dict[str, list[ParametricMap]]] = field(default_factory=dict)


def record_input(study_input: StudyInput, results: RunResults) -> None:
    """Carry the loader's rejected and skipped files into the run's results (already logged)."""
    for rejection in study_input.rejected:
        results.reject(rejection, log=False)
    for skipped in study_input.skipped:
        results.skip(skipped, log=False)


def algorithm_for(model: ModelIdentity, label_set: LabelSet, options: ClassifyOptions) -> AlgorithmInfo:
    """TID 4019 identification of one classification: the model plus what shaped its output."""
    from medgemma_deploy import __version__

    return AlgorithmInfo(
        name=model.name,
        version=model.version,
        parameters=(
            ("label_set", f"{label_set.name} {label_set.version}"),
            ("scoring", label_set.scoring),
            ("threshold", f"{label_set.threshold:g}"),
            ("series_aggregation", "max over frames"),
            ("relevance_top_k", str(options.relevance_top_k)),
        ),
        software_version=__version__,
    )


def classify_study_input(
    study_input: StudyInput,
    scorer: ImageModel,
    model: ModelIdentity,
    label_sets: Sequence[LabelSet],
    options: ClassifyOptions,
    results: RunResults,
    progress: Callable[[int, int, Series], None] | None = None,
) -> list[SeriesClassification]:
    """Classify every series of every study; a series that cannot be classified is rejected."""
    all_series = [series for study in study_input.studies for series in study.series]
    classifications: list[SeriesClassification] = []
    for index, series in enumerate(all_series):
        if progress is not None:
            progress(index, len(all_series), series)
        classification = results.isolated(
            series, "classify", partial(_classify, scorer, series, model, label_sets, options)
        )
        if classification is not None:
            classifications.append(classification)
    return classifications


def write_segmentations(
    classifications: Sequence[SeriesClassification],
    out_dir: Path,
    options: ClassifyOptions,
    results: RunResults,
) -> dict[str, list[Segmentation]]:
    """Write each series' relevance maps as FRACTIONAL SEG(s); returns them by Series Instance UID.

    A SEG that cannot be built (e.g. a CT without a frame of reference) is rejected with the reason;
    the series' SR is still written later, without segment references.
    """
    if not options.writes_seg:
        return {}
    return _write_relevance_objects(
        classifications, "seg", _write_segmentations, out_dir, options, results, carried_by_seg=False
    )


def write_parametric_maps(
    classifications: Sequence[SeriesClassification],
    out_dir: Path,
    options: ClassifyOptions,
    results: RunResults,
) -> dict[str, dict[str, list[ParametricMap]]]:
    """Write each series' relevance maps as Parametric Maps; returns them by series, then finding.

    A series whose images cannot carry a Parametric Map (a projection radiograph: no frame of
    reference) is named in results.json with the reason: as skipped when the SEG carries its maps
    (``relevance_format`` both), as rejected when only Parametric Maps were asked for. Any other
    refusal is a rejection. Its SR is written either way.
    """
    if not options.writes_pmap:
        return {}
    return _write_relevance_objects(
        classifications,
        "pmap",
        _write_parametric_maps,
        out_dir,
        options,
        results,
        carried_by_seg=options.writes_seg,
    )


def write_findings_reports(
    classifications: Sequence[SeriesClassification],
    segmentations: Mapping[str, Sequence[Segmentation]],
    out_dir: Path,
    options: ClassifyOptions,
    results: RunResults,
    parametric_maps: Mapping[str, Mapping[str, Sequence[ParametricMap]]] | None = None,
    triage: Mapping[str, StudyTriage] | None = None,
) -> None:
    """Write each series' TID 1500 SR (referencing its relevance maps) and, if asked, embeddings.

    ``triage`` (by Study Instance UID, :func:`~medgemma_deploy.triage.triage_by_study`)
    puts each study's triage level and reasons in its series' SRs.
    """
    parametric_maps = parametric_maps or {}
    triage = triage or {}
    for classification in classifications:
        series = classification.series
        algorithm = algorithm_for(classification.model, classification.label_set, options)
        written = results.isolated(
            series,
            "sr",
            partial(
                _write_findings_sr,
                classification,
                segmentations,
                parametric_maps,
                algorithm,
                options,
                out_dir,
                triage.get(series.study_instance_uid),
            ),
        )
        if written is not None:
            results.outputs.append(written)
        embeddings_file = None
        if options.write_embeddings and classification.embeddings is not None:
            embeddings_file = out_dir / f"embeddings-{series.series_instance_uid}.npy"
            np.save(embeddings_file, classification.embeddings.astype(np.float32))
            results.outputs.append(
                WrittenObject(
                    path=embeddings_file,
                    kind="EMBEDDINGS",
                    study_instance_uid=series.study_instance_uid,
                    source_series_instance_uid=series.series_instance_uid,
                )
            )
        results.add_classification(classification, embeddings_file)


def _classify(
    scorer: ImageModel,
    series: Series,
    model: ModelIdentity,
    label_sets: Sequence[LabelSet],
    options: ClassifyOptions,
) -> SeriesClassification:
    label_set = select_label_set(label_sets, series.modality, series.body_part_examined)
    return classify_series(
        scorer,
        series,
        label_set,
        relevance_top_k=options.relevance_top_k,
        with_embeddings=options.write_embeddings or options.keep_embeddings,
        model=model,
        with_relevance_maps=options.relevance_maps,
    )


def _write_relevance_objects(
    classifications: Sequence[SeriesClassification],
    stage: str,
    write: Callable[
        [SeriesClassification, AlgorithmInfo, ClassifyOptions, Path], tuple[_Objects, list[WrittenObject]]
    ],
    out_dir: Path,
    options: ClassifyOptions,
    results: RunResults,
    *,
    carried_by_seg: bool,
) -> dict[str, _Objects]:
    """Run one relevance-map writer (SEG or Parametric Map) over every series that has maps.

    Each series is isolated: a refusal rejects that series at ``stage`` and the others go on. A
    series whose images cannot carry the object (:class:`NoPatientGeometryError`) is not a failure:
    it is named as skipped when the SEG carries its maps (``carried_by_seg``), else as rejected.
    """
    by_series: dict[str, _Objects] = {}
    for classification in classifications:
        series = classification.series
        if not classification.relevance_maps:
            continue
        algorithm = algorithm_for(classification.model, classification.label_set, options)
        try:
            outcome = results.isolated(
                series,
                stage,
                partial(write, classification, algorithm, options, out_dir),
                passthrough=(NoPatientGeometryError,),
            )
        except NoPatientGeometryError as exc:
            # Not a failure of the series: its images cannot carry this object (named in results).
            if carried_by_seg:
                results.skip(series_rejection(series, stage, exc), expected=True)
            else:
                results.reject(series_rejection(series, stage, exc))
            continue
        if outcome is not None:
            by_series[series.series_instance_uid] = outcome[0]
            results.outputs.extend(outcome[1])
    return by_series


def _write_segmentations(
    classification: SeriesClassification, algorithm: AlgorithmInfo, options: ClassifyOptions, out_dir: Path
) -> tuple[list[Segmentation], list[WrittenObject]]:
    segmentations = build_relevance_segmentations(
        classification, algorithm, result_version=options.result_version
    )
    series_uid = classification.series.series_instance_uid
    return segmentations, [save_dicom(seg, out_dir, "SEG", series_uid) for seg in segmentations]


def _write_parametric_maps(
    classification: SeriesClassification, algorithm: AlgorithmInfo, options: ClassifyOptions, out_dir: Path
) -> tuple[dict[str, list[ParametricMap]], list[WrittenObject]]:
    maps = build_relevance_parametric_maps(classification, algorithm, result_version=options.result_version)
    series_uid = classification.series.series_instance_uid
    written = [
        save_dicom(parametric_map, out_dir, "PMAP", series_uid)
        for instances in maps.values()
        for parametric_map in instances
    ]
    return maps, written


def _write_findings_sr(
    classification: SeriesClassification,
    segmentations: Mapping[str, Sequence[Segmentation]],
    parametric_maps: Mapping[str, Mapping[str, Sequence[ParametricMap]]],
    algorithm: AlgorithmInfo,
    options: ClassifyOptions,
    out_dir: Path,
    triage: StudyTriage | None = None,
) -> WrittenObject:
    series_uid = classification.series.series_instance_uid
    report = build_findings_sr(
        classification,
        algorithm,
        segmentations=segmentations.get(series_uid, ()),
        parametric_maps=parametric_maps.get(series_uid),
        result_version=options.result_version,
        triage=triage,
    )
    return save_dicom(report, out_dir, "SR", series_uid)
