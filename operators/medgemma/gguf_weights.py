"""GGUF weights of a MedGemma directory for llama.cpp: built once, cached next to the model, digested.

``gguf_weights(model_dir, weight_type)`` returns the text-decoder GGUF and the vision projector
(``mmproj``) GGUF of a MedGemma; ``mmproj=False`` only the text decoder, which is all
:class:`~medgemma_deploy.operators.medgemma.gguf_runner.GgufMedGemmaRunner` loads (its vision tower
runs on torch, from the checkpoint's safetensors):

* User-supplied files win: a model directory holding exactly one ``*.gguf`` other than
  ``*mmproj*.gguf`` uses it as it is (whatever its quantisation; llama.cpp reads it from the file),
  with the one ``*mmproj*.gguf`` beside it when the projector is asked for.
* Otherwise both are built from the Hugging Face files with llama.cpp's own converter
  (:mod:`~medgemma_deploy.operators.medgemma.gguf_convert`, one subprocess) and, for 4-bit, llama.cpp's
  quantiser; they are cached in ``<model_dir>/gguf/`` (or, when that is read-only, under
  ``$XDG_CACHE_HOME/medgemma-deploy/gguf/``) with a ``manifest.json`` holding each file's SHA-256
  and a fingerprint of the sources, so a changed checkpoint is rebuilt and an unchanged one is not.

The converter is Python source that no wheel ships: it is taken from the llama-cpp-python source
distribution of the installed version (``python -m medgemma_deploy.operators.medgemma.gguf_weights
--install-converter``, which ``./run`` does when it installs the ``lowbit`` extra), or from a
llama.cpp checkout named by ``MEDGEMMA_DEPLOY_LLAMA_CPP``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from medgemma_deploy.errors import ModelLoadError

__all__ = [
    "LOWBIT_HINT",
    "WEIGHT_TYPES",
    "GgufWeights",
    "converter_dir",
    "gguf_weights",
    "require_lowbit",
]

logger = logging.getLogger(__name__)

#: What to install for the low-bit path, as every error about it says.
LOWBIT_HINT = "install the optional 'lowbit' extra: pip install 'medgemma-deploy[lowbit]'"

#: GGUF weight types we build: the text decoder's type and the projector's (llama.cpp quantises
#: only the decoder; the SigLIP tower stays at 16 bits, as llama.cpp's own MedGemma files do).
WEIGHT_TYPES: dict[str, tuple[str, str]] = {
    "f32": ("f32", "f32"),
    "f16": ("f16", "f16"),
    "q8_0": ("q8_0", "f16"),
    "q4_0": ("q4_0", "f16"),
}

#: JSON files of a model directory that do not change the GGUF files (decoding settings, our marker).
_NOT_WEIGHTS = ("generation_config.json", "medgemma_deploy_model.json")

#: Bumped when the way we convert changes, so that caches built the old way are rebuilt.
_RECIPE = "1"


@dataclass(frozen=True)
class GgufWeights:
    """The files llama.cpp loads, their SHA-256 digests and how they were made (``mmproj`` and its
    digest are None when only the text decoder was asked for)."""

    text: Path
    mmproj: Path | None
    text_sha256: str
    mmproj_sha256: str | None
    weight_type: str
    user_supplied: bool = False


def require_lowbit(precision: str) -> None:
    """Raise one clear :class:`ModelLoadError` when llama-cpp-python is not installed."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        raise ModelLoadError(f"--precision {precision} runs MedGemma on llama.cpp: {LOWBIT_HINT}")


def converter_dir() -> Path:
    """llama.cpp's converter: ``$MEDGEMMA_DEPLOY_LLAMA_CPP``, else where ``--install-converter`` put it."""
    configured = os.environ.get("MEDGEMMA_DEPLOY_LLAMA_CPP")
    directory = Path(configured) if configured else _installed_converter_dir()
    if not (directory / "convert_hf_to_gguf.py").is_file() or not (directory / "conversion").is_dir():
        raise ModelLoadError(
            f"{directory}: llama.cpp's converter (convert_hf_to_gguf.py and conversion/) is not there; "
            "run 'python -m medgemma_deploy.operators.medgemma.gguf_weights --install-converter' or set "
            "MEDGEMMA_DEPLOY_LLAMA_CPP to a llama.cpp checkout"
        )
    return directory


def _installed_converter_dir() -> Path:
    return Path(sys.prefix) / "share" / "medgemma-deploy" / "llama.cpp"


def gguf_weights(model_dir: Path, weight_type: str, *, mmproj: bool = True) -> GgufWeights:
    """The GGUF files for ``model_dir`` at ``weight_type``: the text decoder, and the projector
    unless ``mmproj`` is False (see the module docstring).

    Raises
    ------
    ModelLoadError
        The converter is missing, or conversion or quantisation failed (the message names the
        directory and llama.cpp's last lines).
    """
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {', '.join(WEIGHT_TYPES)}, got {weight_type!r}")
    supplied = _user_supplied(model_dir, mmproj)
    if supplied is not None:
        return supplied
    cache = _cache_dir(model_dir)
    text_type, mmproj_type = WEIGHT_TYPES[weight_type]
    text = cache / f"text-{text_type}.gguf"
    projector = cache / f"mmproj-{mmproj_type}.gguf"
    manifest_file = cache / "manifest.json"
    fingerprint = _fingerprint(model_dir)
    manifest = _read_manifest(manifest_file, fingerprint)
    wanted = [(text, text_type)] + ([(projector, mmproj_type)] if mmproj else [])
    for path, kind in wanted:
        if path.name not in manifest or not path.is_file():
            _build(model_dir, path, kind, mmproj=path is projector)
            manifest[path.name] = _sha256(path)
            _write_manifest(manifest_file, fingerprint, manifest)
    if not mmproj:
        return GgufWeights(text, None, manifest[text.name], None, weight_type)
    return GgufWeights(text, projector, manifest[text.name], manifest[projector.name], weight_type)


