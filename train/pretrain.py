"""Pretrain a GPT-2 with Sophia on the embedded corpus.

    python -m train.pretrain                      # tiny GPT-2, Sophia-G
    python -m train.pretrain --optimizer sophia-h --steps 100

The corpus is tokenized with the GPT-2 BPE, split by position into training
(first 95%) and validation (last 5%) tokens, and cut into `block + 1` token
windows (inputs and next-token targets). Learning rate: linear warmup, then
cosine decay to `min_lr`; weight decay on matrices only; global-norm
gradient clipping, as in the paper's GPT-2 runs.
"""

import argparse
import json
import pathlib

import keras
import numpy as np
import tensorflow as tf

import keras_sophia
from models import gpt2
from train.tokenizer import gpt2_encoding

CORPUS = pathlib.Path(__file__).parent / "data" / "austen.txt"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=sorted(gpt2.SIZES))
    parser.add_argument(
        "--optimizer",
        default="sophia-g",
        choices=["sophia-g", "sophia-h", "adamw"],
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=0.2)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--hessian-interval", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    return parser.parse_args(argv)


def windows(ids, block):
    """Non-overlapping (n, block + 1) windows; the tail is dropped."""
    n = len(ids) // (block + 1)
    return np.asarray(ids[: n * (block + 1)]).reshape(n, block + 1)


def to_dataset(rows, batch, shuffle_seed=None):
    def split(row):
        x = {
            "token_ids": row[:-1],
            "padding_mask": tf.ones_like(row[:-1], tf.bool),
        }
        return x, row[1:]

    data = tf.data.Dataset.from_tensor_slices(rows)
    if shuffle_seed is not None:
        data = data.shuffle(len(rows), seed=shuffle_seed).repeat()
    return data.map(split).batch(batch, drop_remainder=True).prefetch(2)


def make_optimizer(args):
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        warmup_target=args.lr,
        warmup_steps=args.warmup,
        decay_steps=max(args.steps - args.warmup, 1),
        alpha=args.min_lr / args.lr,
    )
    common = dict(
        learning_rate=schedule,
        weight_decay=args.weight_decay,
        global_clipnorm=args.grad_clip,
    )
    if args.optimizer == "adamw":
        return keras.optimizers.AdamW(beta_1=0.9, beta_2=0.95, **common)
    return keras_sophia.Sophia(
        rho=args.rho,
        hessian_update_interval=args.hessian_interval,
        estimator="gnb" if args.optimizer == "sophia-g" else "hutchinson",
        seed=args.seed,
        **common,
    )


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    text = CORPUS.read_text(encoding="utf-8")
    ids = gpt2_encoding().encode_ordinary(text)
    cut = int(0.95 * len(ids))
    train_rows = windows(ids[:cut], args.block_size)
    val_rows = windows(ids[cut:], args.block_size)
    print(
        f"{len(ids):,} tokens: {len(train_rows):,} training and "
        f"{len(val_rows):,} validation windows of {args.block_size + 1}"
    )

    model = gpt2.build(args.model, block_size=args.block_size)
    optimizer = make_optimizer(args)
    # Decay matrices only: no biases, layer-norm scales or offsets.
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables if len(v.shape) < 2]
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    history = model.fit(
        to_dataset(train_rows, args.batch_size, shuffle_seed=args.seed),
        steps_per_epoch=args.steps,
        epochs=1,
    )
    val_loss = model.evaluate(
        to_dataset(val_rows, args.batch_size), verbose=0
    )
    print(f"final validation loss: {val_loss:.4f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        config = {k: str(v) if isinstance(v, pathlib.Path) else v
                  for k, v in vars(args).items()}
        (args.out / "config.json").write_text(json.dumps(config, indent=2))
        model.save_weights(args.out / "final.weights.h5")
        (args.out / "result.json").write_text(
            json.dumps(
                {"train_loss": history.history["loss"][-1],
                 "val_loss": val_loss},
                indent=2,
            )
        )
    return val_loss


if __name__ == "__main__":
    main()
