"""Label-set YAML: the packaged sets, every validation rule, and selecting a set for a series."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from medgemma_deploy.domain import Code, FindingDefinition, LabelSet
from medgemma_deploy.operators.medsiglip.labels import (
    CODING_SCHEMES,
    LabelSetError,
    NoLabelSetError,
    load_label_set,
    load_label_sets,
    packaged_label_files,
    select_label_set,
)
from tests.support.label_sets import label_set_document, sct_finding

CHEXPERT = {
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "edema",
    "enlarged_cardiomediastinum",
    "fracture",
    "lung_lesion",
    "lung_opacity",
    "pleural_effusion",
    "pleural_other",
    "pneumonia",
    "pneumothorax",
    "support_devices",
}

VALID = label_set_document(
    "test-set",
    ["CR"],
    [
        sct_finding("pneumothorax", "Pneumothorax", "36118008", "a pneumothorax", "no pneumothorax"),
        sct_finding(
            "pleural_effusion", "Pleural effusion", "60046008", "a pleural effusion", "no pleural effusion"
        ),
    ],
    version="3",
    body_parts=["CHEST"],
)


def _write(tmp_path: Path, document: object, name: str = "labels.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _mutated(change) -> dict:
    document = copy.deepcopy(VALID)
    change(document)
    return document


# ---- packaged sets ---------------------------------------------------------------------------


def test_packaged_sets_load_with_codes_and_prompts():
    label_sets = load_label_sets()
    assert {s.name for s in label_sets} == {"chest-xray", "ct", "dermatology"}
    assert len(packaged_label_files()) == len(label_sets)
    for label_set in label_sets:
        assert label_set.findings, label_set.name
        for finding in label_set.findings:
            assert finding.code.value and finding.code.meaning, finding.key
            assert finding.code.scheme_designator in CODING_SCHEMES, finding.key
            assert finding.positive_prompts and finding.negative_prompts, finding.key


def test_chest_set_has_the_thirteen_chexpert_findings_and_known_codes():
    chest = next(s for s in load_label_sets() if s.name == "chest-xray")
    assert {f.key for f in chest.findings} == CHEXPERT
    assert set(chest.modalities) == {"CR", "DX"} and chest.body_parts == ("CHEST",)
    codes = {f.key: (f.code.scheme_designator, f.code.value) for f in chest.findings}
    assert codes["pneumothorax"] == ("SCT", "36118008")
    assert codes["pleural_effusion"] == ("SCT", "60046008")
    assert codes["cardiomegaly"] == ("SCT", "8186001")


def test_private_codes_are_the_documented_ones():
    readme = (packaged_label_files()[0].parent / "README.md").read_text()
    documented = dict(re.findall(r"^\| `(MGD\d{4})` \| ([^|]+?) \|", readme, flags=re.MULTILINE))
    assert documented, "README.md lists no private codes"
    used = {
        f.code.value: f.code.meaning
        for label_set in load_label_sets()
        for f in label_set.findings
        if f.code.scheme_designator == "99MEDGEMMA"
    }
    assert used == documented


def test_private_code_values_are_not_reused_across_sets():
    meanings: dict[tuple[str, str], str] = {}
    for label_set in load_label_sets():
        for finding in label_set.findings:
            key = (finding.code.scheme_designator, finding.code.value)
            assert meanings.setdefault(key, finding.code.meaning) == finding.code.meaning, key


def test_a_valid_file_round_trips(tmp_path):
    label_set = load_label_set(_write(tmp_path, VALID))
    assert isinstance(label_set, LabelSet)
    assert (label_set.name, label_set.version, label_set.threshold) == ("test-set", "3", 0.5)
    assert label_set.findings[0].code.value == "36118008"
    assert label_set.findings[1].negative_prompts == ("no pleural effusion",)


def test_sigmoid_scoring_needs_no_negative_prompts(tmp_path):
    def change(d):
        d["scoring"] = "sigmoid"
        for finding in d["findings"]:
            del finding["negative_prompts"]

    label_set = load_label_set(_write(tmp_path, _mutated(change)))
    assert label_set.scoring == "sigmoid" and label_set.findings[0].negative_prompts == ()


# ---- one pytest.raises per validation rule ------------------------------------------------------


def _set(path: list, value):
    def change(d):
        target = d
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return change


def _delete(path: list):
    def change(d):
        target = d
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]

    return change


RULES = [
    ("unknown-top-key", _set(["treshold"], 0.4), "treshold", "unknown key"),
    ("missing-name", _delete(["name"]), "name", "is missing"),
    ("missing-findings", _delete(["findings"]), "findings", "is missing"),
    ("bad-scoring", _set(["scoring"], "max"), "scoring", "'max' is not one of softmax, sigmoid"),
    ("threshold-zero", _set(["threshold"], 0), "threshold", "strictly between 0 and 1"),
    ("threshold-above-one", _set(["threshold"], 1.5), "threshold", "strictly between 0 and 1"),
    ("threshold-text", _set(["threshold"], "high"), "threshold", "strictly between 0 and 1"),
    ("modalities-empty", _set(["modalities"], []), "modalities", "is empty"),
    ("modalities-not-list", _set(["modalities"], "CR"), "modalities", "must be a list"),
    ("modality-bad", _set(["modalities"], ["chest x-ray"]), "modalities[0]", "not a DICOM Modality"),
    ("findings-empty", _set(["findings"], []), "findings", "at least one finding"),
    ("finding-not-mapping", _set(["findings", 0], "pneumothorax"), "findings[0]", "must be a mapping"),
    ("finding-unknown-key", _set(["findings", 0, "prompt"], "x"), "findings[0].prompt", "unknown key"),
    ("key-missing", _delete(["findings", 0, "key"]), "findings[0].key", "is missing"),
    ("key-format", _set(["findings", 0, "key"], "Pneumo thorax"), "findings[0].key", "lower case"),
    ("key-duplicate", _set(["findings", 1, "key"], "pneumothorax"), "key", "'pneumothorax' is used twice"),
    (
        "positive-missing",
        _delete(["findings", 0, "positive_prompts"]),
        "findings[0].positive_prompts",
        "missing",
    ),
    (
        "positive-empty",
        _set(["findings", 0, "positive_prompts"], []),
        "findings[0].positive_prompts",
        "is empty",
    ),
    (
        "prompt-empty",
        _set(["findings", 0, "positive_prompts"], [" "]),
        "findings[0].positive_prompts[0]",
        "empty",
    ),
    (
        "prompt-duplicate",
        _set(["findings", 0, "negative_prompts"], ["no", "no"]),
        "findings[0].negative_prompts",
        "'no' is used twice",
    ),
    (
        "softmax-without-negatives",
        _delete(["findings", 0, "negative_prompts"]),
        "findings[0].negative_prompts",
        "softmax scoring contrasts",
    ),
    (
        "display-name-too-long",
        _set(["findings", 0, "display_name"], "x" * 65),
        "findings[0].display_name",
        "longer than 64",
    ),
    ("code-not-mapping", _set(["findings", 0, "code"], "36118008"), "findings[0].code", "must be a mapping"),
    (
        "code-missing-scheme",
        _delete(["findings", 0, "code", "scheme_designator"]),
        "findings[0].code.scheme_designator",
        "is missing",
    ),
    ("code-missing-value", _delete(["findings", 0, "code", "value"]), "findings[0].code.value", "is missing"),
    (
        "code-missing-meaning",
        _delete(["findings", 0, "code", "meaning"]),
        "findings[0].code.meaning",
        "is missing",
    ),
    (
        "code-unknown-scheme",
        _set(["findings", 0, "code", "scheme_designator"], "SNOMED"),
        "findings[0].code.scheme_designator",
        "'SNOMED' is not one of",
    ),
    (
        "code-value-number",
        _set(["findings", 0, "code", "value"], 36118008),
        "findings[0].code.value",
        "quoted string",
    ),
    (
        "code-value-not-snomed",
        _set(["findings", 0, "code", "value"], "RID5352"),
        "findings[0].code.value",
        "not a SNOMED CT code",
    ),
    (
        "code-value-too-long",
        _set(
            ["findings", 0, "code"], {"value": "V" * 17, "scheme_designator": "99MEDGEMMA", "meaning": "Long"}
        ),
        "findings[0].code.value",
        "longer than 16",
    ),
    (
        "code-meaning-too-long",
        _set(["findings", 0, "code", "meaning"], "m" * 65),
        "findings[0].code.meaning",
        "longer than 64",
    ),
    (
        "code-duplicate",
        _set(
            ["findings", 1, "code"],
            {"value": "36118008", "scheme_designator": "SCT", "meaning": "Pneumothorax"},
        ),
        "code",
        "'SCT 36118008' is used twice",
    ),
]


@pytest.mark.parametrize(("change", "key", "reason"), [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_each_rule_names_file_key_and_reason(tmp_path, change, key, reason):
    path = _write(tmp_path, _mutated(change))
    with pytest.raises(LabelSetError) as caught:
        load_label_set(path)
    error = caught.value
    assert error.path == str(path)
    assert error.key == key
    assert reason in error.reason
    assert str(error).startswith(f"{path}: {key}: ")


def test_missing_file(tmp_path):
    with pytest.raises(LabelSetError, match=r"missing\.yaml: file: cannot be read"):
        load_label_sets([tmp_path / "missing.yaml"])


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(LabelSetError, match=r"broken\.yaml: file: is not valid YAML"):
        load_label_set(path)


def test_not_a_mapping(tmp_path):
    with pytest.raises(LabelSetError, match="must be a YAML mapping, found list"):
        load_label_set(_write(tmp_path, ["a", "b"]))


def test_two_files_with_one_name(tmp_path):
    first = _write(tmp_path, VALID, "first.yaml")
    second = _write(tmp_path, VALID, "second.yaml")
    with pytest.raises(
        LabelSetError, match=r"second\.yaml: name: 'test-set' is already used by .*first\.yaml"
    ):
        load_label_sets([first, second])


def test_load_errors_are_value_errors_for_the_cli(tmp_path):
    # ClassifyEngine turns (OSError, ValueError) from load_label_sets into a one-line usage error.
    with pytest.raises(ValueError):
        load_label_sets([_write(tmp_path, _mutated(_set(["threshold"], 2)))])


# ---- selecting a set for a series -----------------------------------------------------------


def _label_set(name: str, modalities: tuple[str, ...], body_parts: tuple[str, ...]) -> LabelSet:
    finding = FindingDefinition("finding", "Finding", Code("1", "99MEDGEMMA", "Finding"), ("yes",), ("no",))
    return LabelSet(name, "1", modalities, body_parts, "softmax", 0.5, (finding,))


@pytest.mark.parametrize(
    ("modality", "body_part", "expected"),
    [
        ("CR", None, "chest-xray"),
        ("DX", "CHEST", "chest-xray"),
        ("dx", " chest ", "chest-xray"),
        ("CT", "HEAD", "ct"),
        ("CT", None, "ct"),
        ("XC", None, "dermatology"),
        ("OT", "SKIN", "dermatology"),
    ],
)
def test_packaged_selection(modality, body_part, expected):
    assert select_label_set(load_label_sets(), modality, body_part).name == expected


def test_no_set_for_the_modality_says_what_is_covered():
    with pytest.raises(NoLabelSetError) as caught:
        select_label_set(load_label_sets(), "MR", "BRAIN")
    message = str(caught.value)
    assert "modality 'MR'" in message and "'BRAIN'" in message
    assert "chest-xray: CR/DX CHEST or unspecified" in message
    assert "-l/--labels" in message


def test_a_listed_body_part_is_required_when_the_series_has_one():
    with pytest.raises(NoLabelSetError, match="body part 'HAND'"):
        select_label_set(load_label_sets(), "CR", "HAND")


def test_preference_exact_body_part_then_any_then_unspecified():
    any_part = _label_set("any", ("CR",), ())
    chest = _label_set("chest", ("CR",), ("CHEST",))
    hand = _label_set("hand", ("CR",), ("HAND",))
    sets = [any_part, hand, chest]
    assert select_label_set(sets, "CR", "CHEST").name == "chest"
    assert select_label_set(sets, "CR", "KNEE").name == "any"
    assert select_label_set(sets, "CR", None).name == "any"
    assert select_label_set([hand, chest], "CR", None).name == "hand"  # first in load order


def test_no_label_set_error_is_a_value_error_for_the_pipeline():
    # classify_pipeline rejects the series (and goes on) on InputError or ValueError.
    with pytest.raises(ValueError):
        select_label_set([], "CR", None)
