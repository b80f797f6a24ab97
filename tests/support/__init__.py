"""Helpers shared by the tests (never test modules themselves): inputs, real peers, validators.

``inputs`` (real DICOM test files as domain objects), ``real_size`` (full-size radiographs and
CTs), ``synthetic`` studies come from ``medgemma_deploy.dev``; peers started on 127.0.0.1:
``orthanc``, ``listener``, ``search`` (PostgreSQL), ``triage`` (MLLP); validators ``dciodvfy`` and
``pixelmed`` (with ``pixelmed_batch/``); ``system_tools`` (the Debian packages ``./run tests``
installs), ``polling``, ``cli_options``, ``sr_text``, ``fuzz``, ``transformers_reference``.
"""

from pathlib import Path

#: The repository's root folder.
REPO = Path(__file__).resolve().parents[2]
