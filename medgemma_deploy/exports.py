"""Public names of a package, imported from their modules on first use (PEP 562).

Each capability package (``medgemma_deploy.operators.medsiglip``, ``medgemma_deploy.worker``…)
states its public names in its ``__init__`` as a table of name → defining module. Importing the
package costs nothing: torch, transformers, gRPC or Holoscan load only when a name that needs them
is first used, so ``--help``, the job store's reader and the DICOM writers never pay for the models,
and a MONAI Deploy operator class is importable from ``medgemma_deploy.operators`` without the
plain-Python cores importing Holoscan.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["public_names"]


def public_names(
    package: str, homes: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public names live in the modules ``homes`` names.

    ``homes`` maps each public name to the module, relative to ``package``, that defines it.
    """

    def __getattr__(name: str) -> Any:  # noqa: N807 (the module-level hook it becomes)
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home}"), name)

    def __dir__() -> list[str]:  # noqa: N807 (the module-level hook it becomes)
        return sorted(homes)

    return __getattr__, __dir__
