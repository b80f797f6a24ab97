"""The MedGemma prompt book: one :class:`PromptSpec` per family of ``prompts.yaml``, validated.

:meth:`PromptBook.load` reads ``medgemma_deploy/config/prompts.yaml`` or a hospital's own file and
checks every key (the file's header documents them), so a bad prompts file fails at start-up with
the file and the key named, never half-way through a study. It is separate from
:mod:`~medgemma_deploy.operators.medgemma.request`, which turns a series into a request with the
book, because reading and validating configuration changes for other reasons than image sampling
and rendering. The strict type checks (:func:`~medgemma_deploy.domain.is_int`,
:func:`~medgemma_deploy.domain.is_number`) live with the value types they also validate.

Nothing here imports torch, transformers or PIL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml

from medgemma_deploy.domain import is_int, is_number
from medgemma_deploy.errors import UsageError

__all__ = ["PromptBook", "PromptSpec", "Rendering"]

Rendering = Literal["display", "ct_three_window"]

_RENDERINGS = ("display", "ct_three_window")
_POSITIONS = ("before", "after")
_TEXT_KEYS = ("id", "version", "system", "instruction")
_OPTIONAL_TEXT_KEYS = ("preamble", "image_label")
_REQUIRED_KEYS = (*_TEXT_KEYS, "modalities", "max_images", "rendering")
_OPTIONAL_KEYS = (*_OPTIONAL_TEXT_KEYS, "instruction_position")
_GENERIC = "generic"


@dataclass(frozen=True)
class PromptSpec:
    """One family of ``prompts.yaml`` (see the file's header for the meaning of each key)."""

    family: str
    id: str
    version: str
    modalities: tuple[str, ...]
    system: str
    instruction: str
    max_images: int
    rendering: Rendering
    instruction_position: Literal["before", "after"] = "before"
    preamble: str | None = None
    image_label: str | None = None


@dataclass(frozen=True)
class PromptBook:
    """All prompt families of one ``prompts.yaml``, validated; see :meth:`load`."""

    path: Path
    version: str
    findings_context: str
    families: tuple[PromptSpec, ...]

    @classmethod
    def load(cls, path: str | Path | None = None) -> PromptBook:
        """Read and validate a prompts file; None reads the packaged ``prompts.yaml``.

        Raises
        ------
        UsageError
            The file cannot be read or parsed, or a key is missing, empty, of the wrong type or
            unknown, an id or modality is repeated, or the ``generic`` family is missing; the
            message names the file and the key (``families.ct.instruction``).
        """
        if path is None:
            file = Path(str(resources.files("medgemma_deploy.config") / "prompts.yaml"))
        else:
            file = Path(path)
        try:
            document = yaml.safe_load(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise UsageError(f"{file}: cannot read the prompts file: {exc}") from exc
        if not isinstance(document, dict):
            raise UsageError(f"{file}: expected a mapping of version, findings_context and families")
        findings_context = _text(document, "findings_context", file, "findings_context")
        if "{findings}" not in findings_context:
            raise UsageError(f"{file}: findings_context must contain {{findings}}, got {findings_context!r}")
        families_node = document.get("families")
        if not isinstance(families_node, dict) or not families_node:
            raise UsageError(f"{file}: families must be a non-empty mapping of family name to prompt")
        families = tuple(_family(name, node, file) for name, node in families_node.items())
        _check_unique(families, file)
        if not any(spec.family == _GENERIC for spec in families):
            raise UsageError(f"{file}: families.{_GENERIC} is missing; it serves the other modalities")
        return cls(
            path=file,
            version=str(document.get("version", "")),
            findings_context=findings_context,
            families=families,
        )

    def for_modality(self, modality: str) -> tuple[PromptSpec, bool]:
        """The family serving ``modality`` and whether it is a dedicated one (False: ``generic``)."""
        modality = modality.strip().upper()
        for spec in self.families:
            if modality in spec.modalities:
                return spec, True
        return next(spec for spec in self.families if spec.family == _GENERIC), False


def _family(name: object, node: object, file: Path) -> PromptSpec:
    where = f"families.{name}"

    def fail(message: str) -> UsageError:
        return UsageError(f"{file}: {where}{message}")

    if not isinstance(node, dict):
        raise fail(f" must be a mapping, got {type(node).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in node]
    if missing:
        raise fail(f" is missing {', '.join(missing)}")
    unknown = sorted(map(str, set(node) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS)))
    if unknown:
        raise fail(f" has unknown key(s) {', '.join(unknown)}")
    modalities = node["modalities"]
    if not isinstance(modalities, list) or not all(
        isinstance(item, str) and item.strip() for item in modalities
    ):
        raise fail(f".modalities must be a list of Modality values, got {modalities!r}")
    if not modalities and name != _GENERIC:
        raise fail(f".modalities is empty; only the {_GENERIC} family serves no named modality")
    if not is_int(node["max_images"]) or node["max_images"] < 1:
        raise fail(f".max_images must be an int >= 1, got {node['max_images']!r}")
    if node["rendering"] not in _RENDERINGS:
        raise fail(f".rendering must be one of {', '.join(_RENDERINGS)}, got {node['rendering']!r}")
    position = node.get("instruction_position", "before")
    if position not in _POSITIONS:
        raise fail(f".instruction_position must be before or after, got {position!r}")
    texts = {
        key: _text(node, key, file, f"{where}.{key}")
        for key in (*_TEXT_KEYS, *_OPTIONAL_TEXT_KEYS)
        if key in _TEXT_KEYS or key in node
    }
    if "{n}" not in texts.get("image_label", "{n}"):
        raise fail(f".image_label must contain {{n}}, got {texts['image_label']!r}")
    return PromptSpec(
        family=str(name),
        modalities=tuple(item.strip().upper() for item in modalities),
        max_images=node["max_images"],
        rendering=node["rendering"],
        instruction_position=position,
        **texts,
    )


def _text(node: dict, key: str, file: Path, where: str) -> str:
    value = node.get(key)
    if key == "version" and is_number(value):
        value = str(value)  # version: 1 is as good as version: "1"
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{file}: {where} must be a non-empty string, got {value!r}")
    return value.strip()


def _check_unique(families: Sequence[PromptSpec], file: Path) -> None:
    ids: dict[str, str] = {}
    owners: dict[str, str] = {}
    for spec in families:
        if spec.id in ids:
            raise UsageError(f"{file}: families.{spec.family}.id {spec.id!r} repeats families.{ids[spec.id]}")
        ids[spec.id] = spec.family
        for modality in spec.modalities:
            if modality in owners:
                raise UsageError(
                    f"{file}: modality {modality} is in families.{owners[modality]} and .{spec.family}"
                )
            owners[modality] = spec.family
