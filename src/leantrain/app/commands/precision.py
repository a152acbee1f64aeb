"""``leantrain precision audit MODEL-SPEC``: count the GEMMs of one training step per kind and report any that
ran unrounded (:func:`leantrain.precision.audit`), on a model built with random weights."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from leantrain.app.commands import add_common, emit, key_values

# torch / HF models at toy size, random weights, no download: (builder, example inputs) per name.
_BUILTIN = ("torch:transformer", "torch:mha", "torch:lstm", "torch:gru", "hf:bert", "hf:gpt2", "hf:vit")
_ZOO = ("resnet20", "lenet", "mlp", "charlstm", "dlrm", "dcgan_generator", "dcgan_discriminator")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "precision", help="inspect mixed-precision emulation (audit: which GEMMs are rounded)",
        description="Mixed-precision emulation tools. `audit MODEL-SPEC` builds the model with random weights, runs one "
                    "forward and backward pass emulated under --policy and counts every GEMM: per kind (parameter, "
                    "activation, embedding) and per GEMM (forward, backward-data, backward-weight), plus any aten "
                    "GEMM that ran outside leantrain's emulation (unrounded). Exit status 1 when one did.")
    psub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = psub.add_parser("audit", help="count GEMMs per kind and report any that ran unrounded",
                        description="MODEL-SPEC: a zoo model (" + ", ".join(_ZOO) + ") optionally with constructor "
                                    "arguments NAME:key=value,key=value (e.g. resnet20:width=8,depth=8), or a toy "
                                    "model built from code or config with random weights: " + ", ".join(_BUILTIN)
                                    + " (hf:* need the transformers package).")
    a.add_argument("model", metavar="MODEL-SPEC", help="model to audit (see above)")
    a.add_argument("--policy", default="bf16", help="precision policy (default bf16; see leantrain train --help)")
    a.add_argument("--batch", type=int, default=2, help="batch size of the random input (default 2)")
    add_common(a, out=None)
    a.set_defaults(func=run)


def _builtin(name: str, batch: int) -> tuple[Any, tuple, dict]:
    import torch
    from torch import nn

    if name == "torch:transformer":
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), (torch.randn(batch, 6, 16),), {}
    if name == "torch:mha":
        x = torch.randn(6, batch, 16)
        return nn.MultiheadAttention(16, 4), (x, x, x), {}
    if name in ("torch:lstm", "torch:gru"):
        cls = nn.LSTM if name == "torch:lstm" else nn.GRU
        return cls(8, 8, num_layers=2, batch_first=True), (torch.randn(batch, 5, 8),), {}
    import importlib

    try:
        tr = importlib.import_module("transformers")
    except ImportError as err:
        raise ValueError(f"MODEL-SPEC {name!r} needs the transformers package: {err}") from None
    if name == "hf:bert":
        cfg = tr.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=32, max_position_embeddings=32)
        return tr.BertForMaskedLM(cfg), (torch.randint(0, 64, (batch, 8)),), {}
    if name == "hf:gpt2":
        cfg = tr.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=4)
        return tr.GPT2LMHeadModel(cfg), (torch.randint(0, 64, (batch, 8)),), {}
    cfg = tr.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=32, num_labels=3)
    return tr.ViTForImageClassification(cfg), (torch.randn(batch, 3, 16, 16),), {}


def _zoo(name: str, kwargs: dict[str, Any], batch: int) -> tuple[Any, tuple, dict]:
    import torch

    from leantrain.models import build

    def channels(m: Any) -> int:
        return next(c for c in m.modules() if isinstance(c, torch.nn.Conv2d)).in_channels

    inputs: dict[str, Callable[[Any], tuple]] = {
        "resnet20": lambda m: (torch.randn(batch, channels(m), 32, 32),),
        "lenet": lambda m: (torch.randn(batch, channels(m), 28, 28),),
        "mlp": lambda m: (torch.randn(batch, kwargs["in_features"]),),
        "charlstm": lambda m: (torch.randint(0, kwargs["vocab_size"], (batch, 12)),),
        "dlrm": lambda m: (torch.cat([torch.randn(batch, m.dense), torch.zeros(batch, len(m.embeddings))], 1),),
        "dcgan_generator": lambda m: (torch.randn(batch, m.latent_dim),),
        "dcgan_discriminator": lambda m: (torch.randn(batch, *m.data_shape),),
    }
    defaults = {"mlp": {"in_features": 16, "num_classes": 10}, "charlstm": {"vocab_size": 32}}
    kwargs = {**defaults.get(name, {}), **kwargs}
    model = build(name, **kwargs)
    return model, inputs[name](model), {}


def run(args: argparse.Namespace) -> int:
    import torch

    from leantrain.precision import audit, get_policy

    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    policy = get_policy(args.policy)
    torch.manual_seed(args.seed)
    spec = args.model
    name, _, rest = spec.partition(":") if not spec.startswith(("torch:", "hf:")) else (spec, "", "")
    if name in _BUILTIN:
        model, inputs, kwargs = _builtin(name, args.batch)
    elif name in _ZOO:
        model, inputs, kwargs = _zoo(name, key_values(rest, "MODEL-SPEC arguments"), args.batch)
    else:
        raise ValueError(f"MODEL-SPEC must be one of {list(_ZOO) + list(_BUILTIN)} (zoo names may take :key=value,...), "
                         f"got {spec!r}")
    result = audit(model, *inputs, policy=policy, **kwargs)
    emit(args, {"model": spec, **result.to_dict()}, f"model {spec}\n\n" + result.describe())
    return 1 if result.total_unrounded else 0
