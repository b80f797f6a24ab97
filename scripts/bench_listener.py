"""Load benchmark of the DICOM listener (not a test): many instances, many associations, SIGKILLs.

Sends ``--instances`` small CT instances (``--per-study`` per study) over ``--associations``
concurrent associations to a listener subprocess, SIGKILLs it ``--restarts`` times while it
receives and starts it again; the senders behave like routers and re-send what was not
acknowledged. At the end every study must be delivered (to a real Orthanc when installed) and
every instance that got a Success must be in the spool: the ``lost`` count, goal 0.

The listener runs the test marker pipeline (tests/support/listener.py: one small SR per study
version), so the figures are those of the network entry (receive, fsync, job store, completion,
delivery), not of a model. Prints one JSON summary line::

    .venv/bin/python scripts/bench_listener.py --instances 10000 --associations 16 --restarts 2

``--compare`` measures ingest alone, side by side in one run: ``--compare-instances`` 512 x 512 CT
instances (16-bit, 0.5 MB each) sent over 1 and over ``--compare-associations`` associations to our
listener, to Orthanc (Debian package; its default SQLite index) and to dcmtk's ``storescp`` (no
fsync; ``--fork``, a process per association), each on a fresh store. The sender is dcmtk's
``storescu`` (one process per association, so it costs little CPU) or, with ``--compare-sender
pynetdicom``, pynetdicom (one process per association, as a Python router would send). Prints a
Markdown table and one JSON line::

    flock /tmp/bench.lock .venv/bin/python scripts/bench_listener.py --compare
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from medgemma_deploy.listener.jobstore import JobStore  # noqa: E402
from tests.support.listener import ListenerProcess, all_finished, no_delay, read_job_store  # noqa: E402
from tests.support.orthanc import free_port, orthanc_available, running_orthanc  # noqa: E402
from tests.support.polling import wait_until  # noqa: E402

logger = logging.getLogger("bench_listener")

MARKER = "tests.support.listener:make_marker_pipeline"


def write_instances(out_dir: Path, n_instances: int, per_study: int) -> list[Path]:
    """Tiny CT instances, named ``<SOP Instance UID>.dcm`` so senders never need to read them."""
    from medgemma_deploy.dev.synthetic import write_ct_studies

    n_studies = -(-n_instances // per_study)
    files = write_ct_studies(out_dir / "raw", n_studies, per_study, seed=42, size=16)[:n_instances]
    named = []
    for path in files:
        uid = str(
            pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
        )
        target = out_dir / f"{uid}.dcm"
        path.rename(target)
        named.append(target)
    return named


def _sender_process(port: int, groups: Sequence[Sequence[str]], result_file: str, deadline: float) -> None:
    """One OS process running one thread per association group; writes ``uid -> first ack time``."""
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
    from pynetdicom import AE

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    acknowledged: dict[str, float] = {}
    attempts = {"associations": 0, "failed_associations": 0}
    errors: list[str] = []
    lock = threading.Lock()

    def run(paths: Sequence[str]) -> None:
        pending = list(paths)
        while pending and time.time() < deadline:
            ae = AE(ae_title="STORESCU")
            # pynetdicom notices a peer killed mid-request only at the DIMSE timeout; dcmtk at once.
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
            ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
            assoc = ae.associate("127.0.0.1", port, ae_title="MEDGEMMA")
            with lock:
                attempts["associations"] += 1
            if not assoc.is_established:
                with lock:
                    attempts["failed_associations"] += 1
                time.sleep(0.5)  # the listener is restarting: a router waits and retries
                continue
            no_delay(assoc)  # like dcmtk with TCP_NODELAY=1; Nagle would cap each association near 20/s
            remaining = []
            try:
                for index, path in enumerate(pending):
                    if not assoc.is_established:
                        remaining.extend(pending[index:])
                        break
                    try:
                        status = assoc.send_c_store(path)
                    except Exception as exc:  # a killed peer surfaces as several exception types
                        errors.append(f"{type(exc).__name__}: {exc}")
                        remaining.extend(pending[index:])
                        break
                    if "Status" in status and int(status.Status) == 0:
                        with lock:
                            acknowledged.setdefault(Path(path).stem, time.time())
                    else:
                        remaining.append(path)
            finally:
                if assoc.is_established:
                    assoc.release()
            if remaining and len(remaining) == len(pending):
                time.sleep(0.5)  # nothing went through on this association: do not hammer the listener
            pending = remaining

    threads = [threading.Thread(target=run, args=(group,)) for group in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    Path(result_file).write_text(
        json.dumps({"acknowledged": acknowledged, "errors": errors[:20], **attempts})
    )


def _spooled(spool: Path) -> int:
    return read_job_store(spool, JobStore.count_instances, 0)


def run(args: argparse.Namespace) -> dict:
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-listener-")))
        started = time.perf_counter()
        files = write_instances(work / "in", args.instances, args.per_study)
        logger.info("wrote %d instances in %.1f s", len(files), time.perf_counter() - started)
        studies: dict[str, list[str]] = {}
        for index, path in enumerate(files):
            studies.setdefault(str(index // args.per_study), []).append(str(path))
        groups: list[list[str]] = [[] for _ in range(args.associations)]
        for index, study_files in enumerate(studies.values()):  # a study travels on one association
            groups[index % args.associations].extend(study_files)

        if not orthanc_available():
            raise SystemExit("the benchmark delivers to a real Orthanc: apt-get install orthanc")
        orthanc = stack.enter_context(running_orthanc(work / "orthanc"))
        destination = ["--destination", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"]
        port = free_port()
        listener = ListenerProcess(
            work / "spool",
            port,
            ["--pipeline", MARKER, *destination, "--allow", "STORESCU", "--quiet-seconds", str(args.quiet),
             "--retention-hours", "0", "--backoff-seconds", "0.5", "--max-backoff-seconds", "2",
             "--max-attempts", "100", "--concurrency", "2", "--max-associations", str(args.associations + 8)],
        )  # fmt: skip
        stack.callback(listener.stop)
        listener.start()

        deadline = time.time() + args.timeout
        per_process = [groups[i :: args.sender_processes] for i in range(args.sender_processes)]
        results = [work / f"sender-{i}.json" for i in range(args.sender_processes)]
        context = multiprocessing.get_context("fork")
        senders = [
            context.Process(target=_sender_process, args=(port, chunk, str(result), deadline))
            for chunk, result in zip(per_process, results, strict=True)
        ]
        ingest_started = time.time()
        for sender in senders:
            sender.start()

        kill_points = [int(args.instances * (k + 1) / (args.restarts + 1)) for k in range(args.restarts)]
        kills: list[dict] = []
        for point in kill_points:
            wait_until(
                lambda point=point: _spooled(listener.spool) >= point, args.timeout, 0.05, f"{point} spooled"
            )
            at = _spooled(listener.spool)
            listener.kill()
            down = time.perf_counter()
            listener.start(ready_timeout_s=120)
            kills.append({"at_spooled": at, "down_s": round(time.perf_counter() - down, 2)})
            logger.info("SIGKILL at %d spooled instances; back after %.1f s", at, kills[-1]["down_s"])
        for sender in senders:
            sender.join(max(1.0, deadline - time.time()))
        ingest_s = time.time() - ingest_started

        acknowledged: dict[str, float] = {}
        associations = failed_associations = 0
        sender_errors: list[str] = []
        for result in results:
            data = json.loads(result.read_text())
            for uid, when in data["acknowledged"].items():
                acknowledged[uid] = min(when, acknowledged.get(uid, when))
            associations += data["associations"]
            sender_errors += data["errors"]
            failed_associations += data["failed_associations"]
        last_ack = max(acknowledged.values()) - ingest_started if acknowledged else float("nan")

        delivered_started = time.perf_counter()
        wait_until(lambda: all_finished(listener.spool), args.timeout, 0.5, "every job finished")
        store = JobStore(listener.spool / "jobs.sqlite", read_only=True)
        try:
            jobs = store.jobs()
            lost = sorted(
                uid for uid in acknowledged
                if (record := store.find_instance(uid)) is None
                or not (listener.spool / record.path).is_file()
            )  # fmt: skip
            latest: dict[str, int] = {}
            for job in jobs:
                latest[job.study_instance_uid] = max(job.version, latest.get(job.study_instance_uid, 0))
            covered = set()
            for study_uid, version in latest.items():
                covered |= {i.sop_instance_uid for i in store.study_instances(study_uid, version)}
            not_in_a_delivered_version = sorted(set(acknowledged) - covered)
            outputs = [o.sop_instance_uid for job in jobs for o in store.outputs(job.id)]
        finally:
            store.close()
        in_pacs = len(orthanc.get("/instances"))
        return {
            "instances": args.instances,
            "associations": args.associations,
            "sender_processes": args.sender_processes,
            "restarts": len(kills),
            "kills": kills,
            "acknowledged": len(acknowledged),
            "never_acknowledged": args.instances - len(acknowledged),
            "lost": len(lost) + len(not_in_a_delivered_version),
            "ingest_seconds_to_last_ack": round(last_ack, 1),
            "instances_per_second": round(len(acknowledged) / last_ack, 1) if acknowledged else 0.0,
            "association_attempts": associations,
            "refused_or_failed_associations": failed_associations,
            "jobs": len(jobs),
            "jobs_delivered": sum(job.state.value == "delivered" for job in jobs),
            "studies": len(latest),
            "reopened_versions": len(jobs) - len(latest),
            "result_objects": len(outputs),
            "result_objects_in_orthanc": in_pacs,
            "seconds_after_ingest_until_all_delivered": round(time.perf_counter() - delivered_started, 1),
            "ingest_wall_seconds": round(ingest_s, 1),
            "sender_errors": sorted(set(sender_errors))[:5],
        }


# -- --compare: ingest only, ours against Orthanc and dcmtk storescp -----------------------------

#: The servers --compare measures, in the order of the table.
COMPARED_SERVERS = ("medgemma-deploy listener", "Orthanc", "dcmtk storescp")


def write_ct_instances(out_dir: Path, n_instances: int, per_study: int) -> list[Path]:
    """512 x 512 16-bit CT instances (0.5 MB of pixels each), ``per_study`` to a study.

    One data set is built and only its UIDs change per file, so writing a few thousand takes
    seconds; the pixels are noise (nothing compresses or de-duplicates them).
    """
    from medgemma_deploy.dev.synthetic import write_ct_studies

    out_dir.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(write_ct_studies(out_dir / "template", 1, 1, seed=7, size=512)[0])
    shutil.rmtree(out_dir / "template")
    paths = []
    for index in range(n_instances):
        study, slice_index = divmod(index, per_study)
        template.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[f"compare/{study}"])
        template.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[f"compare/{study}/series"])
        template.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[f"compare/{study}/{slice_index}"])
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = slice_index + 1
        path = out_dir / f"ct-{index:05d}.dcm"
        template.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _send_with_storescu(port: int, called_aet: str, groups: Sequence[Sequence[Path]]) -> float:
    """One ``storescu`` per group, all at once; seconds until the last one exits (each must succeed)."""
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            ["storescu", "-aet", "STORESCU", "-aec", called_aet, "127.0.0.1", str(port), *map(str, group)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for group in groups
    ]
    failures = []
    for process in processes:
        _, stderr = process.communicate()
        if process.returncode != 0:
            failures.append(stderr.decode(errors="replace")[-500:])
    seconds = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"storescu failed: {failures[0]}")
    return seconds


def _pynetdicom_association(port: int, called_aet: str, group: Sequence[Path], result_file: str) -> None:
    from tests.support.listener import send_files

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    statuses = send_files(port, group, called_aet=called_aet)
    Path(result_file).write_text(json.dumps(statuses))


def _send_with_pynetdicom(port: int, called_aet: str, groups: Sequence[Sequence[Path]]) -> float:
    """One process per group sending with pynetdicom (Nagle off); seconds until the last ends."""
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="bench-sender-") as temp:
        results = [Path(temp) / f"{i}.json" for i in range(len(groups))]
        senders = [
            context.Process(target=_pynetdicom_association, args=(port, called_aet, group, str(result)))
            for group, result in zip(groups, results, strict=True)
        ]
        started = time.perf_counter()
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        seconds = time.perf_counter() - started
        failed = [
            status for result in results for status in json.loads(result.read_text()).values() if status != 0
        ]
    if failed:
        raise RuntimeError(f"pynetdicom sender: {len(failed)} instance(s) not stored (statuses {failed[:5]})")
    return seconds


#: --compare-sender choices.
SENDERS = {"storescu": _send_with_storescu, "pynetdicom": _send_with_pynetdicom}


def _compare_one(
    server: str, files: Sequence[Path], associations: int, per_study: int, work: Path, sender: str
) -> dict:
    """Start ``server`` on a fresh store, send ``files`` over ``associations``, count what it holds."""
    studies = [files[i : i + per_study] for i in range(0, len(files), per_study)]
    groups: list[list[Path]] = [[] for _ in range(associations)]
    for index, study in enumerate(studies):  # a study travels on one association, as routers send
        groups[index % associations].extend(study)
    work.mkdir(parents=True)
    send = SENDERS[sender]
    with ExitStack() as stack:
        if server == "medgemma-deploy listener":
            port = free_port()
            # A quiet period longer than the run: nothing but ingest runs while it is measured, so
            # the destination (required by the listener) is never called.
            listener = ListenerProcess(
                work / "spool", port,
                ["--pipeline", MARKER, "--allow", "STORESCU", "--quiet-seconds", "3600",
                 "--destination", f"UNUSED@127.0.0.1:{free_port()}",
                 "--max-associations", str(associations + 8)],
            )  # fmt: skip
            stack.callback(listener.stop)
            listener.start()
            seconds = send(port, "MEDGEMMA", groups)
            stored = _spooled(listener.spool)
        elif server == "Orthanc":
            orthanc = stack.enter_context(running_orthanc(work / "orthanc"))
            seconds = send(orthanc.dicom_port, orthanc.aet, groups)
            stored = int(orthanc.get("/statistics")["CountInstances"])
        else:
            port = free_port()
            out = work / "storescp"
            out.mkdir()
            process = subprocess.Popen(
                ["storescp", "--fork", "-aet", "STORESCP", "-od", str(out), str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            stack.callback(lambda: (process.terminate(), process.wait(10)))
            wait_until(lambda: _accepts(port), 30, 0.1, "storescp to listen")
            seconds = send(port, "STORESCP", groups)
            stored = sum(1 for _ in out.iterdir())
    if stored != len(files):
        raise RuntimeError(f"{server} holds {stored} of {len(files)} instances after the run")
    return {
        "server": server,
        "sender": sender,
        "associations": associations,
        "instances": len(files),
        "seconds": round(seconds, 2),
        "instances_per_second": round(len(files) / seconds, 1),
    }


def _accepts(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def compare(args: argparse.Namespace) -> list[dict]:
    """Every server at 1 and at ``--compare-associations`` associations; one row each."""
    if not orthanc_available() or shutil.which("storescu") is None or shutil.which("storescp") is None:
        raise SystemExit("--compare needs Orthanc and dcmtk: apt-get install orthanc dcmtk")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as temp:
        work = Path(temp)
        files = write_ct_instances(work / "in", args.compare_instances, args.per_study)
        logger.info("wrote %d instances of %d bytes", len(files), os.path.getsize(files[0]))
        rows = []
        for associations in (1, args.compare_associations):
            for index, server in enumerate(args.compare_servers):
                row = _compare_one(
                    server,
                    files,
                    associations,
                    args.per_study,
                    work / f"{associations}-{index}",
                    args.compare_sender,
                )
                logger.info("%s", row)
                rows.append(row)
    return rows


def _markdown(rows: Sequence[dict]) -> str:
    lines = [
        "| server | sender | associations | instances | seconds | instances/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        "| "
        + " | ".join(str(r[k]) for k in ("server", "sender", "associations", "instances", "seconds"))
        + " | "
        f"{r['instances_per_second']} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--associations", type=int, default=16)
    parser.add_argument(
        "--sender-processes", type=int, default=4, help="OS processes the associations run in"
    )
    parser.add_argument("--per-study", type=int, default=50, help="instances per study")
    parser.add_argument(
        "--restarts", type=int, default=2, help="SIGKILL + restart of the listener while it receives"
    )
    parser.add_argument("--quiet", type=float, default=3.0, help="listener --quiet-seconds")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument(
        "--compare", action="store_true", help="ingest only: ours, Orthanc and storescp side by side"
    )
    parser.add_argument("--compare-instances", type=int, default=400, help="instances per --compare row")
    parser.add_argument("--compare-associations", type=int, default=4, help="the concurrent --compare rows")
    parser.add_argument(
        "--compare-servers",
        nargs="+",
        choices=COMPARED_SERVERS,
        default=list(COMPARED_SERVERS),
        help="which servers --compare measures (default: all three)",
    )
    parser.add_argument(
        "--compare-sender",
        choices=sorted(SENDERS),
        default="storescu",
        help="storescu (dcmtk, C++) or pynetdicom (Python, as a pynetdicom router would send)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    if args.compare:
        rows = compare(args)
        print(_markdown(rows))
        print(json.dumps(rows))
        return 0
    summary = run(args)
    print(json.dumps(summary))
    return 0 if summary["lost"] == 0 and summary["never_acknowledged"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
