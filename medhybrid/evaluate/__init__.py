"""Evaluation: metrics with confidence intervals, calibration (issue 6; the command comes next)."""
