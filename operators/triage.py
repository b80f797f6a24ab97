"""Study triage: the label sets' rules applied to MedSigLIP's findings.

A rule (``triage:`` in a label set, see ``medgemma_deploy/config/labels/README.md``) raises a study
to URGENT or STAT when a finding's series probability reaches the rule's threshold. The study's
priority is the highest level any rule reaches, kept with every finding that caused it, so the SR,
``results.json``, the job store and the HL7 message can all say *why*. Triage only ever raises a
study: it never removes one from normal reading.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from medgemma_deploy.operators.domain import (
    FindingDefinition,
    SeriesClassification,
    TriagePriority,
)

__all__ = ["StudyTriage", "TriageReason", "triage_study"]


@dataclass(frozen=True)
class TriageReason:
    """One rule that fired: which finding, in which series, how high, against which threshold."""

    series_instance_uid: str
    finding: FindingDefinition
    probability: float
    threshold: float
    priority: TriagePriority

    def to_json(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid,
            "finding": self.finding.key,
            "display_name": self.finding.display_name,
            "probability": round(self.probability, 6),
            "threshold": self.threshold,
            "priority": self.priority.name,
        }


@dataclass(frozen=True)
class StudyTriage:
    """The priority of one study version and the reasons for it (most urgent first)."""

    priority: TriagePriority
    reasons: tuple[TriageReason, ...] = ()

    @property
    def is_raised(self) -> bool:
        return self.priority > TriagePriority.ROUTINE

    def to_json(self) -> dict[str, Any]:
        return {
            "priority": self.priority.name,
            "uncalibrated": True,
            "reasons": [reason.to_json() for reason in self.reasons],
        }


def triage_study(classifications: Iterable[SeriesClassification]) -> StudyTriage:
    """Apply each series' label-set rules to its findings and combine them into the study's priority.

    A rule fires when the series probability (the maximum over its frames) is at or above the
    rule's threshold. Reasons are ordered by priority, then probability, both descending, so the
    first reason is the one to show when there is room for only one.
    """
    reasons: list[TriageReason] = []
    for classification in classifications:
        scores = {score.finding.key: score for score in classification.scores}
        for rule in classification.label_set.triage_rules:
            score = scores.get(rule.finding_key)
            if score is not None and score.probability >= rule.threshold:
                reasons.append(
                    TriageReason(
                        series_instance_uid=classification.series.series_instance_uid,
                        finding=score.finding,
                        probability=float(score.probability),
                        threshold=rule.threshold,
                        priority=rule.priority,
                    )
                )
    reasons.sort(key=lambda reason: (reason.priority, reason.probability), reverse=True)
    priority = reasons[0].priority if reasons else TriagePriority.ROUTINE
    return StudyTriage(priority=priority, reasons=tuple(reasons))
