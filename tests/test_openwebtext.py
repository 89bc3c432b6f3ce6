"""The OpenWebText builder on a tiny archive in the release's exact format."""

import io
import tarfile

import pytest
import tensorflow_datasets as tfds

from train import openwebtext


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_release(folder, subsets=3, docs_per_subset=8):
    """Writes `openwebtext.tar.xz`; returns {inner file name: text}."""
    texts = {}
    with tarfile.open(folder / openwebtext.ARCHIVE, "w:xz") as outer:
        for s in range(subsets):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w:xz") as inner:
                for d in range(docs_per_subset):
                    name = f"{s:04d}{d:03d}-{s * 31 + d:032x}.txt"
                    # Blank lines, unicode and trailing spaces must survive.
                    text = f"Page {s}.{d}\n\nCaf\u00e9 \u2014 {'word ' * d}"
                    texts[name] = text
                    _add(inner, name, text.encode("utf-8"))
            _add(
                outer,
                f"openwebtext/urlsf_subset{s:02d}-1_data.xz",
                inner_bytes.getvalue(),
            )
    return texts


def _prepare(tmp_path, manual_dir, val_fraction=0.3):
    config = openwebtext.OpenwebtextConfig(
        name="test", val_fraction=val_fraction
    )
    builder = openwebtext.Openwebtext(
        config=config, data_dir=tmp_path / "tfds"
    )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return builder


def _read(builder, split):
    return {
        example["text"].decode("utf-8")
        for example in tfds.as_numpy(builder.as_dataset(split=split))
    }


def test_every_document_once_and_splits_disjoint(tmp_path):
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    texts = make_release(manual_dir)
    builder = _prepare(tmp_path, manual_dir)

    train, validation = _read(builder, "train"), _read(builder, "validation")
    splits = builder.info.splits
    assert splits["train"].num_examples == len(train)
    assert splits["validation"].num_examples == len(validation)
    # 24 documents at 30% held out: both splits non-empty, none shared.
    assert train and validation
    assert not train & validation
    # Sets of distinct texts plus counts: each document exactly once,
    # byte for byte.
    assert len(train) + len(validation) == len(texts)
    assert train | validation == set(texts.values())
    held_out = [n for n in texts if openwebtext._in_validation(n, 0.3)]
    assert validation == {texts[n] for n in held_out}


def test_extracted_folder_gives_the_same_dataset(tmp_path):
    archive_dir = tmp_path / "archive"
    archive_dir.mkdir()
    texts = make_release(archive_dir, subsets=2, docs_per_subset=3)
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    with tarfile.open(archive_dir / openwebtext.ARCHIVE, "r:xz") as tar:
        tar.extractall(manual_dir, filter="data")
    builder = _prepare(tmp_path, manual_dir)
    both = _read(builder, "train") | _read(builder, "validation")
    assert both == set(texts.values())


def test_invalid_utf8_is_replaced(tmp_path):
    manual_dir = tmp_path / "manual"
    (manual_dir / "openwebtext").mkdir(parents=True)
    inner_bytes = io.BytesIO()
    with tarfile.open(fileobj=inner_bytes, mode="w:xz") as inner:
        _add(inner, "bad.txt", b"ok \xff end")
        _add(inner, "good.txt", b"fine")
    path = manual_dir / "openwebtext" / "urlsf_subset00-1_data.xz"
    path.write_bytes(inner_bytes.getvalue())
    # One document per split (hashes of the two names: under and over 0.5).
    builder = _prepare(tmp_path, manual_dir, val_fraction=0.5)
    both = _read(builder, "train") | _read(builder, "validation")
    assert both == {"ok \ufffd end", "fine"}


def test_missing_archive_raises_and_creates_nothing(tmp_path):
    manual_dir = tmp_path / "manual"
    manual_dir.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        _prepare(tmp_path, manual_dir)
    message = str(error.value)
    assert str(manual_dir / openwebtext.ARCHIVE) in message
    assert "Gokaslan & Cohen" in message
    assert not (tmp_path / "tfds").exists()


def test_val_fraction_out_of_range():
    config = openwebtext.OpenwebtextConfig(name="bad", val_fraction=1.5)
    with pytest.raises(ValueError, match=r"\(0, 1\).*val_fraction=1.5"):
        openwebtext.Openwebtext(config=config, data_dir="/nonexistent")
