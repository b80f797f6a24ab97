"""What the listener runs on a completed study version: a small registry of pipelines.

A pipeline is opened once per listener process (models loaded once), then turns the input folder
of each study version into DICOM objects in an output folder. ``classify``, ``report`` and
``study`` are the engine's pipelines (:class:`~medgemma_deploy.engine.PipelineEngine`, built from
the run settings exactly as the CLI and the apps build it). A site can register its own with
:func:`register_pipeline`, or name one as ``module:factory`` on the command line.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from medgemma_deploy.domain import Rejection, SeriesClassification
from medgemma_deploy.errors import UsageError
from medgemma_deploy.settings import RunSettings

if TYPE_CHECKING:  # the engine imports torch: loaded by the factories, not by the listener's --help
    from medgemma_deploy.engine import PipelineEngine
    from medgemma_deploy.search.indexer import SearchIndexer
from medgemma_deploy.triage import StudyTriage

__all__ = [
    "EnginePipeline",
    "Pipeline",
    "PipelineFactory",
    "PipelineOptions",
    "PipelineOutput",
    "PipelineRun",
    "PipelineTriage",
    "StagedPipeline",
    "available_pipelines",
    "make_pipeline",
    "register_pipeline",
]

logger = logging.getLogger(__name__)

#: Kinds of written objects that go to the PACS (embeddings and other sidecars stay local).
DICOM_KINDS = frozenset({"SR", "SEG", "PMAP", "REPORT-SR"})


@dataclass(frozen=True)
class PipelineOptions:
    """What every pipeline factory receives (resolved once by ``medgemma-deploy listen``).

    ``settings`` are the whole run settings, not a copy of some of them: the factories build the
    engine with :meth:`~medgemma_deploy.engine.PipelineEngine.from_settings`, as the CLI, the apps
    and the demo do, so every setting reaches every pipeline.
    """

    models_path: Path | None = None
    settings: RunSettings = field(default_factory=RunSettings)

    @property
    def index_store(self) -> str | None:
        """The search index URL when every classified study is also indexed (``--index``)."""
        return self.settings.store if self.settings.index else None


@dataclass(frozen=True)
class PipelineOutput:
    """One DICOM object a pipeline wrote, to be delivered."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    kind: str


@dataclass(frozen=True)
class PipelineRun:
    """The outcome of one study version: objects to deliver, and the inputs the pipeline refused."""

    outputs: tuple[PipelineOutput, ...]
    rejected: tuple[Rejection, ...] = ()
    skipped: tuple[Rejection, ...] = ()
    models: tuple[str, ...] = field(default=())
    #: The study's triage level and reasons when its label sets have triage rules, else None.
    triage: StudyTriage | None = None
    #: The classified series (for the HL7 message's OBX segments).
    classifications: tuple[SeriesClassification, ...] = ()


@dataclass(frozen=True)
class PipelineTriage:
    """A staged pipeline's first stage: the study's findings and triage, nothing written."""

    triage: StudyTriage | None
    classifications: tuple[SeriesClassification, ...] = ()


class Pipeline(Protocol):
    """Load once (:meth:`open`), process many study versions, :meth:`close`."""

    name: str

    def open(self) -> None: ...

    def close(self) -> None: ...

    def process(self, input_dir: Path, output_dir: Path, *, result_version: int) -> PipelineRun: ...


class StagedPipeline(Pipeline, Protocol):
    """A pipeline whose classification is a cheap stage before an expensive one (reports).

    The listener runs :meth:`triage` on every queued study before any :meth:`process`, so an urgent
    study is found early and its reports and delivery go first. ``classifies_first`` may be False
    (e.g. a report pipeline without findings grounding has nothing to triage on).
    """

    @property
    def classifies_first(self) -> bool: ...

    def triage(self, input_dir: Path) -> PipelineTriage: ...


PipelineFactory = Callable[[PipelineOptions], Pipeline]

_REGISTRY: dict[str, PipelineFactory] = {}


