"""nanorun.trainer.tasks: the datasets post-training trains on and the chat evaluations.

`common` (Task, TaskMixture, TaskSequence, categorical and generative evaluation), one module per
dataset (smoltalk, mmlu, gsm8k, arc, humaneval, spelling, customjson, arithmetic), `hf` (parquet
download with a cache in run storage) and `mixtures` (what each stage trains on, offline fallback).
"""
