"""The MedGemma CPU report benchmark (medgemma_deploy/dev/bench/report_cpu.py) on the tiny model.

Not timed: the figures live in docs/performance.md. This checks that each row's subprocess runs
and that the table carries what it measured (a row that failed shows its error instead of numbers).
"""

from __future__ import annotations

import re

import numpy as np

from medgemma_deploy.dev.bench.report_cpu import main
from tests.support.lowbit import needs_lowbit


@needs_lowbit
def test_the_table_has_a_measured_line_per_row(tmp_path, capsys):
    # The parent holds 1.5 GiB while the rows run: each row's memory must be its own (Linux carries
    # a parent's ru_maxrss into the child it spawns; the tiny model's int4 row needs about 0.5 GiB).
    held = np.ones(3 * 2**26)  # 1.5 GiB of float64, touched
    assert (
        main(["--cache", str(tmp_path / "cache"), "--rows", "int4,llama.cpp,floor", "--max-new-tokens", "8"])
        == 0
    )
    del held
    table = capsys.readouterr().out
    assert "| peak RSS (GiB) |" in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    int4 = [cell.strip() for cell in rows["int4"].split("|")[2:-1]]
    first_token, decode, batch4, report, rss = (float(cell) for cell in int4[:5])
    assert 0 < first_token <= report and decode > 0 and batch4 > 0
    assert 0 < rss < 1.2, f"the int4 row reports {rss} GiB: not its own peak"
    assert "text-q4_0.gguf" in int4[5]
    assert float(rows["llama.cpp"].split("|")[3]) > 0
    floor = rows[next(name for name in rows if name.startswith("bandwidth floor"))]
    assert re.search(r"\d+(\.\d+)? / \d+(\.\d+)? / \d+(\.\d+)?", floor)
    assert "error" not in table.lower()
