"""The one Markdown table renderer of the generated reports (tables, benchmarks, analyses, the
task summary): GitHub tables through tabulate."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tabulate import tabulate


def cell(value, digits: int = 3) -> str:
    """A table cell: floats with ``digits`` decimals, None as "–", anything else as ``str()``; a
    ``|`` or a line break would end the cell or the row, so they are escaped / shown as "⏎"."""
    if value is None:
        return "–"
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return text.replace("\n", "⏎").replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence], digits: int = 3) -> str:
    """``rows`` under ``header`` as a GitHub Markdown table, every cell through ``cell``. Strings are
    printed as given (tabulate's number parsing is off: "0.50" stays "0.50", "1,024" stays)."""
    return tabulate([[cell(v, digits) for v in row] for row in rows], headers=[cell(h) for h in header],
                    tablefmt="github", disable_numparse=True)
