"""Pretrain a GPT-2 with Sophia (or AdamW, Lion) on any tf.distribute
strategy, or on Keras's JAX or torch backend.

    python -m train.pretrain                       # tiny, Sophia-G, austen
    python -m train.pretrain --optimizer adamw --steps 400
    python -m train.pretrain --config gpt2-small-sophia-g --strategy tpu
    python -m train.pretrain --out runs/a --resume # continue runs/a
    KERAS_BACKEND=jax python -m train.pretrain --out runs/jax  # on JAX
    KERAS_BACKEND=torch python -m train.pretrain --out runs/torch

On JAX and torch the batches still come from tf.data; `mixed_float16`
and `--deterministic` are TensorFlow's. On JAX `--strategy mirrored` is
`keras.distribution.DataParallel` over every device JAX sees, and the
step is always compiled; `multiworker` and `tpu` are TensorFlow's. On
torch the step runs eagerly on one device (docs/backends.md).

Settings: the `Config` defaults below, then a named config or a JSON file
(`--config`), then `--key value` flags. The run directory (`--out`) gets
`config.json`, `metrics.jsonl` (one JSON object per logged step),
TensorBoard logs in `tensorboard/`, checkpoints in `checkpoints/` (every
`eval_interval` steps and at the last, written atomically) and
`final.weights.h5`.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

import keras
import tensorflow as tf

import keras_sophia
from models import gpt2
from train import clipping
from train import configs
from train import data
from train import strategy as strategy_lib
from train import tokenizer


OPTIMIZERS = ("sophia-g", "sophia-h", "adamw", "lion")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# Float16 needs loss scaling, which the JAX and torch train steps do not
# do yet.
UNSCALED_PRECISIONS = ("float32", "mixed_bfloat16")
_BACKEND_NAMES = {"jax": "JAX", "torch": "torch"}
# Validation batches per evaluation when --eval-steps is not given.
EVAL_STEPS = 20
# --help lists the settings in these groups, in this order.
GROUPS = ("model", "data", "optimizer", "schedule", "distribution", "run")


def _setting(group, default, text):
    """A `Config` field; `group` and `text` say where --help lists it and
    what it shows."""
    return dataclasses.field(
        default=default, metadata={"group": group, "help": text})


def _chunks(text):
    """--hessian-chunks: `auto` or a whole number (range checked later)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be auto or an integer >= 1; got {text!r}") from None


