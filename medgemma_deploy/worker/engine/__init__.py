"""The worker's engine core, with no gRPC: what many clients share.

:mod:`.queue_thread` (the lifecycle of a queue and its thread), :mod:`.batcher` (dynamic batching of
images), :mod:`.image_service` (MedSigLIP behind it), :mod:`.decode` (the running sequences as one
left-padded KV cache), :mod:`.scheduler` (continuous batching) with :mod:`.sampling` and
:mod:`.events`, :mod:`.report_service` (MedGemma behind it: the one decode core of torch reports,
also run in process by ``backends/inproc.py``), :mod:`.model_service` (what the two services share),
:mod:`.errors` (what a request can fail with).
"""

from medgemma_deploy.exports import public_names

#: public name → the module that defines it
_HOMES = {
    "BatchedRequest": "batcher",
    "MicroBatcher": "batcher",
    "ClassifyOutcome": "image_service",
    "ClassifyWork": "image_service",
    "EmbedWork": "image_service",
    "ImageService": "image_service",
    "ImageWork": "image_service",
    "TextEmbedWork": "image_service",
    "ModelService": "model_service",
    "QueueObserver": "queue_thread",
    "QueueThread": "queue_thread",
    "DecodeBatch": "decode",
    "Prefilled": "decode",
    "PreparedPrompt": "decode",
    "ReportScheduler": "scheduler",
    "apply_repetition_penalty": "sampling",
    "choose_tokens": "sampling",
    "sample_token": "sampling",
    "STREAM_MISMATCH_WARNING": "events",
    "Admitted": "events",
    "Event": "events",
    "Failed": "events",
    "Finished": "events",
    "ReportStream": "events",
    "SchedulerObserver": "events",
    "Tokens": "events",
    "IncrementalDetokenizer": "report_service",
    "PreparedReport": "report_service",
    "ReportDelta": "report_service",
    "ReportDone": "report_service",
    "ReportOutput": "report_service",
    "ReportService": "report_service",
    "BadRequestError": "errors",
    "DeadlineExpiredError": "errors",
    "ModelNotAvailableError": "errors",
    "NotReadyError": "errors",
    "QueueFullError": "errors",
    "RequestCancelledError": "errors",
    "ServingError": "errors",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = public_names(__name__, _HOMES)
