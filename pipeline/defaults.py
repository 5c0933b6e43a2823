"""The model and training defaults that the LLMRun spec (operator/api/llmrun.py) and the stages' command
lines (trainer/) share: one value each, so an unset spec field and a stage run by hand agree. The
values are nanochat's (github.com/karpathy/nanochat, scripts/base_train.py).

Torch-free on purpose: the operator image imports it.
"""

DEPTH = 20  # transformer layers: the speedrun's d20 (1280 wide, 10 heads, about 900M parameters)
ASPECT_RATIO = 64  # model width per layer of depth
HEAD_DIM = 128  # attention head dimension
MAX_SEQ_LEN = 2048  # context length in tokens
VOCAB_SIZE = 32768  # 2**15 tokens, special tokens included
DEVICE_BATCH_SIZE = 32  # sequences per process per micro-step: 32 x 2048 tokens fit an 80 GB GPU at d20
# Training tokens per scaling parameter (the block matrices and the LM head) when no other horizon
# is given: below Chinchilla's compute-optimal 20 (Hoffmann et al. 2022, arXiv:2203.15556), as
# nanochat's speedrun trains (its default since nanochat commit 1cd94d7).
PARAM_DATA_RATIO = 12
