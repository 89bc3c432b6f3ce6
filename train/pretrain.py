"""Pretrain a GPT-2 with Sophia (or AdamW, Lion) on any tf.distribute
strategy.

    python -m train.pretrain                       # tiny, Sophia-G, austen
    python -m train.pretrain --optimizer adamw --steps 400
    python -m train.pretrain --config gpt2-small-sophia-g --strategy tpu
    python -m train.pretrain --out runs/a --resume # continue runs/a

Settings: the `Config` defaults below, then a named config or a JSON file
(`--config`), then `--key value` flags. The run directory (`--out`) gets
`config.json`, `metrics.jsonl` (one JSON object per logged step),
TensorBoard logs in `tensorboard/`, checkpoints in `checkpoints/` (every
`eval_interval` steps, written atomically) and `final.weights.h5`.
"""

import argparse
import dataclasses
import json
import os
import pathlib
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


@dataclasses.dataclass
class Config:
    model: str = "tiny"  # a name in models.gpt2.SIZES
    optimizer: str = "sophia-g"  # sophia-g | sophia-h | adamw | lion
    data: str = "austen"  # austen | openwebtext | text:PATH
    tokenizer: str = "gpt2"  # gpt2 (BPE, 50,257 tokens) | bytes (UTF-8, 256)
    steps: int = 200  # optimizer steps in total (also when resuming)
    batch_size: int = 16  # global batch, in blocks, across all replicas
    block_size: int = 64  # tokens per block
    lr: float = 2e-3  # peak learning rate, after warmup
    min_lr: float = 1e-4  # end of the cosine decay
    warmup: int = 20  # linear warmup steps
    rho: float = 0.05  # Sophia's rho (ignored by AdamW and Lion)
    weight_decay: float = 0.2  # decoupled; dense kernels only
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
    hessian_interval: int = 10  # Sophia's k
    hessian_batch_fraction: float = 1.0  # share of the batch h is estimated on
    beta_1: float = None  # None: the optimizer's default
    beta_2: float = None
    eval_interval: int = 50  # steps between validation and checkpoints
    eval_steps: int = 20  # validation batches per evaluation
    log_interval: int = 10  # steps between lines of metrics.jsonl
    strategy: str = "default"  # default | mirrored | multiworker | tpu
    tpu: str = None  # TPU name or grpc:// address; None: this TPU VM's
    precision: str = "float32"  # float32 | mixed_bfloat16 | mixed_float16
    jit: bool = False  # XLA-compile the train step
    seed: int = 0  # data order, initialisation, estimator draws
    deterministic: bool = False  # bit-reproducible runs and resumes; slower
    val_fraction: float = 0.05  # austen / text: last share of tokens
    cache_dir: str = "~/.cache/keras_sophia"  # token cache
    data_dir: str = None  # TFDS data dir (openwebtext)
    manual_dir: str = None  # where openwebtext.tar.xz was put
    out: str = "runs/latest"  # the run directory
    resume: bool = False  # continue the run in `out` up to `steps`


def parse_config(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--config", help=f"a JSON file or one of: {', '.join(configs.CONFIGS)}"
    )
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            parser.add_argument(flag, action="store_true", default=None)
        else:
            parser.add_argument(flag, type=field.type, default=None)
    args = vars(parser.parse_args(argv))
    settings = {}
    name = args.pop("config")
    if name in configs.CONFIGS:
        settings.update(configs.CONFIGS[name])
    elif name is not None:
        settings.update(json.loads(pathlib.Path(name).read_text()))
    settings.update({k: v for k, v in args.items() if v is not None})
    config = Config(**settings)
    _check(config)
    return config


def _check(config):
    if config.model not in gpt2.SIZES:
        raise ValueError(f"--model must be one of {sorted(gpt2.SIZES)}; "
                         f"got {config.model!r}")
    if config.optimizer not in ("sophia-g", "sophia-h", "adamw", "lion"):
        raise ValueError("--optimizer must be sophia-g, sophia-h, adamw or "
                         f"lion; got {config.optimizer!r}")
    if config.tokenizer not in tokenizer.VOCAB_SIZES:
        raise ValueError(f"--tokenizer must be one of "
                         f"{sorted(tokenizer.VOCAB_SIZES)}; "
                         f"got {config.tokenizer!r}")
    if config.steps % config.eval_interval:
        raise ValueError(
            f"--steps ({config.steps}) must be a multiple of --eval-interval "
            f"({config.eval_interval}): each Keras epoch is one interval."
        )


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
                  "lr": float(opt.learning_rate.numpy())}
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
    """Weights and optimizer state every epoch (= `eval_interval` steps).

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


def _changed_settings(out, config):
    """Names of the settings that differ from the run saved in `out`."""
    saved = json.loads((out / "config.json").read_text())
    return [
        name for name, value in dataclasses.asdict(config).items()
        if name != "resume" and saved.get(name) != value
    ]


def _make_deterministic():
    """Make every op give the same bits in every run.

    Multithreaded CPU kernels split sums differently from run to run, and
    Sophia's lr * m / (rho * h) turns last-bit noise into visible weight
    differences wherever the curvature is tiny. One thread per op, plus
    TensorFlow's op determinism (for GPU kernels), removes the noise."""
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
    strategy = strategy_lib.get_strategy(config.strategy, config.tpu)
    # Under MultiWorkerMirroredStrategy every worker runs this program on
    # the same --out (a shared file system); only the chief writes to it.
    chief = strategy.extended.should_checkpoint
    if chief:
        out.mkdir(parents=True, exist_ok=True)
        _write_atomically(out / "config.json",
                          json.dumps(dataclasses.asdict(config), indent=2))
    train_ids, val_ids = data.load_tokens(
        config.data, os.path.expanduser(config.cache_dir),
        val_fraction=config.val_fraction, data_dir=config.data_dir,
        manual_dir=config.manual_dir, tokenizer_name=config.tokenizer,
    )
    print(f"{len(train_ids):,} training and {len(val_ids):,} validation "
          f"tokens; {strategy.num_replicas_in_sync} replica(s)")

    with strategy.scope():
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
            jit_compile=config.jit,
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

    val_data = data.make_dataset(
        val_ids, config.block_size, config.batch_size
    ).take(config.eval_steps)
    # keras.Model.fit, not keras-hub's: its wrapper only maps a preprocessor
    # (we have none) and cannot take a distributed dataset.
    keras.Model.fit(
        model,
        strategy.distribute_datasets_from_function(train_data),
        steps_per_epoch=config.eval_interval,
        epochs=config.steps // config.eval_interval,
        initial_epoch=start // config.eval_interval,
        validation_data=val_data,
        callbacks=[
            MetricsLog(out / "metrics.jsonl", config.log_interval),
            Checkpoints(out / "checkpoints"),
            keras.callbacks.TensorBoard(
                out / "tensorboard", update_freq=config.log_interval
            ),
        ] if chief else [],
    )
    val_loss = model.evaluate(val_data, verbose=0)
    if chief:
        model.save_weights(out / "final.weights.h5")
    print(f"final validation loss: {val_loss:.4f}")
    return val_loss


if __name__ == "__main__":
    main()
