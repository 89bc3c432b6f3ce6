"""Token cache and window packing in train/data.py."""

import os

import numpy as np
import pytest
import tensorflow as tf

from train import data, tokenizer

AUSTEN_TOKENS = 259_257  # tiktoken "gpt2", encode_ordinary of austen.txt


@pytest.fixture(scope="module")
def austen(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, data.load_tokens("austen", cache)


def _windows(dataset):
    """All (input + last target) windows of a finite dataset, as tuples."""
    out = []
    for inputs, targets in dataset:
        ids, targets = inputs["token_ids"].numpy(), targets.numpy()
        # Targets are the inputs shifted by one.
        np.testing.assert_array_equal(ids[:, 1:], targets[:, :-1])
        assert inputs["padding_mask"].numpy().all()
        out += [tuple(row) + (t[-1],) for row, t in zip(ids, targets)]
    return out


def test_austen_token_count_and_split(austen):
    _, (train, val) = austen
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    # One document, so one <|endoftext|> after its tokens.
    assert train.size + val.size == AUSTEN_TOKENS + 1
    assert val.size == round((AUSTEN_TOKENS + 1) * 0.05)
    # Validation is the tail of the stream: it holds the final end-of-text.
    assert val[-1] == tokenizer.END_OF_TEXT_ID
    assert tokenizer.END_OF_TEXT_ID not in train
    text = data.AUSTEN.read_text(encoding="utf-8")
    stream = tokenizer.gpt2_encoding().encode_ordinary(text)
    np.testing.assert_array_equal(train, stream[: train.size])
    np.testing.assert_array_equal(val[:-1], stream[train.size:])


def test_second_call_reads_the_cache(austen, monkeypatch):
    cache, (train, val) = austen

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(tokenizer, "gpt2_encoding", fail)
    train_again, val_again = data.load_tokens("austen", cache)
    assert isinstance(train_again, np.memmap)
    np.testing.assert_array_equal(train_again, train)
    np.testing.assert_array_equal(val_again, val)
    (folder,) = [p for p in cache.iterdir() if p.name.startswith("austen")]
    assert sorted(p.name for p in folder.iterdir()) == [
        "meta.json", "train.bin", "val.bin"]


def test_windows_are_next_token_pairs_in_order(austen):
    _, (train, _) = austen
    block, batch = 128, 16
    windows = _windows(data.make_dataset(train, block, batch))
    # Non-overlapping windows of block + 1 tokens; the tail and the last
    # partial batch are dropped.
    num = train.size // (block + 1) // batch * batch
    assert len(windows) == num
    expected = np.asarray(train[: num * (block + 1)]).reshape(num, block + 1)
    np.testing.assert_array_equal(np.array(windows), expected)


def test_shapes_and_dtypes():
    ids = np.arange(1000, dtype=np.uint16)
    inputs, targets = next(iter(data.make_dataset(ids, 8, 4, repeat=True)))
    assert inputs["token_ids"].shape == (4, 8)
    assert inputs["token_ids"].dtype == tf.int32
    assert inputs["padding_mask"].dtype == tf.int32
    assert targets.shape == (4, 8) and targets.dtype == tf.int32


def test_shuffle_is_reproducible_and_reshuffles_each_epoch():
    ids = np.arange(10 * 5, dtype=np.uint16)  # 10 windows of 5
    first = _windows(data.make_dataset(ids, 4, 1, shuffle_seed=1))
    same = _windows(data.make_dataset(ids, 4, 1, shuffle_seed=1))
    other = _windows(data.make_dataset(ids, 4, 1, shuffle_seed=2))
    assert first == same
    assert first != other
    assert sorted(first) == sorted(other) == _windows(
        data.make_dataset(ids, 4, 1))
    # Repeating gives every window once per epoch, in a new order.
    repeated = data.make_dataset(ids, 4, 1, shuffle_seed=1, repeat=True)
    two_epochs = _windows(repeated.take(20))
    assert two_epochs[:10] == first
    assert sorted(two_epochs[10:]) == sorted(first)
    assert two_epochs[10:] != first


def test_input_pipelines_get_disjoint_shares():
    ids = np.arange(12 * 5, dtype=np.uint16)  # 12 windows of 5
    shares = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2,
            input_pipeline_id=pipeline,
            num_replicas_in_sync=2,
        )
        # Global batch 4 -> 2 per replica.
        dataset = data.make_dataset(
            ids, 4, 4, shuffle_seed=3, input_context=context
        )
        assert dataset.element_spec[1].shape == (2, 4)
        shares.append(_windows(dataset))
    assert len(shares[0]) == len(shares[1]) == 6
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == _windows(
        data.make_dataset(ids, 4, 1))


def test_too_short_corpus_raises():
    with pytest.raises(ValueError, match="block_size \\+ 1 = 9.*has 5 tok"):
        data.make_dataset(np.arange(5, dtype=np.uint16), 8, 1)
    with pytest.raises(ValueError, match="batch_size=4"):
        data.make_dataset(np.arange(27, dtype=np.uint16), 8, 4)


