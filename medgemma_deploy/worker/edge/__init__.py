"""The worker's gRPC edge: servicer (one exception → status table), server (lifecycle, health,
reflection) and Prometheus metrics.
"""

from medgemma_deploy.exports import public_names

#: public name → the module that defines it
_HOMES = {
    "API_VERSION": "servicer",
    "MAX_LABEL_FINDINGS": "servicer",
    "MAX_LABEL_TEXT_CHARS": "servicer",
    "MAX_PROMPTS_PER_FINDING": "servicer",
    "MAX_STATUS_MESSAGE_CHARS": "servicer",
    "QUEUE_FULL_PUSHBACK_MS": "servicer",
    "RETRY_PUSHBACK_KEY": "servicer",
    "STATUS_TABLE": "servicer",
    "WorkerCore": "servicer",
    "WorkerServicer": "servicer",
    "check_image_shape": "servicer",
    "check_label_set_size": "servicer",
    "check_texts": "servicer",
    "status_for": "servicer",
    "SERVICE_NAME": "server",
    "WorkerServer": "server",
    "WORKER_STATES": "metrics",
    "WorkerMetrics": "metrics",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = public_names(__name__, _HOMES)
