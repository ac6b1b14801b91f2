"""Figures and the HTML report."""

from .report import Report, figure_to_data_uri

__all__ = ["Report", "figure_to_data_uri"]
