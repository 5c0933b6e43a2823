"""Deciding, without API calls: the stage plan both executors run (`plan.py`), one reconcile of an
LLMRun (`run.py`: the run's phase, conditions and serving), each stage's attempts, retries,
preemptions and stalls (`attempts.py`), the Decision and Events a reconcile returns
(`decision.py`), and what children, storage, stalled ranks and failed pods say (`status.py`,
`stalls.py`, `failures.py`).
"""
