"""Zero-shot label sets: read from YAML, validated at load, selected per series.

The format, the scoring and the coding schemes are documented in
``medgemma_deploy/config/labels/README.md``, beside the packaged sets (chest X-ray, CT,
dermatology). Every problem in a file is reported as a :class:`LabelSetError` naming the file, the
key (``findings[3].code.value``) and the reason, before any model is loaded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from medgemma_deploy.domain import Code, FindingDefinition, LabelSet, TriagePriority, TriageRule

__all__ = [
    "CODING_SCHEMES",
    "SCORING_METHODS",
    "LabelSetError",
    "NoLabelSetError",
    "load_label_set",
    "load_label_sets",
    "packaged_label_files",
    "select_label_set",
]

logger = logging.getLogger(__name__)

#: Coding scheme designators a finding code may use, with what each is (README "Coding schemes").
CODING_SCHEMES: dict[str, str] = {
    "SCT": "SNOMED CT",
    "RADLEX": "RadLex",
    "DCM": "DICOM Controlled Terminology",
    "LN": "LOINC",
    "99MEDGEMMA": "medgemma-deploy private findings (README lists the values)",
}

#: How per-prompt logits become a probability (module ``medsiglip`` implements them).
SCORING_METHODS = ("softmax", "sigmoid")

# What a code value of each standard scheme looks like; private schemes take any short string.
_CODE_VALUE_PATTERNS: dict[str, re.Pattern[str]] = {
    "SCT": re.compile(r"^[1-9][0-9]{5,17}$"),
    "RADLEX": re.compile(r"^RID[0-9]+$"),
    "LN": re.compile(r"^[0-9]{1,7}-[0-9]$"),
}
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
_MODALITY = re.compile(r"^[A-Z0-9]{1,16}$")
_TOP_KEYS = {
    "name",
    "version",
    "description",
    "modalities",
    "body_parts",
    "scoring",
    "threshold",
    "findings",
    "triage",
}
_FINDING_KEYS = {"key", "display_name", "code", "positive_prompts", "negative_prompts", "description"}
_CODE_KEYS = {"value", "scheme_designator", "meaning", "scheme_version"}
_TRIAGE_KEYS = {"finding", "threshold", "priority"}
# A rule that only confirms routine reading changes nothing, so only raising levels are accepted.
_TRIAGE_PRIORITIES = {p.name: p for p in TriagePriority if p > TriagePriority.ROUTINE}
# DICOM value representations: Code Value is SH (16), Code Meaning and names are LO (64).
_MAX_CODE_VALUE = 16
_MAX_LO = 64


class LabelSetError(ValueError):
    """A label-set file that cannot be used: the file, the key and the reason."""

    def __init__(self, path: str | Path, key: str, reason: str) -> None:
        self.path = str(path)
        self.key = key
        self.reason = reason
        super().__init__(f"{self.path}: {key}: {reason}")


class NoLabelSetError(ValueError):
    """No loaded label set applies to a series' modality and body part."""


