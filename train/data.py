"""Pretraining data: token sources, a tokenize-once cache, window packing.

`load_tokens` tokenizes a source once, with GPT-2's BPE (tiktoken, byte-exact
with OpenAI's) or as UTF-8 bytes, into `cache_dir/<slug>/{train,val}.bin` and
memory-maps those files afterwards. `make_dataset` cuts the token stream into fixed windows
and batches them for `GPT2CausalLM`-style models.
"""

import hashlib
import itertools
import json
import os
import pathlib
import re
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
import tqdm

from train import tokenizer

AUSTEN = pathlib.Path(__file__).parent / "data" / "austen.txt"
# GPT-2 ids are < 50257 < 2**16, so two bytes per token (bytes too: one
# format for every cache).
_DTYPE = np.uint16
# Documents per `encode_ordinary_batch` call: enough to keep every thread
# busy, few enough that the texts in flight stay small.
_CHUNK = 1024


def load_tokens(
    source, cache_dir, val_fraction=0.05, data_dir=None, manual_dir=None,
    tokenizer_name="gpt2",
):
    """Token ids of `source`, tokenized once and cached.

    Args:
        source: `"austen"` (the embedded novels), `"text:PATH"` (a UTF-8
            text file, or every `*.txt` under a directory, one document per
            file) or `"openwebtext"` (the TFDS builder in
            `train/openwebtext.py`, with its own train/validation splits).
        cache_dir: folder for the tokenized cache.
        val_fraction: for text sources, the last `val_fraction` of the token
            stream is validation. Ignored for `"openwebtext"`.
        data_dir: TFDS data dir for `"openwebtext"`.
        manual_dir: folder holding `openwebtext.tar.xz`.
        tokenizer_name: `"gpt2"` (BPE) or `"bytes"` (UTF-8 bytes).

    Returns:
        `(train_ids, val_ids)`, 1-D uint16 arrays memory-mapped from the
        cache. Every document ends with the tokenizer's end-of-text id
        (`tokenizer.END_OF_TEXT_IDS`).
    """
    if tokenizer_name not in tokenizer.VOCAB_SIZES:
        raise ValueError(
            f"Argument `tokenizer_name` must be one of "
            f"{sorted(tokenizer.VOCAB_SIZES)}. "
            f"Received: tokenizer_name={tokenizer_name!r}"
        )
    files = _source_files(source)
    if files is not None and not 0.0 < val_fraction < 1.0:
        raise ValueError(
            "Argument `val_fraction` must be in (0, 1). "
            f"Received: val_fraction={val_fraction}"
        )
    folder = pathlib.Path(cache_dir) / _slug(
        source, files, val_fraction, tokenizer_name)
    meta = _read_meta(folder)
    if meta is None:
        folder.mkdir(parents=True, exist_ok=True)
        if files is None:
            meta = _cache_openwebtext(
                folder, data_dir, manual_dir, tokenizer_name)
        else:
            meta = _cache_text(
                folder, source, files, val_fraction, tokenizer_name)
    return (
        _open(folder / "train.bin", meta["train_tokens"]),
        _open(folder / "val.bin", meta["val_tokens"]),
    )


def _source_files(source):
    """Text files of `source` (sorted), or None for OpenWebText."""
    if source == "openwebtext":
        return None
    if source == "austen":
        return [AUSTEN]
    if source.startswith("text:"):
        path = pathlib.Path(source[len("text:"):]).expanduser()
        if path.is_file():
            return [path]
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            if files:
                return files
            raise ValueError(
                f"No `*.txt` files under {path} (source={source!r}). "
                "Put UTF-8 text files there, one document per file."
            )
        raise FileNotFoundError(
            f"Text source not found: {path} (source={source!r}). "
            "Pass `text:` followed by an existing file or directory."
        )
    raise ValueError(
        "Argument `source` must be 'austen', 'text:PATH' or 'openwebtext'. "
        f"Received: source={source!r}"
    )


def _slug(source, files, val_fraction, tokenizer_name):
    # BPE caches keep the names they had before byte caches existed.
    suffix = "" if tokenizer_name == "gpt2" else f"-{tokenizer_name}"
    if files is None:
        return "openwebtext" + suffix
    # Paths, sizes and mtimes in the name: editing a file, or asking for
    # another split, gets a fresh cache instead of stale tokens.
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
             for f in files]
    key = json.dumps([source, val_fraction, stats]).encode("utf-8")
    name = source
    if source.startswith("text:"):
        # Readable and safe as a folder name: "text:~/my books" gives
        # "text-my_books-<hash>".
        base = pathlib.Path(source[len("text:"):]).name
        name = "text-" + re.sub(r"[^\w.-]+", "_", base)
    return f"{name}{suffix}-{hashlib.sha256(key).hexdigest()[:12]}"


