"""Keras's torch backend: Sophia through `SophiaTrainStep` against the
authors' own PyTorch `SophiaG`, the refusals, and the benchmark there.
The backend-neutral files of tests/ (bfloat16 included) run on torch too
(`.ci/run`)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import sophia_opt
import torch
from conftest import CE
from conftest import check_backend_steps
from conftest import classification_data
from conftest import slot_values
from conftest import tiny_classifier
from conftest import without_tensorflow

from keras_sophia import Sophia


def test_six_steps_equal_the_authors_sophiag():
    # Same network, batches and Hessian estimate: the squared training
    # gradient, which the authors' `update_hessian()` takes from `p.grad`.
    # Their h is EMA(g^2) and their step divides by rho * bs * h + 1e-15;
    # ours folds bs into the estimate (bs * g^2, DESIGN.md), so with
    # epsilon = 1e-15 both clip the same ratio. k = 3: both refresh
    # before the updates of steps 0 and 3.
    x, y = classification_data(n=48)
    bs, lr, rho, wd, betas = 8, 0.05, 0.04, 0.1, (0.965, 0.99)
    model = tiny_classifier()
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 3))
    with torch.no_grad():
        for layer, (kernel, bias) in zip(
                (net[0], net[2]), zip(*[iter(model.get_weights())] * 2)):
            layer.weight.copy_(torch.from_numpy(kernel.T))
            layer.bias.copy_(torch.from_numpy(bias))

    def squared_gradients(context):
        return [bs * g * g for g in context.grads]

    model.compile(Sophia(lr, *betas, rho=rho, epsilon=1e-15,
                         weight_decay=wd, hessian_update_interval=3,
                         estimator=squared_gradients, seed=0), CE)
    model.fit(x, y, batch_size=bs, epochs=1, shuffle=False, verbose=0)

    theirs = sophia_opt.SophiaG(net.parameters(), lr=lr, betas=betas,
                                rho=rho, weight_decay=wd)
    loss = torch.nn.CrossEntropyLoss()
    for t in range(6):
        rows = slice(t * bs, (t + 1) * bs)
        theirs.zero_grad()
        loss(net(torch.from_numpy(x[rows])),
             torch.from_numpy(y[rows])).backward()
        if t % 3 == 0:
            theirs.update_hessian()
        theirs.step(bs=bs)

    ours = model.get_weights()
    expected = [net[0].weight.T, net[0].bias, net[2].weight.T, net[2].bias]
    moved = 0.0
    # atol: at step 4 one coordinate's m cancels to -4.6e-6 in float32
    # (0.965 m + 0.035 g); the two m differ by 1.5e-4 of that, and the
    # unclipped step lr * m / (rho h) carries it: 7.6e-6 apart (measured).
    # Every other coordinate agrees to float32 rounding.
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-5,
                                   atol=2e-5)
    for a, h in zip(slot_values(model.optimizer, "hessian"),
                    [theirs.state[p]["hessian"] for p in
                     (net[0].weight, net[0].bias, net[2].weight,
                      net[2].bias)]):
        h = h.numpy()
        np.testing.assert_allclose(a, bs * (h.T if h.ndim == 2 else h),
                                   rtol=1e-5, atol=1e-12)
        moved += float(np.abs(a).sum())
    assert moved > 0  # the estimates reached h


@pytest.mark.parametrize("option, match", [
    (dict(loss_scale_factor=128.0), "Loss scaling"),
    (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
])
def test_what_torch_does_not_support_yet_is_refused_by_name(option, match):
    x, y = classification_data(n=16)
    model = tiny_classifier()
    model.compile(Sophia(1e-2, seed=0, **option), CE)
    with pytest.raises(ValueError, match=f"{match}.*torch backend"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)


@pytest.mark.parametrize("estimator, second_order",
                         [("gnb", False), ("hutchinson", True)])
def test_only_a_second_order_estimator_keeps_the_gradients_graph(
        estimator, second_order):
    # GNB takes one product through the output (first order): its passes
    # keep the forward graph but not the training gradient's backward
    # graph, which Hutchinson's product differentiates.
    from keras_sophia import estimators
    from keras_sophia.refresh import shared_pass
    from keras_sophia.torch_step import Torch

    x, y = classification_data(n=8)
    model = tiny_classifier()
    model.compile(Sophia(estimator=estimator), CE)
    model.train_on_batch(x, y)
    chosen = estimators.get(estimator)
    assert chosen.uses_hvp is second_order
    batch = (torch.as_tensor(x), torch.as_tensor(y), None)
    primitives = Torch(model)
    _, grads, (sums, _) = shared_pass(primitives, chosen, batch, (0, 0),
                                      track_loss=False)
    assert all(np.isfinite(s.detach().cpu().numpy()).all() for s in sums)
    _, _, context = primitives.shared_pass(batch, (0, 0), False,
                                           second_order=second_order)
    assert all(g.requires_grad is second_order
               for g in context._recorded_grads())
    assert not any(g.requires_grad for g in grads)


@pytest.mark.parametrize("where", ["without_tensorflow", "tensorflow_parent"])
def test_the_benchmark_times_sophia_against_adamw_on_torch(tmp_path, where):
    # On Keras's torch backend with TensorFlow not importable, and as the
    # `torch` part of a TensorFlow run (a child process on torch).
    out = tmp_path / "bench.json"
    if where == "without_tensorflow":
        done = without_tensorflow("train.benchmark",
                                  ["--quick", "--out", str(out)], "torch")
    else:
        done = subprocess.run(
            [sys.executable, "-m", "train.benchmark", "--quick", "--parts",
             "torch", "--out", str(out)], capture_output=True, text=True,
            cwd=os.path.join(os.path.dirname(__file__), os.pardir),
            env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    check_backend_steps(result, "torch")
    # Without CUDA torch keeps no memory counters: no figure, and the
    # table says so rather than leaving it out silently.
    memory = result["torch_memory_analysis"]
    assert memory and all(figures is None for figures in memory.values())
    assert "peak_memory_bytes" not in result
    table = (tmp_path / "bench.md").read_text()
    assert "Keras on torch (eager)" in table
    assert "not measured: torch keeps no counters of CPU tensors" in table
