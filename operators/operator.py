"""The shape every MONAI Deploy operator of ours shares: at most one input and one output port.

Each operator names its ports as class constants (``INPUT_NAME``, ``OUTPUT_NAME``), so that the apps
wire explicit port pairs, and stores its typed configuration in ``__init__`` before calling the base
constructor (the SDK's rule: the base class constructor comes last, because it calls ``setup``).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from monai.deploy.core import Fragment, Operator, OperatorSpec

__all__ = ["PortOperator", "WriterOperator"]


class PortOperator(Operator):
    """An operator with an optional ``INPUT_NAME`` port and an optional ``OUTPUT_NAME`` port.

    ``setup`` declares the ports that ``emits`` says the operator has; a subclass whose output
    depends on its configuration overrides ``emits``.
    """

    INPUT_NAME: ClassVar[str | None] = None
    OUTPUT_NAME: ClassVar[str | None] = None

    def emits(self) -> bool:
        """Whether this operator has its output port (by default: whether it names one)."""
        return self.OUTPUT_NAME is not None

    def setup(self, spec: OperatorSpec) -> None:
        if self.INPUT_NAME is not None:
            spec.input(self.INPUT_NAME)
        if self.emits():
            spec.output(self.OUTPUT_NAME)


class WriterOperator(PortOperator):
    """An operator that writes its DICOM files (and maybe ``results.json``) into ``output_dir``.

    ``options`` are the writer's typed options (``ClassifyOptions``, ``ReportOptions``).
    """

    def __init__(
        self, fragment: Fragment, *args: object, output_dir: Path, options: object, **kwargs: object
    ) -> None:
        self.output_dir = Path(output_dir)
        self.options = options
        super().__init__(fragment, *args, **kwargs)
