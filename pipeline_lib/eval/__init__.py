"""Evaluation: representation probes (kNN, linear), classification metrics, calibration, plots."""
