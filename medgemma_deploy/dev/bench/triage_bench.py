"""Benchmark of triage in the listener (not a test): how soon an urgent study is notified and reported.

``python -m medgemma_deploy.dev.bench.triage_bench`` runs the real listener in this process with the
``study`` pipeline (MedSigLIP findings + MedGemma draft report, the tiny random models on CPU)
twice, with ``--triage-queue on`` and ``off``. Each time it queues ``--routine`` CT studies (no
triage rule fires on them), then sends one chest CR whose label set has a STAT rule that always
fires, and measures, from the moment the CR's last instance was acknowledged:

* the time to its HL7 ORU^R01 at a real MLLP receiver (hl7apy's server on 127.0.0.1);
* the time to its first SR at a real C-STORE SCP (pynetdicom, the stand-in PACS);

and the routine throughput: routine studies per minute, from the first routine instance sent to
the last routine SR received. With triage on, every queued study is classified before any report,
so the CR is found early and its report and delivery go first; with triage off the queue is first
come, first served and the ORU goes out when the CR's turn comes. The issue's targets: urgent time
to notification at most 10 % of the no-triage time, routine throughput within 5 %.

The numbers depend on the machine's load: the table prints the load average before each run.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydicom.uid import ExplicitVRLittleEndian

import medgemma_deploy.config
from medgemma_deploy.dev.bench.markdown import markdown_table

__all__ = ["BenchResult", "main", "run_mode", "write_triage_label_sets"]

logger = logging.getLogger(__name__)

_LABELS = Path(medgemma_deploy.config.__file__).parent / "labels"
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


def write_triage_label_sets(folder: Path, *, threshold: float = 0.001) -> list[Path]:
    """The packaged chest and CT label sets with test triage rules, for benchmarks and tests.

    The chest set (CR/DX) gets a STAT rule on every finding at ``threshold`` (so a chest film
    always triggers it, whatever the random model scores); the CT set gets no rules (a CT study
    stays routine). These thresholds are for measuring the machinery, never for patients.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chest = yaml.safe_load((_LABELS / "chest_xray.yaml").read_text(encoding="utf-8"))
    chest["triage"] = [
        {"finding": finding["key"], "threshold": threshold, "priority": "STAT"}
        for finding in chest["findings"]
    ]
    ct = yaml.safe_load((_LABELS / "ct.yaml").read_text(encoding="utf-8"))
    ct.pop("triage", None)
    paths = [folder / "chest_xray.yaml", folder / "ct.yaml"]
    for path, document in zip(paths, (chest, ct), strict=True):
        path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return paths


# -- the peers: a PACS and an interface engine --------------------------------------------------


class _Pacs:
    """A C-STORE SCP that records when each study's first SR arrived (pynetdicom)."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.first_sr: dict[str, float] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.port = _free_port()
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: Any) -> int:
        arrived = time.monotonic()
        dataset = event.dataset
        if str(dataset.SOPClassUID).startswith(_SR_PREFIX):
            with self._lock:
                self.first_sr.setdefault(str(dataset.StudyInstanceUID), arrived)
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


class _InterfaceEngine:
    """hl7apy's MLLP server acknowledging AA and recording when each control id first arrived."""

    def __init__(self) -> None:
        from hl7apy.mllp import AbstractHandler, MLLPServer

        arrivals: dict[str, float] = {}
        self.arrivals = arrivals

        class Handler(AbstractHandler):
            def reply(self) -> str:
                from hl7apy.core import Message
                from hl7apy.parser import parse_message

                from medgemma_deploy.listener.mllp import frame

                incoming = parse_message(self.incoming_message)
                control_id = incoming.msh.msh_10.to_er7()
                arrivals.setdefault(control_id, time.monotonic())
                ack = Message("ACK", version="2.5.1")
                ack.msh.msh_9, ack.msh.msh_10, ack.msh.msh_11 = "ACK^R01^ACK", "ACK1", "P"
                ack.msa.msa_1, ack.msa.msa_2 = "AA", control_id
                return frame(ack.to_er7()).decode("utf-8")

        self._server = MLLPServer("127.0.0.1", 0, {"ORU^R01^ORU_R01": (Handler,)}, timeout=10)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _send(port: int, files: Sequence[Path]) -> None:
    """C-STORE ``files`` on one association (pynetdicom); raises if any is not stored."""
    import pydicom
    from pynetdicom import AE

    ae = AE(ae_title="BENCH")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for sop_class in {str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files}:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDGEMMA")
    if not assoc.is_established:
        raise RuntimeError(f"127.0.0.1:{port}: the listener refused the association")
    try:
        for path in files:
            status = assoc.send_c_store(path)
            if int(getattr(status, "Status", -1)) != 0:
                raise RuntimeError(f"{path}: not stored by the listener")
    finally:
        assoc.release()


# -- one run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchResult:
    triage_queue: bool
    n_routine: int
    to_oru_s: float | None
    to_sr_s: float
    routine_per_min: float
    load_average: tuple[float, float, float]


