"""Group commit (medgemma_deploy.listener.groupcommit): concurrent stores share fsyncs and commits,
each store still answers Success only for its own durable instance, and a failed batch fails all."""

from __future__ import annotations

import errno
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
import pytest
from pynetdicom.dsutils import encode, encode_file_meta

from medgemma_deploy.listener import spool as spool_module
from medgemma_deploy.listener.audit import AuditLog
from medgemma_deploy.listener.groupcommit import GroupCommitter
from medgemma_deploy.listener.jobmodel import NewInstance, RecordOutcome
from medgemma_deploy.listener.jobstore import JobStore
from medgemma_deploy.listener.receiver import InstanceReceiver, StoreRequest, StoreStatus
from medgemma_deploy.listener.spool import PendingFile, Spool
from tests.support.listener import write_small_studies
from tests.support.polling import wait_until

N_STORES = 6


class CountingSpool(Spool):
    """A spool that counts :meth:`make_durable` calls, and holds the first until released."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, min_free_bytes=0)
        self.batches: list[int] = []
        self.first_entered = threading.Event()
        self.release_first = threading.Event()

    def make_durable(self, pending: Sequence[PendingFile]) -> None:
        self.batches.append(len(pending))
        if len(self.batches) == 1:
            self.first_entered.set()
            assert self.release_first.wait(30), "the test never released the first batch"
        super().make_durable(pending)


class CountingStore(JobStore):
    """A job store that counts its group transactions and can fail the n-th one."""

    def __init__(self, path: Path, fail_call: int | None = None) -> None:
        super().__init__(path)
        self.transactions: list[int] = []
        self.fail_call = fail_call

    def record_instances(
        self, instances: Sequence[NewInstance], *, now: float | None = None
    ) -> list[RecordOutcome]:
        self.transactions.append(len(instances))
        if len(self.transactions) == self.fail_call:
            raise sqlite3.OperationalError("disk I/O error")
        return super().record_instances(instances, now=now)


class BatchSizes:
    """A :class:`~medgemma_deploy.listener.groupcommit.CommitObserver` that keeps every batch size."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def batch_committed(self, size: int, seconds: float) -> None:
        self.sizes.append(size)


def _encoded(paths: Sequence[Path]) -> list[tuple[StoreRequest, bytes, bytes]]:
    """What the SCP hands the receiver for each file: request, preamble + file meta, data set."""
    items = []
    for path in paths:
        ds = pydicom.dcmread(path)
        header = b"\x00" * 128 + b"DICM" + encode_file_meta(ds.file_meta)
        stream = encode(ds, False, True)
        request = StoreRequest(
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            calling_aet="STORESCU",
            address="127.0.0.1",
        )
        items.append((request, header, stream))
    return items


def _concurrently(
    calls: Sequence[Callable[[], object]], spool: CountingSpool, committer: GroupCommitter
) -> list:
    """Run the first call until its batch is held in make_durable, queue the rest behind it, release.

    The first store leads a batch of one and is held; the others queue meanwhile, so the next
    leader takes them all: two batches, whatever the thread timing.
    """
    results: list = [None] * len(calls)

    def run(index: int) -> None:
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    threads[0].start()
    assert spool.first_entered.wait(30)
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: committer.queued == len(calls) - 1, 30, 0.01, "the other stores to queue")
    spool.release_first.set()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    return results


