"""./run and the tests agree on the system tools, and a missing one fails a test fast, by package."""

from __future__ import annotations

import re
import time

import pytest

from tests.support import REPO
from tests.support.system_tools import SYSTEM_TOOLS, SystemTool, require


def _run_table() -> list[tuple[str, str, str]]:
    script = (REPO / "run").read_text()
    block = re.search(r"^SYSTEM_TOOLS=\((.*?)^\)", script, re.DOTALL | re.MULTILINE)
    assert block, "./run has no SYSTEM_TOOLS table"
    return [tuple(row.split("|")) for row in re.findall(r'"([^"]+)"', block.group(1))]


def test_run_checks_the_same_tools_as_the_tests():
    assert _run_table() == [(t.package, t.kind, t.target) for t in SYSTEM_TOOLS.values()]


def test_run_checks_orthanc_and_its_python_plugin_separately():
    packages = [package for package, _, _ in _run_table()]
    assert "orthanc" in packages and "orthanc-python" in packages


def test_a_missing_tool_fails_at_once_naming_its_package(monkeypatch):
    absent = SystemTool("orthanc-python", "file", "/nonexistent/libOrthancPython.so")
    monkeypatch.setitem(SYSTEM_TOOLS, "orthanc-python", absent)
    started = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install orthanc-python"):
        require("orthanc", "orthanc-python")
    assert time.monotonic() - started < 1.0
