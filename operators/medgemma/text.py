"""MedGemma's draft text as report sections: clean the chat artefacts, split Findings/Impression.

The model writes free text, often with headings in some markdown dialect ("Findings:",
"FINDINGS", "**Impression:**", "## Impression", "**Findings**:"). :func:`split_report` finds
those headings at the start of a line, case- and markdown-insensitively, and returns the text
under each. Text under no recognised heading is never dropped: what comes before the first
heading, and the whole text when there is no heading, belong to Findings; other headings
("Technique:", "Recommendation:") stay inside the section they appear in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ReportSections", "clean_report_text", "split_report"]

#: Control tokens of Gemma 3 that can leak into decoded text (e.g. decoded without
#: skip_special_tokens, or from a tokenizer that does not mark them special).
_CONTROL_TOKENS = re.compile(
    r"<(?:bos|eos|pad|unk|mask|end_of_turn|start_of_image|end_of_image|image_soft_token)>"
)
#: Control characters a DICOM text value (UT, PS3.5 6.2) must not hold: all C0 controls but
#: LF and CR, DEL and the C1 controls. Byte-fallback tokens can decode to any of them.
_FORBIDDEN_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
#: The model opening a new turn: what follows is no longer the report.
_NEW_TURN = re.compile(r"<start_of_turn>")

#: Heading names by section; "Conclusion" is how some reports title the impression.
_SECTION_OF = {
    "finding": "findings",
    "findings": "findings",
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
}
_MARKUP = r"[*_]{0,3}"
_NAMES = "|".join(sorted(_SECTION_OF, key=len, reverse=True))
#: A heading at the start of a line: optional "#" and emphasis, the name, then ":" (the text may
#: go on after it) or the end of the line, so "Findings are normal." is not a heading. Emphasis
#: after the colon is part of the heading only when whitespace follows ("**Findings:** text"),
#: not when it opens the text ("Findings: **No** effusion").
_HEADING = re.compile(
    rf"^[ \t]*(?:\#{{1,6}}[ \t]*)?{_MARKUP}[ \t]*(?P<name>{_NAMES})[ \t]*{_MARKUP}[ \t]*"
    rf"(?::[ \t]*(?:[*_]{{1,3}}(?=\s|\Z))?[ \t]*|(?=\r?\n|\Z))",
    re.IGNORECASE | re.MULTILINE,
)


@dataclass(frozen=True)
class ReportSections:
    """The sections of one draft report.

    Attributes
    ----------
    findings:
        Text of the Findings section (the whole text when there is no heading); may be empty
        when the model wrote only an impression, or nothing.
    impression:
        Text of the Impression section, or None when the model wrote none.
    has_headings:
        Whether any Findings/Impression heading was found.
    """

    findings: str
    impression: str | None
    has_headings: bool

    @property
    def is_empty(self) -> bool:
        return not self.findings and not self.impression


def clean_report_text(text: str) -> str:
    """``text`` without chat artefacts and stray whitespace.

    Removes Gemma control tokens, cuts at a ``<start_of_turn>`` (the model starting another
    turn), turns tabs into four spaces and CRLF into LF, drops control characters a DICOM text
    value cannot hold, strips trailing spaces on each line, collapses runs of blank lines into
    one and strips the ends.

    Raises
    ------
    TypeError
        ``text`` is not a ``str``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = _NEW_TURN.split(text, maxsplit=1)[0]
    text = _CONTROL_TOKENS.sub("", text).replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = _FORBIDDEN_CONTROLS.sub("", text)
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def split_report(text: str) -> ReportSections:
    """Split a draft report into Findings and Impression (after :func:`clean_report_text`).

    Several headings of one section (e.g. "Findings" twice) are joined in order with a blank
    line. Text before the first heading is put at the start of Findings.

    Raises
    ------
    TypeError
        ``text`` is not a ``str``.
    """
    cleaned = clean_report_text(text)
    matches = list(_HEADING.finditer(cleaned))
    if not matches:
        return ReportSections(findings=cleaned, impression=None, has_headings=False)
    parts: dict[str, list[str]] = {"findings": [], "impression": []}
    preamble = cleaned[: matches[0].start()].strip()
    if preamble:
        parts["findings"].append(preamble)
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(cleaned)
        body = cleaned[match.end() : end].strip()
        if body:
            parts[_SECTION_OF[match.group("name").lower()]].append(body)
    impression = "\n\n".join(parts["impression"])
    return ReportSections(
        findings="\n\n".join(parts["findings"]),
        impression=impression or None,
        has_headings=True,
    )
