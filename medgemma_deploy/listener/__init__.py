"""The DICOM network entry: Storage SCP → durable spool → study completion → pipeline → delivery.

``medgemma-deploy listen`` (or ``python -m medgemma_deploy.apps.listener``) runs a
:class:`~medgemma_deploy.listener.service.Listener`; ``medgemma-deploy jobs`` reads its job store.
The cores here import pynetdicom and dicomweb-client (the ``network`` extra), never MONAI Deploy.
Names are imported on first use, so ``medgemma-deploy jobs`` does not pay for pynetdicom.
"""

from medgemma_deploy.exports import public_names

#: public name → the module that defines it
_HOMES = {
    "AllowList": "allowlist",
    "AUDIT_FIELDS": "audit",
    "AuditLog": "audit",
    "CStoreDestination": "delivery",
    "DicomNode": "delivery",
    "StowDestination": "delivery",
    "Job": "jobmodel",
    "JobState": "jobmodel",
    "JobStore": "jobstore",
    "Pipeline": "pipelines",
    "PipelineOptions": "pipelines",
    "PipelineOutput": "pipelines",
    "PipelineRun": "pipelines",
    "available_pipelines": "pipelines",
    "make_pipeline": "pipelines",
    "register_pipeline": "pipelines",
    "STATUS_TABLE": "receiver",
    "StoreStatus": "receiver",
    "Listener": "service",
    "ListenerConfig": "service",
    "Hl7Outbox": "notify",
    "Hl7Settings": "notify",
    "Spool": "spool",
    "safe_uid_name": "spool",
    "RetryPolicy": "worker_loop",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = public_names(__name__, _HOMES)
