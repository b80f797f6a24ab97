"""MedGemma report benchmark: every way we can run a report, side by side, in one table.

``python -m medgemma_deploy.dev.bench.report_cpu [--full-size] [--device cpu|cuda] [--rows ...]``

Rows (each in a fresh subprocess, so that its peak resident memory is its own):

* ``model-card``: the recipe of Google's model card (``AutoModelForImageTextToText`` in bfloat16,
  ``generate(max_new_tokens=200, do_sample=False)``);
* ``cli``: our torch path at ``--precision auto`` (what ``medgemma-deploy report`` loads: the
  worker's decode core in process, ``InprocMedGemma``);
* ``bf16``, ``fp32``: our torch path at that precision;
* ``int8``, ``int4``: our llama.cpp runner (Q8_0 / Q4_0 GGUF, the ``lowbit`` extra);
* ``llama.cpp``: llama.cpp itself on the same Q4_0 file, no wrapper of ours: ``llama-bench`` when
  it is on PATH, else a bare decode loop over llama-cpp-python's C API (greedy sampling in C);
* ``floor``: the memory-bandwidth floor: measured read bandwidth ÷ bytes read per decoded token
  (every decoder weight, the tied embedding as LM head included), for 16, 8 and 4 bits.

Columns: image → first token (processor, vision tower and prefill of one image prompt), decode
tok/s at batch 1 (the same run) and at batch 4 (four text-only prompts decoded together, tokens of
all four per second), one report end to end (``--max-new-tokens``, default 200, prefill included),
and peak RSS of the row's process.

``--full-size`` builds (once, cached in ``--cache``) MedGemma-4B of the real shapes with random
weights (medgemma_deploy/dev/bench/full_size.py); its tokenizer is padded so every one of the 262,208
ids decodes to text, and its ``generation_config.json`` suppresses the few whitespace-only pieces,
so that greedy decoding of random weights never yields an empty report. Without it the tiny test
model runs (a smoke test of the benchmark itself, not a measurement). Random weights measure speed
and memory only; ``medgemma_deploy.dev.bench.compare_precisions`` compares report text on real weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main"]

ROWS = ("model-card", "cli", "bf16", "fp32", "int8", "int4", "llama.cpp", "floor")
_LLAMA_ROWS = ("int8", "int4", "llama.cpp")
#: The issue's reference image: a 1,955 x 1,841 CR, resized by the processor to 896 px.
_CR_SHAPE = (1955, 1841)
_BATCH = 4
_BATCH_NEW_TOKENS = 32
_BATCH_PROMPT = "Findings: the lungs are clear. Describe the heart, the mediastinum and the bones."


# -- inputs -----------------------------------------------------------------------------------


def _cr_request(max_new_tokens: int) -> Any:
    """Our report request for one synthetic CR of the reference size (our preprocessing)."""
    import pydicom

    from medgemma_deploy.dev.synthetic import write_demo_study
    from medgemma_deploy.domain import GenerationSettings, ImageFrame, Series
    from medgemma_deploy.operators.medgemma.prompts import PromptBook
    from medgemma_deploy.operators.medgemma.request import build_report_request

    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"report-cpu-bench-{os.getpid()}"
    (cr_path,) = [path for path in write_demo_study(scratch) if "CR" in pydicom.dcmread(path).Modality][:1]
    dataset = pydicom.dcmread(cr_path)
    rng = np.random.default_rng(0)
    rows, columns = _CR_SHAPE
    display = np.clip(rng.normal(0.5, 0.2, (rows, columns)), 0.0, 1.0).astype(np.float32)
    frame = ImageFrame(cr_path, dataset, 1, display * 4095.0, display, "synthetic benchmark CR")
    series = Series(str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID), "CR", "CHEST", [frame])
    shutil.rmtree(scratch, ignore_errors=True)
    return build_report_request(
        series, PromptBook.load(), settings=GenerationSettings(max_new_tokens=max_new_tokens)
    )


def _text_request(max_new_tokens: int) -> Any:
    from medgemma_deploy.domain import GenerationSettings, ReportRequest

    messages = [{"role": "user", "content": [{"type": "text", "text": _BATCH_PROMPT}]}]
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    return ReportRequest.for_chat(messages, settings, source="benchmark", prompt_id="benchmark-text")


# -- rows (run in a subprocess each) ----------------------------------------------------------


def _row_torch(model_dir: Path, precision: str, device: str, max_new_tokens: int, batch: bool) -> dict:
    """Our torch path (``--backend local``: the worker's decode core in process)."""
    from medgemma_deploy.backends.local import make_backend

    backend = make_backend("local", model_dir, device, precision=precision)
    medgemma = backend.medgemma
    figures = _row_ours(medgemma, max_new_tokens, batch)
    figures["dtype"] = str(medgemma.runner.model.dtype).removeprefix("torch.")
    backend.close()
    return figures


def _row_ours(medgemma: Any, max_new_tokens: int, batch: bool) -> dict:
    """One of our engines behind the worker's decode core in process (``InprocMedGemma``): image →
    first token and decode from ``on_token``; batch 4 as four threads drafting at once (decoded
    together), its tokens after each one's first over the slowest one's decode time."""
    from concurrent.futures import ThreadPoolExecutor

    medgemma.load()
    request = _cr_request(max_new_tokens)
    first: list[float] = []
    started = time.perf_counter()
    result = medgemma.generate(
        request, on_token=lambda _: first.append(time.perf_counter()) if not first else None
    )
    total = time.perf_counter() - started
    figures = _figures(result.n_generated_tokens, total, (first[0] - started) if first else total)
    figures["text_chars"] = len(result.text.strip())
    if batch:
        requests = [_text_request(_BATCH_NEW_TOKENS) for _ in range(_BATCH)]
        medgemma.service.scheduler.eos_token_ids = frozenset()  # each runs to _BATCH_NEW_TOKENS
        medgemma.generate(_text_request(2))  # warm
        with ThreadPoolExecutor(_BATCH) as pool:
            results = list(pool.map(medgemma.generate, requests))
        decode = [r.seconds - r.first_token_seconds for r in results]
        figures["batch4_tok_s"] = sum(r.n_generated_tokens - 1 for r in results) / max(decode)
    return figures


def _row_model_card(model_dir: Path, device: str, max_new_tokens: int) -> dict:
    """The model card's recipe, verbatim but for the messages (ours, so the prompts are equal)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.generation.streamers import BaseStreamer

    # The card passes device_map="auto", which needs accelerate (not a dependency of ours); on one
    # device that is the same as moving the model there.
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    processor = AutoProcessor.from_pretrained(model_dir)
    messages = _cr_request(max_new_tokens).messages

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.at = 0.0

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    streamer = FirstToken()
    started = time.perf_counter()
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device, dtype=torch.bfloat16)
    input_len = inputs["input_ids"].shape[-1]
    with torch.inference_mode():
        generation = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer
        )
    total = time.perf_counter() - started
    figures = _figures(
        int(generation.shape[-1] - input_len), total, (streamer.at or time.perf_counter()) - started
    )
    figures["dtype"] = "bfloat16"
    return figures


def _row_llama(model_dir: Path, precision: str, max_new_tokens: int, batch: bool) -> dict:
    """Our llama.cpp runner behind the same decode core, reserving a sequence per batched report."""
    from medgemma_deploy.backends.inproc import InprocMedGemma
    from medgemma_deploy.operators.medgemma.gguf_runner import GgufMedGemmaRunner

    runner = GgufMedGemmaRunner(model_dir, precision=precision, n_parallel=_BATCH if batch else 1)
    with InprocMedGemma(runner) as medgemma:
        figures = _row_ours(medgemma, max_new_tokens, batch)
    assert runner.weights is not None
    figures["weights"] = (
        f"{runner.weights.text.name} ({runner.weights.text.stat().st_size / 2**30:.2f} GiB), "
        f"vision on torch {runner.vision_dtype}"
    )
    return figures


def _row_bare_llama(model_dir: Path, max_new_tokens: int) -> dict:
    """llama.cpp on our Q4_0 file with nothing of ours around it: llama-bench, or a C-side loop."""
    from medgemma_deploy.operators.medgemma.gguf_weights import gguf_weights

    weights = gguf_weights(model_dir, "q4_0", mmproj=False)
    threads = len(os.sched_getaffinity(0))
    bench = shutil.which("llama-bench")
    if bench:
        command = [bench, "-m", str(weights.text), "-t", str(threads), "-p", "0", "-n", "64", "-o", "json"]
        runs = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        return {"decode_tok_s": float(runs[0]["avg_ts"]), "how": "llama-bench -p 0 -n 64"}
    from medgemma_deploy.operators.medgemma.gguf_runner import (
        extra_buffer_types_usable,
        prefer_passive_openmp,
    )

    prefer_passive_openmp()  # as the runner, before llama.cpp loads its OpenMP runtime
    import llama_cpp
    import llama_cpp._logger as llama_logger

    llama_logger.set_verbose(False)
    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    # As the runner: repacked weights (read, not mapped), unless this build's AMX kernels would run.
    model_params.use_extra_bufts = extra_buffer_types_usable()
    if model_params.use_extra_bufts:
        model_params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE
    model = llama_cpp.llama_model_load_from_file(str(weights.text).encode(), model_params)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_threads, params.n_threads_batch, params.no_perf = 1024, threads, threads, True
    context = llama_cpp.llama_init_from_model(model, params)
    sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    prompt = [2, *(300 + 7 * index for index in range(40))]  # 41 tokens, as the batch-4 prompts
    prompt = [token % n_vocab for token in prompt]
    tokens = (llama_cpp.llama_token * len(prompt))(*prompt)
    if llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(tokens, len(prompt))) != 0:
        raise RuntimeError("llama.cpp could not decode the prompt")
    one = (llama_cpp.llama_token * 1)()
    started = time.perf_counter()
    for _ in range(max_new_tokens):
        one[0] = llama_cpp.llama_sampler_sample(sampler, context, -1)
        llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(one, 1))
    seconds = time.perf_counter() - started
    return {"decode_tok_s": max_new_tokens / seconds, "how": "bare llama_decode loop, greedy sampler in C"}


def _row_floor(model_dir: Path) -> dict:
    """Measured read bandwidth and the decode rate it allows at 16, 8 and 4 bits per weight."""
    bandwidth = _read_bandwidth()
    decoder_parameters = _decoder_parameters(model_dir)
    figures: dict[str, Any] = {"bandwidth_gb_s": bandwidth / 1e9, "decoder_parameters": decoder_parameters}
    from medgemma_deploy.operators.medgemma.gguf_weights import WEIGHT_TYPES

    cache = model_dir / "gguf"
    for label, bytes_per_token in (
        ("bf16", 2 * decoder_parameters),
        ("q8_0", _file_size(cache / f"text-{WEIGHT_TYPES['q8_0'][0]}.gguf") or 34 / 32 * decoder_parameters),
        ("q4_0", _file_size(cache / f"text-{WEIGHT_TYPES['q4_0'][0]}.gguf") or 18 / 32 * decoder_parameters),
    ):
        figures[f"floor_{label}_tok_s"] = bandwidth / bytes_per_token
    return figures


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _decoder_parameters(model_dir: Path) -> int:
    """Parameters of the text decoder (embedding included: Gemma reads it again as its LM head)."""
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, "np") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a dict)
                if "language_model" in name:
                    total += int(np.prod(weights.get_slice(name).get_shape()))
    return total


def _read_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second summing a large array with one thread per core (numpy releases the GIL)."""
    threads = len(os.sched_getaffinity(0))
    parts = [np.ones(int(gigabytes * 1e9 / 8 / threads), dtype=np.float64) for _ in range(threads)]
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.sum, args=(part,)) for part in parts]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, sum(part.nbytes for part in parts) / (time.perf_counter() - started))
    return best


