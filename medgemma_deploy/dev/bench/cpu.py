"""CPU classification benchmark: the model card's recipe, our CLI, our app and the model's floor, in one run.

Many hospitals have no GPU next to their PACS, and every MONAI Deploy app run is a fresh process
per study, so what counts on a CPU is the first image of a process (loading included) and each
further image. This prints, from one run on the machine it runs on::

    python -m medgemma_deploy.dev.bench.cpu --full-size            # real MedSigLIP-448 shapes, random weights
    python -m medgemma_deploy.dev.bench.cpu -m models/medsiglip    # a real model directory
    python -m medgemma_deploy.dev.bench.cpu                        # the tiny test model (a smoke run)

one row per path, each measured in fresh processes on copies of pydicom-data's chest CR
(``RG1_J2KR.dcm``, 1,955 x 1,841, JPEG 2000), each copy its own series:

- **model card recipe**: ``AutoModel`` + ``AutoProcessor`` as on the MedSigLIP model card, the
  DICOM read and windowed to an 8-bit RGB image, every label prompt encoded with every image;
- **our CLI** (``medgemma-deploy classify``, default outputs: SR, SEG, Parametric Maps), once with
  the text-embedding cache empty and once with it filled by an earlier run;
- **our app** (``python -m medgemma_deploy.apps.classify``, the MONAI Deploy app), cache filled;
- **vision tower forward alone**: the floor, what the model itself costs per image.

"first image" is the wall time from launching the process to the first image's result (for the
CLI and the app: the whole run on one copy, writing included); "each further image" is
``(run on N copies - run on 1 copy) / (N - 1)`` for the CLI and the app, and the mean of the later
images inside one process for the recipe and the floor. The numbers are this machine's: compare
rows of one run only.

``--precision`` applies to our CLI and app; the model-card recipe and the floor stay float32 (the
reference). With a random-weight model every probability is meaningless: this measures speed only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Row", "main", "run_benchmark"]

logger = logging.getLogger(__name__)

#: The pydicom-data chest CR every row classifies.
SOURCE_CR = "RG1_J2KR.dcm"
#: Where ``--full-size`` keeps the built real-shape model between runs.
DEFAULT_FULL_SIZE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medgemma-deploy" / "bench"
)
_LAUNCHED_ENV = "MEDGEMMA_DEPLOY_BENCH_LAUNCHED"


@dataclass(frozen=True)
class Row:
    """One path's figures in seconds (None where the path has no such figure)."""

    path: str
    first_image_s: float | None
    further_image_s: float | None
    note: str = ""


