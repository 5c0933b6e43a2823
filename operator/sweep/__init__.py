"""LLMSweep, a scaling-law sweep as one resource: its API and plan (`api.py`), its
CustomResourceDefinition (`crd.py`), the pure `reconcile_sweep()` (`reconcile.py`), and its
reconcile loop and kopf registrations (`controller.py`, `handlers.py`).
"""
