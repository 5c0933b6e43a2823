"""nanorun.trainer: tokenizer, model, optimizers, data, checkpoints, tasks, engine, and one module
per pipeline stage (`python -m nanorun.trainer.<stage> --run-dir URI`).

Import-light on purpose: the operator imports `nanorun.trainer.storage` and `.progress`, which
must not pull in torch.
"""
