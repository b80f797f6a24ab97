"""Which engine runs MedSigLIP's vision tower fastest on this CPU, and how far each is from float32.

The survey behind ``--precision`` (``docs/performance.md``, "MedSigLIP precision")::

    python -m medgemma_deploy.dev.bench.vision_backends -m MODEL_DIR --work /tmp/vision-onnx \\
        [--backends fp32,bf16,bf16-autocast,ort-fp32,ort-int8,ov-fp32,ov-bf16]

One process, batch 1, three random 448 x 448 inputs after one warm-up call; per backend the
seconds of each call and the cosine of its pooled embedding and patch tokens to torch float32.
``ort-*`` export the tower to ONNX (TorchScript exporter, opset 17) under ``--work`` and quantise it
with the recipe ``--precision int8`` ships (ONNX Runtime's dynamic int8, per channel, 7-bit
weights); ``ov-*`` compile that ONNX file with OpenVINO
(``pip install openvino``) at the stated inference precision. Needs the ``cpu-int8`` extra for
``ort-*``; a missing package fails that backend alone, named.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from medgemma_deploy.operators.medsiglip.onnx_vision import (
    VisionTowerGraph,
    export_float_graph,
    quantise_weights_int8,
)

__all__ = ["main"]


def _cosine(a: object, b: object) -> float:
    left = torch.as_tensor(np.asarray(a.float() if torch.is_tensor(a) else a)).float().flatten()
    right = torch.as_tensor(np.asarray(b.float() if torch.is_tensor(b) else b)).float().flatten()
    return float(torch.nn.functional.cosine_similarity(left, right, dim=0))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medgemma_deploy.dev.bench.vision_backends")
    parser.add_argument("-m", "--model", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="folder for the ONNX files")
    parser.add_argument("--backends", default="fp32,bf16,bf16-autocast,ort-fp32,ort-int8,ov-fp32,ov-bf16")
    args = parser.parse_args(argv)
    from transformers import SiglipModel

    torch.manual_seed(0)
    model = SiglipModel.from_pretrained(args.model, dtype=torch.float32).eval()
    tower = VisionTowerGraph(model.vision_model).eval()
    size = int(model.config.vision_config.image_size)
    inputs = [torch.rand(1, 3, size, size) * 2 - 1 for _ in range(3)]
    with torch.inference_mode():
        reference = tower(inputs[0])
    args.work.mkdir(parents=True, exist_ok=True)
    float_onnx, int8_onnx = args.work / "vision-fp32.onnx", args.work / "vision-int8.onnx"
    print(f"CPU threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
    print("| backend | setup + warm-up (s) | seconds per call | cosine pooled | cosine tokens |")
    print("|---|---:|---|---:|---:|")
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        started = time.perf_counter()
        try:
            run = _backend(backend, args.model, tower, inputs[0], float_onnx, int8_onnx)
            first = run(inputs[0])
            seconds = []
            for pixels in inputs:
                began = time.perf_counter()
                run(pixels)
                seconds.append(time.perf_counter() - began)
        except (ImportError, RuntimeError, ValueError) as exc:
            print(f"| {backend} | failed: {type(exc).__name__}: {exc} | | | |")
            continue
        setup = time.perf_counter() - started - sum(seconds)
        print(
            f"| {backend} | {setup:.1f} | {', '.join(f'{s:.2f}' for s in seconds)} | "
            f"{_cosine(first[0], reference[0]):.5f} | {_cosine(first[1], reference[1]):.5f} |",
            flush=True,
        )
    return 0


def _backend(
    name: str,
    model_dir: Path,
    tower: VisionTowerGraph,
    example: torch.Tensor,
    float_onnx: Path,
    int8_onnx: Path,
) -> Callable[[torch.Tensor], tuple]:
    if name == "fp32":
        return lambda x: _no_grad(tower, x)
    if name == "bf16":
        from transformers import SiglipModel

        half = VisionTowerGraph(
            SiglipModel.from_pretrained(model_dir, dtype=torch.bfloat16).eval().vision_model
        )
        return lambda x: _no_grad(half, x.bfloat16())
    if name == "bf16-autocast":

        def autocast(x: torch.Tensor) -> tuple:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _no_grad(tower, x)

        return autocast
    if name.startswith(("ort", "ov")) and not float_onnx.is_file():
        export_float_graph(tower, int(example.shape[-1]), float_onnx)
    if name == "ort-int8" and not int8_onnx.is_file():
        quantise_weights_int8(float_onnx, int8_onnx)  # what --precision int8 runs
    if name in ("ort-fp32", "ort-int8"):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        path = int8_onnx if name == "ort-int8" else float_onnx
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"pixel_values": x.numpy()})
    if name in ("ov-fp32", "ov-bf16"):
        import openvino

        hint = "f32" if name == "ov-fp32" else "bf16"
        compiled = openvino.Core().compile_model(
            str(float_onnx), "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        )
        return lambda x: list(compiled(x.numpy()).values())
    raise ValueError(f"unknown backend {name!r}")


def _no_grad(tower: torch.nn.Module, pixels: torch.Tensor) -> tuple:
    with torch.inference_mode():
        return tower(pixels)


if __name__ == "__main__":
    sys.exit(main())
