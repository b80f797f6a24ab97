"""Test helper: the system tools the tests need, each checked by itself; a fast failure names the package.

The table is ``./run``'s (``SYSTEM_TOOLS``; ``tests/test_system_tools.py`` keeps the two equal):
``./run tests`` apt-installs whatever row is missing, so a test that still finds one missing was
run another way; :func:`require` then fails it at once with the Debian package to install, instead
of letting it wait for a server that cannot start (a missing orthanc-python plugin once meant a
120 s timeout in the forwarding test).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["SYSTEM_TOOLS", "SystemTool", "missing_tools", "require"]


@dataclass(frozen=True)
class SystemTool:
    """One thing the tests need from the system: a command on PATH or a file."""

    package: str
    kind: str  # "command" or "file"
    target: str

    def present(self) -> bool:
        if self.kind == "command":
            return shutil.which(self.target) is not None
        return Path(self.target).exists()


#: tool name → what provides it (the rows of ./run's SYSTEM_TOOLS, in order).
SYSTEM_TOOLS: dict[str, SystemTool] = {
    "orthanc": SystemTool("orthanc", "command", "Orthanc"),
    "orthanc-python": SystemTool("orthanc-python", "file", "/usr/share/orthanc/plugins/libOrthancPython.so"),
    "storescu": SystemTool("dcmtk", "command", "storescu"),
    "kubectl": SystemTool("kubectl", "command", "kubectl"),
    "pixelmed": SystemTool("pixelmed-apps", "file", "/usr/share/java/pixelmed.jar"),
    "java": SystemTool("default-jre-headless", "command", "java"),
    # The compiler lets tests/support/pixelmed.py validate a whole batch of files in one JVM.
    "javac": SystemTool("default-jdk-headless", "command", "javac"),
    "chromium": SystemTool("chromium", "command", "chromium"),
}


def missing_tools(*names: str) -> list[str]:
    """The names among ``names`` whose tool is absent."""
    return [name for name in names if not SYSTEM_TOOLS[name].present()]


def require(*names: str) -> None:
    """Fail the calling test now, naming the Debian packages, unless every tool is present."""
    missing = missing_tools(*names)
    if missing:
        packages = " ".join(SYSTEM_TOOLS[name].package for name in missing)
        what = ", ".join(f"{name} ({SYSTEM_TOOLS[name].target})" for name in missing)
        pytest.fail(f"missing {what}: apt-get install {packages} (./run tests installs it)", pytrace=False)
