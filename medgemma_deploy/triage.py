"""Study triage: the label sets' rules applied to MedSigLIP's findings.

A rule (``triage:`` in a label set, see ``medgemma_deploy/config/labels/README.md``) raises a study
to URGENT or STAT when a finding's series probability reaches the rule's threshold. The study's
priority is the highest level any rule reaches, kept with every finding that caused it, so the SR,
``results.json``, the job store and the HL7 message can all say *why*. Triage only ever raises a
study: it never removes one from normal reading.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from medgemma_deploy.domain import (
    Code,
    FindingDefinition,
    SeriesClassification,
    TriagePriority,
)

__all__ = [
    "TRIAGE_PRIORITY_CODES",
    "TRIAGE_PRIORITY_CONCEPT",
    "TRIAGE_REASON_CONCEPT",
    "StudyTriage",
    "TriageReason",
    "triage_by_study",
    "triage_study",
]

#: The findings SR's triage item (PS3.16 TID 1500 "Qualitative Evaluations"): no standard concept
#: names an AI triage level, so the project's private scheme 99MEDGEMMA is used (PS3.16 8.2,
#: declared in the SR's Coding Scheme Identification Sequence; docs/dicom-conformance.md).
TRIAGE_PRIORITY_CONCEPT = Code("TRIAGE", "99MEDGEMMA", "AI triage priority")
TRIAGE_REASON_CONCEPT = Code("TRIAGE-REASON", "99MEDGEMMA", "AI triage reason")
TRIAGE_PRIORITY_CODES: dict[TriagePriority, Code] = {
    TriagePriority.ROUTINE: Code("ROUTINE", "99MEDGEMMA", "Routine"),
    TriagePriority.URGENT: Code("URGENT", "99MEDGEMMA", "Urgent"),
    TriagePriority.STAT: Code("STAT", "99MEDGEMMA", "Stat"),
}


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

    def reasons_json(self) -> str:
        """The reasons as compact JSON, as the listener's job store keeps them (no patient data)."""
        return json.dumps([reason.to_json() for reason in self.reasons], separators=(",", ":"))

    def describe(self) -> str:
        """One line for people (SR text item, HL7 note): the level and every rule that fired."""
        if not self.reasons:
            return f"{self.priority.name}: no triage rule reached its threshold (uncalibrated thresholds)"
        fired = "; ".join(
            f"{r.finding.display_name} {r.probability:.4f} >= {r.threshold:g} ({r.priority.name}) "
            f"in series {r.series_instance_uid}"
            for r in self.reasons
        )
        return f"{self.priority.name}: {fired} (uncalibrated thresholds, a site decision)"


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


def triage_by_study(classifications: Iterable[SeriesClassification]) -> dict[str, StudyTriage]:
    """:func:`triage_study` per Study Instance UID, for the studies whose label sets have rules.

    A study none of whose series' label sets carries a ``triage:`` section gets no entry: its
    priority is unknown, not routine.
    """
    by_study: dict[str, list[SeriesClassification]] = {}
    for classification in classifications:
        by_study.setdefault(classification.series.study_instance_uid, []).append(classification)
    return {
        study: triage_study(members)
        for study, members in by_study.items()
        if any(member.label_set.triage_rules for member in members)
    }
