"""The classify MONAI Deploy app end to end on the CPU: CLI-style flags and HOLOSCAN_* variables."""

import json
import os
import subprocess
import sys

import pydicom
import pytest

from medgemma_deploy.dev.synthetic import write_demo_study
from tests.support.dciodvfy import run_dciodvfy
from tests.support.real_size import write_multislice_ct, write_real_cr

pytestmark = pytest.mark.holoscan
pytest.importorskip("holoscan", reason="the MONAI Deploy extra (holoscan) is not installed")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app-input")
    write_demo_study(folder)
    return folder


def _run_app(args, env_extra=None, timeout=600):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "medgemma_deploy.apps.classify", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _check_outputs(out):
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "complete", results["rejected"]
    assert len(results["series"]) == 2
    kinds = [o["kind"] for o in results["outputs"]]
    assert kinds.count("SR") == 2 and "SEG" in kinds
    for output in results["outputs"]:
        path = out / output["path"]
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID == output["sop_instance_uid"]
        assert run_dciodvfy(path) == [], path.name
    return results


def test_app_runs_with_monai_deploy_flags(study, tiny_models_root, tmp_path):
    out = tmp_path / "out"
    proc = _run_app(["-i", str(study), "-o", str(out), "-m", str(tiny_models_root)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_outputs(out)


def test_app_runs_from_holoscan_environment_variables(study, tiny_models_root, tmp_path):
    out = tmp_path / "out"
    env = {
        "HOLOSCAN_INPUT_PATH": str(study),
        "HOLOSCAN_OUTPUT_PATH": str(out),
        "HOLOSCAN_MODEL_PATH": str(tiny_models_root / "medsiglip"),
        "MEDGEMMA_DEPLOY_RELEVANCE_TOP_K": "1",
    }
    proc = _run_app([], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _check_outputs(out)
    for series in results["series"]:
        with_maps = [f for f in series["findings"] if f["relevance_map"]]
        present = [f for f in series["findings"] if f["present"]]
        # top-1 plus the present ones, from the environment setting
        assert len(with_maps) <= 1 + len(present)


def test_app_without_models_exits_2_with_one_line(study, tmp_path):
    proc = _run_app(["-i", str(study), "-o", str(tmp_path / "out"), "-m", str(tmp_path)])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "not a medsiglip model directory" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("app", "extra", "kinds"),
    [
        ("report", ["--with-findings"], ["REPORT-SR", "REPORT-SR"]),
        ("study", [], ["REPORT-SR", "REPORT-SR", "SEG", "SEG", "SR", "SR"]),
    ],
)
def test_report_and_study_apps_run_end_to_end(app, extra, kinds, study, tiny_models_root, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", f"medgemma_deploy.apps.{app}", "-i", str(study), "-o", str(out),
         "-m", str(tiny_models_root), "--max-new-tokens", "8", *extra],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == app
    written = sorted(o["kind"] for o in results["outputs"])
    assert [kind for kind in written if kind != "PMAP"] == kinds
    # Parametric Maps (default relevance format "both") for the CT series only: the CR has no geometry.
    assert ("PMAP" in written) is (app == "study")
    for series in results["series"]:
        assert series["report"]["findings_grounded"] is (app == "report")
        assert series["report"]["settings"]["max_new_tokens"] == 8
    for output in results["outputs"]:
        assert run_dciodvfy(out / output["path"]) == [], output["path"]


def test_app_on_a_real_size_radiograph_and_a_multislice_ct(tiny_models_root, tmp_path):
    """pydicom-data's 1,955 x 1,841 JPEG 2000 CR and a 20-slice 512 x 512 CT through the classify app."""
    study = tmp_path / "in"
    write_real_cr(study)
    write_multislice_ct(study, 20)
    out = tmp_path / "out"
    proc = _run_app(["-i", str(study), "-o", str(out), "-m", str(tiny_models_root)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert sorted((s["modality"], s["n_frames"]) for s in results["series"]) == [("CR", 1), ("CT", 20)]
    headers = [
        pydicom.dcmread(out / o["path"], stop_before_pixels=True)
        for o in results["outputs"]
        if o["kind"] == "SEG"
    ]
    assert sorted((int(ds.Rows), int(ds.Columns)) for ds in headers) == [(512, 512), (1955, 1841)]
