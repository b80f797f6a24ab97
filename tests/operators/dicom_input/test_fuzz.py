"""The project's own fuzz test: hostile inputs never cost the rest of a classify run (issue 12).

300 seeded mutations of real sample files (``tests/support/fuzz.py``), in folders of 50 plus two good
neighbours each, as the issue's reporter ran them. Every ``medgemma-deploy classify`` run, a separate
process so that its peak RSS can be measured, must:

* exit 0 or 3 (never 1), with no traceback on stderr and no raw warning lines;
* write ``results.json`` accounting for every input file (in a series, rejected or skipped);
* process the good neighbours (their series written, not rejected);
* peak under the memory target: 2.5 GB above a run of the good files alone (the loaded models);
* write only SR and SEG objects that pass dciodvfy with no error (when dciodvfy is installed).

The totals are printed (``pytest -s``) so they can be quoted: inputs, runs, tracebacks, peak RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.dciodvfy import DCIODVFY, run_dciodvfy
from tests.support.fuzz import available_sources, good_copy, write_mutants

#: Mutated inputs in all, and per classify run.
N_INPUTS = 300
PER_RUN = 50
SEED = 12
#: The memory target of issue 12: a classify run peaks at most this far above the loaded models.
RSS_HEADROOM_BYTES = 2_500_000_000
#: Real files added unmutated to every run, which must come out processed.
GOOD_NEIGHBOURS = ("CT_small.dcm", "SC_rgb.dcm")
#: Prefixes of the lines our CLI writes on stderr; anything else is a raw library message.
_LOG_PREFIXES = ("INFO ", "WARNING ", "ERROR ", "DEBUG ")


#: Runs its arguments as a grandchild and writes the grandchild's peak RSS (kB) to the file named
#: first. Why a launcher: Linux carries the ``ru_maxrss`` of the process that spawns a child across
#: ``exec``, so a child spawned by this test session (gigabytes after a full run) would report the
#: session's peak, and the baseline and fuzz runs would compare two copies of it. A grandchild of
#: this small launcher starts from the launcher's few megabytes and reports its own peak.
_OWN_PEAK_LAUNCHER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)  # the child's own rusage, which wait() would drop
child.returncode = code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as peak:
    peak.write(str(usage.ru_maxrss))
sys.exit(code if code >= 0 else 128 - code)
"""


def _classify(folder: Path, out: Path, models: Path) -> tuple[int, str, int]:
    """Run ``medgemma-deploy classify`` as a child process: exit code, stderr, peak RSS in bytes."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # warnings must be shown to be caught leaking
    command = [sys.executable, "-m", "medgemma_deploy", "classify", "-i", str(folder), "-o", str(out)]
    peak_file = out.parent / f"{out.name}.peak-rss-kb"
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            _OWN_PEAK_LAUNCHER,
            str(peak_file),
            *command,
            "-m",
            str(models),
            "--device",
            "cpu",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        check=False,
    )
    return completed.returncode, completed.stderr, int(peak_file.read_text()) * 1024  # Linux: kilobytes


def _accounted(results: dict) -> set[str]:
    files = {f for series in results["series"] for f in series.get("files", [])}
    for entry in results["rejected"] + results["skipped"]:
        files.add(entry["source"])
        files.update(entry.get("files", []))
    return files


@pytest.fixture(scope="module")
def fuzz_folders(tmp_path_factory) -> list[tuple[Path, list[Path]]]:
    if len(available_sources()) < 10:
        pytest.skip("the fuzz test needs pydicom-data's sample files (pip install pydicom-data)")
    root = tmp_path_factory.mktemp("fuzz")
    mutants = write_mutants(root / "all", N_INPUTS, SEED)
    folders = []
    for run, start in enumerate(range(0, len(mutants), PER_RUN)):
        folder = root / f"run{run:02d}"
        folder.mkdir()
        files = []
        for mutant in mutants[start : start + PER_RUN]:
            files.append(mutant.path.rename(folder / mutant.path.name))
        goods = [good_copy(name, folder, run * 10 + i) for i, name in enumerate(GOOD_NEIGHBOURS)]
        folders.append((folder, files + goods))
    return folders


def test_every_fuzz_run_exits_cleanly_accounts_for_every_input_and_stays_in_budget(
    fuzz_folders, tiny_models_root, tmp_path
):
    baseline_folder = tmp_path / "good"
    baseline_folder.mkdir()
    for i, name in enumerate(GOOD_NEIGHBOURS):
        good_copy(name, baseline_folder, 900 + i)
    code, stderr, baseline_rss = _classify(baseline_folder, tmp_path / "good-out", tiny_models_root)
    assert code == 0, stderr

    tracebacks, peak_rss, n_inputs, n_validated, failures = 0, 0, 0, 0, []
    for folder, files in fuzz_folders:
        out = tmp_path / f"out-{folder.name}"
        code, stderr, rss = _classify(folder, out, tiny_models_root)
        peak_rss = max(peak_rss, rss)
        n_inputs += len(files)
        tracebacks += stderr.count("Traceback")
        raw = [
            line
            for line in stderr.splitlines()
            if line.strip() and not line.startswith(_LOG_PREFIXES) and "input(s) rejected" not in line
        ]
        if code not in (0, 3) or "Traceback" in stderr or raw:
            failures.append(f"{folder.name}: exit {code}; raw stderr lines: {raw[:5]}")
            continue
        results = json.loads((out / "results.json").read_text())
        missing = {str(f) for f in files} - _accounted(results)
        if missing:
            failures.append(f"{folder.name}: not in results.json: {sorted(missing)[:5]}")
        if DCIODVFY is not None:  # nothing invalid in an input may reach an output
            for output in results["outputs"]:
                if output["kind"] in ("SR", "SEG"):
                    n_validated += 1
                    errors = run_dciodvfy(out / output["path"])
                    if errors:
                        failures.append(f"{folder.name}: {output['path']} fails dciodvfy: {errors[:3]}")
        rejected = {entry["source"] for entry in results["rejected"]}
        for good in files[-len(GOOD_NEIGHBOURS) :]:
            if str(good) in rejected:
                failures.append(f"{folder.name}: good neighbour {good.name} rejected")
    print(
        f"\nfuzz totals: {n_inputs} inputs ({N_INPUTS} mutated, seed {SEED}) in {len(fuzz_folders)} runs, "
        f"{tracebacks} tracebacks, peak RSS {peak_rss / 1e9:.2f} GB "
        f"(good files alone: {baseline_rss / 1e9:.2f} GB), {n_validated} SR/SEG outputs through dciodvfy"
    )
    assert not failures, "\n".join(failures)
    assert peak_rss - baseline_rss <= RSS_HEADROOM_BYTES, (
        f"peak RSS {peak_rss / 1e9:.2f} GB is more than {RSS_HEADROOM_BYTES / 1e9} GB above the "
        f"{baseline_rss / 1e9:.2f} GB of a run of good files"
    )