def make_study(folder: Path, copies: int) -> list[Path]:
    """``copies`` copies of the CR in ``folder``, each with new Series and SOP Instance UIDs.

    The pixel data stays the source's JPEG 2000 codestream, so every row decodes what a PACS sends.
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    from medgemma_deploy.dev.synthetic import save_as_new_instance

    found = get_testdata_file(SOURCE_CR)
    if found is None:
        raise SystemExit(f"{SOURCE_CR} is not available: pip install pydicom-data (part of the dev extra)")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for number in range(1, copies + 1):
        dataset = pydicom.dcmread(found)
        dataset.SeriesInstanceUID = generate_uid()
        dataset.SeriesNumber = number
        written.append(save_as_new_instance(dataset, folder / f"cr-{number}.dcm", generate_uid()))
    return written


def run_benchmark(
    model_dir: Path,
    *,
    copies: int = 3,
    precision: str = "fp32",
    paths: Sequence[str] = ("model-card", "cli", "app", "floor"),
    work_dir: Path | None = None,
) -> list[Row]:
    """Measure every path in ``paths`` on ``copies`` CR copies (module docstring); returns the rows."""
    if copies < 2:
        raise ValueError(f"copies must be at least 2 (one further image), got {copies}")
    own_work_dir = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="medgemma-bench-cpu-")) if work_dir is None else work_dir
    try:
        one = make_study(work / "study-1", 1)
        many = make_study(work / f"study-{copies}", copies)
        # A cache of our own: "empty" really is empty, and the user's cache is left alone.
        cache_dir = work / "cache"
        rows: list[Row] = []
        for name in paths:
            if name == "model-card":
                rows.append(
                    _in_process_row(
                        "model card recipe (AutoModel + AutoProcessor, prompts per image)",
                        "model-card",
                        model_dir,
                        many,
                    )
                )
            elif name == "floor":
                rows.append(
                    _in_process_row("vision tower forward alone (the floor)", "floor", model_dir, many)
                )
            elif name in ("cli", "app"):
                rows.extend(_command_rows(name, model_dir, one, many, work, cache_dir, precision))
            else:
                raise ValueError(f"unknown path {name!r}: use model-card, cli, app or floor")
        return rows
    finally:
        if own_work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _command(name: str, study: Path, out: Path, model_dir: Path, precision: str) -> list[str]:
    arguments = ["-i", str(study.parent), "-o", str(out), "-m", str(model_dir)]
    if name == "cli":
        return [
            sys.executable,
            "-m",
            "medgemma_deploy",
            "classify",
            *arguments,
            "--device",
            "cpu",
            "--precision",
            precision,
        ]
    return [sys.executable, "-m", "medgemma_deploy.apps.classify", *arguments]


def _timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        tail = "\n".join((completed.stderr or completed.stdout).splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[:4])} failed with exit code {completed.returncode}:\n{tail}")
    return elapsed


def _command_rows(
    name: str, model_dir: Path, one: list[Path], many: list[Path], work: Path, cache_dir: Path, precision: str
) -> list[Row]:
    env = dict(
        os.environ,
        MEDGEMMA_DEPLOY_CACHE_DIR=str(cache_dir),
        MEDGEMMA_DEPLOY_DEVICE="cpu",
        MEDGEMMA_DEPLOY_PRECISION=precision,
    )
    label = "`medgemma-deploy classify`" if name == "cli" else "`python -m medgemma_deploy.apps.classify`"
    rows = []
    if name == "cli":
        shutil.rmtree(cache_dir, ignore_errors=True)
        cold = _timed(_command(name, one[0], work / f"out-{name}-cold", model_dir, precision), env)
        rows.append(Row(f"{label}, text-embedding cache empty", cold, None, "first study after install"))
    else:
        # The app's own first study fills the cache like the CLI's would.
        _timed(_command(name, one[0], work / f"out-{name}-fill", model_dir, precision), env)
    first = _timed(_command(name, one[0], work / f"out-{name}-1", model_dir, precision), env)
    total = _timed(_command(name, many[0], work / f"out-{name}-n", model_dir, precision), env)
    further = (total - first) / (len(many) - 1)
    rows.append(
        Row(f"{label}, text-embedding cache filled", first, further, f"{len(many)} copies: {total:.1f} s")
    )
    return rows


def _in_process_row(label: str, kind: str, model_dir: Path, study: list[Path]) -> Row:
    env = dict(os.environ, **{_LAUNCHED_ENV: repr(time.time())})
    command = [
        sys.executable,
        "-m",
        "medgemma_deploy.dev.bench.cpu",
        "--child",
        kind,
        "-m",
        str(model_dir),
        *[str(p) for p in study],
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.splitlines()[-15:])
        raise RuntimeError(f"{kind} failed with exit code {completed.returncode}:\n{tail}")
    times = json.loads(completed.stdout.strip().splitlines()[-1])
    further = times["further"]
    return Row(
        label,
        times["first"] if kind != "floor" else None,
        sum(further) / len(further),
        "each: " + ", ".join(f"{t:.1f}" for t in further),
    )


def _since_launch() -> float:
    return time.time() - float(os.environ[_LAUNCHED_ENV])


def _dicom_to_rgb(path: Path):
    """The model card's input: an 8-bit RGB image (VOI LUT applied, MONOCHROME1 inverted)."""
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_voi_lut

    dataset = pydicom.dcmread(path)
    pixels = apply_voi_lut(dataset.pixel_array, dataset).astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - low) / max(high - low, 1e-6)
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return Image.fromarray((scaled * 255).round().astype(np.uint8)).convert("RGB")


