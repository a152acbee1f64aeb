"""bf16-language: a character-level LSTM language model in BF16 vs FP32 (bits per character).

The BF16 paper (arXiv:1905.12322) reports FP32-parity for language workloads (GNMT, stacked LSTMs;
which tensors were BF16 was not recovered). Here: the zoo's ``CharLSTM``, whose input, recurrent and
decoder GEMMs are all ``nn.Linear`` (so every GEMM of the recurrence is emulated) plus an
``nn.Embedding``, trained with Adam on the ``pydocs`` corpus (docstrings of Python's standard library,
built offline). Metric: test bits per character. Same seeds, data order and hyper-parameters per policy.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from leantrain.app.experiments._precision_training import (
    mean_curve_plot,
    paired_values,
    parity,
    train_run,
    underflow_table,
)
from leantrain.app.registry import Claim, Result, Table, experiment
from leantrain.data import load_dataset
from leantrain.models import CharLSTM
from leantrain.train import sequence_cross_entropy

LN2 = math.log(2.0)


def _setting(profile: str) -> dict:
    if profile == "quick":
        return {"name": "charlstm64-pydocs", "seq_len": 32, "train_chars": 48_000, "test_chars": 12_000, "hidden": 64,
                "embed": 16, "epochs": 4, "batch_size": 32, "lr": 5e-3, "fp32_seeds": 3, "seeds": 1,
                "policies": ("fp32", "bf16", "fp16")}
    return {"name": "charlstm128-pydocs", "seq_len": 64, "train_chars": 400_000, "test_chars": 50_000, "hidden": 128,
            "embed": 32, "epochs": 6, "batch_size": 32, "lr": 5e-3, "fp32_seeds": 3, "seeds": 3,
            "policies": ("fp32", "bf16", "bf16-sr", "fp16", "fp16-scaled")}


@experiment(
    "bf16-language",
    arxiv="1905.12322",
    title="BF16 training of a character-level LSTM language model (Python docstrings) vs FP32",
    claim="A recurrent language model trained with BF16 GEMM inputs reaches FP32's bits per character with the same "
          "hyper-parameters and iterations.",
    quick_minutes=0.8,
)
def run(profile: str, out: Path, seed: int = 0, device: str = "cpu") -> Result:
    cfg = _setting(profile)
    data = load_dataset("pydocs", seq_len=cfg["seq_len"], max_train_chars=cfg["train_chars"],
                        max_test_chars=cfg["test_chars"])
    vocab = data.info.num_classes
    seeds32 = list(range(seed, seed + cfg["fp32_seeds"]))
    runs = {}
    for name in cfg["policies"]:
        runs[name] = [
            train_run(cfg["name"], lambda: CharLSTM(vocab, embed_dim=cfg["embed"], hidden_size=cfg["hidden"]), name, data,
                      seed=s, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"], out=out, device=device,
                      optimizer="adam", loss_fn=sequence_cross_entropy, metric=None)
            for s in (seeds32 if name in ("fp32", "bf16") else seeds32[:cfg["seeds"]])]  # bf16: the claim, paired
    bpc = {k: [r.final("test_loss") / LN2 for r in v] for k, v in runs.items()}
    par = {k: parity(bpc["fp32"], bpc[k]) for k in runs if k != "fp32"}
    metric = "test bits per character"
    claims = [Claim(
        f"bf16 reaches FP32's test bits per character after {cfg['epochs']} epochs (same hyper-parameters)",
        "not recovered (paper: FP32 parity for GNMT / language workloads; values not recovered)",
        f"bf16 {par['bf16'].mean:.4f} vs FP32 {par['bf16'].fp32_mean:.4f} bpc (delta {par['bf16'].delta:+.4f})",
        par["bf16"].tolerance_text(metric), par["bf16"].passed, per_seed=paired_values(bpc, "bf16"), seeds=seeds32)]
    rows = [[k, len(bpc[k]), f"{statistics.mean(bpc[k]):.4f}", "-" if k == "fp32" else f"{par[k].delta:+.4f}",
             "-" if k == "fp32" else f"{par[k].tolerance:.4f}",
             "-" if k == "fp32" else ("within" if par[k].passed else "OUTSIDE")] for k in runs]
    table = Table(f"test bits per character ({cfg['name']}, {data.info.extra['train_chars']} training characters)",
                  ["policy", "seeds", "test bpc", "delta vs FP32", "tolerance", "parity"], rows)
    under = Table("output-gradient (dY) rounding over training", ["policy", "underflow to 0 (of non-zero)",
                                                                  "subnormal (of all)", "overflow (of all)", "skipped steps"],
                  underflow_table({k: v[0] for k, v in runs.items() if k != "fp32"}))
    for r in runs.values():
        for x in r:
            for row in x.history.evals:
                row["test_bpc"] = row["test_loss"] / LN2
    mean_curve_plot(out / "test_bpc.png", runs, "test_bpc", xlabel="epoch", ylabel="test bits per character",
                    title=f"{cfg['name']}: test bpc per policy")
    notes = (f"bf16 (the claim) runs on every FP32 seed {seeds32}, paired; the other policies on "
             f"{seeds32[:cfg['seeds']]} (table rows, no claim). "
             "CharLSTM: Embedding -> LSTM layer (input GEMM and recurrent GEMM as nn.Linear, gates FP32) -> Linear "
             "decoder; Adam, constant learning rate; every GEMM input rounded by the policy, softmax/loss FP32.")
    metrics = {"setting": cfg, "test_bpc": bpc, "parity": {k: vars(p) for k, p in par.items()},
               "dy": {k: v[0].summary.get("dy") for k, v in runs.items()},
               "history": {k: [r.history.evals for r in v] for k, v in runs.items()},
               "wall_s": {k: [r.wall_s for r in v] for k, v in runs.items()}, "data": data.info.extra}
    metrics["data"] = {k: v for k, v in data.info.extra.items() if k != "vocab"}
    setting = {"data": ("not recovered (GNMT translation, DeepSpeech2 speech)",
                        f"Python documentation characters ({data.info.extra.get('train_chars')} train)"),
               "model": ("GNMT (LSTM encoder-decoder)", f"CharLSTM, hidden {cfg['hidden']}, embedding {cfg['embed']}"),
               "batch / epochs": ("not recovered (the FP32 baseline's, same iterations)",
                                  f"{cfg['batch_size']} x {cfg['seq_len']} characters, {cfg['epochs']} epochs, Adam"),
               "seeds": ("not recovered", f"FP32 and bf16 {len(seeds32)} paired; other policies {cfg['seeds']}")}
    return Result(metrics, claims, ["test_bpc.png"], [table, under], notes, setting=setting)
