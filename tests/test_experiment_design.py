"""Pieces of the reproduction experiments' designs that a wrong implementation would silently change."""

import torch
from torch import nn

from leantrain.app.experiments.large_batch import Config, _batch_schedule, progressive_batch_sizes
from leantrain.app.experiments.mlsl import _LocalMomentum


def test_local_momentum_then_plain_sgd_is_momentum_sgd():
    """EF-SignSGD's uncompressed form: each rank's lr * (heavy-ball momentum) applied with SGD(lr=1) is torch's
    momentum SGD, so the compressed arm is judged against the same optimizer."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    b = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    b.load_state_dict(a.state_dict())
    ref = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    local = _LocalMomentum(list(b.parameters()), 0.05, 0.9)
    opt = torch.optim.SGD(b.parameters(), lr=1.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
        for model, o in ((a, ref), (b, opt)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)
    for h in local.handles:
        h.remove()


def test_large_batch_proportions_match_the_paper():
    """SB at ~0.4% of the 4,000 MNIST-1D training samples (paper 256/60,000), LB/SB ~23 (paper 6,000/256)."""
    cfg = Config(seeds=1, warm_epochs=3, contenders=("SB", "LB"))
    large = cfg.batch_ratio * cfg.small_batch
    assert abs(cfg.small_batch / 4000 - 256 / 60000) < 0.001
    assert abs(large / cfg.small_batch - 6000 / 256) < 1.0 and 0.08 <= large / 4000 <= 0.1
    assert _batch_schedule("SB", cfg, large) == ([], 16)
    assert _batch_schedule("LB warm-started", cfg, large) == ([16, 16, 16], large)
    sizes = progressive_batch_sizes(16, large, 5)
    assert sizes[0] == 16 and sizes[-1] == large and sizes == sorted(sizes)
