"""What every training stage shares: the stage context and logging (common.py), the training loop
of post-training (finetune.py), checkpoints (checkpoint.py) and Prometheus metrics (metrics.py)."""