def packaged_label_files() -> list[Path]:
    """The label-set files shipped in ``medgemma_deploy/config/labels``, sorted by name."""
    folder = resources.files("medgemma_deploy.config").joinpath("labels")
    return sorted(Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def load_label_sets(paths: Sequence[str | Path] | None = None) -> list[LabelSet]:
    """Load and validate label sets, in the given order.

    Parameters
    ----------
    paths:
        YAML files, one label set each. ``None`` or empty: the packaged sets.

    Raises
    ------
    LabelSetError
        A file is missing, is not YAML, or breaks a rule of the format; or two files use the same
        ``name``.
    """
    files = [Path(p) for p in paths] if paths else packaged_label_files()
    label_sets: list[LabelSet] = []
    seen: dict[str, Path] = {}
    for path in files:
        label_set = load_label_set(path)
        if label_set.name in seen:
            raise LabelSetError(path, "name", f"{label_set.name!r} is already used by {seen[label_set.name]}")
        seen[label_set.name] = path
        label_sets.append(label_set)
    logger.info(
        "label sets: %s",
        ", ".join(
            f"{s.name} {s.version} ({len(s.findings)} findings, {'/'.join(s.modalities)})" for s in label_sets
        ),
    )
    return label_sets


def load_label_set(path: str | Path) -> LabelSet:
    """Load one label-set file (see the module docstring for the errors)."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LabelSetError(path, "file", f"cannot be read ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise LabelSetError(path, "file", f"is not valid YAML ({' '.join(str(exc).split())})") from exc
    return _parse_label_set(document, path)


def select_label_set(label_sets: Sequence[LabelSet], modality: str, body_part: str | None) -> LabelSet:
    """The label set for a series, by Modality and Body Part Examined (case-insensitive).

    Preference, first match in ``label_sets`` order within each level: (1) a set listing the
    series' body part; (2) a set for any body part (``body_parts: []``); (3) when the series has no
    body part, a set that lists body parts (e.g. a chest set for a CR without Body Part Examined).

    Raises
    ------
    NoLabelSetError
        No set lists the modality, or none of those fits the body part; the message says what the
        loaded sets cover.
    """
    wanted_modality = (modality or "").strip().upper()
    wanted_part = (body_part or "").strip().upper() or None
    candidates = [s for s in label_sets if wanted_modality in s.modalities]
    for level in (
        [s for s in candidates if wanted_part is not None and wanted_part in s.body_parts],
        [s for s in candidates if not s.body_parts],
        [s for s in candidates if wanted_part is None and s.body_parts],
    ):
        if level:
            return level[0]
    covered = "; ".join(f"{s.name}: {'/'.join(s.modalities)} {_body_parts_text(s)}" for s in label_sets)
    raise NoLabelSetError(
        f"no label set for modality {wanted_modality or '(none)'!r} with body part "
        f"{wanted_part or '(unspecified)'!r}: loaded sets cover {covered or 'nothing'}; "
        "add a label set YAML for it (-l/--labels)"
    )


def _body_parts_text(label_set: LabelSet) -> str:
    if not label_set.body_parts:
        return "any body part"
    return "/".join(label_set.body_parts) + " or unspecified"


def _parse_label_set(document: Any, path: Path) -> LabelSet:
    if not isinstance(document, dict):
        raise LabelSetError(path, "file", f"must be a YAML mapping, found {type(document).__name__}")
    _check_keys(
        document, _TOP_KEYS, {"name", "version", "modalities", "scoring", "threshold", "findings"}, path, ""
    )
    name = _text(document["name"], path, "name")
    version = _text(document["version"], path, "version")
    modalities = _modalities(document["modalities"], path)
    body_parts = tuple(
        _text(part, path, f"body_parts[{index}]").upper()
        for index, part in enumerate(_list(document.get("body_parts") or [], path, "body_parts"))
    )
    scoring = document["scoring"]
    if scoring not in SCORING_METHODS:
        raise LabelSetError(path, "scoring", f"{scoring!r} is not one of {', '.join(SCORING_METHODS)}")
    threshold = document["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise LabelSetError(path, "threshold", f"{threshold!r} must be a number strictly between 0 and 1")
    raw_findings = _list(document["findings"], path, "findings")
    if not raw_findings:
        raise LabelSetError(path, "findings", "is empty: a label set needs at least one finding")
    findings = tuple(
        _finding(raw, path, f"findings[{index}]", scoring) for index, raw in enumerate(raw_findings)
    )
    _check_unique((f.key for f in findings), path, "key")
    _check_unique((f"{f.code.scheme_designator} {f.code.value}" for f in findings), path, "code")
    triage_rules = tuple(
        _triage_rule(raw, path, f"triage[{index}]", findings)
        for index, raw in enumerate(_list(document.get("triage") or [], path, "triage"))
    )
    _check_unique((rule.finding_key for rule in triage_rules), path, "triage.finding")
    return LabelSet(
        name=name,
        version=version,
        modalities=modalities,
        body_parts=body_parts,
        scoring=scoring,
        threshold=float(threshold),
        findings=findings,
        triage_rules=triage_rules,
    )


def _triage_rule(raw: Any, path: Path, where: str, findings: tuple[FindingDefinition, ...]) -> TriageRule:
    if not isinstance(raw, dict):
        raise LabelSetError(path, where, f"must be a mapping, found {type(raw).__name__}")
    _check_keys(raw, _TRIAGE_KEYS, _TRIAGE_KEYS, path, where)
    finding_key = _text(raw["finding"], path, f"{where}.finding")
    known = [finding.key for finding in findings]
    if finding_key not in known:
        raise LabelSetError(
            path, f"{where}.finding", f"{finding_key!r} is not a finding of this set ({', '.join(known)})"
        )
    threshold = raw["threshold"]
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
        raise LabelSetError(
            path, f"{where}.threshold", f"{threshold!r} must be a number strictly between 0 and 1"
        )
    priority = str(raw["priority"]).strip().upper()
    if priority not in _TRIAGE_PRIORITIES:
        raise LabelSetError(
            path, f"{where}.priority", f"{raw['priority']!r} is not one of {', '.join(_TRIAGE_PRIORITIES)}"
        )
    return TriageRule(
        finding_key=finding_key, threshold=float(threshold), priority=_TRIAGE_PRIORITIES[priority]
    )


def _finding(raw: Any, path: Path, where: str, scoring: str) -> FindingDefinition:
    if not isinstance(raw, dict):
        raise LabelSetError(path, where, f"must be a mapping, found {type(raw).__name__}")
    _check_keys(raw, _FINDING_KEYS, {"key", "display_name", "code", "positive_prompts"}, path, where)
    key = _text(raw["key"], path, f"{where}.key")
    if not _KEY.match(key):
        raise LabelSetError(
            path, f"{where}.key", f"{key!r} must be lower case letters, digits and _ ([a-z][a-z0-9_]*)"
        )
    display_name = _text(raw["display_name"], path, f"{where}.display_name", max_length=_MAX_LO)
    positive = _prompts(raw["positive_prompts"], path, f"{where}.positive_prompts")
    if not positive:
        raise LabelSetError(
            path, f"{where}.positive_prompts", "is empty: a finding needs at least one prompt"
        )
    negative = _prompts(raw.get("negative_prompts") or [], path, f"{where}.negative_prompts")
    if scoring == "softmax" and not negative:
        raise LabelSetError(
            path,
            f"{where}.negative_prompts",
            "is missing: softmax scoring contrasts positive with negative prompts",
        )
    return FindingDefinition(
        key=key,
        display_name=display_name,
        code=_code(raw["code"], path, f"{where}.code"),
        positive_prompts=positive,
        negative_prompts=negative,
    )


def _code(raw: Any, path: Path, where: str) -> Code:
    if not isinstance(raw, dict):
        raise LabelSetError(
            path, where, f"must be a mapping with value, scheme_designator, meaning; found {raw!r}"
        )
    _check_keys(raw, _CODE_KEYS, {"value", "scheme_designator", "meaning"}, path, where)
    scheme = _text(raw["scheme_designator"], path, f"{where}.scheme_designator")
    if scheme not in CODING_SCHEMES:
        raise LabelSetError(
            path, f"{where}.scheme_designator", f"{scheme!r} is not one of {', '.join(CODING_SCHEMES)}"
        )
    value = raw["value"]
    if not isinstance(value, str):
        raise LabelSetError(
            path, f"{where}.value", f"{value!r} must be a quoted string (YAML reads 0123 as an octal number)"
        )
    value = _text(value, path, f"{where}.value", max_length=_MAX_CODE_VALUE)
    pattern = _CODE_VALUE_PATTERNS.get(scheme)
    if pattern is not None and not pattern.match(value):
        raise LabelSetError(
            path,
            f"{where}.value",
            f"{value!r} is not a {CODING_SCHEMES[scheme]} code (expected {pattern.pattern})",
        )
    scheme_version = raw.get("scheme_version")
    return Code(
        value=value,
        scheme_designator=scheme,
        meaning=_text(raw["meaning"], path, f"{where}.meaning", max_length=_MAX_LO),
        scheme_version=None
        if scheme_version is None
        else _text(scheme_version, path, f"{where}.scheme_version"),
    )


def _modalities(raw: Any, path: Path) -> tuple[str, ...]:
    values = [
        _text(v, path, f"modalities[{i}]").upper() for i, v in enumerate(_list(raw, path, "modalities"))
    ]
    if not values:
        raise LabelSetError(
            path, "modalities", "is empty: list the DICOM Modality values this set applies to"
        )
    for index, value in enumerate(values):
        if not _MODALITY.match(value):
            raise LabelSetError(
                path, f"modalities[{index}]", f"{value!r} is not a DICOM Modality value (CR, DX, CT…)"
            )
    return tuple(values)


def _prompts(raw: Any, path: Path, where: str) -> tuple[str, ...]:
    prompts = tuple(_text(p, path, f"{where}[{i}]") for i, p in enumerate(_list(raw, path, where)))
    _check_unique(prompts, path, where)
    return prompts


def _check_keys(raw: dict, allowed: set[str], required: set[str], path: Path, where: str) -> None:
    prefix = f"{where}." if where else ""
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise LabelSetError(
            path, f"{prefix}{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(allowed))})"
        )
    missing = sorted(k for k in required if k not in raw or raw[k] is None)
    if missing:
        raise LabelSetError(path, f"{prefix}{missing[0]}", "is missing")


def _check_unique(values: Iterable[str], path: Path, where: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise LabelSetError(path, where, f"{value!r} is used twice")
        seen.add(value)


def _list(raw: Any, path: Path, where: str) -> list:
    if not isinstance(raw, list):
        raise LabelSetError(path, where, f"must be a list, found {type(raw).__name__} {raw!r}")
    return raw


def _text(raw: Any, path: Path, where: str, *, max_length: int | None = None) -> str:
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise LabelSetError(path, where, f"must be text, found {type(raw).__name__} {raw!r}")
    text = str(raw).strip()
    if not text:
        raise LabelSetError(path, where, "is empty")
    if max_length is not None and len(text) > max_length:
        raise LabelSetError(path, where, f"{text!r} is longer than {max_length} characters (a DICOM limit)")
    return text
