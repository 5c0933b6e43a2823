"""The GPT (gpt.py), its attention kernels (attention.py), FP8 matmuls (fp8.py) and the Muon and
AdamW optimizers (optim.py)."""
