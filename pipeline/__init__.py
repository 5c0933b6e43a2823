"""What every component shares, torch-free so the operator image can import it alone: the stage
table (stages.py), the defaults the spec and the stages share (defaults.py), the run directory's
layout (layout.py), local and S3 storage (storage.py), the stage contract's progress files
(progress.py), per-rank liveness and attempt fencing (liveness.py), progress reports to Kubeflow
Trainer (trainer_status.py), a sweep's directory (sweep.py), deleting a run's files (cleanup.py) and
the errors a stage explains in one line (errors.py)."""