def _figures(n_tokens: int, total: float, first: float) -> dict:
    decode = total - first
    return {
        "first_token_s": first,
        "decode_tok_s": (n_tokens - 1) / decode if n_tokens > 1 and decode > 0 else 0.0,
        "report_s": total,
        "new_tokens": n_tokens,
    }


def _run_row(name: str, model_dir: Path, device: str, max_new_tokens: int, batch: bool) -> dict:
    if name == "model-card":
        return _row_model_card(model_dir, device, max_new_tokens)
    if name in ("cli", "bf16", "fp32"):
        return _row_torch(model_dir, "auto" if name == "cli" else name, device, max_new_tokens, batch)
    if name in ("int8", "int4"):
        return _row_llama(model_dir, name, max_new_tokens, batch)
    if name == "llama.cpp":
        return _row_bare_llama(model_dir, 64)
    if name == "floor":
        return _row_floor(model_dir)
    raise ValueError(f"unknown row {name!r}; rows are {', '.join(ROWS)}")


# -- the parent: one subprocess per row, one table --------------------------------------------


def _measure(name: str, model_dir: Path, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        "-m",
        "medgemma_deploy.dev.bench.report_cpu",
        "--row",
        name,
        "--model",
        str(model_dir),
    ]
    command += ["--device", args.device, "--max-new-tokens", str(args.max_new_tokens)]
    command += [] if args.batch else ["--no-batch"]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        lines_err = completed.stderr.strip().splitlines() or ["no output"]
        failures = [line for line in lines_err if "Error" in line or "error:" in line or "Fatal" in line]
        reason = (failures or lines_err)[-1] + f" (exit {completed.returncode})"
        return {"error": reason[:160]}
    figures = json.loads(lines[-1])
    return figures


