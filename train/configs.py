"""Named configs: the authors' GPT-2 runs (arXiv 2305.14342 and their
code), for every optimizer. Each is a set of overrides of `pretrain.Config`.

Shared by all: OpenWebText, blocks of 1024, a global batch of 480 blocks,
2,000 warmup steps then cosine decay over 100k steps, global-norm clipping
at 1.0, weight decay on dense kernels only, bf16 compute.
"""

_COMMON = dict(
    data="openwebtext",
    block_size=1024,
    batch_size=480,
    steps=100_000,
    warmup=2000,
    grad_clip=1.0,
    precision="mixed_bfloat16",
    eval_interval=1000,
    eval_steps=200,
)

# model: (Sophia lr, Sophia min_lr, rho, AdamW lr, AdamW min_lr)
_SIZES = {
    "small": ("125m", 6e-4, 1.5e-5, 0.05, 6e-4, 3e-5),
    "medium": ("355m", 7e-4, 1e-5, 0.08, 3e-4, 6e-5),
    "large": ("770m", 3e-4, 1e-5, 0.05, 2e-4, 1e-5),
}


def _configs():
    configs = {}
    for size, (model, lr, min_lr, rho, adam_lr, adam_min) in _SIZES.items():
        base = dict(_COMMON, model=model)
        sophia = dict(base, lr=lr, min_lr=min_lr, weight_decay=0.2,
                      hessian_interval=10)
        configs[f"gpt2-{size}-sophia-g"] = dict(
            sophia, optimizer="sophia-g", rho=rho
        )
        # The paper's Sophia-H runs used a rho (gamma) of about 0.01.
        configs[f"gpt2-{size}-sophia-h"] = dict(
            sophia, optimizer="sophia-h", rho=0.01
        )
        configs[f"gpt2-{size}-adamw"] = dict(
            base, optimizer="adamw", lr=adam_lr, min_lr=adam_min,
            weight_decay=0.1, beta_1=0.9, beta_2=0.95,
        )
        # Lion: lr 1e-4 and betas (0.95, 0.98) as in the paper's baseline.
        # min_lr and weight decay are our choice (the Lion authors advise a
        # 3-10x larger decay than AdamW's to go with the smaller lr).
        configs[f"gpt2-{size}-lion"] = dict(
            base, optimizer="lion", lr=1e-4, min_lr=1e-5,
            weight_decay=1.0, beta_1=0.95, beta_2=0.98,
        )
    return configs


CONFIGS = _configs()
