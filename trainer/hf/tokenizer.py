"""nanorun's tokenizer as a Hugging Face fast tokenizer: `AutoTokenizer.from_pretrained(DIR,
trust_remote_code=True)` (the folder's config names the model code it ships).

    hf = hf_tokenizer(Tokenizer.from_run_dir(run_dir), model_max_length=2048)
    hf.save_pretrained(out_dir)    # tokenizer.json, tokenizer_config.json, chat_template.jinja

- The BPE (`tokenizers`' byte-level BPE) is tiktoken's, converted by transformers'
  `TikTokenConverter` from the run's ranks: the same split pattern (`Split`, isolated), bytes
  mapped to characters as GPT-2's byte-level BPE does, and the merges rebuilt from the ranks (every
  way of splitting a token into two shorter ones is a merge, ranked by the token's rank, so the
  lowest-ranked adjacent pair is merged first, as tiktoken does); `ignore_merges` takes a whole
  piece that is a token as it is, as tiktoken does too.
- The nine chat special tokens are added tokens; plain text between them is encoded as ordinary
  text. `<|bos|>` is the BOS token (and pads a batch: padding is masked out),
  `<|assistant_end|>` the EOS; batches are padded on the left, for `generate`.
- The chat template renders a conversation as nanorun's `trainer/chat/conversation.py` does: BOS,
  the system message folded into the first user turn, user turns, assistant turns with their
  calculator calls and outputs; `add_generation_prompt` drops a trailing assistant message and opens
  an assistant turn, as `render_for_completion` does. `apply_chat_template` thus gives the engine's
  token ids.
"""

from __future__ import annotations

from typing import Any

BOS, EOS = "<|bos|>", "<|assistant_end|>"

# One Jinja expression per rule of render_conversation (trainer/chat/conversation.py). Whitespace is
# trimmed everywhere: every character the template writes is one the model reads.
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}{{- part['text'] -}}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(system='', expect='user') -%}"
    "{%- set history = messages -%}"
    "{%- if add_generation_prompt and messages and messages[-1]['role'] == 'assistant' -%}"
    "{%- set history = messages[:-1] -%}"
    "{%- endif -%}"
    "{{- '<|bos|>' -}}"
    "{%- for message in history -%}"
    "{%- if loop.first and message['role'] == 'system' -%}"
    "{%- set ns.system = text(message['content']) -%}"
    "{%- elif message['role'] != ns.expect -%}"
    "{{- raise_exception('messages alternate user/assistant, starting with user, after an optional "
    "system message; message ' ~ loop.index0 ~ ' is ' ~ message['role']) -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- set user = text(message['content']) -%}"
    "{%- if ns.system -%}{%- set user = ns.system ~ '\\n\\n' ~ user -%}{%- endif -%}"
    "{%- set ns.system = '' -%}{%- set ns.expect = 'assistant' -%}"
    "{{- '<|user_start|>' ~ user ~ '<|user_end|>' -}}"
    "{%- else -%}"
    "{%- set ns.expect = 'user' -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}{{- '<|python_start|>' ~ part['text'] ~ '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}"
    "{{- '<|output_start|>' ~ part['text'] ~ '<|output_end|>' -}}"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


def hf_tokenizer(tokenizer: Any, model_max_length: int) -> Any:
    """A transformers fast tokenizer that encodes and decodes as `tokenizer` (nanorun's) does."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class FromRanks(TikTokenConverter):
        """transformers' tiktoken conversion, from the ranks in memory rather than a file."""

        def load_tiktoken_bpe(self, _: str) -> dict[bytes, int]:
            return tokenizer.mergeable_ranks

        def extract_vocab_merges_from_model(self, url: str):
            vocab, merges = super().extract_vocab_merges_from_model(url)
            # The special tokens keep their ids: in the vocabulary first, then marked special (a piece
            # of text never reaches the BPE whole as "<|bos|>": the split pattern cuts "<|" from "bos").
            vocab.update(tokenizer.special_tokens)
            return vocab, merges

    fast = FromRanks(
        pattern=tokenizer.pattern, extra_special_tokens=list(tokenizer.special_tokens)
    ).converted()
    return PreTrainedTokenizerFast(
        tokenizer_object=fast,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=BOS,
        padding_side="left",  # a batch of prompts for `generate`: each row ends where its reply starts
        model_max_length=model_max_length,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