def register_pipeline(name: str, factory: PipelineFactory) -> None:
    """Make ``--pipeline name`` build its pipeline with ``factory(options)``."""
    if not name or ":" in name:
        raise ValueError(f"pipeline name must be non-empty and contain no ':', got {name!r}")
    _REGISTRY[name] = factory


def available_pipelines() -> list[str]:
    return sorted(_REGISTRY)


def make_pipeline(spec: str, options: PipelineOptions) -> Pipeline:
    """Build (not open) the pipeline named ``spec``: a registered name or ``module:factory``.

    Raises
    ------
    UsageError
        Unknown name, a ``module:factory`` that cannot be imported, or a pipeline whose engine is
        whose options are incomplete (one line naming what is missing).
    """
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise UsageError(
                f"--pipeline {spec}: cannot import {attribute} from {module_name} ({exc})"
            ) from exc
    elif spec in _REGISTRY:
        factory = _REGISTRY[spec]
    else:
        raise UsageError(f"--pipeline {spec}: unknown; available: {', '.join(available_pipelines())}")
    return factory(options)


class EnginePipeline:
    """A pipeline over a :class:`~medgemma_deploy.engine.PipelineEngine` (``open``/``process``/``close``).

    The engine's ``process(input, output, result_version=N)`` returns a
    :class:`~medgemma_deploy.results.RunResults`; its DICOM outputs are what is delivered.
    """

    def __init__(self, name: str, engine: PipelineEngine, *, index_store: str | None = None) -> None:
        self.name = name
        self.engine = engine
        self.index_store = index_store
        self._indexer: SearchIndexer | None = None

    def open(self) -> None:
        if self.index_store is not None:
            from medgemma_deploy.search.indexer import SearchIndexer

            self._indexer = self.engine.on_classified = SearchIndexer.open(self.index_store)
        self.engine.open()

    def close(self) -> None:
        self.engine.close()
        if self._indexer is not None:
            self._indexer.close()
            self._indexer = self.engine.on_classified = None

    @property
    def classifies_first(self) -> bool:
        return self.engine.classifies_first

    def triage(self, input_dir: Path) -> PipelineTriage:
        findings = self.engine.triage(input_dir)
        return PipelineTriage(triage=findings.triage, classifications=findings.classifications)

    def process(self, input_dir: Path, output_dir: Path, *, result_version: int) -> PipelineRun:
        results = self.engine.process(input_dir, output_dir, result_version=result_version)
        outputs = []
        for written in results.outputs:
            if written.kind not in DICOM_KINDS:
                continue
            if not written.sop_instance_uid or not written.sop_class_uid:
                raise RuntimeError(
                    f"{self.name}: output {written.path} has no SOP Instance/Class UID recorded"
                )
            outputs.append(
                PipelineOutput(
                    path=Path(written.path),
                    sop_class_uid=str(written.sop_class_uid),
                    sop_instance_uid=str(written.sop_instance_uid),
                    kind=written.kind,
                )
            )
        return PipelineRun(
            outputs=tuple(outputs),
            rejected=tuple(results.rejected),
            skipped=tuple(results.skipped),
            models=tuple(f"{m.name} {m.version}" for m in results.models),
            triage=_study_triage(results.triage),
            classifications=tuple(results.classifications),
        )


def _study_triage(by_study: dict[str, StudyTriage]) -> StudyTriage | None:
    """One study version's triage (the listener runs one study per job; several: the highest)."""
    if not by_study:
        return None
    return max(by_study.values(), key=lambda triage: triage.priority)


def _engine_factory(name: str) -> PipelineFactory:
    """The factory of the engine's pipeline ``name``, built from the listener's run settings."""

    def factory(options: PipelineOptions) -> Pipeline:
        from medgemma_deploy.engine import PipelineEngine

        if options.settings.backend == "local" and options.models_path is None:
            raise UsageError(f"--pipeline {name}: --models is required with --backend local")
        engine = PipelineEngine.from_settings(name, options.models_path, options.settings)
        return EnginePipeline(name, engine, index_store=options.index_store)

    return factory


for _name in ("classify", "report", "study"):
    register_pipeline(_name, _engine_factory(_name))