@pytest.fixture
def studies(tmp_path: Path) -> list[Path]:
    return write_small_studies(tmp_path / "in", 2, N_STORES // 2, seed=3)


def _receiver(
    tmp_path: Path, fail_call: int | None = None
) -> tuple[InstanceReceiver, CountingSpool, CountingStore, BatchSizes]:
    spool = CountingSpool(tmp_path / "spool")
    store = CountingStore(spool.root / "jobs.sqlite", fail_call=fail_call)
    sizes = BatchSizes()
    committer = GroupCommitter(spool, store, window_s=0.0, observer=sizes)
    receiver = InstanceReceiver(spool, store, AuditLog(tmp_path / "audit.jsonl"), committer=committer)
    return receiver, spool, store, sizes


def _spool_files(spool: Spool) -> list[Path]:
    return sorted(p for p in (spool.root / "studies").rglob("*") if p.is_file())


def test_concurrent_stores_share_fsyncs_and_one_commit(tmp_path, studies):
    receiver, spool, store, sizes = _receiver(tmp_path)
    items = _encoded(studies)
    calls = [lambda item=item: receiver.receive(*item) for item in items]
    try:
        responses = _concurrently(calls, spool, receiver.committer)
        assert [int(r.Status) for r in responses] == [StoreStatus.SUCCESS] * N_STORES
        # Two batches for six stores: the held one, then the five that queued behind it.
        assert spool.batches == [1, N_STORES - 1]
        assert store.transactions == [1, N_STORES - 1]
        assert sizes.sizes == [1, N_STORES - 1]
        assert store.count_instances() == N_STORES
        for request, _, _ in items:
            record = store.find_instance(request.sop_instance_uid)
            assert record is not None and spool.path(record.path).is_file()
        assert not [p for p in (spool.root / "studies").rglob(".*.tmp")], "temporary files left"
    finally:
        store.close()


def test_a_failed_commit_fails_every_store_in_its_batch(tmp_path, studies):
    receiver, spool, store, sizes = _receiver(tmp_path, fail_call=2)
    items = _encoded(studies)
    calls = [lambda item=item: receiver.receive(*item) for item in items]
    try:
        responses = _concurrently(calls, spool, receiver.committer)
        statuses = [int(r.Status) for r in responses]
        assert statuses == [StoreStatus.SUCCESS] + [StoreStatus.OUT_OF_RESOURCES] * (N_STORES - 1)
        assert all("job store" in r.ErrorComment for r in responses[1:])
        assert sizes.sizes == [1], "only the first batch was committed"
        assert store.count_instances() == 1
        first = store.find_instance(items[0][0].sop_instance_uid)
        assert first is not None
        # The failed stores' files are gone; only the committed one stays.
        assert _spool_files(spool) == [spool.path(first.path)]
    finally:
        store.close()


def test_an_fsync_failure_fails_every_store_in_its_batch(tmp_path, studies, monkeypatch):
    receiver, spool, store, sizes = _receiver(tmp_path)
    items = _encoded(studies)
    calls = [lambda item=item: receiver.receive(*item) for item in items]
    real_fsync = spool_module.os.fsync

    def failing_fsync(fd: int) -> None:
        if spool.release_first.is_set() and len(spool.batches) > 1:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", failing_fsync)
    try:
        responses = _concurrently(calls, spool, receiver.committer)
        statuses = [int(r.Status) for r in responses]
        assert statuses == [StoreStatus.SUCCESS] + [StoreStatus.OUT_OF_RESOURCES] * (N_STORES - 1)
        assert spool.batches == [1, N_STORES - 1]
        assert store.transactions == [1], "a batch whose files are not durable is never recorded"
        assert sizes.sizes == [1]
        assert store.count_instances() == 1
        assert len(_spool_files(spool)) == 1, "no file of the failed batch is left, not even a temporary one"
    finally:
        store.close()


def test_a_lone_store_does_not_wait_for_the_window(tmp_path):
    """With nobody else writing, the leader commits at once (a window of an hour never starts)."""
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    store = JobStore(spool.root / "jobs.sqlite")
    sizes = BatchSizes()
    committer = GroupCommitter(spool, store, window_s=3600.0, observer=sizes)
    relative = spool.instance_path("1.2.3", "1.2.3.4", "ab" * 32)
    instance = NewInstance(
        "1.2.3.4", "1.2.3", None, "1.2.840.10008.5.1.4.1.1.2", None, relative, "ab" * 32, 4, "A"
    )
    done: list[RecordOutcome] = []

    def store_one() -> None:
        with committer.writing():
            done.append(committer.commit(spool.write_pending(relative, [b"data"]), instance))

    thread = threading.Thread(target=store_one)
    thread.start()
    thread.join(60)
    try:
        assert not thread.is_alive(), "a lone store waited for the batching window"
        assert done[0].new_job and sizes.sizes == [1]
        assert spool.path(relative).read_bytes() == b"data"
    finally:
        store.close()


def test_record_instances_is_all_or_nothing(tmp_path):
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    store = JobStore(spool.root / "jobs.sqlite")
    good = NewInstance(
        "1.2.3.4", "1.2.3", None, "1.2.840.10008.5.1.4.1.1.2", None, "studies/a.dcm", "a", 1, "A"
    )
    # No Study Instance UID: the job row cannot be inserted (NOT NULL), so the transaction fails.
    bad = NewInstance("1.2.3.5", None, None, "1.2.840.10008.5.1.4.1.1.2", None, "studies/b.dcm", "b", 1, "A")
    try:
        with pytest.raises(sqlite3.IntegrityError):
            store.record_instances([good, bad])
        assert store.count_instances() == 0, "the first row was rolled back with the second"
        outcomes = store.record_instances([good, good])
        assert [o.duplicate for o in outcomes] == [False, True]
        assert store.count_instances() == 1
    finally:
        store.close()


def test_make_durable_refuses_a_file_twice(tmp_path):
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    pending = spool.write_pending("studies/x/a.dcm", [b"abc"])
    spool.make_durable([pending])
    with pytest.raises(ValueError, match="already made durable"):
        spool.make_durable([pending])
    assert spool.path("studies/x/a.dcm").read_bytes() == b"abc"
