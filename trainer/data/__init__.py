"""Pretraining data: the shard format (shards.py), the bundled corpus (corpus.py), downloads of public
shard sets (download.py), data URIs and the `nanorun data` command (dataset.py), the distributed
token loader (dataloader.py) and the BPE tokenizer (tokenizer.py)."""