def run_mode(
    models_root: Path,
    work: Path,
    *,
    triage_queue: bool,
    routine_files: Sequence[Path],
    n_routine: int,
    urgent_files: Sequence[Path],
    label_files: Sequence[Path],
    new_tokens: int,
    timeout_s: float,
) -> BenchResult:
    """One listener run (see the module docstring); returns the measured times."""
    import pydicom

    from medgemma_deploy.listener.delivery import DicomNode
    from medgemma_deploy.listener.hl7 import message_control_id
    from medgemma_deploy.listener.mllp import Hl7Endpoint
    from medgemma_deploy.listener.notify import Hl7Settings
    from medgemma_deploy.listener.pipelines import PipelineOptions
    from medgemma_deploy.listener.service import Listener, ListenerConfig
    from medgemma_deploy.settings import resolve_settings

    load = os.getloadavg()
    pacs, engine = _Pacs(), _InterfaceEngine()
    settings = resolve_settings(
        {"labels": list(label_files), "max_new_tokens": new_tokens, "device": "cpu"}, environ={}
    )
    config = ListenerConfig(
        ae_title="MEDGEMMA",
        spool=work / "spool",
        host="127.0.0.1",
        port=_free_port(),
        pipeline="study",
        pipeline_options=PipelineOptions(models_path=models_root, settings=settings),
        destinations=(DicomNode("PACS", "127.0.0.1", pacs.port),),
        quiet_s=1.0,
        retention_s=None,
        drain_s=5.0,
        hl7=Hl7Settings(endpoint=Hl7Endpoint("127.0.0.1", engine.port, timeout_s=10)),
        triage_queue=triage_queue,
    )
    listener = Listener(config)
    listener.start()
    try:
        routine_studies = {
            str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in routine_files
        }
        started = time.monotonic()
        _send(listener.port, routine_files)
        store = listener.store
        _wait(lambda: store.counts_by_state()["received"] == 0, timeout_s, "routine studies queued")
        _send(listener.port, urgent_files)
        last_instance = time.monotonic()
        urgent_study = str(pydicom.dcmread(urgent_files[0], stop_before_pixels=True).StudyInstanceUID)
        control_id = message_control_id(urgent_study, 1)
        _wait(
            lambda: control_id in engine.arrivals and urgent_study in pacs.first_sr, timeout_s, "urgent study"
        )
        _wait(lambda: routine_studies <= set(pacs.first_sr), timeout_s, "every routine study in the PACS")
        last_routine = max(pacs.first_sr[study] for study in routine_studies)
        return BenchResult(
            triage_queue=triage_queue,
            n_routine=n_routine,
            to_oru_s=engine.arrivals[control_id] - last_instance,
            to_sr_s=pacs.first_sr[urgent_study] - last_instance,
            routine_per_min=60.0 * n_routine / (last_routine - started),
            load_average=load,
        )
    finally:
        listener.stop(drain_s=5.0)
        pacs.stop()
        engine.stop()


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"triage bench: timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def format_table(results: Sequence[BenchResult]) -> str:
    header = (
        "triage queue | routine studies | last instance → ORU (s) | last instance → SR in PACS (s) "
        "| routine throughput (studies/min) | load average (1/5/15 min) before the run"
    )
    cells = [
        (
            "on" if r.triage_queue else "off",
            r.n_routine,
            "-" if r.to_oru_s is None else f"{r.to_oru_s:.2f}",
            f"{r.to_sr_s:.2f}",
            f"{r.routine_per_min:.1f}",
            "/".join(f"{value:.2f}" for value in r.load_average),
        )
        for r in results
    ]
    lines = [markdown_table(header, "lrrrrl", cells)]
    by_mode = {r.triage_queue: r for r in results}
    if True in by_mode and False in by_mode:
        on, off = by_mode[True], by_mode[False]
        if on.to_oru_s is not None and off.to_oru_s:
            lines.append(
                f"\nurgent time to ORU, on/off: {100 * on.to_oru_s / off.to_oru_s:.1f} % (target <= 10 %)"
            )
        lines.append(f"urgent time to SR in PACS, on/off: {100 * on.to_sr_s / off.to_sr_s:.1f} %")
        change = 100 * (on.routine_per_min / off.routine_per_min - 1)
        lines.append(f"routine throughput, on vs off: {change:+.1f} % (target within 5 %)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medgemma_deploy.dev.bench.triage_bench", description=__doc__
    )
    parser.add_argument("--routine", type=int, default=20, help="routine CT studies queued (issue: 100)")
    parser.add_argument("--slices", type=int, default=2, help="slices per routine CT study")
    parser.add_argument("--new-tokens", type=int, default=16, help="MedGemma tokens per report")
    parser.add_argument("--models", type=Path, help="models root (default: the tiny random models)")
    parser.add_argument("--modes", default="off,on", help="comma-separated: on, off (default off,on)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per wait")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pynetdicom", "medgemma_deploy", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="triage-bench-") as tmp:
        root = Path(tmp)
        models = args.models
        if models is None:
            from medgemma_deploy.dev.testmodels import make_test_models

            models = root / "models"
            make_test_models(models)
        from medgemma_deploy.dev.synthetic import write_ct_studies, write_demo_study

        labels = write_triage_label_sets(root / "labels")
        routine = write_ct_studies(
            root / "routine", args.routine, args.slices, size=32, patient=("BENCH^ROUTINE", "BENCH", "")
        )
        urgent = write_demo_study(root / "urgent", seed=7)[:1]  # its chest CR
        results = []
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            if mode not in ("on", "off"):
                parser.error(f"--modes: {mode!r} is not on or off")
            result = run_mode(
                models,
                root / f"run-{mode}",
                triage_queue=mode == "on",
                routine_files=routine,
                n_routine=args.routine,
                urgent_files=urgent,
                label_files=labels,
                new_tokens=args.new_tokens,
                timeout_s=args.timeout,
            )
            print(
                f"triage {mode}: ORU {result.to_oru_s:.2f} s, SR {result.to_sr_s:.2f} s, "
                f"{result.routine_per_min:.1f} routine studies/min",
                flush=True,
            )
            results.append(result)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
