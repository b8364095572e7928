"""Self-contained HTML reports of runs (images embedded, no network access)."""

from medistill.report.html import build_report

__all__ = ["build_report"]
