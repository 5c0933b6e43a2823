"""Pretraining data: parquet shards and the bundled corpus (dataset.py), the distributed token
loader (dataloader.py) and the BPE tokenizer (tokenizer.py)."""
