"""Evaluation libraries the stages use: CORE (core_eval.py) and bits per byte (loss_eval.py)."""
