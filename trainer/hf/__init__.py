"""A run's model in the Hugging Face format: the model and configuration files every exported folder
ships for `trust_remote_code` (modeling_nanorun.py, configuration_nanorun.py), the tokenizer in the
`tokenizers` format with nanorun's chat template (tokenizer.py), and the export itself (export.py)."""
