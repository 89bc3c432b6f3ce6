"""train.pretrain's settings: every invalid one exits as argparse does
(status 2, one line naming the flag) before anything is written; the
valid ones keep their names and defaults, which train.compare relies on."""

import dataclasses
import json

import pytest

from train import configs
from train import data
from train import pretrain

PROG = "python -m train.pretrain: error: "

# (flags, what the error says); {tmp} is an empty folder.
INVALID = [
    (["--model", "gpt5"], "--model must be one of byte-s, byte-m, tiny"),
    (["--optimizer", "sgd"], "--optimizer must be one of sophia-g, "
     "sophia-h, adamw, lion; got 'sgd'"),
    (["--tokenizer", "chars"], "--tokenizer must be one of gpt2, bytes; "
     "got 'chars'"),
    (["--strategy", "cluster"], "--strategy must be one of default, "
     "mirrored, multiworker, tpu; got 'cluster'"),
    (["--precision", "float16"], "--precision must be one of float32, "
     "mixed_bfloat16, mixed_float16; got 'float16'"),
    (["--data", "wikipedia"], "--data must be austen, openwebtext or "
     "text:PATH"),
    (["--data", "text:{tmp}/missing.txt"], "--data must be"),
    (["--data", "text:{tmp}"], "--data must be"),  # no *.txt in it
    (["--steps", "0"], "--steps must be > 0; got 0"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--batch-size", "-4"], "--batch-size must be > 0; got -4"),
    (["--block-size", "0"], "--block-size must be > 0; got 0"),
    (["--eval-interval", "0"], "--eval-interval must be > 0; got 0"),
    (["--eval-steps", "0"], "--eval-steps must be > 0; got 0"),
    (["--log-interval", "-10"], "--log-interval must be > 0; got -10"),
    (["--hessian-interval", "0"], "--hessian-interval must be > 0; got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0; got -1"),
    (["--lr", "-1"], "--lr must be > 0; got -1.0"),
    (["--lr", "0"], "--lr must be > 0; got 0.0"),
    (["--min-lr", "-0.0001"], "--min-lr must be in [0, --lr] = [0, 0.002]; "
     "got -0.0001"),
    (["--lr", "1e-3", "--min-lr", "2e-3"], "--min-lr must be in [0, --lr] "
     "= [0, 0.001]; got 0.002"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0; got -0.1"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0; got -1.0"),
    (["--rho", "0"], "--rho must be > 0; got 0.0"),
    (["--hessian-batch-fraction", "0"], "--hessian-batch-fraction must be "
     "in (0, 1]; got 0.0"),
    (["--hessian-batch-fraction", "1.5"], "--hessian-batch-fraction must "
     "be in (0, 1]; got 1.5"),
    (["--hessian-chunks", "0"], "--hessian-chunks must be auto or an "
     "integer >= 1; got 0"),
    (["--hessian-chunks", "two"], "argument --hessian-chunks: must be auto "
     "or an integer >= 1; got 'two'"),
    (["--val-fraction", "0"], "--val-fraction must be in (0, 1); got 0.0"),
    (["--val-fraction", "1"], "--val-fraction must be in (0, 1); got 1.0"),
    (["--beta-1", "1"], "--beta-1 must be in [0, 1); got 1.0"),
    (["--beta-2", "-0.1"], "--beta-2 must be in [0, 1); got -0.1"),
    (["--config", "gpt2-huge"], "--config must be a JSON file or one of "
     "gpt2-small-sophia-g"),
]


@pytest.mark.parametrize("flags, error", INVALID)
def test_an_invalid_setting_exits_2_naming_it_and_writes_nothing(
    tmp_path, capsys, flags, error
):
    out, cache = tmp_path / "run", tmp_path / "cache"
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    with pytest.raises(SystemExit) as exit:
        pretrain.main(flags + ["--out", str(out), "--cache-dir", str(cache)])
    assert exit.value.code == 2
    message = capsys.readouterr().err.splitlines()[-1]
    assert message.startswith(PROG + error), message
    assert not out.exists() and not cache.exists()


@pytest.mark.parametrize("settings, error", [
    ({"learning_rate": 1e-3}, "unknown setting 'learning_rate'"),
    ({"steps": "ten"}, "steps must be of type int; got 'ten'"),
    ({"steps": 10.0}, "steps must be of type int; got 10.0"),
    ({"jit": 1}, "jit must be of type bool; got 1"),
    ({"lr": None}, "lr must be of type float; got None"),
    ({"hessian_chunks": "2"}, "hessian_chunks must be auto or an integer; "
     "got '2'"),
    ([1, 2], "must hold a JSON object of settings"),
])
def test_a_config_file_with_a_wrong_setting_exits_2(
    tmp_path, capsys, settings, error
):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(settings))
    with pytest.raises(SystemExit) as exit:
        pretrain.parse_config(["--config", str(path)])
    assert exit.value.code == 2
    assert error in capsys.readouterr().err.splitlines()[-1]


def test_a_config_file_is_checked_like_flags(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"lr": -1, "beta_1": None, "steps": 40}))
    with pytest.raises(SystemExit) as exit:
        pretrain.parse_config(["--config", str(path)])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        PROG + "--lr must be > 0; got -1")
    # Flags come last: they can mend a file's setting.
    config = pretrain.parse_config(["--config", str(path), "--lr", "1e-3"])
    assert (config.lr, config.steps, config.beta_1) == (1e-3, 40, None)


