"""Test helper: a real Orthanc (Debian package ``orthanc``) on loopback, with its own temp storage.

Orthanc 1.10 has no bind-address option and listens on every interface, so it is only ever used
with loopback traffic here: ``RemoteAccessAllowed`` false (HTTP from 127.0.0.1 only), no
authentication, ports picked free at start. :func:`running_orthanc` always stops the process.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.system_tools import require

__all__ = ["ORTHANC_BINARY", "OrthancServer", "free_port", "orthanc_available", "running_orthanc"]

ORTHANC_BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")


def orthanc_available() -> bool:
    return Path(ORTHANC_BINARY).is_file()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OrthancServer:
    """A running Orthanc: its ports, AE title and a few REST helpers."""

    process: subprocess.Popen
    aet: str
    http_port: int
    dicom_port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def upload(self, dicom_file: Path) -> Any:
        return self.post("/instances", dicom_file.read_bytes())

    def instances_by_sop_class(self) -> dict[str, list[str]]:
        """SOP Class UID → SOP Instance UIDs of every instance Orthanc holds."""
        found: dict[str, list[str]] = {}
        for instance_id in self.get("/instances"):
            tags = self.get(f"/instances/{instance_id}/simplified-tags")
            found.setdefault(tags.get("SOPClassUID", ""), []).append(tags.get("SOPInstanceUID", ""))
        return found

    def sop_instance_uids(self) -> list[str]:
        return [uid for uids in self.instances_by_sop_class().values() for uid in uids]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _config(
    workdir: Path,
    aet: str,
    http_port: int,
    dicom_port: int,
    modalities: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    storage = workdir / "db"
    config: dict[str, Any] = {
        "Name": "medgemma-deploy test Orthanc",
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "DicomModalities": modalities,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": False,
        "SaveJobs": False,
        "ConcurrentJobs": 2,
        "HttpThreadsCount": 8,
        "DicomThreadsCount": 8,
        "StableAge": 2,
        "Plugins": [],
    }
    config.update(extra)
    return config


@contextlib.contextmanager
def running_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    http_port: int | None = None,
    dicom_port: int | None = None,
    python_script: Path | None = None,
    startup_timeout_s: float = 30.0,
) -> Iterator[OrthancServer]:
    """Start Orthanc with storage under ``workdir``; yield it once its REST API answers; stop it.

    ``modalities`` is Orthanc's ``DicomModalities``; ``python_script`` loads the orthanc-python
    plugin with that script. A given ``http_port``/``dicom_port`` lets a test restart Orthanc on the
    same ports (to bring a destination back).
    """
    # Fail now, naming the package, rather than wait startup_timeout_s for a server that cannot start
    # (or, without the plugin, for a forward that never comes).
    require("orthanc", *(("orthanc-python",) if python_script is not None else ()))
    workdir.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    if python_script is not None:
        extra["Plugins"] = [str(PYTHON_PLUGIN)]
        extra["PythonScript"] = str(python_script)
        extra["PythonVerbose"] = False
    server = OrthancServer(
        process=None,  # type: ignore[arg-type]
        aet=aet,
        http_port=http_port or free_port(),
        dicom_port=dicom_port or free_port(),
        workdir=workdir,
    )
    config_file = workdir / "orthanc.json"
    config = _config(workdir, aet, server.http_port, server.dicom_port, modalities or {}, extra)
    config_file.write_text(json.dumps(config, indent=2))
    log = server.log_path.open("ab")
    server.process = subprocess.Popen(
        [ORTHANC_BINARY, "--no-jobs", str(config_file)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir
    )
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if server.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {server.process.returncode}; see {server.log_path}")
            try:
                server.get("/system")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Orthanc not ready after {startup_timeout_s} s; see {server.log_path}"
                    ) from None
                time.sleep(0.1)
        yield server
    finally:
        server.stop()
        log.close()
