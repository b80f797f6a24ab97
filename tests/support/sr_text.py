"""Test helper: every text an SR carries (TEXT values, code meanings, descriptions), in tree order."""

from pydicom.dataset import Dataset


def sr_texts(ds: Dataset) -> list[str]:
    texts = [str(ds.get("SeriesDescription", ""))]

    def walk(items) -> None:
        for item in items:
            for keyword in ("TextValue", "UID"):
                if keyword in item:
                    texts.append(str(item.get(keyword)))
            for sequence in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
                for code in item.get(sequence, []):
                    texts.append(str(code.CodeMeaning))
            walk(item.get("ContentSequence", []))

    walk(ds.get("ContentSequence", []))
    return texts
