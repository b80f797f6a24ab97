"""Compare MedSigLIP's precisions on your own studies: speed per image and agreement with float32.

Random weights cannot judge whether a lower precision keeps a model's answers, and neither can a
benchmark on someone else's images: run this on a few of your studies with your model::

    python -m medgemma_deploy.dev.bench.precision -m models/medsiglip -i STUDY_DIR \
        [--precisions fp32,bf16,int8]

Without ``-i`` it uses three copies of pydicom-data's chest CR. Every frame of every series is
scored with the label set the pipeline would choose for it, once per precision in this process
(one runner at a time, each loaded, used and closed). Per precision it prints the load time, the
median seconds per image of ``score`` (preprocessing, vision tower, relevance grids), and, against
``fp32``, the largest change of any finding probability and the lowest cosine between image
embeddings. The issue's acceptance limits are 0.02 and 0.99; a precision is worth using on your
data when it stays within both.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medgemma_deploy.dev.bench.markdown import markdown_table

__all__ = ["PrecisionRow", "compare_precisions", "main"]

logger = logging.getLogger(__name__)

#: The limits a lower precision must keep against float32 (issue 17).
MAX_PROBABILITY_CHANGE = 0.02
MIN_EMBEDDING_COSINE = 0.99


@dataclass(frozen=True)
class PrecisionRow:
    """One precision's figures; the agreement columns are None for the fp32 reference itself."""

    precision: str
    load_s: float
    median_image_s: float
    images: int
    max_probability_change: float | None
    min_embedding_cosine: float | None

    @property
    def within_limits(self) -> bool | None:
        if self.max_probability_change is None or self.min_embedding_cosine is None:
            return None
        return (
            self.max_probability_change <= MAX_PROBABILITY_CHANGE
            and self.min_embedding_cosine >= MIN_EMBEDDING_COSINE
        )


def compare_precisions(
    model_dir: Path, study: Path, precisions: Sequence[str], *, cache_dir: Path | None = None
) -> list[PrecisionRow]:
    """Score every frame of ``study`` at each precision; the first must be ``fp32`` (the reference)."""
    from medgemma_deploy.operators.dicom_input.reader import load_study_input
    from medgemma_deploy.operators.medsiglip.labels import load_label_sets, select_label_set
    from medgemma_deploy.operators.medsiglip.runner import make_medsiglip_runner

    if not precisions or precisions[0] != "fp32":
        raise ValueError("the first precision must be fp32: the others are compared with it")
    label_sets = load_label_sets(None)
    study_input = load_study_input(study)
    work: list[tuple[object, list[np.ndarray]]] = []
    for one_study in study_input.studies:
        for series in one_study.series:
            label_set = select_label_set(label_sets, series.modality, series.body_part_examined)
            work.append((label_set, [frame.display for frame in series.frames]))
    if not work:
        raise ValueError(f"{study}: no image series to score")
    rows: list[PrecisionRow] = []
    reference: tuple[list[np.ndarray], list[np.ndarray]] | None = None
    for precision in precisions:
        started = time.perf_counter()
        runner = make_medsiglip_runner(model_dir, device="cpu", precision=precision, cache_dir=cache_dir)
        runner.load()
        loaded = time.perf_counter() - started
        probabilities, embeddings, seconds = [], [], []
        try:
            for label_set, images in work:
                runner.text_embeddings(label_set)  # prompts are not the images' cost
                for image in images:
                    began = time.perf_counter()
                    scores = runner.score([image], label_set)
                    seconds.append(time.perf_counter() - began)
                    probabilities.append(scores.probabilities[0])
                    embeddings.append(scores.embeddings[0])
        finally:
            runner.close()
        change = cosine = None
        if reference is None:
            reference = (probabilities, embeddings)
        else:
            change = max(float(np.abs(p - q).max()) for p, q in zip(probabilities, reference[0], strict=True))
            cosine = min(float(np.dot(e, f)) for e, f in zip(embeddings, reference[1], strict=True))
        rows.append(PrecisionRow(precision, loaded, statistics.median(seconds), len(seconds), change, cosine))
    return rows


def _format(rows: Sequence[PrecisionRow]) -> str:
    fp32 = rows[0].median_image_s
    header = (
        "precision | load (s) | score per image, median (s) | speed-up vs fp32 | max probability change | "
        "min embedding cosine | within 0.02 / 0.99"
    )
    cells = []
    for row in rows:
        change = "—" if row.max_probability_change is None else f"{row.max_probability_change:.4f}"
        cosine = "—" if row.min_embedding_cosine is None else f"{row.min_embedding_cosine:.5f}"
        within = {None: "reference", True: "yes", False: "NO"}[row.within_limits]
        figures = (f"{row.load_s:.1f}", f"{row.median_image_s:.2f}", f"{fp32 / row.median_image_s:.2f}×")
        cells.append((row.precision, *figures, change, cosine, within))
    return markdown_table(header, "lrrrrrl", cells)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medgemma_deploy.dev.bench.precision", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("-m", "--model", type=Path, required=True, help="the MedSigLIP directory")
    parser.add_argument(
        "-i", "--input", type=Path, help="a DICOM file or folder (default: 3 chest CR copies)"
    )
    parser.add_argument("--precisions", default="fp32,bf16,int8", help="comma-separated, fp32 first")
    parser.add_argument("--cache-dir", type=Path, help="the cache_dir setting (default: the usual one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import os

    from medgemma_deploy.errors import ModelLoadError

    with tempfile.TemporaryDirectory(prefix="medgemma-precision-") as work:
        study = args.input
        if study is None:
            from medgemma_deploy.dev.bench.cpu import make_study

            study = make_study(Path(work) / "study", 3)[0].parent
        try:
            rows = compare_precisions(
                args.model,
                study,
                [p.strip() for p in args.precisions.split(",") if p.strip()],
                cache_dir=args.cache_dir,
            )
        except (ValueError, ModelLoadError, OSError) as exc:
            print(f"precision comparison failed: {exc}", file=sys.stderr)
            return 2
    import torch

    print(
        f"model: {args.model}; images: {rows[0].images}; CPU threads: {torch.get_num_threads()}; "
        f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    print(_format(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
