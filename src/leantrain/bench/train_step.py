"""Benchmark ``train``: one step of leantrain's loop machinery vs a hand-written step."""

from __future__ import annotations

import torch
from torch import nn

from leantrain.bench import check, compare
from leantrain.models import resnet20
from leantrain.registry import benchmark
from leantrain.train import Hooks


@benchmark("train", description="ResNet-20 training step through leantrain Hooks vs a plain PyTorch step")
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

    row = compare("resnet20 step via Hooks", ours, plain, baseline_name="plain PyTorch step",
                  repeats=5 if quick else 9, device=device)
    return {"rows": [row], "checks": [check("hooks step / plain step", row["ratio"], "<=", 1.1)]}
