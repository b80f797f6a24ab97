"""What every MedGemma engine promises about streamed tokens, checked one way for all of them."""

from __future__ import annotations

from medgemma_deploy.domain import ReportModel, ReportRequest, ReportResult


def assert_streamed_pieces_make_the_text(model: ReportModel, request: ReportRequest) -> ReportResult:
    """Generate ``request`` with ``on_token``: the pieces, non-empty and more than one, join to the text."""
    pieces: list[str] = []
    result = model.generate(request, on_token=pieces.append)
    assert "".join(pieces) == result.text
    assert len(pieces) > 1
    assert all(pieces)
    return result
