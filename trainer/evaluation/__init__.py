"""Evaluation libraries the stages use: CORE (core_eval.py), bits per byte (loss_eval.py) and the
scaling-law fits of a sweep's points (scaling.py)."""
