"""Orthanc Python plugin: forward each stable study's images to the medgemma-deploy listener.

Runs inside Orthanc (Debian ``orthanc-python``); see README.md in this folder for the configuration.
When Orthanc reports a study stable (``StableAge`` seconds without a new instance), a background
thread sends the study's *source images* to the listener with a synchronous C-STORE
(``/modalities/<Modality>/store``) and marks each sent instance with a user metadata entry.

Loop guard, so the listener's own results never go back round:

1. instances received from the listener's AE title(s) (Orthanc's ``RemoteAET`` metadata) are
   never forwarded: those are our SR/SEG results;
2. non-image series (SR, SEG, PR, KO, DOC… by Modality) are never forwarded;
3. instances already marked forwarded are not sent again when the study turns stable again
   (results arriving make the study change). Without the metadata configured, a process-lifetime
   memory does it, and the listener's idempotent receive (same SOP Instance UID, same content →
   nothing new) is the last line.

A failed store (listener down) is retried with exponential backoff (5 s doubling to 5 min) for as
long as Orthanc runs; the listener's spool makes the retried instances harmless.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any

import orthanc

#: Defaults of the ``MedgemmaForward`` configuration section.
DEFAULTS: dict[str, Any] = {
    "Modality": "medgemma",
    "ListenerAETs": ["MEDGEMMA"],
    "ForwardedMetadata": "MedgemmaForwarded",
    "SkipModalities": ["SR", "SEG", "PR", "KO", "DOC", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RWV", "PLAN"],
    "StoreTimeout": 120,
}

_MAX_BACKOFF_S = 300.0


def _settings() -> dict[str, Any]:
    configured = json.loads(orthanc.GetConfiguration()).get("MedgemmaForward", {})
    unknown = sorted(set(configured) - set(DEFAULTS))
    if unknown:
        ignored = ", ".join(unknown)
        orthanc.LogWarning(f"medgemma-forward: unknown MedgemmaForward setting(s) ignored: {ignored}")
    settings = dict(DEFAULTS)
    settings.update({key: value for key, value in configured.items() if key in DEFAULTS})
    return settings


class Forwarder:
    """Queue of stable studies and the thread that forwards them."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.modality = str(settings["Modality"])
        self.listener_aets = {str(aet).strip() for aet in settings["ListenerAETs"]}
        self.metadata = settings["ForwardedMetadata"] or None
        self.skip_modalities = {str(m).upper() for m in settings["SkipModalities"]}
        self.timeout = int(settings["StoreTimeout"])
        self._queue: queue.Queue[tuple[float, str, int]] = queue.Queue()
        self._sent_in_memory: set[str] = set()
        self._metadata_usable = self.metadata is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medgemma-forward", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put((0.0, "", 0))
        self._thread.join(10)

    def on_change(self, change_type: int, level: int, resource_id: str) -> None:
        if change_type == orthanc.ChangeType.STABLE_STUDY:
            self._queue.put((0.0, resource_id, 0))
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            self.stop()

    def candidates(self, study_id: str) -> list[str]:
        """Orthanc ids of the study's instances that should go to the listener (the loop guard)."""
        selected = []
        for series in json.loads(orthanc.RestApiGet(f"/studies/{study_id}/series")):
            modality = str(series.get("MainDicomTags", {}).get("Modality", "")).upper()
            if modality in self.skip_modalities:
                continue
            for instance_id in series.get("Instances", []):
                if instance_id in self._sent_in_memory:
                    continue
                metadata = json.loads(orthanc.RestApiGet(f"/instances/{instance_id}/metadata?expand"))
                if str(metadata.get("RemoteAET", "")).strip() in self.listener_aets:
                    continue  # our own result came back: never send it round again
                if self.metadata and metadata.get(self.metadata):
                    continue
                selected.append(instance_id)
        return selected

    def forward(self, study_id: str) -> int:
        instances = self.candidates(study_id)
        if not instances:
            return 0
        body = {"Resources": instances, "Synchronous": True, "Timeout": self.timeout}
        orthanc.RestApiPost(f"/modalities/{self.modality}/store", json.dumps(body))
        for instance_id in instances:
            self._mark(instance_id)
        orthanc.LogWarning(f"medgemma-forward: sent {len(instances)} instance(s) of study {study_id}")
        return len(instances)

    def _mark(self, instance_id: str) -> None:
        self._sent_in_memory.add(instance_id)
        if not self._metadata_usable:
            return
        try:
            orthanc.RestApiPut(f"/instances/{instance_id}/metadata/{self.metadata}", "1")
        except orthanc.OrthancException as exc:
            self._metadata_usable = False
            orthanc.LogWarning(
                f"medgemma-forward: cannot set metadata {self.metadata} ({exc}); declare it under "
                "UserMetadata. Falling back to memory (lost on restart; the listener dedups)."
            )

    @staticmethod
    def _exists(study_id: str) -> bool:
        try:
            orthanc.RestApiGet(f"/studies/{study_id}")
        except orthanc.OrthancException:
            return False
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            not_before, study_id, attempts = self._queue.get()
            if self._stop.is_set() or not study_id:
                return
            wait = not_before - time.monotonic()
            if wait > 0:
                self._queue.put((not_before, study_id, attempts))
                self._stop.wait(min(wait, 1.0))
                continue
            try:
                self.forward(study_id)
            except orthanc.OrthancException as exc:
                if not self._exists(study_id):
                    orthanc.LogWarning(f"medgemma-forward: study {study_id} was deleted; not forwarded")
                    continue
                delay = min(_MAX_BACKOFF_S, 5.0 * 2**attempts)
                orthanc.LogWarning(
                    f"medgemma-forward: study {study_id} not sent ({exc}); "
                    f"retry {attempts + 1} in {delay:.0f} s"
                )
                self._queue.put((time.monotonic() + delay, study_id, attempts + 1))


_forwarder = Forwarder(_settings())
_forwarder.start()
orthanc.RegisterOnChangeCallback(_forwarder.on_change)
