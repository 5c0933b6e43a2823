"""nanorun.trainer: one entry point per pipeline stage (`python -m nanorun.trainer.<module> --run-dir
URI`: tok_train, base_train, base_eval, mid_train, chat_sft, chat_rl, chat_eval, report, the stages
tokenizer, pretrain, baseEval, midtrain, sft, rl, eval, report of pipeline/stages.py; tok_eval; and
chat_cli, the terminal chat), and the libraries they are made of:

    model/       the GPT, attention kernels, FP8, Muon and AdamW
    data/        shards, the token loader, the tokenizer
    training/    the stage context, the post-training loop, checkpoints, metrics, cross-rank helpers
    evaluation/  CORE and bits per byte
    chat/        the KV-cache engine, conversations, the calculator, the code sandbox
    tasks/       evaluation and finetuning datasets

Import-light on purpose: what the operator shares with the stages (storage, progress files, the
stage table) is in `nanorun.pipeline`, which never imports torch.
"""
