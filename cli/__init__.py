"""The `nanorun` command: the dispatcher (main.py) and `nanorun run FILE` (run.py), the executor that
runs an LLMRun's stage plan on one machine, the way the operator runs it on a cluster."""