@dataclasses.dataclass
class Config:
    model: str = _setting("model", "tiny", " | ".join(gpt2.SIZES))
    optimizer: str = _setting("optimizer", "sophia-g", " | ".join(OPTIMIZERS))
    data: str = _setting("data", "austen", "austen | openwebtext | text:PATH "
                         "(a UTF-8 file, or a directory of *.txt files)")
    tokenizer: str = _setting(
        "data", "gpt2", "gpt2 (BPE, 50,257 tokens) | bytes (UTF-8, 256)")
    steps: int = _setting(
        "schedule", 200, "optimizer steps in total (also when resuming)")
    batch_size: int = _setting(
        "schedule", 16, "global batch, in blocks, across all replicas")
    block_size: int = _setting("model", 64, "tokens per block")
    lr: float = _setting("schedule", 2e-3, "peak learning rate, after warmup")
    min_lr: float = _setting("schedule", 1e-4, "end of the cosine decay")
    warmup: int = _setting("schedule", 20, "linear warmup steps")
    rho: float = _setting(
        "optimizer", 0.05, "Sophia's rho (ignored by AdamW and Lion)")
    weight_decay: float = _setting(
        "optimizer", 0.2, "decoupled; dense kernels only")
    grad_clip: float = _setting(
        "optimizer", 1.0, "global-norm clipping; 0 turns it off")
    hessian_interval: int = _setting("optimizer", 10, "Sophia's k")
    hessian_batch_fraction: float = _setting(
        "optimizer", 1.0, "share of the batch h is estimated on")
    hessian_chunks: _chunks = _setting(
        "optimizer", "auto", "chunks the estimator runs the share in, one at a "
        "time (less memory, one more forward pass): N or auto")
    beta_1: float = _setting(
        "optimizer", None, "None: the optimizer's default")
    beta_2: float = _setting(
        "optimizer", None, "None: the optimizer's default")
    eval_interval: int = _setting(
        "schedule", 50, "steps between validation and checkpoints; the "
        "last interval is shorter when it does not divide --steps")
    eval_steps: int = _setting(
        "schedule", None, f"validation batches per evaluation; None: "
        f"{EVAL_STEPS}, or all the validation split holds if fewer")
    log_interval: int = _setting(
        "schedule", 10, "steps between lines of metrics.jsonl")
    strategy: str = _setting(
        "distribution", "default", " | ".join(strategy_lib.NAMES)
        + f" (on JAX: {' | '.join(strategy_lib.BACKEND_NAMES['jax'])}; "
        f"on torch: {' | '.join(strategy_lib.BACKEND_NAMES['torch'])})")
    tpu: str = _setting("distribution", None,
                        "TPU name or grpc:// address; None: this TPU VM's")
    precision: str = _setting(
        "distribution", "float32", " | ".join(PRECISIONS))
    jit: bool = _setting(
        "distribution", False, "XLA-compile the train step (always on JAX)")
    seed: int = _setting(
        "run", 0, "data order, initialisation, estimator draws")
    deterministic: bool = _setting(
        "run", False, "bit-reproducible runs and resumes; slower")
    val_fraction: float = _setting(
        "data", 0.05, "austen / text: last share of tokens")
    cache_dir: str = _setting("data", "~/.cache/keras_sophia", "token cache")
    data_dir: str = _setting("data", None, "TFDS data dir (openwebtext)")
    manual_dir: str = _setting(
        "data", None, "where openwebtext.tar.xz was put")
    out: str = _setting("run", "runs/latest", "the run directory")
    resume: bool = _setting(
        "run", False, "continue the run in --out up to --steps")


# (settings, the test each must pass, what the test allows)
_RANGES = (
    (("steps", "batch_size", "block_size", "eval_interval",
      "log_interval", "hessian_interval", "lr", "rho"),
     lambda value: value > 0, "> 0"),
    (("eval_steps",), lambda value: value is None or value > 0, "> 0"),
    (("warmup", "weight_decay", "grad_clip"),
     lambda value: value >= 0, ">= 0"),
    (("hessian_batch_fraction",), lambda value: 0 < value <= 1, "in (0, 1]"),
    (("hessian_chunks",), lambda value: value == "auto" or value >= 1,
     "auto or an integer >= 1"),
    (("val_fraction",), lambda value: 0 < value < 1, "in (0, 1)"),
    (("beta_1", "beta_2"),
     lambda value: value is None or 0 <= value < 1, "in [0, 1)"),
)


def _flag(name):
    return "--" + name.replace("_", "-")


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m train.pretrain",
        usage="%(prog)s [--config NAME|FILE.json] [--key value ...]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", help=f"a JSON file or one of: {', '.join(configs.CONFIGS)}"
    )
    groups = {title: parser.add_argument_group(title) for title in GROUPS}
    for field in dataclasses.fields(Config):
        flag = _flag(field.name)
        group = groups[field.metadata["group"]]
        # default=None marks a flag not given, so the shown default is
        # Config's.
        text = f"{field.metadata['help']} (default: {field.default})"
        if field.type is bool:
            group.add_argument(flag, action="store_true", default=None,
                               help=text)
        else:
            group.add_argument(flag, type=field.type, default=None,
                               help=text)
    return parser


