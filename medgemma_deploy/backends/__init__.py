"""Where the models run: one interface, two transports (vLLM's ``make_client``).

:mod:`.local` (:func:`make_backend`, the one place runners are built, and the in-process models),
:mod:`.inproc` (MedGemma in process through the worker's decode core),
:mod:`.remote` (the same models over gRPC), :mod:`.grpc_client` (the worker client: retries,
deadlines), :mod:`.wire` and :mod:`.chat_wire` (protobuf ↔ domain types), :mod:`.tls` (certificates
for both ends).
"""

from medgemma_deploy.exports import public_names

#: public name → the module that defines it
_HOMES = {
    "BACKEND_HELP": "local",
    "Backend": "local",
    "make_backend": "local",
    "InprocMedGemma": "inproc",
    "RemoteMedGemma": "remote",
    "RemoteMedSigLIP": "remote",
    "RetryPolicy": "grpc_client",
    "WorkerClient": "grpc_client",
    "WorkerError": "grpc_client",
    "WorkerRequestError": "grpc_client",
    "WorkerUnavailableError": "grpc_client",
    "parse_target": "grpc_client",
    "DTYPE_TO_NUMPY": "wire",
    "MAX_TEXTS_PER_REQUEST": "wire",
    "array_from_proto": "wire",
    "array_to_proto": "wire",
    "check_finding_keys": "wire",
    "check_model_input_shape": "wire",
    "display_image_from_proto": "wire",
    "finding_keys": "wire",
    "identity_from_proto": "wire",
    "identity_to_proto": "wire",
    "image_to_proto": "wire",
    "label_set_from_proto": "wire",
    "label_set_key": "wire",
    "label_set_to_proto": "wire",
    "MAX_CHAT_MESSAGES": "chat_wire",
    "MAX_CHAT_TEXT_CHARS": "chat_wire",
    "chat_from_proto": "chat_wire",
    "chat_to_proto": "chat_wire",
    "image_to_chat_array": "chat_wire",
    "sampling_from_proto": "chat_wire",
    "settings_to_proto": "chat_wire",
    "CLIENT_TLS_ENV": "tls",
    "ClientTLS": "tls",
    "ServerTLS": "tls",
    "check_listen_security": "tls",
    "is_loopback": "tls",
    "split_host_port": "tls",
}

__all__ = sorted(_HOMES)
__getattr__, __dir__ = public_names(__name__, _HOMES)
