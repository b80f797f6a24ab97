import pytest

from medgemma_deploy.dev.bench.markdown import markdown_table


def test_a_table_has_its_header_alignment_row_and_one_line_per_row():
    table = markdown_table("path | seconds", "lr", [("cli", 1.5), ("app", "—")])
    assert table.splitlines() == ["| path | seconds |", "|---|---:|", "| cli | 1.5 |", "| app | — |"]


@pytest.mark.parametrize("align", ["l", "lrr", "lc"], ids=["too-few", "too-many", "unknown-letter"])
def test_an_alignment_that_does_not_fit_the_columns_is_refused(align):
    with pytest.raises(ValueError, match="one 'l' or 'r' per column"):
        markdown_table("path | seconds", align, [])
