"""Run MedGemma at several precisions on your own studies and print how the reports differ.

``python -m medgemma_deploy.dev.bench.compare_precisions -i STUDY -m MODELS [--precisions bf16,int8,int4]``

Random weights cannot judge quantisation: the benchmark's models produce noise at every precision.
Only a site's real checkpoint on its own images can say whether 8- or 4-bit reports are as good as
16-bit ones, so this command drafts each series' report at every precision (greedy, same prompts,
same preprocessing, one precision loaded at a time) and prints, per series and against the first
precision: the first token where they part, the share of equal tokens, a text similarity
(``difflib`` ratio, 1.0 = identical) and, with ``--show-text``, the texts themselves. It writes no
DICOM; it is a judgement aid, and a radiologist still reads the drafts.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import time
from pathlib import Path

from medgemma_deploy.backends.local import make_backend
from medgemma_deploy.domain import GenerationSettings
from medgemma_deploy.errors import InputError, ModelLoadError, UsageError
from medgemma_deploy.model_dir import resolve_model_dir
from medgemma_deploy.operators.dicom_input.reader import load_study_input
from medgemma_deploy.operators.medgemma.prompts import PromptBook
from medgemma_deploy.operators.medgemma.request import build_report_request
from medgemma_deploy.precision import PRECISIONS

__all__ = ["compare", "main"]


def compare(
    study: Path, models: Path, precisions: list[str], *, max_new_tokens: int = 200, device: str | None = None
) -> dict[str, dict[str, dict]]:
    """``{series uid: {precision: {"tokens", "text", "seconds"}}}`` for every series of ``study``."""
    model_dir = resolve_model_dir(models, "medgemma")
    prompts = PromptBook.load()
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    all_series = [series for entry in load_study_input(study).studies for series in entry.series]
    if not all_series:
        raise UsageError(f"{study}: no usable image series")
    requests = {}
    for series in all_series:
        try:
            requests[series.series_instance_uid] = build_report_request(series, prompts, settings=settings)
        except InputError as exc:
            print(f"series {series.series_instance_uid}: skipped: {exc.reason}", file=sys.stderr)
    drafts: dict[str, dict[str, dict]] = {uid: {} for uid in requests}
    for precision in precisions:
        # What the CLI runs at that precision (--backend local).
        with make_backend("local", model_dir, device, precision=precision) as backend:
            medgemma = backend.medgemma
            medgemma.load()
            for uid, request in requests.items():
                started = time.perf_counter()
                result = medgemma.generate(request)
                drafts[uid][precision] = {
                    "tokens": result.token_ids,
                    "text": result.text,
                    "seconds": time.perf_counter() - started,
                }
    return drafts


def _first_difference(first: list[int], other: list[int]) -> int | None:
    for index, (a, b) in enumerate(zip(first, other, strict=False)):
        if a != b:
            return index
    return None if len(first) == len(other) else min(len(first), len(other))


def report(drafts: dict[str, dict[str, dict]], precisions: list[str], *, show_text: bool) -> str:
    """The comparison as plain text, one block per series."""
    reference = precisions[0]
    lines = []
    for uid, by_precision in drafts.items():
        lines.append(f"series {uid}")
        base = by_precision[reference]
        for precision in precisions:
            draft = by_precision[precision]
            if precision == reference:
                summary = "reference"
            else:
                part = _first_difference(base["tokens"], draft["tokens"])
                pairs = list(zip(base["tokens"], draft["tokens"], strict=False))
                same = sum(a == b for a, b in pairs) / max(len(base["tokens"]), len(draft["tokens"]), 1)
                ratio = difflib.SequenceMatcher(None, base["text"], draft["text"]).ratio()
                where = "identical tokens" if part is None else f"first different token #{part}"
                summary = f"{where}; {same:.0%} tokens equal; text similarity {ratio:.3f}"
            lines.append(
                f"  {precision:>5}: {len(draft['tokens'])} tokens in {draft['seconds']:.1f} s; {summary}"
            )
            if show_text:
                lines.extend(f"         | {line}" for line in draft["text"].splitlines() or [""])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--input", type=Path, required=True, help="DICOM file or folder")
    parser.add_argument("-m", "--models", type=Path, required=True, help="MedGemma directory or models root")
    parser.add_argument(
        "--precisions", default="bf16,int8,int4", help="comma-separated; the first is the reference"
    )
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--device", default=None)
    parser.add_argument("--show-text", action="store_true", help="print each draft under its figures")
    args = parser.parse_args(argv)
    precisions = [name.strip() for name in args.precisions.split(",") if name.strip()]
    unknown = [name for name in precisions if name not in PRECISIONS]
    if unknown or not precisions:
        parser.error(f"--precisions takes {', '.join(PRECISIONS)}; got {args.precisions!r}")
    try:
        drafts = compare(
            args.input, args.models, precisions, max_new_tokens=args.max_new_tokens, device=args.device
        )
    except (ModelLoadError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(drafts, precisions, show_text=args.show_text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