def test_text_directory_source(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "b.txt").write_text("Second file.", encoding="utf-8")
    (corpus / "sub" / "a.txt").write_text("Third.", encoding="utf-8")
    (corpus / "a.txt").write_text("First file here.", encoding="utf-8")
    (corpus / "notes.md").write_text("not text source", encoding="utf-8")
    train, val = data.load_tokens(
        f"text:{corpus}", tmp_path / "cache", val_fraction=0.25
    )
    encode = tokenizer.gpt2_encoding().encode_ordinary
    eot = [tokenizer.END_OF_TEXT_ID]
    # Sorted paths: a.txt, b.txt, sub/a.txt; one end-of-text after each.
    expected = (encode("First file here.") + eot + encode("Second file.")
                + eot + encode("Third.") + eot)
    np.testing.assert_array_equal(np.concatenate([train, val]), expected)
    assert val.size == round(len(expected) * 0.25)


def test_progress_in_a_file_is_plain_lines(tmp_path, capfd):
    # Under pytest stderr is not a terminal, as in a log file: no tqdm bar
    # (carriage returns), one plain line at the end of each split.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A few words of text.", encoding="utf-8")
    data.load_tokens(f"text:{corpus}", tmp_path / "cache")
    err = capfd.readouterr().err
    assert "\r" not in err
    assert [line for line in err.splitlines()
            if line.startswith("Tokenizing")] == ["Tokenizing: 1/1 doc [00:00<00:00]"]


def test_empty_and_bad_sources(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        data.load_tokens(f"text:{empty}", tmp_path / "cache")
    # The failed build left neither a cache nor temp files behind.
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Fran\u00e7ais".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt is not UTF-8 text"):
        data.load_tokens(f"text:{latin}", tmp_path / "cache")
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="No `\\*.txt` files"):
        data.load_tokens(f"text:{tmp_path / 'none'}", tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="missing"):
        data.load_tokens(f"text:{tmp_path / 'missing'}", tmp_path / "cache")
    with pytest.raises(ValueError, match="source='wiki'"):
        data.load_tokens("wiki", tmp_path / "cache")
    with pytest.raises(ValueError, match="val_fraction=0"):
        data.load_tokens("austen", tmp_path / "cache", val_fraction=0)


def test_interrupted_cache_is_rebuilt(tmp_path):
    source = tmp_path / "doc.txt"
    source.write_text("Some words to tokenize. " * 20, encoding="utf-8")
    cache = tmp_path / "cache"
    # Copies: the cache files are changed below under any memmap of them.
    train, val = map(np.array, data.load_tokens(f"text:{source}", cache))
    (folder,) = cache.iterdir()
    # A crash before meta.json was written: bins (even truncated ones) and
    # a temp file, but no meta.
    os.remove(folder / "meta.json")
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(4)
    (folder / "leftover.tmp").write_bytes(b"\0" * 6)
    again_train, again_val = data.load_tokens(f"text:{source}", cache)
    np.testing.assert_array_equal(again_train, train)
    np.testing.assert_array_equal(again_val, val)
    # A meta.json that does not match the files is not trusted either.
    with open(folder / "val.bin", "r+b") as f:
        f.truncate(2)
    np.testing.assert_array_equal(
        data.load_tokens(f"text:{source}", cache)[1], val)


def test_openwebtext_source(tmp_path, monkeypatch):
    from test_openwebtext import make_release

    from train import openwebtext

    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    texts = make_release(manual_dir, subsets=2, docs_per_subset=6)
    # The default 0.05% would hold out none of 12 documents.
    monkeypatch.setattr(
        openwebtext.Openwebtext.BUILDER_CONFIGS[0], "val_fraction", 0.3
    )
    train, val = data.load_tokens(
        "openwebtext", tmp_path / "cache",
        data_dir=tmp_path / "tfds", manual_dir=manual_dir,
    )
    held_out = [n for n in texts if openwebtext._in_validation(n, 0.3)]
    encode = tokenizer.gpt2_encoding().encode_ordinary
    eot = tokenizer.END_OF_TEXT_ID
    # TFDS stores documents in its own order: compare sorted documents.
    val_docs = np.split(val, np.flatnonzero(val == eot)[:-1] + 1)
    assert sorted(tuple(d) for d in val_docs) == sorted(
        tuple(encode(texts[n]) + [eot]) for n in held_out)
    total = sum(len(encode(t)) + 1 for t in texts.values())
    assert train.size + val.size == total


def test_byte_tokenizer_caches_the_utf8_bytes(tmp_path):
    source = tmp_path / "books"
    source.mkdir()
    # Two documents (sorted by name), one with a two-byte character.
    (source / "a.txt").write_text("né\n", encoding="utf-8")
    (source / "b.txt").write_text("ab", encoding="utf-8")
    train, val = data.load_tokens(f"text:{source}", tmp_path / "cache",
                                  val_fraction=0.25, tokenizer_name="bytes")
    # "né\n" is 6e c3 a9 0a; each document ends with byte 0: 8 tokens in
    # all, the last round(8 * 0.25) = 2 of them validation.
    stream = [0x6E, 0xC3, 0xA9, 0x0A, 0, ord("a"), ord("b"), 0]
    np.testing.assert_array_equal(np.concatenate([train, val]), stream)
    assert val.size == 2
    assert tokenizer.VOCAB_SIZES["bytes"] == 256
    # Its own cache, beside (not instead of) the BPE one.
    data.load_tokens(f"text:{source}", tmp_path / "cache", val_fraction=0.25)
    # (Names end in a hash of the files' stats, so their order varies.)
    names = [p.name for p in (tmp_path / "cache").iterdir()]
    assert sorted("-bytes-" in name for name in names) == [False, True]
    with pytest.raises(ValueError, match="tokenizer_name"):
        data.load_tokens("austen", tmp_path / "cache", tokenizer_name="char")
