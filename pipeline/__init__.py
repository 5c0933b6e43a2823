"""What every component shares, torch-free so the operator image can import it alone: the stage
table (stages.py), the run directory's layout (layout.py), local and S3 storage (storage.py), the
stage contract's progress files (progress.py) and the errors a stage explains in one line
(errors.py)."""
