"""Cross-check: the Sophia authors' own SophiaG, in PyTorch on CPU.

Trains a byte-level GPT-2 equivalent to our keras-hub one (`models.gpt2`,
`--tokenizer bytes`) on the same corpus with the authors' optimizer
(`sophia_opt.SophiaG` from the PyPI package `sophia-opt`, which packages
github.com/Liuhong99/Sophia) and their training-loop recipe, or with
PyTorch's AdamW, so that our Keras numbers can be set beside theirs.

An optional tool, not a test dependency. It needs:

    pip install torch==2.13.0          # a CPU wheel; no other version
    pip install sophia-opt --no-deps   # --no-deps: keep that torch

Example:

    python -m train.crosscheck_torch --optimizer sophia-g --lr 1e-3 \\
        --rho 0.05 --steps 2000 --seed 0 --init keras \\
        --out runs/crosscheck/sophia-g-keras

The run directory gets `metrics.jsonl` ({"step", "val_loss"} every
`--eval-interval` steps and at the end) and `result.json` (the settings,
the final validation loss and the wall time).
"""

import argparse
import json
import math
import pathlib
import sys
import time

import numpy as np

from train import require_tensorflow

AUSTEN = pathlib.Path(__file__).parent / "data" / "austen.txt"
INSTALL = ("crosscheck_torch needs PyTorch and sophia-opt: pip install "
           "torch==2.13.0 && pip install sophia-opt --no-deps")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--optimizer", choices=("sophia-g", "adamw"),
                   default="sophia-g")
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr")
    p.add_argument("--rho", type=float, default=0.05, help="SophiaG's rho")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="Linear weights only; None: 0.2 for sophia-g, "
                   "0.1 for adamw")
    p.add_argument("--hessian-interval", type=int, default=10,
                   help="SophiaG's k")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="global-norm clipping; 0 turns it off")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16, help="in blocks")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--init", choices=("keras", "torch"), default="keras",
                   help="keras: keras-hub GPT2Backbone's initialisers; "
                   "torch: PyTorch's module defaults")
    p.add_argument("--eval-interval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="PyTorch's intra-op threads (1 per run when two "
                   "runs share 2 cores)")
    p.add_argument("--text", type=pathlib.Path, default=AUSTEN,
                   help="a UTF-8 text file, one document")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="run directory; None: "
                   "runs/crosscheck/OPTIMIZER-INIT-seedSEED")
    args = p.parse_args(argv)
    if min(args.steps, args.eval_interval, args.threads) < 1:
        p.error("--steps, --eval-interval and --threads must be at least 1")
    if args.weight_decay is None:
        args.weight_decay = 0.2 if args.optimizer == "sophia-g" else 0.1
    if args.out is None:
        args.out = pathlib.Path(
            f"runs/crosscheck/{args.optimizer}-{args.init}-seed{args.seed}")
    return args


def windows(path, block_size, val_fraction):
    """(train, val) arrays of windows of block_size + 1 bytes, as in
    `train.data` with `--tokenizer bytes`: the document's UTF-8 bytes and
    a 0 byte (end of document); the last val_fraction is validation."""
    ids = np.frombuffer(
        path.read_text(encoding="utf-8").encode("utf-8") + b"\0", np.uint8)
    num_val = int(round(ids.size * val_fraction))
    size = block_size + 1

    def cut(stream):
        n = stream.size // size  # the tail that fills no window is dropped
        return stream[:n * size].reshape(n, size).astype(np.int64)

    return cut(ids[:ids.size - num_val]), cut(ids[ids.size - num_val:])


