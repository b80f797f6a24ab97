"""Generated gRPC stubs of ``protos/`` (``worker_pb2``, ``worker_pb2_grpc``): never edit by hand.

Regenerate with ``python -m medgemma_deploy.dev.protos_build``; ``tests/dev/test_protos_build.py``
fails when these files no longer match the ``.proto`` files. This ``__init__`` is the only hand-written file.
"""