def _child_model_card(model_dir: Path, study: list[Path]) -> dict[str, object]:
    """The model card's recipe, label prompts of the chest label set, one image per call."""
    import torch
    from transformers import AutoModel, AutoProcessor

    from medgemma_deploy.operators.medsiglip.labels import load_label_sets

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    chest = next(s for s in load_label_sets(None) if s.name == "chest-xray")
    texts = [p for f in chest.findings for p in (*f.positive_prompts, *f.negative_prompts)]
    done = []
    for path in study:
        image = _dicom_to_rgb(path)
        inputs = processor(text=texts, images=[image], padding="max_length", return_tensors="pt")
        with torch.no_grad():
            outputs = model(**inputs)
        torch.sigmoid(outputs.logits_per_image)
        done.append(_since_launch())
    return {
        "first": done[0],
        "further": [b - a for a, b in itertools.pairwise(done)],
        "prompts": len(texts),
    }


def _child_floor(model_dir: Path, study: list[Path]) -> dict[str, object]:
    """The vision tower's forward pass on a 448 x 448 input, nothing else: the per-image floor."""
    import torch
    from transformers import SiglipModel

    model = SiglipModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    size = int(model.config.vision_config.image_size)
    pixels = torch.rand(1, 3, size, size) * 2 - 1
    done = []
    with torch.inference_mode():
        for _ in study:
            model.vision_model(pixel_values=pixels)
            done.append(_since_launch())
    return {"first": done[0], "further": [b - a for a, b in itertools.pairwise(done)]}


def _format(rows: Sequence[Row]) -> str:
    def seconds(value: float | None) -> str:
        return "—" if value is None else f"{value:.1f} s"

    lines = [
        "| path | first image (one process, load included) | each further image | note |",
        "|---|---:|---:|---|",
    ]
    lines += [
        f"| {r.path} | {seconds(r.first_image_s)} | {seconds(r.further_image_s)} | {r.note} |" for r in rows
    ]
    return "\n".join(lines)


def _full_size_model(cache: Path) -> Path:
    from medgemma_deploy.dev.bench.full_size import make_full_size_models

    target = cache / "medsiglip-448-random"
    if (target / "medsiglip" / "model.safetensors").is_file():
        return target / "medsiglip"
    return make_full_size_models(target, device="cpu", kinds=("medsiglip",))["medsiglip"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medgemma_deploy.dev.bench.cpu", description=__doc__.split("\n")[0]
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "-m", "--model", type=Path, help="a MedSigLIP directory (default: the tiny test model)"
    )
    source.add_argument(
        "--full-size",
        action="store_true",
        help="build (once) and use random weights of the real MedSigLIP-448 shapes",
    )
    parser.add_argument(
        "--full-size-dir",
        type=Path,
        default=DEFAULT_FULL_SIZE_DIR,
        help=f"where --full-size keeps its model (default {DEFAULT_FULL_SIZE_DIR})",
    )
    parser.add_argument(
        "--copies", type=int, default=3, help="CR copies for 'each further image' (default 3)"
    )
    parser.add_argument("--precision", default="fp32", help="precision of our CLI and app (default fp32)")
    parser.add_argument(
        "--paths",
        default="model-card,cli,app,floor",
        help="comma-separated subset of model-card,cli,app,floor",
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--child", choices=("model-card", "floor"), help=argparse.SUPPRESS)
    parser.add_argument("study", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    if args.child:
        child = _child_model_card if args.child == "model-card" else _child_floor
        print(json.dumps(child(args.model, args.study)))
        return 0

    work = Path(tempfile.mkdtemp(prefix="medgemma-bench-cpu-"))
    try:
        if args.full_size:
            model_dir = _full_size_model(args.full_size_dir)
        elif args.model:
            model_dir = args.model
        else:
            from medgemma_deploy.dev.testmodels import make_test_models

            model_dir = make_test_models(work / "models")["medsiglip"]
        import torch

        started = time.perf_counter()
        rows = run_benchmark(
            model_dir,
            copies=args.copies,
            precision=args.precision,
            paths=[p.strip() for p in args.paths.split(",") if p.strip()],
            work_dir=work,
        )
        print(
            f"model: {model_dir}; CPU threads: {torch.get_num_threads()}; load average: "
            f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; benchmark wall time "
            f"{time.perf_counter() - started:.0f} s"
        )
        print(_format(rows))
        if args.json:
            args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
    except (RuntimeError, ValueError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
