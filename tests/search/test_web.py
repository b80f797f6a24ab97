"""The search HTTP API and results page, on the tiny models, checked in a real headless Chromium.

The page test takes a screenshot with Debian's ``chromium`` and looks for the pixels themselves:
the stored thumbnail of the indexed CR must appear unchanged in the PNG, and the relevance-map
overlays must put red pixels on it. HTML asserts alone would pass a page whose images never load.
"""

import io
import json
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pydicom
import pytest
from PIL import Image

from medgemma_deploy.operators.medsiglip.runner import MedSigLIPRunner
from medgemma_deploy.search.service import SearchService
from medgemma_deploy.search.store import open_store
from medgemma_deploy.search.web import SearchServer
from tests.support.demo_index import index_demo_study

QUERY = "a chest x-ray with a right pneumothorax"
WADO_ROOT = "https://pacs.example.org/dicom-web"


@pytest.fixture(scope="module")
def indexed(tiny_models_root, tmp_path_factory):
    return index_demo_study(tiny_models_root, tmp_path_factory.mktemp("search"))


@pytest.fixture(scope="module")
def served(indexed, tiny_models_root):
    url, files = indexed.url, indexed.files
    with (
        open_store(url, cache_vectors=True) as store,
        MedSigLIPRunner(tiny_models_root / "medsiglip", device="cpu") as runner,
        SearchServer(SearchService(store, runner), port=0, wado_root=WADO_ROOT) as server,
    ):
        yield server, files


def get(server, path):
    try:
        with urllib.request.urlopen(server.url + path, timeout=60) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def api(server, query):
    status, content_type, body = get(server, f"/api/search?{query}")
    assert content_type == "application/json"
    return status, json.loads(body)


def test_api_returns_hits_with_uids_and_wado_links(served):
    server, files = served
    status, document = api(server, "q=" + urllib.request.quote(QUERY) + "&top=3")
    assert status == 200
    assert len(document["hits"]) == 3
    hit = document["hits"][0]
    assert hit["wado_rs_url"] == (
        f"{WADO_ROOT}/studies/{hit['study_instance_uid']}/series/{hit['series_instance_uid']}"
        f"/instances/{hit['sop_instance_uid']}/frames/{hit['frame_number']}"
    )
    indexed = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert {h["sop_instance_uid"] for h in document["hits"]} <= indexed
    scores = [h["score"] for h in document["hits"]]
    assert scores == sorted(scores, reverse=True)


def test_api_filters_by_modality(served):
    server, _ = served
    status, document = api(server, "q=chest&modality=CR")
    assert status == 200
    assert [h["modality"] for h in document["hits"]] == ["CR"]


@pytest.mark.parametrize(
    ("query", "message"),
    [("q=", "empty"), ("q=chest&colour=red", "unknown parameter"), ("q=chest&finding=nope>=0.5", "nope")],
)
def test_api_refuses_bad_queries_with_400(served, query, message):
    server, _ = served
    status, document = api(server, query)
    assert status == 400
    assert message in document["error"]


def test_images_are_served_as_png_and_missing_ones_are_404(served):
    server, _ = served
    _, document = api(server, "q=chest&top=1")
    status, content_type, body = get(server, document["hits"][0]["thumbnail_url"])
    assert status == 200 and content_type == "image/png"
    assert Image.open(io.BytesIO(body)).size[0] <= 128
    assert get(server, "/images/999999/thumbnail.png")[0] == 404
    assert get(server, "/nowhere")[0] == 404


def find_image(screenshot: np.ndarray, image: np.ndarray, tolerance: int = 3) -> tuple[int, int] | None:
    """Top-left (row, column) where ``image`` (RGB) appears in ``screenshot`` (RGB), or None."""
    height, width = image.shape[:2]
    first_row = image[0].astype(np.int16)
    for y in range(screenshot.shape[0] - height + 1):
        windows = np.lib.stride_tricks.sliding_window_view(screenshot[y].astype(np.int16), width, axis=0)
        # windows: (columns - width + 1, 3, width) → compare with the first row of the image.
        close = np.abs(windows - first_row.T[None]).max(axis=(1, 2)) <= tolerance
        for x in np.flatnonzero(close):
            block = screenshot[y : y + height, x : x + width].astype(np.int16)
            if np.abs(block - image.astype(np.int16)).max() <= tolerance:
                return y, int(x)
    return None


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)"
)
def test_page_renders_thumbnails_and_overlays_in_chromium(served, tmp_path):
    server, files = served
    cr_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID
    path = "/?q=" + urllib.request.quote(QUERY) + "&top=7"
    status, _, html = get(server, path)
    assert status == 200 and cr_uid.encode() in html
    _, document = api(server, "q=" + urllib.request.quote(QUERY) + "&top=7")
    cr_hit = next(h for h in document["hits"] if h["sop_instance_uid"] == cr_uid)
    thumbnail = np.asarray(Image.open(io.BytesIO(get(server, cr_hit["thumbnail_url"])[2])).convert("RGB"))
    assert thumbnail.std() > 5  # a real image, not a flat patch that would match anywhere

    screenshot_file = tmp_path / "page.png"
    completed = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            "--force-color-profile=srgb",
            "--window-size=1200,1400",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={screenshot_file}",
            server.url + path,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert screenshot_file.is_file(), completed.stderr[-2000:]
    screenshot = np.asarray(Image.open(screenshot_file).convert("RGB"))
    assert find_image(screenshot, thumbnail) is not None, "the CR thumbnail is not on the rendered page"
    overlays = [h for h in document["hits"] if h["overlay_url"]]
    assert overlays, "no hit has a relevance overlay"
    red = (screenshot[..., 0].astype(int) - screenshot[..., 1].astype(int) > 60) & (
        screenshot[..., 0].astype(int) - screenshot[..., 2].astype(int) > 60
    )
    assert red.sum() > 500, "the relevance overlays are not on the rendered page"


def test_the_search_server_command_serves_stops_on_sigterm_and_refuses_a_busy_port(indexed, tiny_models_root):
    url = indexed.url
    command = [
        sys.executable,
        "-m",
        "medgemma_deploy",
        "search-server",
        "--store",
        url,
        "-m",
        str(tiny_models_root),
    ]
    process = subprocess.Popen(
        [*command, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("serving http://127.0.0.1:"), process.stderr.read() if process.poll() else line
        base = line.split()[1]
        with urllib.request.urlopen(base + "/api/search?q=chest&top=2", timeout=60) as response:
            assert len(json.loads(response.read())["hits"]) == 2
        busy = subprocess.run(
            [*command, "--port", base.rsplit(":", 1)[1]], capture_output=True, text=True, timeout=300
        )
        assert busy.returncode == 2
        errors = [e for e in busy.stderr.splitlines() if e.startswith("medgemma-deploy: error:")]
        assert len(errors) == 1 and "cannot listen" in errors[0]
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
