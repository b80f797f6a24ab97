"""Benchmark of the GPU worker (not a test): throughput and latency at several concurrencies.

``python -m medgemma_deploy.dev.bench.worker_bench`` starts a worker in this process on 127.0.0.1,
drives it from a separate client process (as apps are separate processes) through the real gRPC
client (``RemoteMedSigLIP`` / ``RemoteMedGemma``, one channel per client thread) at concurrency 1,
8, 32 and 64, and prints per level:

* Classify: images/s, p50/p95 latency per request;
* GenerateReport: generated tokens/s, reports/min, p50/p95 latency per report, p50 time to the
  first token;
* peak GPU memory during the level (CUDA) or the process's peak RSS (CPU);
* bytes on the wire: Classify request and response bytes per image, GenerateReport request bytes;

next to baselines measured in the same run on the same loaded model: MedSigLIP ``score`` one image
at a time, and plain transformers ``model.generate`` — one prompt at a time (what every app would
do with its own model), and all the level's prompts as one padded batch (static batching, no
streaming, nobody can join).

``--wire-sizes`` prints instead the message sizes of whole studies (a 3,000 x 3,000 CR, a 4,280 x 3,520
DX, an 85-slice CT) as the client builds them for a MedSigLIP-448 / MedGemma worker (no model needed:
the messages are built from the real code paths and measured with ``ByteSize()``).

Models: the tiny random test models (default; CPU is fine), ``--models ROOT``, or ``--full-size``
(random weights with the real MedSigLIP-448 and MedGemma-4B/27B shapes; needs a GPU). Random
models may emit an end-of-turn token at any step, so every report (worker and baselines) runs to
``--new-tokens`` and throughput compares like with like.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["main", "run_benchmark"]

logger = logging.getLogger(__name__)

LEVELS = (1, 8, 32, 64)


def run_benchmark(
    models: dict[str, Path],
    *,
    levels: Sequence[int] = LEVELS,
    new_tokens: int = 32,
    image_shape: tuple[int, int] = (512, 512),
    classify_requests_per_client: int = 16,
    device: str | None = None,
    baselines: bool = True,
) -> list[dict[str, Any]]:
    """Measure every level; return one row of figures per level."""
    from medgemma_deploy.worker.config import WorkerConfig
    from medgemma_deploy.worker.edge.server import WorkerServer

    top = max(levels)
    config = WorkerConfig(
        listen="127.0.0.1:0",
        medsiglip=models["medsiglip"],
        medgemma=models["medgemma"],
        device=device,
        report_max_running=top,
        report_max_waiting=4 * top,
        classify_max_queued_images=16 * top * classify_requests_per_client,
        max_new_tokens=max(2048, new_tokens),
        max_concurrent_rpcs=4 * top + 16,
    )
    grey, rgb = _images(image_shape)
    rows = []
    spawn = multiprocessing.get_context("spawn")
    with WorkerServer(config) as server, ProcessPoolExecutor(1, mp_context=spawn) as clients:
        server.report_service().scheduler.eos_token_ids = frozenset()  # every report runs to new_tokens
        for level in levels:
            row: dict[str, Any] = {"concurrency": level}
            _reset_peak_memory()
            row.update(
                _classify_level(clients, server.address, level, image_shape, classify_requests_per_client)
            )
            row.update(_report_level(clients, server.address, level, image_shape, new_tokens))
            row["peak_memory_gb"] = _peak_memory_gb()
            if baselines:
                row.update(
                    _baselines(server, level, grey, rgb, new_tokens, level * classify_requests_per_client)
                )
            logger.info("level %d: %s", level, json.dumps(row))
            rows.append(row)
    return rows


def _classify_level(
    pool: Executor, address: str, level: int, image_shape: tuple[int, int], per_client: int
) -> dict:
    run = pool.submit(_run_clients, address, "classify", level, per_client, image_shape, 0).result()
    latencies, seconds = run["latencies"], run["seconds"]
    sent, received, images = (sum(column) for column in zip(*run["wire"], strict=True))
    return {
        "classify_request_bytes_per_image": sent / images,
        "classify_response_bytes_per_image": received / images,
        "classify_images_per_s": level * per_client / seconds,
        "classify_p50_ms": 1000 * _percentile(latencies, 50),
        "classify_p95_ms": 1000 * _percentile(latencies, 95),
    }


def _report_level(
    pool: Executor, address: str, level: int, image_shape: tuple[int, int], new_tokens: int
) -> dict:
    run = pool.submit(_run_clients, address, "report", level, 1, image_shape, new_tokens).result()
    latencies, seconds, first_token = run["latencies"], run["seconds"], run["first_token"]
    return {
        "report_request_bytes": max(sent for sent, _, _ in run["wire"]),
        "report_tokens_per_s": level * new_tokens / seconds,
        "reports_per_min": 60 * level / seconds,
        "report_p50_s": _percentile(latencies, 50),
        "report_p95_s": _percentile(latencies, 95),
        "first_token_p50_s": _percentile(first_token, 50) if first_token else float("nan"),
    }


def _run_clients(
    address: str, kind: str, level: int, per_client: int, image_shape: tuple[int, int], new_tokens: int
) -> dict[str, Any]:
    """In a client process of its own (as apps are): ``level`` threads, one channel each, started together."""
    from medgemma_deploy.backends.local import make_backend
    from medgemma_deploy.operators.medsiglip.labels import load_label_sets

    grey, rgb = _images(image_shape)
    label_set = load_label_sets()[0]
    request = _report_request(rgb, new_tokens) if kind == "report" else None
    backends = [make_backend(f"grpc://{address}", None, None) for _ in range(level)]
    models = [b.medsiglip.load() if kind == "classify" else b.medgemma.load() for b in backends]
    barrier = threading.Barrier(level + 1)
    latencies: list[float] = []
    first_token: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    wire: list[tuple[int, int, int]] = []  # (request bytes, response bytes, images) per call
    for model in models:
        _record_wire(model.client, wire, lock)

    def call(model: Any) -> None:
        if kind == "classify":
            model.score([grey], label_set)
            return
        started, seen = time.perf_counter(), []

        def on_token(_: str) -> None:
            if not seen:
                seen.append(True)
                with lock:
                    first_token.append(time.perf_counter() - started)

        model.generate(request, on_token=on_token)

    def client(model: Any) -> None:
        # Classify: one untimed call first: the channel connects and the label set is registered,
        # which would otherwise be billed to the first of a few timed requests (a report is long).
        if kind == "classify":
            try:
                call(model)
            except Exception as exc:  # reported after the level, like a failed timed call
                errors.append(exc)
        barrier.wait()
        if errors:
            return
        for _ in range(per_client):
            started = time.perf_counter()
            try:
                call(model)
            except Exception as exc:  # reported after the level; the other clients go on
                errors.append(exc)
                return
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(model,)) for model in models]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    for backend in backends:
        backend.close()
    if errors:
        raise RuntimeError(f"{len(errors)} of {level} {kind} clients failed; first: {errors[0]!r}")
    return {"latencies": latencies, "seconds": seconds, "first_token": first_token, "wire": wire}


def _record_wire(client: Any, wire: list[tuple[int, int, int]], lock: threading.Lock) -> None:
    """Make ``client`` note the bytes of every message it sends and receives."""
    call, stream_report = client.call, client.stream_report

    def recording_call(method: str, request: Any) -> Any:
        response = call(method, request)
        with lock:
            wire.append((request.ByteSize(), response.ByteSize(), len(getattr(request, "images", ()))))
        return response

    def recording_stream(request: Any) -> Any:
        with lock:
            wire.append((request.ByteSize(), 0, 0))
        return stream_report(request)

    client.call, client.stream_report = recording_call, recording_stream


#: The studies of protos/README.md's size table: (name, modality, rows, columns, images).
WIRE_STUDIES = (
    ("CR 3,000 x 3,000", "CR", 3000, 3000, 1),
    ("DX 4,280 x 3,520", "DX", 4280, 3520, 1),
    ("CT 85 x 512 x 512", "CT", 512, 512, 85),
)


def wire_sizes(
    *,
    input_size: int = 448,
    patch_grid: int = 32,
    embedding_dim: int = 1152,
    n_findings: int = 13,
    relevance_keys: int = 3,
    max_message_bytes: int = 128 * 1024 * 1024,
) -> list[dict[str, Any]]:
    """Bytes of the messages of each study in :data:`WIRE_STUDIES`, as the client builds them.

    Classify: images at the model input (``to_model_input``, float32 grey), split into requests
    under ``max_message_bytes`` like ``WorkerClient.chunks``; responses with probabilities,
    embeddings and ``relevance_keys`` patch grids per image. GenerateReport: the prompt images as
    the report pipeline renders them (8-bit RGB at the source size; a CT prompt holds up to 85
    slices). Also the bytes the pre-issue-11 wire needed (full-size float32 images and maps).
    """
    from medgemma_deploy._proto import worker_pb2 as pb
    from medgemma_deploy.backends import wire
    from medgemma_deploy.operators.medsiglip.preprocess import MedSigLIPPreprocessor

    resize = MedSigLIPPreprocessor.from_resize((input_size, input_size), "bilinear", True)
    budget = int(0.9 * max_message_bytes)
    rows = []
    for name, _, height, width, n_images in WIRE_STUDIES:
        image = np.linspace(0.0, 1.0, height * width, dtype=np.float32).reshape(height, width)
        one = wire.image_to_proto(resize.to_model_input(image)[0])
        per_request = max(1, min(n_images, budget // len(one.data)))
        requests = -(-n_images // per_request)
        request = pb.ClassifyRequest(images=[one] * per_request, images_at_model_input=True)
        response = pb.ClassifyResponse(
            probabilities=wire.array_to_proto(np.zeros((per_request, n_findings), np.float32)),
            embeddings=wire.array_to_proto(np.zeros((per_request, embedding_dim), np.float32)),
            relevance_grids=[
                wire.array_to_proto(np.zeros((relevance_keys, patch_grid, patch_grid), np.float32))
            ]
            * per_request,
        )
        rgb = pb.Array(shape=[height, width, 3], dtype=pb.DTYPE_UINT8, data=bytes(height * width * 3))
        prompt = pb.GenerateReportRequest(
            messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(image=rgb)] * n_images)]
        )
        rows.append(
            {
                "study": name,
                "classify_requests": requests,
                "classify_request_bytes": request.ByteSize(),
                "classify_response_bytes": response.ByteSize(),
                "classify_request_bytes_per_image": request.ByteSize() / per_request,
                "full_size_float32_bytes": n_images * height * width * 4 * (1 + relevance_keys),
                "report_request_bytes": prompt.ByteSize(),
            }
        )
    return rows


def _images(image_shape: tuple[int, int]) -> tuple[np.ndarray, Image.Image]:
    rng = np.random.default_rng(0)
    grey = rng.random(image_shape, dtype=np.float32)
    rgb = Image.fromarray((rng.random((*image_shape, 3)) * 255).astype(np.uint8), "RGB")
    return grey, rgb


def _baselines(
    server: Any, level: int, image: np.ndarray, rgb: Image.Image, new_tokens: int, classify_calls: int
) -> dict[str, float]:
    """Plain in-process calls on the worker's own loaded models (the worker is idle meanwhile).

    Classify: as many one-image ``score`` calls as the worker level answered, after one untimed
    call, so both sides are timed warm over the same number of images.
    """
    import torch

    siglip = server.image_service().runner
    label_set = server.image_service().label_sets[0]
    siglip.score([image], label_set)
    started = time.perf_counter()
    for _ in range(classify_calls):
        siglip.score([image], label_set)
    classify_seconds = time.perf_counter() - started

    runner = server.report_service().runner
    model, processor = runner.model, runner.processor
    messages = _report_request(rgb, new_tokens).messages
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    single = _inputs(processor, [messages], model)
    _synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(level):
            model.generate(**single, **options)
    _synchronize()
    sequential_seconds = time.perf_counter() - started
    batch = _inputs(processor, [messages] * level, model)
    _synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(**batch, **options)
    _synchronize()
    batch_seconds = time.perf_counter() - started
    return {
        "baseline_classify_images_per_s": classify_calls / classify_seconds,
        "baseline_generate_1_at_a_time_tokens_per_s": level * new_tokens / sequential_seconds,
        "baseline_generate_static_batch_tokens_per_s": level * new_tokens / batch_seconds,
    }


def _inputs(processor: Any, chats: list[list[dict]], model: Any) -> Any:
    processor.tokenizer.padding_side = "left"
    inputs = processor.apply_chat_template(
        chats, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def _report_request(image: Image.Image, new_tokens: int) -> Any:
    from medgemma_deploy.domain import GenerationSettings, ReportRequest

    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe this X-ray"}],
        },
    ]
    return ReportRequest(
        source="benchmark",
        messages=messages,
        prompt_id="benchmark",
        prompt_version="1",
        settings=GenerationSettings(max_new_tokens=new_tokens),
        frames=[],
        modality="CR",
    )


def _percentile(values: Sequence[float], q: int) -> float:
    if len(values) == 1:
        return float(values[0])
    return float(statistics.quantiles(values, n=100, method="inclusive")[q - 1])


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux: process peak RSS


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def format_table(rows: Sequence[dict[str, Any]], memory_label: str) -> str:
    """The figures as a Markdown table."""
    columns = [
        ("concurrency", "clients", "{:d}"),
        ("classify_images_per_s", "images/s", "{:.1f}"),
        ("baseline_classify_images_per_s", "images/s 1-by-1", "{:.1f}"),
        ("classify_p50_ms", "classify p50 ms", "{:.0f}"),
        ("classify_p95_ms", "classify p95 ms", "{:.0f}"),
        ("report_tokens_per_s", "worker tok/s", "{:.1f}"),
        ("baseline_generate_1_at_a_time_tokens_per_s", "generate 1-by-1 tok/s", "{:.1f}"),
        ("baseline_generate_static_batch_tokens_per_s", "generate batch tok/s", "{:.1f}"),
        ("reports_per_min", "reports/min", "{:.1f}"),
        ("report_p50_s", "report p50 s", "{:.2f}"),
        ("report_p95_s", "report p95 s", "{:.2f}"),
        ("first_token_p50_s", "first token p50 s", "{:.2f}"),
        ("peak_memory_gb", memory_label, "{:.2f}"),
        ("classify_request_bytes_per_image", "wire B/image in", "{:.0f}"),
        ("classify_response_bytes_per_image", "wire B/image out", "{:.0f}"),
        ("report_request_bytes", "report request B", "{:d}"),
    ]
    present = [c for c in columns if any(c[0] in row for row in rows)]
    lines = ["| " + " | ".join(c[1] for c in present) + " |", "|" + "---|" * len(present)]
    for row in rows:
        lines.append(
            "| " + " | ".join(c[2].format(row[c[0]]) if c[0] in row else "–" for c in present) + " |"
        )
    return "\n".join(lines)


def format_wire_sizes(rows: Sequence[dict[str, Any]]) -> str:
    """:func:`wire_sizes` as a Markdown table (bytes in MB = 10^6)."""
    lines = [
        "| study | Classify requests | bytes per request | bytes per response | bytes per image "
        "| full-size float32 (before) | GenerateReport request |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['study']} | {row['classify_requests']} | {row['classify_request_bytes'] / 1e6:.2f} MB "
            f"| {row['classify_response_bytes'] / 1e6:.3f} MB "
            f"| {row['classify_request_bytes_per_image']:,.0f} "
            f"| {row['full_size_float32_bytes'] / 1e6:.1f} MB | {row['report_request_bytes'] / 1e6:.1f} MB |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medgemma_deploy.dev.bench.worker_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--models", type=Path, help="models root (medsiglip/, medgemma/); default: tiny test models"
    )
    parser.add_argument(
        "--full-size", nargs="?", const="4b", choices=["4b", "27b"], help="real shapes, random weights (GPU)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--new-tokens", type=int, help="tokens per report (default 32 tiny, 128 full size)")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("ROWS", "COLS"))
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument(
        "--wire-sizes", action="store_true", help="print the message sizes of real-size studies and exit"
    )
    args = parser.parse_args(argv)
    if args.wire_sizes:
        print(format_wire_sizes(wire_sizes()))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "PIL", "httpx", "medgemma_deploy.operators"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    with tempfile.TemporaryDirectory(prefix="worker-bench-") as scratch:
        if args.full_size:
            if not torch.cuda.is_available() and args.device != "cpu":
                print("--full-size needs a CUDA GPU (or --device cpu and a lot of patience)", file=sys.stderr)
                return 2
            from medgemma_deploy.dev.bench.full_size import make_full_size_models

            models = make_full_size_models(
                Path(scratch), variant=args.full_size, device=args.device or "cuda"
            )
        elif args.models:
            models = {"medsiglip": args.models / "medsiglip", "medgemma": args.models / "medgemma"}
        else:
            from medgemma_deploy.dev.testmodels import make_test_models

            models = make_test_models(Path(scratch))
        new_tokens = args.new_tokens or (128 if args.full_size else 32)
        image_shape = (
            tuple(args.image_size) if args.image_size else ((2500, 2048) if args.full_size else (256, 256))
        )
        rows = run_benchmark(
            models,
            levels=args.concurrency,
            new_tokens=new_tokens,
            image_shape=image_shape,  # type: ignore[arg-type]
            device=args.device,
            baselines=not args.no_baselines,
        )
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    what = (
        f"full-size {args.full_size}"
        if args.full_size
        else ("tiny random" if not args.models else str(args.models))
    )
    print(
        f"\nworker benchmark: {what} models on {device}; {new_tokens} new tokens per report; "
        f"images {image_shape[0]}x{image_shape[1]}\n"
    )
    print(format_table(rows, "peak GPU GB" if torch.cuda.is_available() else "peak RSS GB"))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "models": what, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
