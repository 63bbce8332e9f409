"""Evaluation: metrics, the digit classifier, and the evaluate stage."""
