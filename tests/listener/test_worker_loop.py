"""The job runner without a network: retries, permanent failures, partial deliveries, ordering."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from medgemma_deploy.domain import Rejection
from medgemma_deploy.errors import InputError
from medgemma_deploy.listener.audit import AuditLog
from medgemma_deploy.listener.delivery import DeliveryItem, TransientDeliveryError
from medgemma_deploy.listener.jobmodel import JobState
from medgemma_deploy.listener.jobstore import JobStore
from medgemma_deploy.listener.pipelines import PipelineOutput, PipelineRun
from medgemma_deploy.listener.spool import Spool
from medgemma_deploy.listener.worker_loop import RetryPolicy, WorkerLoop
from tests.support.listener import spool_studies, write_small_studies
from tests.support.polling import wait_until

STUDY = "1.2.3"


class ScriptedPipeline:
    """Each call takes the next step: an exception to raise, "reject" (all inputs), or "ok"."""

    name = "scripted"

    def __init__(self, steps: Sequence[object], n_outputs: int = 2) -> None:
        self.steps = list(steps)
        self.n_outputs = n_outputs
        self.calls: list[int] = []

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def process(self, input_dir: Path, output_dir: Path, *, result_version: int) -> PipelineRun:
        self.calls.append(result_version)
        step = self.steps.pop(0) if self.steps else "ok"
        if isinstance(step, BaseException):
            raise step
        inputs = sorted(input_dir.iterdir())
        if step == "reject":
            return PipelineRun(
                outputs=(), rejected=tuple(Rejection(str(p), "no pixel data", "pixels") for p in inputs)
            )
        output_dir.mkdir(parents=True)
        outputs = []
        for index in range(self.n_outputs):
            ds = pydicom.dcmread(inputs[0])
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"{result_version}/{index}/{len(inputs)}"])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = output_dir / f"out{index}.dcm"
            ds.save_as(path)
            outputs.append(PipelineOutput(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), "SR"))
        return PipelineRun(outputs=tuple(outputs))


class FlakyDestination:
    """Acknowledges objects until ``fail_at`` (a list of call-local indexes) says to go down."""

    name = "test:flaky"

    def __init__(self, fail_at: Sequence[int] = ()) -> None:
        self.fail_at = list(fail_at)
        self.received: list[str] = []

    def deliver(self, items: Sequence[DeliveryItem], on_delivered) -> None:
        for index, item in enumerate(items):
            if self.fail_at and self.fail_at[0] == index:
                self.fail_at.pop(0)
                raise TransientDeliveryError("PACS went away")
            self.received.append(item.sop_instance_uid)
            on_delivered([item.sop_instance_uid])


@pytest.fixture
def setting(tmp_path):
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    store = JobStore(spool.root / "jobs.sqlite")
    audit = AuditLog(spool.root / "audit.jsonl")
    files = write_small_studies(tmp_path / "in", 1, 3)
    loops: list[WorkerLoop] = []

    def add_study_version(paths=files) -> None:
        spool_studies(spool, store, paths)

    def start(pipeline, destination) -> WorkerLoop:
        loop = WorkerLoop(
            store, spool, pipeline, [destination], audit,
            concurrency=2, retry=RetryPolicy(max_attempts=4, base_s=0.02, max_s=0.05), idle_poll_s=0.05,
        )  # fmt: skip
        loop.start()
        loops.append(loop)
        return loop

    yield {"spool": spool, "store": store, "files": files, "add": add_study_version, "start": start}
    for loop in loops:
        loop.stop(10)
    store.close()
    audit.close()


def _finished(store: JobStore, count: int = 1):
    found = store.jobs()
    return (
        found
        if len(found) == count and all(j.state in (JobState.DELIVERED, JobState.FAILED) for j in found)
        else None
    )


def test_transient_pipeline_failures_are_retried_then_delivered(setting):
    pipeline = ScriptedPipeline([ConnectionRefusedError("worker unavailable"), TimeoutError("deadline")])
    destination = FlakyDestination()
    setting["add"]()
    setting["start"](pipeline, destination)
    [job] = wait_until(lambda: _finished(setting["store"]), 20, 0.02, "delivered after two retries")
    assert job.state is JobState.DELIVERED and pipeline.calls == [1, 1, 1]
    assert len(destination.received) == 2


def test_a_partial_delivery_resumes_with_what_is_missing(setting):
    destination = FlakyDestination(fail_at=[1, 0])  # first call: 1 of 2 go through; second: none
    setting["add"]()
    setting["start"](ScriptedPipeline([]), destination)
    [job] = wait_until(lambda: _finished(setting["store"]), 20, 0.02, "delivered")
    assert job.state is JobState.DELIVERED
    assert len(destination.received) == len(set(destination.received)) == 2  # each object exactly once
    events = [
        json.loads(line)["event"] for line in (setting["spool"].root / "audit.jsonl").read_text().splitlines()
    ]
    assert events.count("job-retry") == 2 and events.count("delivered") == 2


@pytest.mark.parametrize(
    ("step", "reason"),
    [
        (InputError("x.dcm", "not DICOM"), "not DICOM"),
        ("reject", "no results from 3 instance(s): 3 rejected"),
    ],
    ids=["input-error", "all-rejected"],
)
def test_permanent_failures_fail_at_once_with_the_reason(setting, step, reason):
    pipeline = ScriptedPipeline([step])
    setting["add"]()
    setting["start"](pipeline, FlakyDestination())
    [job] = wait_until(lambda: _finished(setting["store"]), 20, 0.02, "failed")
    assert job.state is JobState.FAILED and reason in job.last_error and pipeline.calls == [1]


def test_attempts_run_out_and_the_job_fails(setting):
    setting["add"]()
    setting["start"](ScriptedPipeline([OSError(5, "I/O error")] * 10), FlakyDestination())
    [job] = wait_until(lambda: _finished(setting["store"]), 20, 0.02, "failed")
    assert job.state is JobState.FAILED and job.attempts == 4 and "gave up after 4 attempts" in job.last_error


def test_versions_of_a_study_get_their_own_result_uids(setting, tmp_path):
    pipeline = ScriptedPipeline([], n_outputs=1)
    destination = FlakyDestination()
    setting["add"](setting["files"][:2])
    setting["start"](pipeline, destination)
    wait_until(lambda: _finished(setting["store"]), 20, 0.02, "version 1")
    setting["add"](setting["files"][2:])
    jobs = wait_until(lambda: _finished(setting["store"], 2), 20, 0.02, "version 2")
    assert [(j.version, j.n_instances) for j in jobs] == [(1, 2), (2, 3)]
    assert pipeline.calls == [1, 2] and len(set(destination.received)) == 2


class BrokenDestination:
    name = "test:broken"

    def __init__(self) -> None:
        self.calls = 0

    def deliver(self, items: Sequence[DeliveryItem], on_delivered) -> None:
        self.calls += 1
        raise ValueError("no presentation context for this SOP class")


def test_an_unexpected_delivery_error_fails_the_job_instead_of_spinning(setting):
    destination = BrokenDestination()
    setting["add"]()
    setting["start"](ScriptedPipeline([]), destination)
    [job] = wait_until(lambda: _finished(setting["store"]), 20, 0.02, "failed")
    assert job.state is JobState.FAILED and "no presentation context" in job.last_error
    assert destination.calls == 1


def test_a_crash_is_retried_with_backoff_then_its_instances_quarantined_with_the_reason(setting):
    pipeline = ScriptedPipeline([KeyError("a bug in a writer")] * 10)
    setting["add"]()
    setting["start"](pipeline, FlakyDestination())
    [job] = wait_until(lambda: _finished(setting["store"]), 20, 0.02, "failed after retries")
    assert job.state is JobState.FAILED and pipeline.calls == [1, 1, 1, 1]
    assert "process crashed: KeyError" in job.last_error and "gave up after 4 attempts" in job.last_error
    # The job reads failed a moment before its inputs are quarantined (two writes): wait for them.
    rejected = wait_until(lambda: setting["store"].rejected_inputs(job.id), 5, 0.02, "inputs quarantined")
    assert len(rejected) == 3 and {r.stage for r in rejected} == {"process"}
    quarantined = setting["store"].quarantined()
    assert sorted(q["path"] for q in quarantined) == sorted(r.path for r in rejected)
    assert all("process crashed: KeyError" in q["reason"] for q in quarantined)


def test_rejected_inputs_are_listed_with_the_job_and_the_rest_is_delivered(setting):
    class RejectFirst(ScriptedPipeline):
        def process(self, input_dir: Path, output_dir: Path, *, result_version: int) -> PipelineRun:
            run = super().process(input_dir, output_dir, result_version=result_version)
            first = sorted(input_dir.iterdir())[0]
            refused = Rejection(str(first), "empty frames", "pixels")
            return PipelineRun(outputs=run.outputs, rejected=(refused,))

    destination = FlakyDestination()
    setting["add"]()
    setting["start"](RejectFirst([]), destination)
    [job] = wait_until(lambda: _finished(setting["store"]), 20, 0.02, "delivered")
    assert job.state is JobState.DELIVERED and job.n_rejected == 1 and len(destination.received) == 2
    [rejected] = setting["store"].rejected_inputs(job.id)
    assert rejected.reason == "empty frames" and rejected.stage == "pixels"
    [quarantined] = setting["store"].quarantined()
    assert quarantined["path"] == rejected.path and "empty frames" in quarantined["reason"]