def _cell(figures: dict, key: str, digits: int = 1) -> str:
    value = figures.get(key)
    return "—" if value is None else f"{value:.{digits}f}"


def _table(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"| path | image → first token (s) | decode tok/s, batch 1 | decode tok/s, batch 4 (total) "
        f"| {args.max_new_tokens}-token report (s) | peak RSS (GiB) | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, figures in results.items():
        if "error" in figures:
            lines.append(f"| {name} | | | | | | not run: {figures['error']} |")
            continue
        if name == "floor":
            notes = (
                f"read bandwidth {figures['bandwidth_gb_s']:.1f} GB/s; "
                f"{figures['decoder_parameters'] / 1e9:.2f} B decoder parameters"
            )
            floors = " / ".join(f"{figures[f'floor_{k}_tok_s']:.1f}" for k in ("bf16", "q8_0", "q4_0"))
            lines.append(f"| bandwidth floor, 16 / 8 / 4-bit weights | | {floors} | | | | {notes} |")
            continue
        notes = ", ".join(
            str(figures[key]) for key in ("dtype", "weights", "how") if figures.get(key) not in (None, "")
        )
        if figures.get("new_tokens") is not None:
            notes += f"; {figures['new_tokens']} tokens"
        lines.append(
            f"| {name} | {_cell(figures, 'first_token_s')} | {_cell(figures, 'decode_tok_s', 2)} "
            f"| {_cell(figures, 'batch4_tok_s', 2)} | {_cell(figures, 'report_s')} "
            f"| {_cell(figures, 'peak_rss_gib', 2)} | {notes} |"
        )
    return "\n".join(lines)


def _full_size_model(cache: Path) -> Path:
    from medgemma_deploy.dev.bench.full_size import make_full_size_models

    model_dir = cache / "medgemma"
    if not (model_dir / "model.safetensors").is_file():
        make_full_size_models(cache, device="cpu", kinds=("medgemma",))
    _suppress_whitespace_pieces(model_dir)
    return model_dir


def _suppress_whitespace_pieces(model_dir: Path) -> None:
    """Keep greedy decoding of random weights off whitespace-only pieces (an empty report is refused)."""
    from transformers import AutoTokenizer

    config_file = model_dir / "generation_config.json"
    config = json.loads(config_file.read_text())
    if config.get("suppress_tokens"):
        return
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blank = [
        index
        for piece, index in tokenizer.get_vocab().items()
        if index not in tokenizer.all_special_ids and not tokenizer.decode([index]).strip()
    ]
    config["suppress_tokens"] = sorted(blank)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def _peak_rss_gib() -> float:
    """This process's own peak resident set, GiB: ``VmHWM`` of ``/proc/self/status`` on Linux.

    Not ``getrusage``: Linux carries the ``ru_maxrss`` of the process that spawned a row across
    ``exec`` (the old address space's high-water mark is kept), so a row started by a large parent
    (a test session of 8 GiB) would report the parent's peak instead of its own.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**30  # bytes on macOS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MedGemma report benchmark (one table)")
    parser.add_argument(
        "--full-size", action="store_true", help="MedGemma-4B of the real shapes, random weights"
    )
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache" / "medgemma-deploy" / "medgemma-4b-random"
    )
    parser.add_argument("--model", type=Path, help="a MedGemma directory to measure instead")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--no-batch", dest="batch", action="store_false", help="skip the batch-4 column")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.row:
        figures = _run_row(args.row, args.model, args.device, args.max_new_tokens, args.batch)
        figures["peak_rss_gib"] = _peak_rss_gib()
        print(json.dumps(figures))
        return 0

    if args.model:
        model_dir = args.model
    elif args.full_size:
        model_dir = _full_size_model(args.cache)
    else:
        from medgemma_deploy.dev.testmodels.gemma import make_test_medgemma

        model_dir = make_test_medgemma(args.cache.parent / "tiny-medgemma", seed=0)
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; rows are {', '.join(ROWS)}")
    results: dict[str, dict] = {}
    for name in rows:
        if args.device != "cpu" and name in _LLAMA_ROWS:
            results[name] = {"error": "llama.cpp rows run on the CPU build only"}
            continue
        started = time.perf_counter()
        results[name] = _measure(name, model_dir, args)
        print(f"{name}: {time.perf_counter() - started:.0f} s {json.dumps(results[name])}", file=sys.stderr)
    print(f"model: {model_dir}; device {args.device}; load average {os.getloadavg()}")
    print(_table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
