"""The listener's cores without a network: spool, job store, completion, retries, allow-list, audit, CLI."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest

from medgemma_deploy.cli import jobs as jobs_command
from medgemma_deploy.cli import listen as listen_command
from medgemma_deploy.errors import InputError, UsageError
from medgemma_deploy.listener.allowlist import AllowList
from medgemma_deploy.listener.audit import AuditLog
from medgemma_deploy.listener.completion import StudyCompletion, purge_finished_studies
from medgemma_deploy.listener.delivery import DicomNode, PermanentDeliveryError, TransientDeliveryError
from medgemma_deploy.listener.jobmodel import JobState, NewInstance, OutputRecord
from medgemma_deploy.listener.jobstore import JobStore
from medgemma_deploy.listener.pipelines import PipelineOptions, make_pipeline, register_pipeline
from medgemma_deploy.listener.spool import Spool, SpoolFullError, SpoolLockedError, safe_uid_name
from medgemma_deploy.listener.worker_loop import RetryPolicy, is_transient
from medgemma_deploy.settings import RunSettings

STUDY = "1.2.3.4"


def _instance(spool: Spool, sop: str, content: bytes = b"x", study: str = STUDY) -> NewInstance:
    import hashlib

    sha = hashlib.sha256(content).hexdigest()
    relative = spool.instance_path(study, sop, sha)
    spool.write(relative, [content])
    return NewInstance(
        sop, study, "1.2.3.4.5", "1.2.840.10008.5.1.4.1.1.2", None, relative, sha, len(content), "AET"
    )


# -- spool --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uid", "kept"),
    [
        ("1.2.840.10008.1.2", True),
        ("../../etc/passwd", False),
        ("1.2..3", False),
        ("1." + "2" * 70, False),
        ("", False),
    ],
)
def test_safe_uid_name_keeps_only_valid_uids(uid, kept):
    name = safe_uid_name(uid)
    assert (name == uid) is kept
    assert "/" not in name and ".." not in name and name


def test_spool_write_is_atomic_and_leaves_no_temp_file(spool):
    stored = spool.write("studies/a/b.dcm", [b"abc", b"def"])
    assert spool.path(stored.relative_path).read_bytes() == b"abcdef"
    assert stored.size == 6 and len(stored.sha256) == 64

    def failing():
        yield b"partial"
        raise OSError(5, "I/O error")

    with pytest.raises(OSError):
        spool.write("studies/a/c.dcm", failing())
    assert sorted(p.name for p in (spool.root / "studies" / "a").iterdir()) == ["b.dcm"]


def test_spool_refuses_writes_below_the_free_space_floor(tmp_path):
    spool = Spool(tmp_path / "s", min_free_bytes=2**62)
    with pytest.raises(SpoolFullError, match="must stay free"):
        spool.check_free_space(10)


def test_spool_path_cannot_leave_the_spool(spool):
    with pytest.raises(ValueError, match="not inside the spool"):
        spool.path("../outside")


def test_a_second_process_lock_on_the_spool_is_refused(spool, tmp_path):
    spool.lock()
    try:
        with pytest.raises(SpoolLockedError, match="another listener"):
            Spool(spool.root).lock()
    finally:
        spool.unlock()
    Spool(spool.root).lock()  # free again


def test_link_inputs_makes_hard_links(spool, tmp_path):
    stored = spool.write("studies/a/one.dcm", [b"1"])
    target = tmp_path / "in"
    assert spool.link_inputs([stored.relative_path], target) == 1
    assert os.stat(target / "one.dcm").st_ino == os.stat(spool.path(stored.relative_path)).st_ino


# -- job store ----------------------------------------------------------------------------------


def test_instances_group_into_versions_and_late_instances_reopen(spool, store):
    first = store.record_instance(_instance(spool, "1.1"))
    assert first.new_job and first.version == 1
    assert store.record_instance(_instance(spool, "1.2")).job_id == first.job_id
    assert store.record_instance(_instance(spool, "1.2")).duplicate  # same content: idempotent

    [queued] = store.complete_quiet_studies(time.time() + 1)
    assert queued.state is JobState.QUEUED and queued.n_instances == 2
    reopened = store.record_instance(_instance(spool, "1.3"))
    assert reopened.reopened and reopened.version == 1
    assert store.job(first.job_id).state is JobState.RECEIVED

    store.complete_quiet_studies(time.time() + 1)
    running = store.claim_next(allow_processing=True)
    assert running.state is JobState.RUNNING and running.n_instances == 3
    late = store.record_instance(_instance(spool, "1.4"))
    assert late.new_job and late.version == 2
    changed = store.record_instance(_instance(spool, "1.1", content=b"corrected"))
    assert changed.version == 2 and changed.replaced_path is not None
    assert [i.sop_instance_uid for i in store.study_instances(STUDY, 1)] == ["1.2", "1.3"]
    assert len(store.study_instances(STUDY, 2)) == 4


def test_a_version_waits_for_the_previous_one(spool, store):
    store.record_instance(_instance(spool, "1.1"))
    store.complete_quiet_studies(time.time() + 1)
    v1 = store.claim_next(allow_processing=True)
    store.record_instance(_instance(spool, "1.2"))
    store.complete_quiet_studies(time.time() + 1)
    assert store.claim_next(allow_processing=True) is None  # v2 queued behind the running v1
    store.set_processed(v1.id, [OutputRecord("9.1", "1.2", "SR", "work/x")], pipeline="p", n_rejected=0)
    v2 = store.claim_next(allow_processing=True)
    assert v2.version == 2 and v2.state is JobState.RUNNING


def test_retries_back_off_then_fail_and_restart_recovers_running_jobs(spool, store):
    store.record_instance(_instance(spool, "1.1"))
    store.complete_quiet_studies(time.time() + 1)
    job = store.claim_next(allow_processing=True)
    store.release(job.id)
    retried = store.retry_later(job.id, "worker unavailable", delay_s=60, max_attempts=3)
    assert (
        retried.state is JobState.QUEUED and retried.attempts == 1 and retried.not_before > time.time() + 50
    )
    assert store.claim_next(allow_processing=True) is None  # not due yet

    store._db.execute("UPDATE jobs SET state = 'running' WHERE id = ?", (job.id,))  # as if killed mid-job
    reopened = JobStore(store.path)
    try:
        [recovered] = reopened.recover(max_attempts=3)
        assert recovered.state is JobState.QUEUED and recovered.attempts == 2
        assert "interrupted" in recovered.last_error
        failed = reopened.retry_later(job.id, "still down", delay_s=0, max_attempts=3)
        assert failed.state is JobState.FAILED and "gave up after 3 attempts" in failed.last_error
        again = reopened.requeue_failed(job.id)
        assert again.state is JobState.QUEUED and again.attempts == 0
    finally:
        reopened.close()


def test_deliveries_are_recorded_per_object_and_destination(spool, store):
    store.record_instance(_instance(spool, "1.1"))
    store.complete_quiet_studies(time.time() + 1)
    job = store.claim_next(allow_processing=True)
    outputs = [OutputRecord("9.1", "1.2", "SR", "work/a"), OutputRecord("9.2", "1.2", "SEG", "work/b")]
    assert store.set_processed(job.id, outputs, pipeline="p", n_rejected=0).state is JobState.DELIVERING
    store.mark_delivered(job.id, ["9.1"], "dicom:PACS")
    assert [o.sop_instance_uid for o in store.pending_outputs(job.id, "dicom:PACS")] == ["9.2"]
    assert len(store.pending_outputs(job.id, "stow:x")) == 2
    assert store.finish_delivered(job.id).state is JobState.DELIVERED
    assert store.counts_by_state()["delivered"] == 1


def test_quiet_period_completion_and_retention(spool, store, tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    completion = StudyCompletion(store, spool, audit, quiet_s=5)
    store.record_instance(_instance(spool, "1.1"), now=100.0)
    assert completion.tick(now=104.0) == []
    [job] = completion.tick(now=105.5)
    assert job.n_instances == 1
    store._db.execute("UPDATE jobs SET state = 'delivered', updated_at = 0")
    assert purge_finished_studies(store, spool, audit, older_than=1.0) == 1
    assert store.count_instances() == 0 and not (spool.root / "studies" / STUDY).exists()
    events = [json.loads(line)["event"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert events == ["study-complete", "study-purged"]


# -- policies and parsing -----------------------------------------------------------------------


def test_retry_policy_grows_exponentially_and_caps():
    policy = RetryPolicy(max_attempts=5, base_s=2, max_s=10)
    delays = [policy.delay(n) for n in (1, 2, 3, 4, 5)]
    assert 1.6 <= delays[0] <= 2.4 and 3.2 <= delays[1] <= 4.8
    assert all(d <= 12 for d in delays) and delays[4] >= 8
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


class _GrpcLikeError(Exception):
    def __init__(self, name: str) -> None:
        self._name = name

    def code(self):
        return type("Code", (), {"name": self._name})()


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError(), True),
        (OSError(28, "No space left on device"), True),
        (TransientDeliveryError("down"), True),
        (PermanentDeliveryError("refused"), False),
        (InputError("x.dcm", "no pixel data"), False),
        (UsageError("bad"), False),
        (_GrpcLikeError("UNAVAILABLE"), True),
        (_GrpcLikeError("INVALID_ARGUMENT"), False),
        (KeyError("bug"), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_transient_failures_are_told_from_permanent_ones(exc, transient):
    assert is_transient(exc) is transient


def test_allow_list_titles_addresses_networks_and_pairs():
    allow = AllowList(["ROUTER", "MODALITY@10.1.0.0/16", "*@192.168.5.5"])
    assert allow.allows("ROUTER", "8.8.8.8")
    assert allow.allows("MODALITY", "10.1.2.3") and not allow.allows("MODALITY", "10.2.0.1")
    assert allow.allows("ANYONE", "192.168.5.5") and not allow.allows("ANYONE", "192.168.5.6")
    assert allow.allows_address("::ffff:10.1.0.9")
    assert allow.required_titles() == []  # a '*' entry admits any title at association time
    assert AllowList(["A", "B@127.0.0.1"]).required_titles() == ["A", "B"]
    assert not AllowList(["A@127.0.0.1"]).allows_address("10.0.0.1")
    with pytest.raises(ValueError, match="1-16 characters"):
        AllowList(["WAYTOOLONGAETITLE17"])
    with pytest.raises(ValueError, match="cannot resolve"):
        AllowList(["A@no-such-host.invalid"])


@pytest.mark.parametrize(
    "text", ["PACS@host", "@h:1", "PACS@:104", "PACS@h:0", "PACS@h:x", "A" * 17 + "@h:1"]
)
def test_destination_parse_errors(text):
    with pytest.raises(ValueError):
        DicomNode.parse(text)


def test_destination_parse():
    assert DicomNode.parse("PACS@[::1]:104") == DicomNode("PACS", "::1", 104)
    assert str(DicomNode.parse("ORTHANC@127.0.0.1:4242")) == "ORTHANC@127.0.0.1:4242"


def test_audit_log_refuses_fields_outside_the_allow_list(tmp_path):
    audit = AuditLog(tmp_path / "a.jsonl")
    audit.event("instance-received", sop_instance_uid="1.2", calling_aet="X", job_id=None)
    with pytest.raises(ValueError, match="patient_name"):
        audit.event("instance-received", patient_name="DOE^JOHN")
    audit.close()
    [line] = (tmp_path / "a.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert (
        record["event"] == "instance-received" and "job_id" not in record and record["ts"].endswith("+00:00")
    )


# -- pipelines and command line -----------------------------------------------------------------


def test_pipeline_registry_names_what_is_missing():
    with pytest.raises(UsageError, match=r"unknown; available: .*classify"):
        make_pipeline("nope", PipelineOptions())
    with pytest.raises(UsageError, match="cannot import"):
        make_pipeline("no_such_module:factory", PipelineOptions())
    with pytest.raises(UsageError, match="--models is required"):
        make_pipeline("classify", PipelineOptions(models_path=None))
    register_pipeline("unit-test", lambda options: ("built", options.settings.backend))
    remote = PipelineOptions(settings=RunSettings(backend="grpc://127.0.0.1:1"))
    assert make_pipeline("unit-test", remote) == ("built", "grpc://127.0.0.1:1")


@pytest.mark.parametrize("name", ["report", "study"])
def test_report_pipelines_build_their_engine_with_the_backend(name):
    options = PipelineOptions(models_path=Path("/models"), settings=RunSettings(relevance_top_k=2))
    pipeline = make_pipeline(name, options)
    assert pipeline.name == name and pipeline.engine.command == name  # built, not loaded
    assert pipeline.engine.medgemma is None
    assert pipeline.engine.classify_options.relevance_top_k == 2
    remote_settings = RunSettings(backend="grpc://127.0.0.1:1")
    remote = make_pipeline(name, PipelineOptions(models_path=None, settings=remote_settings))
    assert remote.engine.backend == "grpc://127.0.0.1:1"


@pytest.mark.parametrize("name", ["classify", "report", "study"])
def test_a_local_pipeline_without_models_fails_with_one_line(name):
    with pytest.raises(UsageError, match=f"--pipeline {name}: --models is required with --backend local"):
        make_pipeline(name, PipelineOptions(models_path=None))


def _listen_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    listen_command.add_arguments(parser)
    return parser.parse_args(argv)


def test_listen_options_come_from_flags_then_environment(tmp_path):
    environ = {
        "MEDGEMMA_LISTENER_SPOOL": str(tmp_path),
        "MEDGEMMA_LISTENER_DESTINATION": "PACS@pacs:104, BACKUP@backup:11112",
        "MEDGEMMA_LISTENER_QUIET_SECONDS": "7.5",
        "MEDGEMMA_LISTENER_STOW_TOKEN": "secret-token",
    }
    config = listen_command.build_config(_listen_args("--quiet-seconds", "2", "--allow", "A"), environ)
    assert config.quiet_s == 2.0 and config.allow == ("A",) and config.spool == tmp_path
    assert [str(d) for d in config.destinations] == ["PACS@pacs:104", "BACKUP@backup:11112"]
    assert config.stow_token == "secret-token" and "secret-token" not in repr(config)
    with pytest.raises(UsageError, match="MEDGEMMA_LISTENER_PORT='x'"):
        listen_command.build_config(_listen_args(), {**environ, "MEDGEMMA_LISTENER_PORT": "x"})
    with pytest.raises(UsageError, match="--spool DIR is required"):
        listen_command.build_config(_listen_args("--destination", "P@h:1"), {})
    with pytest.raises(UsageError, match="somewhere to go"):
        listen_command.build_config(_listen_args("--spool", str(tmp_path)), {})
    with pytest.raises(UsageError, match="--tls-cert and --tls-key go together"):
        listen_command.build_config(_listen_args("--tls-cert", "c.pem"), environ)


def test_jobs_command_lists_and_retries(spool, store, capsys):
    store.record_instance(_instance(spool, "1.1"))
    store.complete_quiet_studies(time.time() + 1)
    job = store.claim_next(allow_processing=True)
    store.fail(job.id, "process: InputError: nothing usable")
    assert jobs_command.main(["--spool", str(spool.root)]) == 0
    table = capsys.readouterr().out
    assert "failed" in table and STUDY in table and "nothing usable" in table
    assert jobs_command.main(["--spool", str(spool.root), "--json", "--state", "failed"]) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["id"] == job.id and record["attempts"] == 1
    assert jobs_command.main(["--spool", str(spool.root), "--retry", str(job.id)]) == 0
    assert "queued again" in capsys.readouterr().out
    assert jobs_command.main(["--spool", str(spool.root), "--retry", str(job.id)]) == 2
    assert "only failed jobs" in capsys.readouterr().err
    assert jobs_command.main(["--spool", str(spool.root / "missing")]) == 2


@pytest.mark.parametrize(
    ("argv", "variable"),
    [([], "spool"), (["--spool", "spool"], "elsewhere")],
    ids=["from-environment", "flag-over-environment"],
)
def test_jobs_and_listen_resolve_the_same_spool(spool, store, tmp_path, monkeypatch, capsys, argv, variable):
    store.record_instance(_instance(spool, "1.1"))
    environ = {"MEDGEMMA_LISTENER_SPOOL": str(tmp_path / variable)}
    monkeypatch.setenv("MEDGEMMA_LISTENER_SPOOL", environ["MEDGEMMA_LISTENER_SPOOL"])
    argv = [str(tmp_path / arg) if arg == "spool" else arg for arg in argv]
    listen_config = listen_command.build_config(_listen_args(*argv, "--destination", "P@h:1"), environ)
    assert listen_config.spool == spool.root
    assert jobs_command.main([*argv, "--json"]) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["study_instance_uid"] == STUDY


def test_listen_refuses_to_start_with_an_unusable_pipeline(tmp_path, capsys):
    argv = ["--spool", str(tmp_path / "spool"), "--destination", "PACS@127.0.0.1:104", "--port", "0"]
    assert listen_command.run(_listen_args(*argv, "--pipeline", "nope")) == 2
    assert listen_command.run(_listen_args(*argv, "--models", str(tmp_path / "missing"))) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[0].startswith("medgemma-deploy listen: error: --pipeline nope: unknown")
    assert errors[1] == f"medgemma-deploy listen: error: model path {tmp_path / 'missing'} does not exist"
    assert not (tmp_path / "spool" / "listener.lock").exists() or Spool(tmp_path / "spool").lock() is None


def test_jobs_tells_rejected_input_apart_from_failed_will_retry(tmp_path):
    from medgemma_deploy.listener.jobmodel import Job, RejectedInput

    def job(**changes) -> Job:
        base = dict(
            id=1, study_instance_uid="1.2.3", version=1, state=JobState.DELIVERED, pipeline="classify",
            n_instances=4, attempts=0, last_error=None, not_before=0.0, n_outputs=2, n_rejected=0,
            created_at=0.0, updated_at=0.0, last_instance_at=0.0, delivered_at=None,
        )  # fmt: skip
        return Job(**{**base, **changes})

    retrying = job(state=JobState.QUEUED, attempts=2, last_error="process: unavailable", not_before=130.0)
    assert jobs_command.describe_status(retrying, now=100.0).startswith("failed, will retry (attempt 2")
    rejected = job(n_rejected=1)
    assert jobs_command.describe_status(rejected) == "rejected input: 1 instance(s) quarantined"
    given_up = job(state=JobState.FAILED, attempts=10, last_error="gave up")
    assert jobs_command.describe_status(given_up).startswith("failed after 10 attempt(s)")
    table = jobs_command.format_table(
        [rejected], {1: [RejectedInput(1, "1.2.3.4", "studies/x.dcm", "pixels", "empty frames")]}
    )
    assert "rejected 1.2.3.4 [pixels]: empty frames" in table and "└ rejected input: 1" in table
