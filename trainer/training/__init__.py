"""What every training stage shares: the stage context and logging (common.py), the one training
loop (loop.py), where post-training starts and how it schedules (finetune.py), checkpoints
(checkpoint.py), torch.compile (compilation.py), the process group and cross-rank helpers
(distributed.py), each rank's heartbeat, stack dumps and attempt fencing (liveness.py) and
Prometheus metrics (metrics.py)."""
