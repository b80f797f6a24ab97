"""Invalid inputs that every classification writer (SEG, Parametric Map, findings SR) refuses alike.

Each writer's test module adds these rows to its own table of ``ValueError`` cases, so that the
numbering and empty-series rules the writers share (``check_numbering``) are tested on each.
"""

from __future__ import annotations

#: name -> (damage done to the classification or None, writer keyword arguments, message matched)
COMMON_VALUE_ERRORS = {
    "no-frames": (lambda c: c.series.frames.clear(), {}, "frames is empty"),
    "series-number-zero": (None, {"series_number": 0}, "series_number"),
    "series-number-bool": (None, {"series_number": True}, "series_number"),
    "series-number-not-int": (None, {"series_number": "9902"}, "series_number"),
    "result-version-zero": (None, {"result_version": 0}, "result_version"),
}
