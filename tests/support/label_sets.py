"""Label-set YAML documents for tests, shaped like the packaged ``labels/*.yaml``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def label_set_document(
    name: str,
    modalities: Sequence[str],
    findings: Sequence[dict[str, Any]],
    *,
    version: str = "1",
    body_parts: Sequence[str] = (),
    **optional: Any,
) -> dict[str, Any]:
    """A valid label-set document: softmax scoring, threshold 0.5; ``optional`` adds e.g. a description."""
    return {
        "name": name,
        "version": version,
        **optional,
        "modalities": list(modalities),
        "body_parts": list(body_parts),
        "scoring": "softmax",
        "threshold": 0.5,
        "findings": list(findings),
    }


def sct_finding(key: str, display_name: str, sct_value: str, positive: str, negative: str) -> dict[str, Any]:
    """One finding of a label-set document, coded in SNOMED CT with its display name as meaning."""
    return {
        "key": key,
        "display_name": display_name,
        "code": {"value": sct_value, "scheme_designator": "SCT", "meaning": display_name},
        "positive_prompts": [positive],
        "negative_prompts": [negative],
    }
