"""OpenWebText as a TFDS dataset, read from the manually downloaded release.

tensorflow-datasets has no OpenWebText builder, and the corpus has no stable
download URL, so `Openwebtext` reads `openwebtext.tar.xz` from TFDS's manual
dir. That archive holds `openwebtext/urlsf_subset*_data.xz` files, each an
xz-compressed tar of `.txt` documents. Both layers are streamed with
`tarfile`, so nothing is extracted to disk.

The release has no validation split. Like nanoGPT (0.05% held out), we hold
out documents whose file-name hash falls under `val_fraction`: the split is
disjoint, deterministic and independent of archive order.
"""

import dataclasses
import hashlib
import tarfile

import tensorflow_datasets as tfds
from etils import epath

ARCHIVE = "openwebtext.tar.xz"
FOLDER = "openwebtext"

_CITATION = """\
@misc{Gokaslan2019OpenWeb,
  title={OpenWebText Corpus},
  author={Aaron Gokaslan and Vanya Cohen},
  howpublished={\\url{http://Skylion007.github.io/OpenWebTextCorpus}},
  year={2019}
}"""

_HOMEPAGE = "https://skylion007.github.io/OpenWebTextCorpus/"


@dataclasses.dataclass(eq=False)
class OpenwebtextConfig(tfds.core.BuilderConfig):
    """Builder config: `val_fraction` of documents go to "validation"."""

    val_fraction: float = 0.0005


class Openwebtext(tfds.core.GeneratorBasedBuilder):
    """OpenWebText (Gokaslan & Cohen, 2019): ~8M web pages as plain text.

    Example:

    ```python
    builder = Openwebtext(data_dir="~/tensorflow_datasets")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir="~/owt"))
    train = builder.as_dataset(split="train")  # {"text": tf.string}
    ```
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        OpenwebtextConfig(
            name="default",
            description="0.05% of documents held out for validation.",
        )
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Download `{ARCHIVE}` (about 12 GB) of the OpenWebText corpus release
    (Gokaslan & Cohen, 2019, {_HOMEPAGE}) and put it in the manual dir
    (`tfds.download.DownloadConfig(manual_dir=...)`, by default
    `<data_dir>/downloads/manual/`). Its extracted folder `{FOLDER}/`
    (holding the `urlsf_subset*_data.xz` files) works too.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        fraction = self.builder_config.val_fraction
        # TFDS refuses to write an empty split, so 0 is not allowed.
        if not 0.0 < fraction < 1.0:
            raise ValueError(
                "Argument `val_fraction` must be in (0, 1). "
                f"Received: val_fraction={fraction}"
            )

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text()}
            ),
            homepage=_HOMEPAGE,
            citation=_CITATION,
        )

    def download_and_prepare(
        self, *, download_dir=None, download_config=None, **kwargs
    ):
        # TFDS creates directories before it asks for the manual dir, so
        # look for the archive first: a missing download creates nothing.
        if not self.data_path.exists():
            config = download_config or tfds.download.DownloadConfig()
            downloads = epath.Path(
                download_dir or self.data_dir_root / "downloads"
            )
            _find_source(config.manual_dir or downloads / "manual")
        super().download_and_prepare(
            download_dir=download_dir,
            download_config=download_config,
            **kwargs,
        )

    def _split_generators(self, dl_manager):
        source = _find_source(dl_manager.manual_dir)
        # Each split streams the whole archive once: the held-out set is
        # tiny, but which documents belong to it is only known by reading.
        return {
            "train": self._generate_examples(source, validation=False),
            "validation": self._generate_examples(source, validation=True),
        }

    def _generate_examples(self, source, validation):
        fraction = self.builder_config.val_fraction
        for name, data in _documents(source):
            if _in_validation(name, fraction) == validation:
                # A few pages hold bytes that are not UTF-8; we replace them
                # (U+FFFD) rather than drop the page or fail the build.
                yield name, {"text": data.decode("utf-8", errors="replace")}


def _find_source(manual_dir):
    """The archive, else the extracted folder, else a clear error."""
    manual_dir = epath.Path(manual_dir)
    if (manual_dir / ARCHIVE).is_file():
        return manual_dir / ARCHIVE
    if (manual_dir / FOLDER).is_dir():
        return manual_dir / FOLDER
    raise FileNotFoundError(
        f"OpenWebText was not found: no `{ARCHIVE}` (nor extracted "
        f"`{FOLDER}/` folder) in the manual dir {manual_dir}. Download "
        f"`{ARCHIVE}` of the OpenWebText corpus release (Gokaslan & Cohen, "
        f"2019, {_HOMEPAGE}) and put it at {manual_dir / ARCHIVE}."
    )


def _in_validation(name, fraction):
    # sha256 rather than hash(): Python salts str hashes per process.
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _documents(source):
    """Yields (inner file name, bytes) of every document, streaming."""
    if source.is_dir():
        for subset in sorted(source.glob("*.xz")):
            with subset.open("rb") as f:
                yield from _subset_documents(f)
        return
    # "|" modes read strictly forward, which is all we need: no seeking
    # back into a 12 GB xz stream.
    with source.open("rb") as f, tarfile.open(fileobj=f, mode="r|xz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".xz"):
                yield from _subset_documents(tar.extractfile(member))


def _subset_documents(fileobj):
    with tarfile.open(fileobj=fileobj, mode="r|xz") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".txt"):
                yield member.name, tar.extractfile(member).read()
