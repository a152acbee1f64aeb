"""Ternary residual edges (arXiv:1707.04679): where to spend a few extra ternary terms.

A residual edge on a layer adds the next term of its ternary expansion
``W ~= alpha_1 T_1 + alpha_2 T_2 + ...`` (term k ternarizes the error left by the terms before it,
with the same grouping; :func:`~leantrain.quant.weights.ternary_expansion`). It is a parallel
ternary edge ``alpha_k (T_k x)``: additions plus one multiply per group.

**Sensitivity (first-order perturbation theory).** Our formula (the paper's exact measure was not
recovered; see docs/quant.md): quantization perturbs layer l's weight by
``delta_l(t) = W_l - sum_{k<=t} alpha_k T_k`` (t terms on). To first order the logits ``z`` change by
``dz = J_l(x) vec(delta_l(t)) + O(||delta||^2)``, with ``J_l = dz / dW_l`` at the FP32 weights, and
we score

    s_l(t) = (1 / B) sum_b || J_l(x_b) vec(delta_l(t)) ||^2

over calibration inputs x_b, computed exactly as Jacobian-vector products (by double backward: one
forward and backward pass for all layers, then one product per layer and t; no Jacobian is formed).
Layers' contributions add to first order, so the estimated gain of edge (l, t+1) is
``s_l(t) - s_l(t+1)``. Edges are ranked greedily by gain per unit cost, a layer's edges always in
term order. The cost of an edge is its extra weight bits ``2*numel + scale_bits*G`` (``unit="size"``)
or its extra operations ``MACs + K*S*L`` (``unit="ops"``). ``sensitivity="random"`` gives a random
interleaving with the same per-layer order (the control).

**Budget.** ``budget`` is the extra size (``unit="size"``) or extra operations (``unit="ops"``) as a
fraction of the plain 8-2 model's quantized layers; edges are switched on in ranked order while the
total stays within it. ``QuantizedModel.set_residuals(k)`` switches the first k ranked edges on and
the rest off at run time; ``QuantLayer.active_terms`` is the per-layer switch.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import torch

from leantrain.quant.convert import Batch, QuantizedModel, calibration_batches
from leantrain.quant.layers import QuantLayer

__all__ = ["add_residual_edges", "perturbation_sensitivity", "edge_costs", "edges_within", "SENSITIVITIES", "BUDGET_UNITS"]

SENSITIVITIES: tuple[str, ...] = ("perturbation", "random")
BUDGET_UNITS: tuple[str, ...] = ("size", "ops")


@torch.no_grad()
def _weight_error(layer: QuantLayer, terms: int) -> torch.Tensor:
    assert layer.weight is not None
    return layer.weight.detach() - layer.weight_hat(terms)


def perturbation_sensitivity(qmodel: QuantizedModel, inputs: Any, *, max_terms: int) -> dict[str, list[float]]:
    """``s_l(t)`` for t = 1..max_terms of every quantized layer (module docstring).

    ``inputs``: one calibration batch (a tensor, a mapping of keyword inputs or a :class:`Batch`);
    ``z`` is the model's output, or its first tensor when it returns a tuple or a ``ModelOutput``
    (the logits of a classifier or language model). Layers need their FP32 shadow weights and at
    least ``max_terms`` stored terms.
    """
    layers = qmodel.quant_layers()
    modes = {n: layer.mode for n, layer in layers.items()}
    was_training = qmodel.training
    qmodel.eval()
    qmodel.set_mode("float")  # J_l is taken at the FP32 network
    net = qmodel.model
    batch = calibration_batches(inputs, batches=1)[0].to(next(net.parameters()).device)
    out: dict[str, list[float]] = {}
    try:
        missing = [n for n, layer in layers.items() if layer.weight is None]
        if missing:
            raise ValueError(f"layers {missing} have no FP32 shadow weight; sensitivity needs the float model")
        weights = [layer.weight for layer in layers.values()]
        with torch.enable_grad():
            # J delta without forming J: g(v) = J^T v is linear in v, so d<g(v), delta>/dv = J delta
            # (the double-backward form of a Jacobian-vector product; one forward for all layers).
            z = _first_tensor(batch(net))
            v = torch.zeros_like(z, requires_grad=True)
            grads = torch.autograd.grad(z, weights, v, create_graph=True)
            for (name, layer), g in zip(layers.items(), grads):
                scores = []
                for t in range(1, max_terms + 1):
                    (dz,) = torch.autograd.grad(g, v, _weight_error(layer, t), retain_graph=True)
                    scores.append(float(dz.detach().double().square().sum() / batch.batch_size))
                out[name] = scores
    finally:
        for n, layer in layers.items():
            layer.mode = modes[n]
        qmodel.train(was_training)
    return out


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for v in items:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"the model's output ({type(out).__name__}) holds no tensor to measure sensitivity on")


def edge_costs(qmodel: QuantizedModel, unit: str = "size") -> tuple[dict[str, float], float]:
    """Cost of one residual edge per layer and the plain 8-2 total it is measured against.

    ``size``: bits of codes and scales (``2*numel + scale_bits*G``); ``ops``: additions and
    multiplications per sample (``MACs + K*S*L``), the same for every term of a layer.
    """
    if unit not in BUDGET_UNITS:
        raise ValueError(f"unit must be one of {BUDGET_UNITS}, got {unit!r}")
    costs: dict[str, float] = {}
    for name, layer in qmodel.quant_layers().items():
        lay = layer.layout
        if unit == "size":
            costs[name] = 2.0 * math.prod(layer.shape) + torch.finfo(layer.scale_dtype).bits * lay.G
        else:
            pos = qmodel.layer_info[name].get("positions", 0)
            costs[name] = float(lay.K * lay.R * pos + lay.K * lay.segments * pos)
    return costs, sum(costs.values())


def edges_within(order: list[tuple[str, int]], costs: dict[str, float], base: float, budget: float) -> tuple[int, float]:
    """How many leading edges of ``order`` fit in ``budget * base`` (their costs summed), and what they cost."""
    spent, k = 0.0, 0
    for name, _ in order:
        if spent + costs[name] > budget * base * (1 + 1e-9):
            break
        spent += costs[name]
        k += 1
    return k, spent


def add_residual_edges(qmodel: QuantizedModel, *, budget: float, sensitivity: str = "perturbation", max_terms: int = 4,
                       unit: str = "size", calibration: Any = None, seed: int = 0) -> dict[str, Any]:
    """Compute up to ``max_terms - 1`` residual edges per ternary layer, rank them, switch on what ``budget`` buys.

    Returns ``{"edge_order", "budget_edges", "scores", "costs", "base_cost", "spent"}``; the
    ranking is also stored on ``qmodel`` (``edge_order``, ``budget_edges``) for ``set_residuals``.
    ``calibration`` defaults to the sample kept by :func:`quantize_model`.
    """
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity must be one of {SENSITIVITIES}, got {sensitivity!r}")
    if not (isinstance(budget, (int, float)) and budget >= 0 and math.isfinite(budget)):
        raise ValueError(f"budget must be a finite number >= 0 (extra {unit} as a fraction of the 8-2 model), got {budget!r}")
    if isinstance(max_terms, bool) or not isinstance(max_terms, int) or max_terms < 2:
        raise ValueError(f"max_terms must be an integer >= 2 (base term plus at least one edge), got {max_terms!r}")
    layers = qmodel.quant_layers()
    if not layers:
        raise ValueError("the model has no quantized layers")
    for name, layer in layers.items():
        if layer.bits != 2:
            raise ValueError(f"residual edges need ternary weights; layer {name!r} has {layer.bits}-bit weights")
        if layer.weight is None:
            raise ValueError(f"layer {name!r} has no FP32 shadow weight (loaded packed model); convert from the float model")
    for layer in layers.values():
        layer.requantize(max_terms)
        layer.active_terms = 1
    costs, base = edge_costs(qmodel, unit)
    edges_per_layer = {name: layer.n_terms - 1 for name, layer in layers.items()}
    scores: dict[str, list[float]] = {}
    order: list[tuple[str, int]] = []
    if sensitivity == "perturbation":
        sample: Batch | None = qmodel.calibration_sample if calibration is None else \
            calibration_batches(calibration, batches=1)[0]
        if sample is None:
            raise ValueError("no calibration sample: pass calibration= (a batch of inputs)")
        scores = perturbation_sensitivity(qmodel, sample, max_terms=max_terms)
        # Greedy by gain per cost; a layer's next edge enters the heap once the previous one is taken.
        heap = []
        for name, s in scores.items():
            if edges_per_layer[name]:
                heapq.heappush(heap, (-(s[0] - s[1]) / costs[name], name, 1))
        while heap:
            _, name, t = heapq.heappop(heap)
            order.append((name, t))
            if t < edges_per_layer[name]:
                s = scores[name]
                heapq.heappush(heap, (-(s[t] - s[t + 1]) / costs[name], name, t + 1))
    else:
        g = torch.Generator().manual_seed(seed)
        labels = [name for name, k in edges_per_layer.items() for _ in range(k)]
        seen: dict[str, int] = {}
        for i in torch.randperm(len(labels), generator=g).tolist():
            name = labels[i]
            seen[name] = seen.get(name, 0) + 1
            order.append((name, seen[name]))
    k, spent = edges_within(order, costs, base, budget)
    qmodel.edge_order = order
    qmodel.budget_edges = k
    qmodel.set_residuals(k)
    return {"edge_order": order, "budget_edges": k, "scores": scores, "costs": costs, "base_cost": base,
            "spent": spent / base if base else 0.0, "unit": unit, "sensitivity": sensitivity}
