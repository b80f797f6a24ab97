"""Findings SR + relevance SEG + draft report SR in one MONAI Deploy application (``app.py``)."""