def parse_config(argv=None):
    """The `Config` of `argv`. An invalid setting exits as argparse does
    (usage, a one-line error, status 2) before anything is written."""
    parser = _parser()
    args = vars(parser.parse_args(argv))
    settings = {}
    name = args.pop("config")
    if name in configs.CONFIGS:
        settings.update(configs.CONFIGS[name])
    elif name is not None:
        settings.update(_read_config(name, parser.error))
    settings.update({k: v for k, v in args.items() if v is not None})
    config = Config(**settings)
    _check(config, parser.error)
    return config


def _read_config(path, error):
    """The settings in the JSON file `path`; `error` for anything else."""
    try:
        settings = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as problem:
        error(f"--config must be a JSON file or one of "
              f"{', '.join(configs.CONFIGS)}; got {path!r} ({problem})")
    if not isinstance(settings, dict):
        error(f"--config {path} must hold a JSON object of settings")
    fields = {field.name: field for field in dataclasses.fields(Config)}
    for name, value in settings.items():
        if name not in fields:
            error(f"--config {path}: unknown setting {name!r}; the settings "
                  f"are {', '.join(fields)}")
        if not _fits(fields[name], value):
            kind = ("auto or an integer" if fields[name].type is _chunks
                    else f"of type {fields[name].type.__name__}")
            error(f"--config {path}: {name} must be {kind}; got {value!r}")
    return settings


def _fits(field, value):
    """Whether a JSON `value` has the type of `field`."""
    if value is None:
        return field.default is None
    if field.type is float:
        return type(value) in (int, float)
    if field.type is _chunks:
        return value == "auto" or type(value) is int
    return type(value) is field.type


def _check(config, error):
    """Calls `error` on the first setting no run could use."""
    backend = keras.backend.backend()
    tensorflow = backend == "tensorflow"
    on = "" if tensorflow else f" on Keras's {_BACKEND_NAMES[backend]} backend"
    for name, allowed in (
        ("model", tuple(gpt2.SIZES)),
        ("optimizer", OPTIMIZERS),
        ("tokenizer", tuple(tokenizer.VOCAB_SIZES)),
        ("strategy", strategy_lib.BACKEND_NAMES[backend]),
        ("precision", PRECISIONS if tensorflow else UNSCALED_PRECISIONS),
    ):
        value = getattr(config, name)
        if value not in allowed:
            error(f"{_flag(name)} must be one of {', '.join(allowed)}"
                  f"{on}; got {value!r}")
    if backend == "jax" and config.deterministic:
        error(f"--deterministic is TensorFlow's{on}: JAX's compiled "
              "steps on CPU repeat their bits without it; on GPUs start "
              "with XLA_FLAGS=--xla_gpu_deterministic_ops=true")
    if backend == "torch" and config.deterministic:
        error(f"--deterministic is TensorFlow's{on}: torch's eager CPU "
              "steps repeat their bits without it; on GPUs see "
              "torch.use_deterministic_algorithms")
    if backend == "torch" and config.jit:
        error(f"--jit is XLA's{on}: the torch step runs eagerly")
    for names, test, allowed in _RANGES:
        for name in names:
            value = getattr(config, name)
            if not test(value):
                error(f"{_flag(name)} must be {allowed}; got {value!r}")
    if not 0 <= config.min_lr <= config.lr:
        error(f"--min-lr must be in [0, --lr] = [0, {config.lr!r}]; "
              f"got {config.min_lr!r}")
    if not _readable(config.data):
        error("--data must be austen, openwebtext or text:PATH, PATH a "
              "UTF-8 file or a directory of *.txt files; "
              f"got {config.data!r}")


def _readable(source):
    """Whether `data.load_tokens` can read `source`."""
    if source in ("austen", "openwebtext"):
        return True
    if not source.startswith("text:"):
        return False
    path = pathlib.Path(source[len("text:"):]).expanduser()
    return path.is_file() or any(path.rglob("*.txt"))


