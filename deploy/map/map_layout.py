"""Lay out a MONAI Application Package's file system in a folder, without docker, and run the app.

``monai-deploy package`` (holoscan-cli <= 4.2) builds a container whose file system follows a fixed
contract; this script reproduces that contract under any root folder so an app can be checked (and
debugged) exactly as the MAP runs it, on a machine without a docker engine:

=====================================  ======================================================
``<root>/opt/holoscan/app/``           the app folder (``__main__.py``, ``app.yaml``, ...)
``<root>/opt/holoscan/models/<name>/`` one folder per model (``HOLOSCAN_MODEL_PATH``)
``<root>/opt/holoscan/docs/``          documentation
``<root>/etc/holoscan/app.json``       application manifest (command, environment, input/output)
``<root>/etc/holoscan/pkg.json``       package manifest (models, resources from ``app.yaml``)
``<root>/var/holoscan/app.yaml``       the app configuration (``HOLOSCAN_CONFIG_PATH``)
``<root>/var/holoscan/input/``         ``HOLOSCAN_INPUT_PATH``
``<root>/var/holoscan/output/``        ``HOLOSCAN_OUTPUT_PATH``
``<root>/var/holoscan/logs/``          ``HOLOSCAN_LOGS_PATH``
=====================================  ======================================================

The manifests carry the keys and values holoscan-cli 4.2 writes (``packager/config_reader.py``,
``common/constants.py``): ``command`` is a JSON-encoded argv, ``["python3", "/opt/holoscan/app"]``
for a Python app folder. The container's environment (``HOLOSCAN_*``) is what the packager's
Dockerfile sets; :meth:`MapLayout.environment` gives it with every path under ``<root>``.

Usage::

    python deploy/map/map_layout.py apps/classify --root /tmp/map --model medsiglip=models/medsiglip \\
        --input study/ --run [-- --backend grpc://localhost:50051]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

__all__ = [
    "MAP_PATHS",
    "MapConfigError",
    "MapLayout",
    "app_manifest",
    "lay_out_map",
    "main",
    "package_manifest",
    "read_app_config",
]

logger = logging.getLogger(__name__)

#: Where a MAP keeps each thing (holoscan-cli 4.2 ``DefaultValues``), as container paths.
MAP_PATHS: dict[str, PurePosixPath] = {
    "app": PurePosixPath("/opt/holoscan/app"),
    "models": PurePosixPath("/opt/holoscan/models"),
    "docs": PurePosixPath("/opt/holoscan/docs"),
    "app_json": PurePosixPath("/etc/holoscan/app.json"),
    "pkg_json": PurePosixPath("/etc/holoscan/pkg.json"),
    "workdir": PurePosixPath("/var/holoscan"),
    "config": PurePosixPath("/var/holoscan/app.yaml"),
    "input": PurePosixPath("/var/holoscan/input"),
    "output": PurePosixPath("/var/holoscan/output"),
    "logs": PurePosixPath("/var/holoscan/logs"),
}
#: The manifests' apiVersion (holoscan-cli 4.2 ``DefaultValues.API_VERSION``).
MAP_API_VERSION = "1.0.0"
#: The packager's Python (``Constants.PYTHON_EXECUTABLE``); :meth:`MapLayout.command` swaps in ours.
MAP_PYTHON = "python3"


class MapConfigError(ValueError):
    """An ``app.yaml`` the packager would refuse; the message names the file and the key."""


def read_app_config(app_yaml: str | Path) -> dict[str, Any]:
    """Read an app's ``app.yaml`` and check what ``monai-deploy package`` requires of it.

    Raises
    ------
    MapConfigError
        The file is not a YAML mapping, or lacks ``application.title``, ``application.version``
        or ``resources`` (the packager's own checks, plus the version it needs for the manifests).
    """
    path = Path(app_yaml)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MapConfigError(f"{path}: cannot be read as YAML ({exc})") from exc
    if not isinstance(config, dict):
        raise MapConfigError(f"{path}: must be a mapping with 'application' and 'resources'")
    application = config.get("application")
    if not isinstance(application, dict):
        raise MapConfigError(f"{path}: 'application' mapping is missing")
    if not isinstance(config.get("resources"), dict):
        raise MapConfigError(f"{path}: 'resources' mapping is missing")
    for key in ("title", "version"):
        if not str(application.get(key) or "").strip():
            raise MapConfigError(f"{path}: 'application>{key}' is missing or empty")
    return config


def app_manifest(config: Mapping[str, Any], *, sdk_version: str | None = None) -> dict[str, Any]:
    """``/etc/holoscan/app.json`` for a Python app folder, as holoscan-cli 4.2 writes it."""
    application = config["application"]
    workdir = MAP_PATHS["workdir"]
    environment = {
        "HOLOSCAN_APPLICATION": str(MAP_PATHS["app"]),
        # The packager writes input/output relative to the working directory here; the image's
        # ENV (see MapLayout.environment) has them absolute.
        "HOLOSCAN_INPUT_PATH": "input/",
        "HOLOSCAN_OUTPUT_PATH": "output/",
        "HOLOSCAN_WORKDIR": str(workdir),
        "HOLOSCAN_MODEL_PATH": str(MAP_PATHS["models"]),
        "HOLOSCAN_CONFIG_PATH": str(MAP_PATHS["config"]),
        "HOLOSCAN_APP_MANIFEST_PATH": str(MAP_PATHS["app_json"]),
        "HOLOSCAN_PKG_MANIFEST_PATH": str(MAP_PATHS["pkg_json"]),
        "HOLOSCAN_DOCS_PATH": str(MAP_PATHS["docs"]),
        "HOLOSCAN_LOGS_PATH": str(MAP_PATHS["logs"]),
    }
    return {
        "apiVersion": MAP_API_VERSION,
        "command": json.dumps([MAP_PYTHON, str(MAP_PATHS["app"])]),
        "environment": environment,
        "input": {"path": "input/", "formats": application.get("input-formats")},
        "liveness": None,
        "output": {"path": "output/", "formats": application.get("output-formats")},
        "readiness": None,
        "sdk": "monai-deploy",
        "sdkVersion": sdk_version,
        "timeout": 0,  # DefaultValues.TIMEOUT; `monai-deploy package --timeout` overrides it
        "version": str(application["version"]),
        "workingDirectory": str(workdir),
    }


def package_manifest(config: Mapping[str, Any], model_names: Sequence[str]) -> dict[str, Any]:
    """``/etc/holoscan/pkg.json``: the models by name and the resources of ``app.yaml``."""
    model_root = MAP_PATHS["models"]
    return {
        "apiVersion": MAP_API_VERSION,
        "applicationRoot": str(MAP_PATHS["app"]),
        "modelRoot": str(model_root),
        "models": {name: str(model_root / name) for name in model_names},
        "resources": dict(config["resources"]),
        "version": str(config["application"]["version"]),
        "platformConfig": "dGPU",
    }


@dataclass(frozen=True)
class MapLayout:
    """A MAP file system under ``root``; ``path("input")`` is ``<root>/var/holoscan/input``."""

    root: Path

    def path(self, name: str) -> Path:
        """The folder or file ``name`` of :data:`MAP_PATHS` under ``root``."""
        return self.root / MAP_PATHS[name].relative_to("/")

    def app_json(self) -> dict[str, Any]:
        return json.loads(self.path("app_json").read_text())

    def pkg_json(self) -> dict[str, Any]:
        return json.loads(self.path("pkg_json").read_text())

    def environment(self) -> dict[str, str]:
        """The ``HOLOSCAN_*`` variables of the MAP image (its Dockerfile ENV), rooted at ``root``."""
        rooted = {name: str(self.path(name)) for name in MAP_PATHS}
        return {
            "HOLOSCAN_APPLICATION": rooted["app"],
            "HOLOSCAN_INPUT_PATH": rooted["input"],
            "HOLOSCAN_OUTPUT_PATH": rooted["output"],
            "HOLOSCAN_WORKDIR": rooted["workdir"],
            "HOLOSCAN_MODEL_PATH": rooted["models"],
            "HOLOSCAN_CONFIG_PATH": rooted["config"],
            "HOLOSCAN_APP_MANIFEST_PATH": rooted["app_json"],
            "HOLOSCAN_PKG_MANIFEST_PATH": rooted["pkg_json"],
            "HOLOSCAN_DOCS_PATH": rooted["docs"],
            "HOLOSCAN_LOGS_PATH": rooted["logs"],
        }

    def command(self, python: str = sys.executable) -> list[str]:
        """The argv of ``app.json``'s ``command`` with its paths under ``root`` and our Python."""
        argv = json.loads(self.app_json()["command"])
        if not isinstance(argv, list) or not argv:
            raise MapConfigError(f"{self.path('app_json')}: 'command' is not a JSON-encoded argv")
        resolved = [python if argv[0] == MAP_PYTHON else argv[0]]
        for arg in argv[1:]:
            resolved.append(str(self.root / arg.lstrip("/")) if arg.startswith("/") else arg)
        return resolved

    def run(
        self,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the app as the MAP's entry point does: ``command`` + ``args`` in the working directory.

        ``env`` is added to this process's environment, then the MAP's ``HOLOSCAN_*`` variables
        (the image's ENV) are applied unless ``env`` sets them.
        """
        environment = {**os.environ, **self.environment(), **(env or {})}
        return subprocess.run(
            [*self.command(), *args],
            cwd=self.path("workdir"),
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def lay_out_map(
    root: str | Path,
    app_dir: str | Path,
    *,
    models: Mapping[str, str | Path] | None = None,
    input_path: str | Path | None = None,
    copy_models: bool = False,
    sdk_version: str | None = None,
) -> MapLayout:
    """Create the MAP file system of the app in ``app_dir`` under ``root`` (which must not exist).

    Parameters
    ----------
    root:
        New folder standing for the container's ``/``.
    app_dir:
        The app folder as given to ``monai-deploy package`` (holds ``__main__.py`` and ``app.yaml``).
    models:
        Model name → model folder, laid out as ``/opt/holoscan/models/<name>`` (symbolic links
        unless ``copy_models``). None or empty: a MAP built without ``--models``.
    input_path:
        A DICOM file or folder copied into ``/var/holoscan/input``; None leaves the folder empty.

    Raises
    ------
    MapConfigError
        ``app_dir`` has no ``__main__.py`` (the packager's test for a Python app), or its
        ``app.yaml`` is invalid (see :func:`read_app_config`).
    FileExistsError
        ``root`` exists.
    FileNotFoundError
        A model folder or the input does not exist.
    """
    root, app_dir = Path(root), Path(app_dir)
    if not (app_dir / "__main__.py").is_file():
        raise MapConfigError(f"{app_dir}: not a Python app folder (no __main__.py)")
    config = read_app_config(app_dir / "app.yaml")
    models = dict(models or {})
    for name, source in models.items():
        if not Path(source).is_dir():
            raise FileNotFoundError(f"model {name!r}: folder {source} does not exist")
    if input_path is not None and not Path(input_path).exists():
        raise FileNotFoundError(f"input {input_path} does not exist")
    root.mkdir(parents=True, exist_ok=False)
    layout = MapLayout(root)

    shutil.copytree(app_dir, layout.path("app"), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    layout.path("models").mkdir(parents=True)
    for name, source in models.items():
        target = layout.path("models") / name
        if copy_models:
            shutil.copytree(source, target)
        else:
            target.symlink_to(Path(source).resolve(), target_is_directory=True)
    for name in ("docs", "input", "output", "logs"):
        layout.path(name).mkdir(parents=True, exist_ok=True)
    if input_path is not None:
        source = Path(input_path)
        if source.is_dir():
            shutil.copytree(source, layout.path("input"), dirs_exist_ok=True)
        else:
            shutil.copy2(source, layout.path("input") / source.name)
    shutil.copy2(app_dir / "app.yaml", layout.path("config"))
    layout.path("app_json").parent.mkdir(parents=True, exist_ok=True)
    layout.path("app_json").write_text(json.dumps(app_manifest(config, sdk_version=sdk_version), indent=2))
    layout.path("pkg_json").write_text(json.dumps(package_manifest(config, sorted(models)), indent=2))
    logger.info("laid out the MAP of %s under %s", app_dir, root)
    return layout


def _parse_model(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"--model {text!r}: expected NAME=FOLDER")
    return name, Path(folder)


def main(argv: Sequence[str] | None = None) -> int:
    """Lay out (and with ``--run``, run) an app's MAP; returns the app's exit code or 0."""
    parser = argparse.ArgumentParser(prog="map_layout.py", description=__doc__.splitlines()[0])
    parser.add_argument("app_dir", type=Path, help="app folder, e.g. apps/classify")
    parser.add_argument("--root", type=Path, required=True, help="new folder standing for the container's /")
    parser.add_argument("--model", type=_parse_model, action="append", default=[], metavar="NAME=FOLDER")
    parser.add_argument("--input", type=Path, help="DICOM file or folder to put in /var/holoscan/input")
    parser.add_argument("--copy-models", action="store_true", help="copy model folders instead of linking")
    parser.add_argument("--run", action="store_true", help="then run the app from the layout")
    parser.epilog = "Arguments after -- go to the app (e.g. -- --backend grpc://HOST:50051)."
    argv = list(sys.argv[1:] if argv is None else argv)
    app_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, app_args = argv[:split], argv[split + 1 :]
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        layout = lay_out_map(
            args.root,
            args.app_dir,
            models=dict(args.model),
            input_path=args.input,
            copy_models=args.copy_models,
        )
    except (MapConfigError, FileExistsError, FileNotFoundError) as exc:
        print(f"map_layout.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"MAP layout: {layout.root}")
    if not args.run:
        return 0
    result = layout.run(app_args)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    print(f"outputs: {layout.path('output')}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
