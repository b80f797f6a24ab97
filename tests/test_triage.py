"""Triage rules in label sets (parsing and refusal) and the study priority they give."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from medgemma_deploy.domain import (
    LabelSet,
    TriagePriority,
    TriageRule,
)
from medgemma_deploy.operators.medsiglip.labels import LabelSetError, load_label_set, load_label_sets
from medgemma_deploy.triage import triage_study
from tests.support.triage import FINDINGS, RULES, classification

SET_WITH_RULES = {
    "name": "triage-set",
    "version": "1",
    "modalities": ["CR"],
    "scoring": "softmax",
    "threshold": 0.5,
    "findings": [
        {
            "key": f.key,
            "display_name": f.display_name,
            "code": {"value": f.code.value, "scheme_designator": "SCT", "meaning": f.code.meaning},
            "positive_prompts": ["p"],
            "negative_prompts": ["n"],
        }
        for f in FINDINGS
    ],
    "triage": [
        {"finding": "pneumothorax", "threshold": 0.6, "priority": "STAT"},
        {"finding": "consolidation", "threshold": 0.7, "priority": "urgent"},
    ],
}


def write(tmp_path: Path, document: dict) -> Path:
    path = tmp_path / "set.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def test_rules_are_read_with_case_insensitive_priorities(tmp_path):
    label_set = load_label_set(write(tmp_path, SET_WITH_RULES))
    assert label_set.triage_rules == RULES


def test_packaged_sets_ship_rules_only_for_their_own_findings():
    for label_set in load_label_sets():
        keys = {finding.key for finding in label_set.findings}
        assert {rule.finding_key for rule in label_set.triage_rules} <= keys
    chest = next(s for s in load_label_sets() if s.name == "chest-xray")
    assert TriageRule("pneumothorax", 0.6, TriagePriority.STAT) in chest.triage_rules


@pytest.mark.parametrize(
    ("rule", "key", "reason"),
    [
        (
            {"finding": "hernia", "threshold": 0.6, "priority": "STAT"},
            "triage[0].finding",
            "'hernia' is not a finding",
        ),
        (
            {"finding": "fracture", "threshold": 1.0, "priority": "STAT"},
            "triage[0].threshold",
            "strictly between",
        ),
        (
            {"finding": "fracture", "threshold": True, "priority": "STAT"},
            "triage[0].threshold",
            "strictly between",
        ),
        (
            {"finding": "fracture", "threshold": 0.5, "priority": "ROUTINE"},
            "triage[0].priority",
            "URGENT, STAT",
        ),
        ({"finding": "fracture", "threshold": 0.5, "priority": "soon"}, "triage[0].priority", "URGENT, STAT"),
        ({"finding": "fracture", "threshold": 0.5}, "triage[0].priority", "is missing"),
        (
            {"finding": "fracture", "threshold": 0.5, "priority": "STAT", "when": 1},
            "triage[0].when",
            "unknown",
        ),
    ],
    ids=[
        "unknown-finding",
        "threshold-1",
        "threshold-bool",
        "routine",
        "unknown-priority",
        "missing",
        "extra-key",
    ],
)
def test_a_bad_rule_refuses_the_set_naming_the_rule(tmp_path, rule, key, reason):
    document = copy.deepcopy(SET_WITH_RULES)
    document["triage"] = [rule]
    with pytest.raises(LabelSetError) as caught:
        load_label_set(write(tmp_path, document))
    assert caught.value.key == key
    assert reason in caught.value.reason


def test_two_rules_for_one_finding_are_refused(tmp_path):
    document = copy.deepcopy(SET_WITH_RULES)
    document["triage"].append({"finding": "pneumothorax", "threshold": 0.9, "priority": "URGENT"})
    with pytest.raises(LabelSetError, match="'pneumothorax' is used twice"):
        load_label_set(write(tmp_path, document))


def test_no_rule_fires_below_thresholds():
    result = triage_study([classification({"pneumothorax": 0.59, "consolidation": 0.69, "fracture": 0.99})])
    assert result.priority is TriagePriority.ROUTINE
    assert not result.is_raised
    assert result.reasons == ()


def test_a_rule_fires_at_its_threshold():
    result = triage_study([classification({"consolidation": 0.7})])
    assert result.priority is TriagePriority.URGENT
    assert [r.finding.key for r in result.reasons] == ["consolidation"]


def test_the_highest_priority_of_any_series_wins_and_every_reason_is_kept():
    result = triage_study(
        [
            classification({"consolidation": 0.95}, series_uid="1.2.3.1"),
            classification({"pneumothorax": 0.61}, series_uid="1.2.3.2"),
        ]
    )
    assert result.priority is TriagePriority.STAT
    assert [(r.series_instance_uid, r.finding.key) for r in result.reasons] == [
        ("1.2.3.2", "pneumothorax"),
        ("1.2.3.1", "consolidation"),
    ]
    as_json = result.to_json()
    assert as_json["priority"] == "STAT"
    assert as_json["uncalibrated"] is True
    assert as_json["reasons"][0] == {
        "series_instance_uid": "1.2.3.2",
        "finding": "pneumothorax",
        "display_name": "Pneumothorax",
        "probability": 0.61,
        "threshold": 0.6,
        "priority": "STAT",
    }


def test_priorities_order_and_hl7_codes():
    assert max(TriagePriority) is TriagePriority.STAT
    assert [p.hl7_code for p in TriagePriority] == ["R", "A", "S"]


def test_rules_do_not_change_what_a_label_set_is_for_scoring():
    """A worker registers label sets by value; a client's set with rules must match its own without."""
    with_rules = classification({}).label_set
    without = LabelSet(
        with_rules.name,
        with_rules.version,
        with_rules.modalities,
        with_rules.body_parts,
        with_rules.scoring,
        with_rules.threshold,
        with_rules.findings,
    )
    assert with_rules.triage_rules and not without.triage_rules
    assert with_rules == without