def _check_splits(config, train_ids, val_ids):
    """Exits as argparse does if a split holds too few batches: a check
    that needs the tokens, made before anything goes into --out. Returns
    the number of validation batches per evaluation."""
    window = config.block_size + 1  # a block and its last target
    blocks = len(train_ids) // window
    if config.batch_size > blocks:
        _parser().error(
            f"--batch-size must be at most {blocks}: the training split "
            f"({len(train_ids):,} tokens) holds {blocks} blocks of "
            f"--block-size {config.block_size} tokens (+ 1 target); "
            f"got {config.batch_size}")
    batches = len(val_ids) // window // config.batch_size
    if config.eval_steps is None:
        # The embedded corpus's validation split holds 12 batches at the
        # default batch and block: the default takes what there is.
        return min(EVAL_STEPS, batches)
    if config.eval_steps > batches:
        _parser().error(
            f"--eval-steps must be at most {batches}: the validation split "
            f"({len(val_ids):,} tokens) holds {batches} batches of "
            f"--batch-size {config.batch_size} blocks of --block-size "
            f"{config.block_size} tokens (+ 1 target); "
            f"got {config.eval_steps}")
    return config.eval_steps


def no_decay(variables):
    """The variables weight decay leaves alone: all but the dense kernels.

    The Sophia authors' GPT-2 (nanoGPT's) decays the weights of its Linear
    layers only: not embeddings, biases or layer norms. keras-hub's
    attention biases have shape (heads, head_dim), so picking matrices by
    rank would decay them; the name `kernel` marks Dense and EinsumDense
    weights, whatever their rank."""
    return [v for v in variables if v.name != "kernel"]


