"""Evaluation: the Evaluator (one jitted step for every score), error by group, calibration, plots."""
