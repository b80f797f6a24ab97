"""The worker's configuration: one frozen dataclass, validated once (``--help`` explains each option)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medgemma_deploy.backends.tls import ServerTLS, check_listen_security
from medgemma_deploy.errors import UsageError

__all__ = ["WorkerConfig"]

_MIB = 1024 * 1024

#: Settings that count something (at least 1), and the worker option that sets each.
_COUNTS = {
    "max_images_per_request": "--max-images-per-request",
    "max_concurrent_rpcs": "--max-concurrent-rpcs",
    "classify_max_batch_size": "--max-batch-size",
    "classify_max_queued_images": "--max-queued-images",
    "report_max_running": "--report-max-running",
    "report_max_waiting": "--report-max-waiting",
    "report_max_prefills_per_step": "--report-max-prefills",
    "default_max_new_tokens": "--default-max-new-tokens",
    "max_new_tokens": "--max-new-tokens",
}


@dataclass(frozen=True)
class WorkerConfig:
    """Everything ``medgemma-deploy worker`` configures (see its ``--help`` for each option)."""

    listen: str = "127.0.0.1:50051"
    medsiglip: Path | None = None
    medgemma: Path | None = None
    device: str | None = None
    #: ``--precision`` (medgemma_deploy/precision.py) for the worker's models.
    precision: str = "auto"
    #: The ``cache_dir`` setting: where MedSigLIP keeps label sets' prompt embeddings.
    cache_dir: Path | None = None
    label_files: tuple[Path, ...] = ()
    tls: ServerTLS | None = None
    allow_insecure: bool = False
    metrics_port: int | None = None
    metrics_host: str | None = None
    # 128, not gRPC's usual 64: an 85-slice CT report prompt is 85 RGB 512x512 slices, 66.8 MB
    # (protos/README.md). Classify requests are split to fit whatever the limit is.
    max_message_bytes: int = 128 * _MIB
    max_images_per_request: int = 512
    max_image_pixels: int = 8192 * 8192
    max_concurrent_rpcs: int = 256
    classify_max_batch_size: int = 32
    classify_max_queue_delay: float = 0.005
    classify_max_queued_images: int = 1024
    report_max_running: int = 32
    report_max_waiting: int = 64
    report_max_cached_tokens: int = 0
    report_max_prefills_per_step: int = 8
    default_max_new_tokens: int = 512
    max_new_tokens: int = 2048
    drain_timeout: float = 30.0
    warm_up: bool = True

    def validate(self) -> None:
        """Raises UsageError for a configuration that cannot work (naming the option)."""
        if self.medsiglip is None and self.medgemma is None:
            raise UsageError("the worker needs --medsiglip DIR and/or --medgemma DIR (or --models ROOT)")
        check_listen_security(self.listen, self.tls, self.allow_insecure)
        for name, option in _COUNTS.items():
            if getattr(self, name) < 1:
                raise UsageError(f"{option} must be at least 1, got {getattr(self, name)}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise UsageError(
                f"--default-max-new-tokens {self.default_max_new_tokens} exceeds "
                f"--max-new-tokens {self.max_new_tokens}"
            )
        if self.max_message_bytes < _MIB:
            raise UsageError(f"--max-message-mb must be at least 1, got {self.max_message_bytes / _MIB:g}")