def make_optimizer(config):
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        warmup_target=config.lr,
        warmup_steps=config.warmup,
        decay_steps=max(config.steps - config.warmup, 1),
        alpha=config.min_lr / config.lr,
    )
    betas = {
        k: v
        for k, v in (("beta_1", config.beta_1), ("beta_2", config.beta_2))
        if v is not None
    }
    common = dict(learning_rate=schedule, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(**common, **{
            "beta_1": 0.9, "beta_2": 0.95, **betas})
    if config.optimizer == "lion":
        return keras.optimizers.Lion(**common, **{
            "beta_1": 0.95, "beta_2": 0.98, **betas})
    return keras_sophia.Sophia(
        rho=config.rho,
        hessian_update_interval=config.hessian_interval,
        hessian_batch_fraction=config.hessian_batch_fraction,
        hessian_chunks=config.hessian_chunks,
        estimator="gnb" if config.optimizer == "sophia-g" else "hutchinson",
        seed=config.seed,
        **common,
        **betas,
    )


class MetricsLog(keras.callbacks.Callback):
    """Appends one JSON line per `every` steps to `path` (and adds the
    clipping and Sophia diagnostics to the logs TensorBoard sees).

    Every line has `time`: seconds spent in training steps since the run
    began, for plotting loss against wall-clock. The clock stops between
    an epoch's last step and the next epoch's start, so validation,
    checkpoints and their bookkeeping are left out."""

    def __init__(self, path, every):
        super().__init__()
        self.path, self.every = path, every
        self.last_count = self.last_step = None

    def on_train_begin(self, logs=None):
        # A resumed run's clock goes on from the time logged at its
        # checkpoint's step, so work redone after a crash counts once.
        step = int(self.model.optimizer.iterations.numpy())
        self.elapsed = _logged_time(self.path, step)

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter() - self.elapsed

    def on_train_batch_end(self, batch, logs=None):
        self.elapsed = time.perf_counter() - self.started
        opt = self.model.optimizer
        step = int(opt.iterations.numpy())
        if step % self.every:
            return
        record = {"step": step, "time": self.elapsed,
                  "loss": float(logs["loss"]),
                  "lr": float(opt.learning_rate)}
        for name in ("win_rate", "hessian_norm", "skipped_steps",
                     "skipped_refreshes"):
            if name in logs:
                record[name] = float(logs[name])
        if hasattr(opt, "clip_count"):
            count = int(opt.clip_count.numpy())
            if self.last_count is not None:
                # Share of the steps since the last line that were clipped.
                record["clipped"] = (count - self.last_count) / (
                    step - self.last_step)
            record["grad_norm"] = float(opt.grad_norm.numpy())
            self.last_count, self.last_step = count, step
        logs.update({k: v for k, v in record.items()
                     if k not in ("step", "time")})
        self._write(record)

    def on_epoch_end(self, epoch, logs=None):
        if "val_loss" in logs:
            step = int(self.model.optimizer.iterations.numpy())
            self._write({"step": step, "time": self.elapsed,
                         "val_loss": float(logs["val_loss"])})

    def _write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class StopAt(keras.callbacks.Callback):
    """Ends training at step `steps`, within the last epoch if `steps` is
    not a multiple of `eval_interval` (`fit`'s steps per epoch).

    `fit` takes one `steps_per_epoch`, so the last interval is cut short
    here rather than trained by a second `fit`: that would restart the
    data iterator and the callbacks. A stopped epoch still validates and
    ends (val_loss line, checkpoint), and counting optimizer steps keeps
    a resumed run, whose first epoch starts at its checkpoint, on the
    same steps as a straight one."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def on_train_batch_end(self, batch, logs=None):
        if self.model.optimizer.iterations.numpy() >= self.steps:
            self.model.stop_training = True


class ProgressBar(keras.callbacks.ProgbarLogger):
    """Keras's progress bar with what a person watches: loss, learning
    rate, win rate and val_loss. The diagnostics also in the logs go to
    metrics.jsonl and TensorBoard only; filtering them here, not keeping
    them out of the logs, leaves the TensorBoard callback writing them."""

    SHOWN = ("loss", "lr", "win_rate", "val_loss")

    def __init__(self, steps, interval):
        super().__init__()
        self.steps, self.interval = steps, interval
        self.lr = None

    def on_epoch_begin(self, epoch, logs=None):
        # The bar's length: the interval, or what StopAt leaves of it.
        step = int(self.model.optimizer.iterations.numpy())
        self.target = min(self.interval, self.steps - step)
        super().on_epoch_begin(epoch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self.lr = (logs or {}).get("lr", self.lr)
        super().on_train_batch_end(batch, self._shown(logs))

    def on_epoch_end(self, epoch, logs=None):
        # The epoch's logs lack the lr MetricsLog adds to each batch's; the
        # line printed when the output is not a terminal shows the last.
        if self.lr is not None:
            logs = {"lr": self.lr, **(logs or {})}
        super().on_epoch_end(epoch, self._shown(logs))

    def _shown(self, logs):
        return {k: v for k, v in (logs or {}).items() if k in self.SHOWN}


def _logged_time(path, step):
    """The last `time` logged in `path` at or before `step`; 0 if none."""
    path = pathlib.Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    times = [0.0] + [
        record["time"] for record in map(json.loads, lines)
        if record["step"] <= step and "time" in record
    ]
    return times[-1]


class Checkpoints(keras.callbacks.Callback):
    """Weights and optimizer state every epoch: every `eval_interval`
    steps, and at the last step.

    Each file is written under a temporary name and renamed, and
    `latest.json` is replaced last, so a crash mid-save leaves the previous
    checkpoint in charge. The two newest checkpoints are kept."""

    def __init__(self, folder):
        super().__init__()
        self.folder = pathlib.Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        path = self.folder / f"ckpt-{step:08d}.weights.h5"
        temporary = path.with_name("partial-" + path.name)
        self.model.save_weights(temporary)
        os.replace(temporary, path)
        _write_atomically(self.folder / "latest.json",
                          json.dumps({"step": step, "file": path.name}))
        for old in sorted(self.folder.glob("ckpt-*.weights.h5"))[:-2]:
            old.unlink()


def latest_checkpoint(out):
    """(step, path) of the newest complete checkpoint in `out`, or None."""
    marker = pathlib.Path(out) / "checkpoints" / "latest.json"
    if not marker.exists():
        return None
    latest = json.loads(marker.read_text())
    return latest["step"], marker.parent / latest["file"]


def saved_config(config):
    """What `config.json` holds: the settings, and Keras's backend, whose
    random draws differ from another backend's for the same seed."""
    return dict(dataclasses.asdict(config),
                keras_backend=keras.backend.backend())


def _changed_settings(out, config):
    """The settings that differ from the run saved in `out`, each as
    "name (saved value there, this one here)"."""
    saved = json.loads((out / "config.json").read_text())
    return [
        f"{name} ({saved.get(name)!r} there, {value!r} here)"
        for name, value in saved_config(config).items()
        if name != "resume" and saved.get(name) != value
    ]


def _make_deterministic():
    """Make every op give the same bits in every run.

    Multithreaded CPU kernels split sums differently from run to run, and
    Sophia's lr * m / (rho * h) turns last-bit noise into visible weight
    differences wherever the curvature is tiny. One thread per op, plus
    TensorFlow's op determinism (for GPU kernels), removes the noise.

    Grappler is turned off too: with the chunked refresh's loop it
    rewrites the step's graph differently from process to process, and
    the rewritten sums round differently (measured on one Sophia-H refresh
    of the tiny model in 4 chunks: 4 processes, 3 or 4 different weights;
    turning off every pass `set_experimental_options` names still left
    them differing; with Grappler off, 8 of 8 equal). The step is no
    slower: a 12-step run of the tiny model took 28 s against 33 s.
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError as error:
        raise SystemExit(
            "--deterministic must take effect before TensorFlow runs its "
            "first op: call train.pretrain.main first, or set "
            "TF_NUM_INTRAOP_THREADS=1 and TF_NUM_INTEROP_THREADS=1 in the "
            f"environment instead ({error})"
        ) from error
    tf.config.experimental.enable_op_determinism()
    tf.config.optimizer.set_experimental_options(
        {"disable_meta_optimizer": True})


def _write_atomically(path, text):
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(text)
    os.replace(temporary, path)


def main(argv=None):
    config = parse_config(argv)
    out = pathlib.Path(config.out)
    checkpoint = latest_checkpoint(out)
    if checkpoint and not config.resume:
        # The same command after a crash or preemption continues the run;
        # anything else must say so (--resume) or go elsewhere.
        changed = _changed_settings(out, config)
        if changed:
            raise SystemExit(
                f"{out} already holds a run (checkpoint at step "
                f"{checkpoint[0]}) with other settings: {', '.join(changed)}."
                " Pass --resume to continue it with these settings, or "
                "choose another --out."
            )
        print(f"{out} holds this run up to step {checkpoint[0]}: resuming")
    if config.resume and not checkpoint:
        raise SystemExit(f"--resume: no checkpoint in {out}/checkpoints.")
    if config.deterministic:
        _make_deterministic()
    keras.utils.set_random_seed(config.seed)
    keras.mixed_precision.set_global_policy(config.precision)
    devices = strategy_lib.devices(config.strategy, config.tpu)
    # Under MultiWorkerMirroredStrategy every worker runs this program on
    # the same --out (a shared file system); only the chief writes to it.
    chief = devices.chief
    train_ids, val_ids = data.load_tokens(
        config.data, os.path.expanduser(config.cache_dir),
        val_fraction=config.val_fraction, data_dir=config.data_dir,
        manual_dir=config.manual_dir, tokenizer_name=config.tokenizer,
    )
    eval_steps = _check_splits(config, train_ids, val_ids)
    if config.batch_size % devices.replicas:
        _parser().error(
            f"--batch-size must be a multiple of the {devices.replicas} "
            f"replicas of --strategy {config.strategy}; "
            f"got {config.batch_size}")
    # Sophia's own rule; seed given, so Python's `random` is not drawn.
    sophia = keras_sophia.Sophia(
        hessian_batch_fraction=config.hessian_batch_fraction,
        hessian_chunks=config.hessian_chunks, seed=0)
    share = sophia.hessian_share(config.batch_size // devices.replicas)
    try:
        sophia.chunks_for(share)
    except ValueError:
        _parser().error(
            f"--hessian-chunks must divide the {share} blocks per replica "
            f"the Hessian is estimated on (--hessian-batch-fraction "
            f"{config.hessian_batch_fraction} of --batch-size "
            f"{config.batch_size} over {devices.replicas} replica(s)); "
            f"got {config.hessian_chunks}")
    if chief:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomically(out / "config.json",
                          json.dumps(saved_config(config), indent=2))
    print(f"{len(train_ids):,} training and {len(val_ids):,} validation "
          f"tokens; {devices.replicas} replica(s)")

    with devices.scope():
        model = gpt2.build(
            config.model, block_size=config.block_size,
            vocabulary_size=tokenizer.VOCAB_SIZES[config.tokenizer])
        optimizer = make_optimizer(config)
        optimizer.exclude_from_weight_decay(
            var_list=no_decay(model.trainable_variables))
        if config.grad_clip > 0:
            clipping.track_global_clipping(optimizer, config.grad_clip)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
            # Keras on JAX without jit runs op by op, too slow to train.
            jit_compile=config.jit or keras.backend.backend() == "jax",
        )
        start = 0
        if checkpoint:
            start, path = checkpoint
            optimizer.build(model.trainable_variables)
            model.load_weights(path)
            print(f"resuming from {path} at step {start}")

    def train_data(input_context):
        # Skip what the run already consumed, so a resumed run sees the
        # batches the uninterrupted run would have seen.
        return data.make_dataset(
            train_ids, config.block_size, config.batch_size,
            shuffle_seed=config.seed, repeat=True,
            input_context=input_context,
        ).skip(start)

    # An evaluation that runs to the end of its data gets one batch too
    # many in the loss's count from Keras's graph-mode (not XLA) test step:
    # the batch's static shape lets the count be added before the iterator
    # reports its end, so the mean is eval_steps / (eval_steps + 1) of the
    # truth. So each evaluation takes eval_steps steps of a dataset that
    # repeats the same eval_steps batches.
    val_data = data.make_dataset(
        val_ids, config.block_size, config.batch_size
    ).take(eval_steps).repeat()
    # Every worker stops at the same step and shows a bar; only the chief
    # writes.
    callbacks = [StopAt(config.steps)]
    if chief:
        callbacks += [
            MetricsLog(out / "metrics.jsonl", config.log_interval),
            Checkpoints(out / "checkpoints"),
            keras.callbacks.TensorBoard(
                out / "tensorboard", update_freq=config.log_interval
            ),
        ]
    # Last, to show the lr MetricsLog adds to the logs.
    callbacks.append(ProgressBar(config.steps, config.eval_interval))
    # keras.Model.fit, not keras-hub's: its wrapper only maps a preprocessor
    # (we have none) and cannot take a distributed dataset. Epochs are
    # eval intervals, the last one cut short by StopAt; ceil, so a run
    # that ended in such an interval is complete. shuffle=False: the
    # dataset shuffles itself (Keras warns that it ignores shuffle=True).
    keras.Model.fit(
        model,
        devices.distribute(train_data),
        steps_per_epoch=config.eval_interval,
        epochs=math.ceil(config.steps / config.eval_interval),
        initial_epoch=math.ceil(start / config.eval_interval),
        validation_data=val_data,
        validation_steps=eval_steps,
        shuffle=False,
        callbacks=callbacks,
        # Into a file or a pipe: one line per eval interval, not a bar
        # redrawn with carriage returns and colour codes.
        verbose=1 if sys.stdout.isatty() else 2,
    )
    val_loss = model.evaluate(val_data, steps=eval_steps, verbose=0)
    if chief:
        model.save_weights(out / "final.weights.h5")
    print(f"final validation loss: {val_loss:.4f}")
    return val_loss


if __name__ == "__main__":
    main()