def _user_supplied(model_dir: Path, mmproj: bool) -> GgufWeights | None:
    files = sorted(model_dir.glob("*.gguf"))
    projectors = [path for path in files if "mmproj" in path.name.lower()]
    texts = [path for path in files if path not in projectors]
    if not files:
        return None
    if len(texts) != 1 or (mmproj and len(projectors) != 1) or len(projectors) > 1:
        raise ModelLoadError(
            f"{model_dir}: holds {len(texts)} text GGUF(s) and {len(projectors)} *mmproj*.gguf; "
            "user-supplied files are exactly one text GGUF and at most one *mmproj*.gguf (or remove "
            "them to build our own)"
        )
    if not mmproj:
        return GgufWeights(texts[0], None, _sha256(texts[0]), None, "supplied", user_supplied=True)
    return GgufWeights(
        texts[0], projectors[0], _sha256(texts[0]), _sha256(projectors[0]), "supplied", user_supplied=True
    )


def _cache_dir(model_dir: Path) -> Path:
    beside = model_dir / "gguf"
    try:
        beside.mkdir(exist_ok=True)
        probe = beside / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
        return beside
    except OSError:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medgemma-deploy" / "gguf"
        cache = root / hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]
        cache.mkdir(parents=True, exist_ok=True)
        return cache


def _fingerprint(model_dir: Path) -> str:
    """Sources (config, tokenizer, processor contents; weight names, sizes and mtimes) and versions."""
    digest = hashlib.sha256(f"recipe {_RECIPE} llama-cpp-python {_llama_cpp_version()}\n".encode())
    for path in sorted(model_dir.iterdir()):
        if path.suffix == ".json" and path.name not in _NOT_WEIGHTS:
            digest.update(path.name.encode() + path.read_bytes())
        elif path.suffix in (".safetensors", ".model"):
            stat = path.stat()
            digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _llama_cpp_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return "none"


def _read_manifest(manifest_file: Path, fingerprint: str) -> dict[str, str]:
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        return {}
    if manifest.get("fingerprint") != fingerprint:
        return {}
    return dict(manifest.get("sha256", {}))


def _write_manifest(manifest_file: Path, fingerprint: str, files: dict[str, str]) -> None:
    manifest = {"fingerprint": fingerprint, "sha256": files}
    manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _build(model_dir: Path, out: Path, kind: str, *, mmproj: bool) -> None:
    started = time.perf_counter()
    converter = converter_dir()
    outtype = "f16" if kind == "q4_0" else kind
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".building-") as scratch:
        converted = Path(scratch) / f"converted-{outtype}.gguf"
        command = [
            sys.executable,
            "-m",
            "medgemma_deploy.operators.medgemma.gguf_convert",
            str(converter),
            str(model_dir),
            str(converted),
            "--outtype",
            outtype,
            *(["--mmproj"] if mmproj else []),
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0 or not converted.is_file():
            tail = " | ".join(completed.stderr.strip().splitlines()[-3:])
            raise ModelLoadError(f"{model_dir}: llama.cpp's converter failed ({out.name}): {tail}")
        if kind == "q4_0":
            _quantize(converted, Path(scratch) / out.name, model_dir)
            converted = Path(scratch) / out.name
        os.replace(converted, out)
    logger.info("%s: built %s in %.1f s", model_dir, out.name, time.perf_counter() - started)


def _quantize(source: Path, target: Path, model_dir: Path) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise ModelLoadError(f"{model_dir}: llama.cpp could not quantise {source.name} to Q4_0")


def install_converter(version: str | None = None) -> Path:
    """Unpack llama.cpp's converter from the llama-cpp-python sdist of the installed version."""
    version = version or _llama_cpp_version()
    if version == "none":
        raise ModelLoadError(f"llama-cpp-python is not installed: {LOWBIT_HINT}")
    target = _installed_converter_dir()
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}"]
        command += ["--no-deps", "--no-binary", ":all:", "-d", scratch, "-q"]
        subprocess.run(command, check=True)
        (sdist,) = Path(scratch).glob("llama_cpp_python-*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
        with tarfile.open(sdist) as archive:
            members = [
                member
                for member in archive.getmembers()
                if member.name.startswith(prefix) and member.name[len(prefix) :].startswith(wanted)
            ]
            for member in members:
                member.name = member.name[len(prefix) :]
            if target.exists():
                shutil.rmtree(target)
            archive.extractall(target, members=members, filter="data")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llama.cpp weights for MedGemma")
    parser.add_argument("--install-converter", action="store_true", help=install_converter.__doc__)
    parser.add_argument("--build", type=Path, metavar="MODEL_DIR", help="build (or reuse) the GGUF files")
    parser.add_argument(
        "--no-mmproj",
        dest="mmproj",
        action="store_false",
        help="only the text decoder (the runner's)",
    )
    parser.add_argument("--weight-type", default="q4_0", choices=tuple(WEIGHT_TYPES))
    args = parser.parse_args(argv)
    try:
        if args.install_converter:
            print(f"llama.cpp converter installed in {install_converter()}")
        if args.build:
            weights = gguf_weights(args.build, args.weight_type, mmproj=args.mmproj)
            print(f"{weights.text} sha256 {weights.text_sha256}")
            if weights.mmproj is not None:
                print(f"{weights.mmproj} sha256 {weights.mmproj_sha256}")
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
