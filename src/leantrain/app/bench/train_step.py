"""Benchmark ``train``: leantrain's training loop against the plain PyTorch loop a user would write.

Two rows, each measured side by side in one process:

- a ResNet-20 step through :class:`leantrain.train.Hooks` vs the same step written directly (the
  cost of the hook indirection the precision and distributed layers use);
- one epoch of :func:`leantrain.train.fit` (deterministic order, history, no checkpoint, no
  evaluation) vs a hand-written epoch over ``torch.utils.data.DataLoader(shuffle=True)`` with the
  same model, optimizer and batch size (the cost, or gain, of the loop machinery and its direct
  tensor batching).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from leantrain.app.bench import check, compare
from leantrain.app.registry import benchmark
from leantrain.data import load_dataset
from leantrain.models import LeNet, resnet20
from leantrain.train import Hooks, fit


@benchmark("train", description="leantrain step (Hooks) and fit() epoch vs plain PyTorch step and DataLoader loop")
def run(quick: bool = False, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    batch = 16 if quick else 64
    model = resnet20(width=8 if quick else 16).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    hooks = Hooks()
    loss_fn = nn.functional.cross_entropy

    def plain() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    def ours() -> None:
        opt.zero_grad(set_to_none=True)
        hooks.backward(loss_fn(model(x), y))
        hooks.step(opt)

    step_row = compare("resnet20 step via Hooks", ours, plain, baseline_name="plain PyTorch step",
                       repeats=5 if quick else 9, device=device)

    data = load_dataset("digits")
    small = LeNet(1, 10, width=8).to(device)
    sgd = torch.optim.SGD(small.parameters(), lr=0.01, momentum=0.9)
    loader = DataLoader(data.train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))

    def fit_epoch() -> None:
        fit(small, sgd, loss_fn, data.train, epochs=1, batch_size=32, device=device, eval_train=False)

    def loader_epoch() -> None:
        small.train()
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            sgd.zero_grad(set_to_none=True)
            loss_fn(small(xb), yb).backward()
            sgd.step()

    n = len(data.train)
    epoch_row = compare("fit() epoch, LeNet on digits", fit_epoch, loader_epoch, baseline_name="DataLoader loop",
                        repeats=3 if quick else 7, min_sample_s=0.0, device=device, work=n, work_unit="samples")
    return {"rows": [step_row, epoch_row],
            "checks": [check("hooks step / plain step", step_row["ratio"], "<=", 1.1),
                       check("fit epoch / DataLoader epoch", epoch_row["ratio"], "<=", 1.1)]}
