"""The GPT-2 BPE, offline, byte-exact with OpenAI's encoding."""

from train.data import AUSTEN
from train.tokenizer import END_OF_TEXT, END_OF_TEXT_ID, gpt2_encoding


def test_reference_ids():
    encoding = gpt2_encoding()
    assert encoding.encode_ordinary("Hello world") == [15496, 995]
    assert encoding.encode(END_OF_TEXT, allowed_special="all") == [
        END_OF_TEXT_ID
    ]
    assert END_OF_TEXT_ID == 50256 and encoding.n_vocab == 50257


def test_whitespace_runs_are_split_like_openai():
    # keras-hub's tokenizer makes "\n\n" + letter one token; OpenAI's
    # lookahead keeps the newlines apart from the word.
    assert gpt2_encoding().encode_ordinary("a\n\nThe") == [64, 198, 198, 464]


def test_embedded_corpus_count_and_round_trip():
    text = AUSTEN.read_text(encoding="utf-8")
    ids = gpt2_encoding().encode_ordinary(text)
    assert len(ids) == 259_257
    assert gpt2_encoding().decode(ids) == text