def _read_meta(folder):
    """The cache's metadata, or None unless every file is complete."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        sizes = [(folder / f"{split}.bin").stat().st_size
                 for split in ("train", "val")]
    except FileNotFoundError:
        return None
    itemsize = np.dtype(_DTYPE).itemsize
    expected = [meta["train_tokens"] * itemsize, meta["val_tokens"] * itemsize]
    return meta if sizes == expected else None


def _open(path, count):
    # np.memmap refuses empty files; an empty split is a plain empty array.
    if count == 0:
        return np.zeros(0, _DTYPE)
    return np.memmap(path, dtype=_DTYPE, mode="r", shape=(count,))


def _cache_text(folder, source, files, val_fraction, tokenizer_name):
    temp = _temp_path(folder)
    try:
        with open(temp, "wb") as out:
            total = _write_tokens(
                _read_texts(files), out, len(files), tokenizer_name)
        if total["text_tokens"] == 0:
            raise ValueError(
                f"The corpus {source!r} is empty: its {len(files)} file(s) "
                "hold no text. Point the source at non-empty text files."
            )
        # Split by position: the tail of the stream is validation.
        num_val = int(round(total["tokens"] * val_fraction))
        num_train = total["tokens"] - num_val
        itemsize = np.dtype(_DTYPE).itemsize
        val_temp = _temp_path(folder)
        try:
            np.fromfile(
                temp, _DTYPE, count=num_val, offset=num_train * itemsize
            ).tofile(val_temp)
            os.truncate(temp, num_train * itemsize)
            os.replace(val_temp, folder / "val.bin")
        finally:
            _remove(val_temp)
        os.replace(temp, folder / "train.bin")
    finally:
        _remove(temp)
    meta = dict(
        source=source,
        val_fraction=val_fraction,
        train_tokens=num_train,
        val_tokens=num_val,
        documents=total["documents"],
    )
    return _write_meta(folder, meta, tokenizer_name)


def _cache_openwebtext(folder, data_dir, manual_dir, tokenizer_name):
    # Imported here: TFDS and the builder are only needed for this source.
    import tensorflow_datasets as tfds

    from train import openwebtext

    builder = openwebtext.Openwebtext(data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    counts = {}
    for split, name in (("train", "train"), ("validation", "val")):
        texts = (
            example["text"].decode("utf-8")
            for example in tfds.as_numpy(
                builder.as_dataset(split=split, shuffle_files=False)
            )
        )
        temp = _temp_path(folder)
        try:
            with open(temp, "wb") as out:
                size = builder.info.splits[split].num_examples
                counts[name] = _write_tokens(
                    texts, out, size, tokenizer_name)
            os.replace(temp, folder / f"{name}.bin")
        finally:
            _remove(temp)
    meta = dict(
        source="openwebtext",
        train_tokens=counts["train"]["tokens"],
        val_tokens=counts["val"]["tokens"],
        documents=counts["train"]["documents"] + counts["val"]["documents"],
    )
    return _write_meta(folder, meta, tokenizer_name)


def _read_texts(files):
    for path in files:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{path} is not UTF-8 text ({error}). Convert it to UTF-8 "
                "or leave it out of the source."
            ) from error


def _write_tokens(texts, out, num_documents, tokenizer_name):
    """Tokenizes `texts` chunk by chunk into `out`; returns the counts."""
    end_of_text = tokenizer.END_OF_TEXT_IDS[tokenizer_name]
    total = dict(tokens=0, text_tokens=0, documents=0)
    progress = (tqdm.tqdm(total=num_documents, unit="doc", desc="Tokenizing")
                if sys.stderr.isatty() else
                PlainProgress(num_documents, "Tokenizing", "doc"))
    with progress:
        while chunk := list(itertools.islice(texts, _CHUNK)):
            encoded = tokenizer.encode_batch(tokenizer_name, chunk)
            # An empty document would add a lone end-of-text id: skip it.
            encoded = [ids + [end_of_text] for ids in encoded if ids]
            ids = np.fromiter(
                itertools.chain.from_iterable(encoded), dtype=_DTYPE
            )
            ids.tofile(out)
            total["tokens"] += ids.size
            total["text_tokens"] += ids.size - len(encoded)
            total["documents"] += len(encoded)
            progress.update(len(chunk))
    return total


class PlainProgress:
    """tqdm's counts as a plain line on stderr every `interval` seconds and
    at the end, for a log file (there tqdm's bar is carriage returns
    piling up on one line)."""

    FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}]"

    def __init__(self, total, desc, unit, interval=30.0):
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.interval = 0, interval
        self.start = self.shown = time.monotonic()

    def update(self, n):
        self.n += n
        if time.monotonic() - self.shown >= self.interval:
            self.show()

    def show(self):
        self.shown = time.monotonic()
        print(tqdm.tqdm.format_meter(
            self.n, self.total, self.shown - self.start, prefix=self.desc,
            unit=self.unit, bar_format=self.FORMAT), file=sys.stderr,
            flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.show()


def _write_meta(folder, meta, tokenizer_name):
    names = {"gpt2": "gpt2 (tiktoken)", "bytes": "UTF-8 bytes"}
    meta = dict(meta, tokenizer=names[tokenizer_name], dtype="uint16")
    temp = _temp_path(folder)
    try:
        pathlib.Path(temp).write_text(json.dumps(meta, indent=2) + "\n")
        # meta.json goes last: its presence marks the cache complete.
        os.replace(temp, folder / "meta.json")
    finally:
        _remove(temp)
    return meta


def _temp_path(folder):
    # A unique name per writer: two processes filling the same cache
    # (several workers) never write into each other's file.
    handle, path = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(handle)
    return path


def _remove(path):
    if os.path.exists(path):
        os.remove(path)


def make_dataset(
    ids,
    block_size,
    batch_size,
    shuffle_seed=None,
    repeat=False,
    input_context=None,
):
    """Batches of next-token windows cut from a token stream.

    The stream is cut into non-overlapping windows of `block_size + 1`
    tokens (the tail that does not fill one is dropped); each gives inputs
    `window[:-1]` and targets `window[1:]`.

    Args:
        ids: 1-D array of token ids, e.g. a memmap from `load_tokens`.
        block_size: tokens per example.
        batch_size: global batch size. With `input_context`, each input
            pipeline gets its per-replica share.
        shuffle_seed: None keeps stream order; an int shuffles windows,
            in a new but reproducible order each epoch.
        repeat: repeat epochs forever (training).
        input_context: optional `tf.distribute.InputContext`; each input
            pipeline then reads its own disjoint share of the windows.

    Returns:
        A `tf.data.Dataset` of `({"token_ids", "padding_mask"}, targets)`,
        int32 tensors of shape `(batch, block_size)`.
    """
    ids = np.asarray(ids)  # a view: a memmap stays on disk
    if ids.ndim != 1:
        raise ValueError(
            "Argument `ids` must be a 1-D array of token ids. "
            f"Received: ids with shape {ids.shape}"
        )
    window = block_size + 1
    num_windows = ids.size // window
    if num_windows == 0:
        raise ValueError(
            f"The corpus is too short: one window of block_size + 1 = "
            f"{window} tokens is needed, but it has {ids.size} tokens. "
            "Use a longer corpus or a smaller `block_size`."
        )
    pipelines, pipeline = 1, 0
    if input_context is not None:
        pipelines = input_context.num_input_pipelines
        pipeline = input_context.input_pipeline_id
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    # Equal shares, so no pipeline runs out of data before the others.
    per_pipeline = num_windows // pipelines
    if per_pipeline < batch_size:
        raise ValueError(
            f"The corpus is too short: {ids.size} tokens give {num_windows} "
            f"windows of {window} tokens, {per_pipeline} per input pipeline,"
            f" fewer than batch_size={batch_size}. Use a longer corpus or "
            "a smaller `batch_size` or `block_size`."
        )

    def epoch_windows(epoch_key):
        # Pipeline i takes positions i, i + n, ... of the epoch's order.
        positions = tf.data.Dataset.range(
            pipeline, per_pipeline * pipelines, pipelines
        )
        if shuffle_seed is None:
            return positions
        # A stateless permutation of all window indices: no shuffle buffer
        # (millions of windows), and every pipeline computes the same one.
        seed = tf.stack([tf.constant(shuffle_seed, tf.int64), epoch_key])
        last = tf.constant(num_windows - 1, tf.int64)
        return positions.map(
            lambda p: tf.random.experimental.index_shuffle(p, seed, last)
        )

    if shuffle_seed is None:
        epochs = tf.data.Dataset.range(1)
    else:
        # One random key per epoch, drawn anew each time the dataset is
        # iterated, reproducibly for a given seed.
        epochs = tf.data.Dataset.random(
            seed=shuffle_seed, rerandomize_each_iteration=True
        ).take(1)
    if repeat:
        epochs = epochs.repeat()

    def read(starts):
        # No TF op reads a slice of a file, so numpy gathers the batch from
        # the memmap: one call per batch, only those tokens are read.
        rows = ids[starts[:, None] + np.arange(window)]
        return rows.astype(np.int32)

    def to_example(starts):
        rows = tf.numpy_function(read, [starts], tf.int32, stateful=False)
        rows = tf.ensure_shape(rows, (batch_size, window))
        inputs = {
            "token_ids": rows[:, :-1],
            # Packed windows are all real tokens. int32, not bool: Keras's
            # MirroredStrategy build adds replica inputs with AddN, which
            # has no bool kernel.
            "padding_mask": tf.ones((batch_size, block_size), tf.int32),
        }
        return inputs, rows[:, 1:]

    dataset = epochs.flat_map(epoch_windows)
    dataset = dataset.map(lambda w: w * window)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.map(to_example, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
