"""Batch-size sweeps and their report: the sweep over train(), one run per directory with skip and resume,
learning-rate tuning, the fits and findings with their uncertainty (bootstrap intervals), the report and its plots,
and the check of the advisor's prediction against the sweep.
"""
