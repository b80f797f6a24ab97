"""Shared helpers for the triage and HL7 tests: a small label set with rules, and classifications."""

from __future__ import annotations

from pathlib import Path

from medgemma_deploy.operators.domain import (
    Code,
    FindingDefinition,
    FindingScore,
    LabelSet,
    ModelIdentity,
    Series,
    SeriesClassification,
    TriagePriority,
    TriageRule,
)

FINDINGS = (
    FindingDefinition(
        "pneumothorax", "Pneumothorax", Code("36118008", "SCT", "Pneumothorax"), ("p",), ("n",)
    ),
    FindingDefinition(
        "consolidation", "Consolidation", Code("95436008", "SCT", "Consolidation"), ("p",), ("n",)
    ),
    FindingDefinition("fracture", "Fracture", Code("125605004", "SCT", "Fracture of bone"), ("p",), ("n",)),
)
RULES = (
    TriageRule("pneumothorax", 0.6, TriagePriority.STAT),
    TriageRule("consolidation", 0.7, TriagePriority.URGENT),
)


def classification(probabilities: dict[str, float], series_uid: str = "1.2.3.1") -> SeriesClassification:
    label_set = LabelSet("triage-set", "1", ("CR",), (), "softmax", 0.5, FINDINGS, RULES)
    series = Series("1.2.3", series_uid, "CR", "CHEST", [])
    scores = [
        FindingScore(f, probabilities.get(f.key, 0.0), probabilities.get(f.key, 0.0) >= 0.5, [0.0], 0)
        for f in FINDINGS
    ]
    return SeriesClassification(series, label_set, ModelIdentity("medsiglip", "v1", Path("m")), scores)