def test_valid_settings_keep_their_names_and_defaults():
    # train.compare compares saved config.json files with these dicts.
    assert dataclasses.asdict(pretrain.parse_config([])) == {
        "model": "tiny", "optimizer": "sophia-g", "data": "austen",
        "tokenizer": "gpt2", "steps": 200, "batch_size": 16,
        "block_size": 64, "lr": 2e-3, "min_lr": 1e-4, "warmup": 20,
        "rho": 0.05, "weight_decay": 0.2, "grad_clip": 1.0,
        "hessian_interval": 10, "hessian_batch_fraction": 1.0,
        "hessian_chunks": "auto", "beta_1": None, "beta_2": None, "eval_interval": 50,
        "eval_steps": None, "log_interval": 10, "strategy": "default",
        "tpu": None, "precision": "float32", "jit": False, "seed": 0,
        "deterministic": False, "val_fraction": 0.05,
        "cache_dir": "~/.cache/keras_sophia", "data_dir": None,
        "manual_dir": None, "out": "runs/latest", "resume": False,
    }
    assert pretrain.Config.cache_dir == "~/.cache/keras_sophia"
    # The edges of each range, and steps that are no multiple of the
    # eval interval (the last interval is shorter).
    config = pretrain.parse_config([
        "--steps", "40", "--warmup", "0", "--min-lr", "0", "--rho", "1e-9",
        "--weight-decay", "0", "--grad-clip", "0", "--beta-1", "0",
        "--hessian-batch-fraction", "1", "--hessian-chunks", "1",
        "--val-fraction", "0.5",
        "--lr", "1e-3", "--data", "openwebtext", "--jit", "--resume",
    ])
    assert (config.steps, config.eval_interval, config.jit,
            config.hessian_chunks) == (40, 50, True, 1)
    assert pretrain.parse_config(
        ["--steps", "130", "--eval-interval", "50"]).steps == 130
    for name in configs.CONFIGS:
        pretrain.parse_config(["--config", name])


def test_help_lists_every_setting_in_a_group_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit:
        pretrain.parse_config(["--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    sections = text.split("\n\n")
    for title in pretrain.GROUPS:
        assert sum(s.startswith(f"{title}:\n") for s in sections) == 1
    for field in dataclasses.fields(pretrain.Config):
        flag = "--" + field.name.replace("_", "-")
        assert text.count(f"  {flag} ") == 1, flag
    assert "(default: 50)" in text and "(default: sophia-g)" in text


def test_the_default_command_fits_the_embedded_corpus(tmp_path):
    # `python -m train.pretrain` as the README runs it: the embedded
    # corpus's validation split (12,963 GPT-2 tokens) holds 12 batches of
    # 16 x (64 + 1) tokens, fewer than the default 20, so the default
    # evaluates on those 12; an explicit larger value is an error (below).
    config = pretrain.parse_config([])
    train_ids, val_ids = data.load_tokens(
        config.data, str(tmp_path), val_fraction=config.val_fraction,
        tokenizer_name=config.tokenizer)
    assert pretrain._check_splits(config, train_ids, val_ids) == min(
        pretrain.EVAL_STEPS, len(val_ids) // 65 // 16)
    config = pretrain.parse_config(["--eval-steps", "3"])
    assert pretrain._check_splits(config, train_ids, val_ids) == 3


def test_a_split_too_small_for_the_batches_exits_2_and_writes_nothing(
    tmp_path, capsys
):
    # Needs the tokens (bytes of the embedded novels, quick to cache), but
    # is checked before --out gets anything.
    out = tmp_path / "run"
    flags = ["--tokenizer", "bytes", "--block-size", "32", "--out", str(out),
             "--cache-dir", str(tmp_path / "cache")]
    for extra, error in (
        (["--eval-steps", "100000"], "--eval-steps must be at most "),
        (["--batch-size", "100000000"], "--batch-size must be at most "),
    ):
        with pytest.raises(SystemExit) as exit:
            pretrain.main(flags + extra)
        assert exit.value.code == 2
        message = capsys.readouterr().err.splitlines()[-1]
        assert message.startswith(PROG + error), message
        assert "split" in message and "holds" in message
        assert not out.exists()


def test_a_batch_the_replicas_cannot_share_exits_2_and_writes_nothing(
    tmp_path, capsys
):
    # MirroredStrategy over the 4 logical CPUs of conftest.py: 6 blocks
    # do not split into 4 equal per-replica batches.
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        pretrain.main(["--strategy", "mirrored", "--batch-size", "6",
                       "--tokenizer", "bytes", "--out", str(out),
                       "--cache-dir", str(tmp_path / "cache")])
    assert exit.value.code == 2
    message = capsys.readouterr().err.splitlines()[-1]
    assert message == (PROG + "--batch-size must be a multiple of the 4 "
                       "replicas of --strategy mirrored; got 6")
    assert not out.exists()


def test_chunks_that_do_not_divide_the_share_exit_2_and_write_nothing(
    tmp_path, capsys
):
    # 8 blocks over the 4 logical CPUs of conftest.py: 2 per replica, half
    # of them estimated on: a share of 1 block, which 2 chunks cannot cut.
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        pretrain.main(["--strategy", "mirrored", "--batch-size", "8",
                       "--hessian-batch-fraction", "0.5",
                       "--hessian-chunks", "2", "--tokenizer", "bytes",
                       "--out", str(out),
                       "--cache-dir", str(tmp_path / "cache")])
    assert exit.value.code == 2
    message = capsys.readouterr().err.splitlines()[-1]
    assert message == (
        PROG + "--hessian-chunks must divide the 1 blocks per replica the "
        "Hessian is estimated on (--hessian-batch-fraction 0.5 of "
        "--batch-size 8 over 4 replica(s)); got 2")
    assert not out.exists()
