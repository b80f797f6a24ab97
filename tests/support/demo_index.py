"""The demo study indexed by ``medgemma-deploy index`` into a new SQLite file, for the search tests.

The study is synthetic (:func:`~medgemma_deploy.dev.synthetic.write_demo_study`: a chest CR and a
six-slice chest CT) and the index is made through the command line, as a user would make it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgemma_deploy.cli.main import main
from medgemma_deploy.dev.synthetic import write_demo_study


@dataclass(frozen=True)
class DemoIndex:
    """An index of the demo study: the files indexed, the SQLite file, and the run's results.json."""

    files: list[Path]
    database: Path
    results: dict[str, Any]

    @property
    def url(self) -> str:
        """The ``--store`` URL of the index."""
        return f"sqlite:///{self.database}"


def index_demo_study(models_root: Path, folder: Path) -> DemoIndex:
    """Write the demo study under ``folder`` and index it with the models under ``models_root``.

    Raises AssertionError, with the run's results, when ``index`` does not exit 0.
    """
    study = folder / "study"
    study.mkdir()
    files = write_demo_study(study)
    database = folder / "index.db"
    out = folder / "out"
    code = main(["index", "-i", str(study), "-m", str(models_root), "--store", f"sqlite:///{database}",
                 "-o", str(out)])  # fmt: skip
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    assert code == 0, results
    return DemoIndex(files, database, results)
