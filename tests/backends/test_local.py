"""The backend module is the one place runners are built: the local backend's models, the worker's
runners, and a worker's backend that builds none."""

from __future__ import annotations

import ast
import importlib.util

import pytest

from medgemma_deploy.backends.local import make_backend
from medgemma_deploy.errors import UsageError
from medgemma_deploy.operators.medgemma.runner import MedGemmaRunner
from medgemma_deploy.operators.medsiglip.runner import MedSigLIPRunner
from tests.support import REPO

#: The runner factories, and the one module of the service that may call them.
FACTORIES = {"make_medsiglip_runner", "make_medgemma_runner"}
BUILDER = "medgemma_deploy/backends/local.py"
#: It, and the benchmarks (which measure a runner on its own).
ALLOWED = (BUILDER, "medgemma_deploy/dev/bench/")


def _factory_calls(source: str) -> list[int]:
    """Lines of ``source`` that call a runner factory (by its bare or dotted name)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if name in FACTORIES:
                lines.append(node.lineno)
    return lines


def test_runners_are_built_only_by_the_backend_module():
    callers = {}
    for folder in ("medgemma_deploy", "operators", "apps"):
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO).as_posix()
            lines = _factory_calls(path.read_text())
            if lines and not relative.startswith(ALLOWED):
                callers[relative] = lines
    assert callers == {}, f"runners built outside {BUILDER}: {callers}"
    assert _factory_calls((REPO / BUILDER).read_text()), f"{BUILDER} no longer builds the runners"


def test_the_factory_call_check_flags_a_call():
    assert _factory_calls("from x import make_medgemma_runner\nmake_medgemma_runner(d)\n") == [2]
    assert _factory_calls("import runners\nrunners.make_medsiglip_runner(d)\n") == [2]
    assert _factory_calls("make_medgemma_runner\n") == []


def test_the_local_backend_builds_new_unloaded_runners(tiny_models_root):
    backend = make_backend("local", tiny_models_root, "cpu", precision="fp32")
    medsiglip = backend.medsiglip_runner(max_batch_size=3)
    assert isinstance(medsiglip, MedSigLIPRunner) and not medsiglip.is_loaded
    assert medsiglip.max_batch_size == 3
    assert medsiglip.model_dir == tiny_models_root / "medsiglip"
    assert backend.medsiglip_runner() is not medsiglip
    medgemma = backend.medgemma_runner()
    assert isinstance(medgemma, MedGemmaRunner) and not medgemma.is_loaded
    assert medgemma.model_dir == tiny_models_root / "medgemma" and medgemma.precision == "fp32"
    # Its own MedGemma is such a runner behind the worker's decode core.
    assert isinstance(backend.medgemma.runner, MedGemmaRunner)  # type: ignore[attr-defined]
    backend.close()


def test_medsiglip_path_names_medsiglip_beside_a_medgemma_directory(tiny_models_root):
    backend = make_backend(
        "local", tiny_models_root / "medgemma", "cpu", medsiglip_path=tiny_models_root / "medsiglip"
    )
    assert backend.medsiglip_runner().model_dir == tiny_models_root / "medsiglip"
    assert backend.medgemma_runner().model_dir == tiny_models_root / "medgemma"


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="the lowbit extra is not installed")
def test_low_bit_medgemma_is_llama_cpps_runner_behind_the_same_decode_core(tiny_models_root):
    from medgemma_deploy.backends.inproc import InprocMedGemma
    from medgemma_deploy.operators.medgemma.gguf_runner import GgufMedGemmaRunner

    backend = make_backend("local", tiny_models_root, "cpu", precision="int4")
    runner = backend.medgemma_runner()
    assert isinstance(runner, GgufMedGemmaRunner) and runner.n_parallel == 1  # one report at a time
    assert backend.medgemma_runner(sequences=3).n_parallel == 3  # the worker's scheduler asks for more
    assert backend.medgemma_runner(sequences=64).n_parallel == 4  # capped: LOW_BIT_MAX_SEQUENCES
    medgemma = backend.medgemma
    assert isinstance(medgemma, InprocMedGemma) and isinstance(medgemma.runner, GgufMedGemmaRunner)


def test_without_a_models_path_no_runner_is_built():
    backend = make_backend("local", None, "cpu")
    for build in (backend.medsiglip_runner, backend.medgemma_runner):
        with pytest.raises(UsageError, match="needs the models path"):
            build()


def test_a_workers_backend_builds_no_local_runner():
    backend = make_backend("grpc://127.0.0.1:1", None, None)
    for build in (backend.medsiglip_runner, backend.medgemma_runner):
        with pytest.raises(UsageError, match="the models run on the worker"):
            build()
    backend.close()
