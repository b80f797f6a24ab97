"""Generate the gRPC Python stubs of ``protos/`` into ``medgemma_deploy/_proto/``.

Run ``python -m medgemma_deploy.dev.protos_build`` after editing a ``.proto`` (``--check`` only compares
and exits 1 on drift). It needs ``grpcio-tools`` (the ``dev`` extra); the generated files are
checked in, so running the worker does not.

protoc's output is post-processed by fixed, documented rules, so the checked-in stubs run on every
supported runtime and never need a hand edit:

* the files are flattened from ``medgemma_deploy/v1/`` into ``medgemma_deploy/_proto/`` and the
  service module imports the message module from there (protoc would write
  ``from medgemma_deploy.v1 import worker_pb2``, a package that does not exist);
* the protobuf gencode/runtime version guard is removed: it refuses any runtime older than the
  protoc that generated the file, but the builder API the file uses exists since protobuf 4.21 and
  the project supports ``protobuf>=4.25`` (GPU images ship their own);
* the grpcio version guard is lowered from the generating grpcio-tools version to
  :data:`MIN_GRPCIO`, the first grpcio with ``_registered_method`` and
  ``add_registered_method_handlers``, which the generated code calls (checked by hand: grpcio
  1.63 lacks the latter; protobuf 4.25.9 with grpcio 1.64.0 imports these stubs and serves them).

The file name in the descriptor pool stays ``medgemma_deploy/v1/worker.proto`` (what server
reflection shows), and the API version is the proto package, ``medgemma_deploy.v1``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "GENERATED_DIR",
    "MIN_GRPCIO",
    "PROTO_FILES",
    "PROTO_ROOT",
    "check",
    "generate",
    "main",
    "render",
]

logger = logging.getLogger(__name__)

#: ``protos/`` at the repository root (the import root given to protoc).
PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"
#: Where the stubs are checked in.
GENERATED_DIR = Path(__file__).resolve().parents[1] / "_proto"
#: The .proto files, relative to :data:`PROTO_ROOT`.
PROTO_FILES: tuple[str, ...] = ("medgemma_deploy/v1/worker.proto",)
#: Oldest grpcio the generated service code runs on.
MIN_GRPCIO = "1.64.0"

_PACKAGE = "medgemma_deploy._proto"


def render(proto_root: Path = PROTO_ROOT) -> dict[str, str]:
    """Run protoc on :data:`PROTO_FILES` and return ``{file name: text}`` after the rules above.

    Raises
    ------
    RuntimeError
        grpcio-tools is missing, or protoc reports an error (its message is included).
    """
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as exc:
        raise RuntimeError(
            "generating the gRPC stubs needs grpcio-tools (pip install 'medgemma-deploy[dev]')"
        ) from exc
    tools_version = _distribution_version("grpcio-tools")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rendered: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="protos-build-") as tmp:
        out = Path(tmp)
        for proto in PROTO_FILES:
            if not (proto_root / proto).is_file():
                raise RuntimeError(f"{proto_root / proto}: .proto file not found")
            args = [
                "grpc_tools.protoc",
                f"-I{proto_root}",
                f"-I{well_known}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                proto,
            ]
            status = protoc.main(args)
            if status != 0:
                raise RuntimeError(
                    f"protoc failed on {proto_root / proto} (exit status {status}); see stderr"
                )
            stem = Path(proto).with_suffix("")
            module = stem.name
            source_module = ".".join(stem.parts[:-1])
            header = _header(proto, tools_version)
            messages = (out / f"{stem}_pb2.py").read_text()
            rendered[f"{module}_pb2.py"] = _fix_messages(messages, proto, source_module, module, header)
            stubs = (out / f"{stem}_pb2.pyi").read_text()
            rendered[f"{module}_pb2.pyi"] = header + stubs
            services = (out / f"{stem}_pb2_grpc.py").read_text()
            rendered[f"{module}_pb2_grpc.py"] = _fix_services(services, proto, source_module, module, header)
    return rendered


def generate(out_dir: Path = GENERATED_DIR, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Write the stubs into ``out_dir`` (created if missing); return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render(proto_root).items():
        path = out_dir / name
        path.write_text(text)
        written.append(path)
        logger.info("wrote %s", path)
    return written


def check(out_dir: Path = GENERATED_DIR, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Names of the files in ``out_dir`` that differ from a fresh build (empty when in sync)."""
    drifted = []
    for name, text in render(proto_root).items():
        path = out_dir / name
        if not path.is_file() or path.read_text() != text:
            drifted.append(name)
    return drifted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medgemma_deploy.dev.protos_build", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=GENERATED_DIR, help=f"default: {GENERATED_DIR}")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 when the stubs drifted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.check:
            drifted = check(args.out)
            for name in drifted:
                logger.error("%s is out of date with %s", args.out / name, PROTO_ROOT)
            return 1 if drifted else 0
        generate(args.out)
    except RuntimeError as exc:
        logger.error("protos_build: %s", exc)
        return 2
    return 0


def _header(proto: str, tools_version: str) -> str:
    return (
        f"# Generated from protos/{proto} by `python -m medgemma_deploy.dev.protos_build`\n"
        f"# (grpcio-tools {tools_version}). DO NOT EDIT: change the .proto and regenerate.\n"
    )


def _fix_messages(text: str, proto: str, source_module: str, module: str, header: str) -> str:
    text = re.sub(r"^# (NO CHECKED-IN PROTOBUF GENCODE|Protobuf Python Version:.*)\n", "", text, flags=re.M)
    text = text.replace("from google.protobuf import runtime_version as _runtime_version\n", "")
    text, n_guards = re.subn(r"_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:.*\n)*?\)\n", "", text)
    if "_runtime_version" in text or n_guards > 1:
        raise RuntimeError(
            f"{proto}: unexpected protobuf version guard in protoc output; update protos_build"
        )
    old_name = f"'{source_module}.{module}_pb2'"
    if old_name not in text:
        raise RuntimeError(f"{proto}: module name {old_name} not found in protoc output; update protos_build")
    text = text.replace(old_name, f"'{_PACKAGE}.{module}_pb2'")
    return header + text


def _fix_services(text: str, proto: str, source_module: str, module: str, header: str) -> str:
    old_import = f"from {source_module} import {module}_pb2 as "
    if old_import not in text:
        raise RuntimeError(f"{proto}: import {old_import!r} not found in grpc output; update protos_build")
    text = text.replace(old_import, f"from {_PACKAGE} import {module}_pb2 as ")
    text, n = re.subn(
        r"^GRPC_GENERATED_VERSION = '[^']*'$", f"GRPC_GENERATED_VERSION = '{MIN_GRPCIO}'", text, flags=re.M
    )
    if n != 1:
        raise RuntimeError(f"{proto}: GRPC_GENERATED_VERSION not found in grpc output; update protos_build")
    return header + text


def _distribution_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