def train_batches(train, batch_size, seed):
    """Batches forever: a new window order each epoch, remainder dropped."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(train))
        for i in range(len(train) // batch_size):
            yield train[order[i * batch_size:(i + 1) * batch_size]]


def lr_at(step, args):
    """keras CosineDecay(initial 0, warmup_target=lr, warmup_steps=warmup,
    decay_steps=steps - warmup, alpha=1/20) at the 0-based step, as
    `train.pretrain` uses it (Keras reads `iterations` before the step)."""
    if step < args.warmup:
        return args.lr * step / args.warmup
    low = args.lr / 20
    done = min(step - args.warmup, args.steps - args.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * done
                                 / max(args.steps - args.warmup, 1)))
    return low + (args.lr - low) * cosine


def build_model(torch, args, vocab=256):
    """keras-hub's GPT2Backbone + GPT2CausalLM, without dropout."""
    nn, F = torch.nn, torch.nn.functional
    width, heads = args.width, args.heads

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(width, eps=1e-5)
            self.qkv = nn.Linear(width, 3 * width)  # q, k, v with biases
            self.proj = nn.Linear(width, width)
            self.ln2 = nn.LayerNorm(width, eps=1e-5)
            self.fc = nn.Linear(width, 4 * width)
            self.out = nn.Linear(4 * width, width)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (z.view(b, t, heads, -1).transpose(1, 2)
                       for z in self.qkv(self.ln1(x)).split(width, dim=-1))
            # Scaled by 1/sqrt(head_dim), as Keras's MultiHeadAttention.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, width))
            # keras-hub's GPT-2 passes `gelu_approximate`, i.e.
            # keras.activations.gelu(approximate=True): the tanh form.
            h = F.gelu(self.fc(self.ln2(x)), approximate="tanh")
            return x + self.out(h)

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(vocab, width)
            self.wpe = nn.Embedding(args.block_size, width)
            self.blocks = nn.ModuleList(Block() for _ in range(args.layers))
            self.ln_f = nn.LayerNorm(width, eps=1e-5)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe.weight[:idx.shape[1]]
            for block in self.blocks:
                x = block(x)
            # Tied output, as ReversibleEmbedding(reverse=True): x @ E^T.
            return self.ln_f(x) @ self.wte.weight.T

    model = GPT()
    if args.init == "keras":
        # keras-hub's GPT2Backbone: RandomNormal (not truncated) with
        # stddev 0.02 for every dense and attention kernel, no GPT-2
        # 1/sqrt(2L) scaling of residual projections; zero biases; token
        # embedding stddev 0.01, position embedding 0.02; LayerNorm 1, 0
        # (PyTorch's default already).
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.normal_(model.wte.weight, std=0.01)
        nn.init.normal_(model.wpe.weight, std=0.02)
    return model


def param_groups(torch, model, weight_decay):
    """Decay on Linear weights only, as the authors' nanoGPT-based
    configure_optimizers (and our `pretrain.no_decay`)."""
    decay = [m.weight for m in model.modules()
             if isinstance(m, torch.nn.Linear)]
    ids = {id(p) for p in decay}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [dict(params=decay, weight_decay=weight_decay),
            dict(params=rest, weight_decay=0.0)]


def main(argv=None):
    require_tensorflow("train.crosscheck_torch")
    args = parse_args(argv)
    try:
        import torch
        if args.optimizer == "sophia-g":
            from sophia_opt import SophiaG
    except ImportError:
        print(INSTALL, file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    F = torch.nn.functional

    train, val = windows(args.text, args.block_size, args.val_fraction)
    val_batches = [torch.from_numpy(val[i:i + args.batch_size])
                   for i in range(0, len(val) - args.batch_size + 1,
                                  args.batch_size)]
    batches = train_batches(train, args.batch_size, args.seed)
    model = build_model(torch, args)
    groups = param_groups(torch, model, args.weight_decay)
    if args.optimizer == "sophia-g":
        optimizer = SophiaG(groups, lr=args.lr, betas=(0.965, 0.99),
                            rho=args.rho, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95),
                                      weight_decay=args.weight_decay)
    tokens = args.batch_size * args.block_size

    def loss_of(logits, targets):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                               targets.reshape(-1))

    @torch.no_grad()
    def val_loss():
        losses = [loss_of(model(b[:, :-1]), b[:, 1:]).item()
                  for b in val_batches]
        return float(np.mean(losses))

    args.out.mkdir(parents=True, exist_ok=True)
    metrics = open(args.out / "metrics.jsonl", "w")
    start = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        batch = torch.from_numpy(next(batches))
        x, y = batch[:, :-1], batch[:, 1:]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model(x), y)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if args.optimizer == "adamw":
            optimizer.step()
        else:
            # ratio = |m| / (rho * bs * h): bs is the tokens in the batch,
            # since h is an EMA of squared *mean* gradients.
            optimizer.step(bs=tokens)
            # The authors' schedule (README recipe and train_sophiag.py):
            # after the step at iter % k == k - 1, so h is fresh for the
            # steps at iter % k == 0 except step 0 (our Keras Sophia also
            # refreshes at step 0; here steps 0..k-1 see h = 0, i.e. sign
            # steps). GNB on the batch just trained on, as in their README;
            # train_sophiag.py draws a fresh batch and also clips these
            # gradients at grad_clip, which we do not.
            if step % args.hessian_interval == args.hessian_interval - 1:
                optimizer.zero_grad(set_to_none=True)
                logits = model(x)
                sampled = torch.distributions.Categorical(
                    logits=logits).sample()
                loss_of(logits, sampled).backward()
                optimizer.update_hessian()
                optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.eval_interval == 0 or done == args.steps:
            v = val_loss()
            metrics.write(json.dumps({"step": done, "val_loss": v}) + "\n")
            metrics.flush()
            print(f"step {done}: train loss {loss.item():.4f}, val loss "
                  f"{v:.4f}, {time.time() - start:.0f}s", flush=True)
    metrics.close()
    seconds = time.time() - start
    settings = {k: str(v) if isinstance(v, pathlib.Path) else v
                for k, v in vars(args).items()}
    result = dict(settings, final_val_loss=v, seconds=round(seconds, 1),
                  torch=torch.__version__)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"final val loss {v:.4f} ({seconds:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
