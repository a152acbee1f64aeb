from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CharLSTM", "LSTMLayer"]


class LSTMLayer(nn.Module):
    """One LSTM layer whose two GEMMs are explicit ``nn.Linear`` modules.

    With input ``x_t`` and state ``(h, c)``, gates are computed as::

        [i, f, g, o] = ih(x_t) + hh(h_{t-1})          (ih has the bias, hh none)
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(c_t)

    which is ``torch.nn.LSTM``'s cell with its two bias vectors merged into one. ``ih`` is applied to
    the whole sequence in one GEMM; ``hh`` once per time step. Because both are plain
    ``nn.Linear``, a precision policy that wraps ``nn.Linear`` sees every GEMM of the recurrence.

    Initialisation: weights and bias ~ U(-1/sqrt(H), 1/sqrt(H)) as in ``nn.LSTM``, then the
    forget-gate bias is set to 1 so that early gradients flow through ``c`` (Jozefowicz et al. 2015).
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(f"input_size and hidden_size must be >= 1, got {input_size}, {hidden_size}")
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 4 * hidden_size)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        with torch.no_grad():
            self.ih.bias[hidden_size:2 * hidden_size].fill_(1.0)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``x``: (batch, time, input_size) -> outputs (batch, time, hidden), final ``(h, c)``."""
        b, t, _ = x.shape
        if state is None:
            h = x.new_zeros(b, self.hidden_size)
            c = x.new_zeros(b, self.hidden_size)
        else:
            h, c = state
        xg = self.ih(x)  # (b, t, 4H): the input GEMM for all steps at once
        outs = []
        for s in range(t):
            gates = xg[:, s] + self.hh(h)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1), (h, c)


class CharLSTM(nn.Module):
    """Character-level LSTM language model: ``Embedding -> LSTMLayer* -> Linear`` to next-char logits.

    Input: token ids (batch, time), int64 in ``[0, vocab_size)``. Output: logits
    (batch, time, vocab_size), position ``t`` predicting token ``t+1``. Train with
    :func:`leantrain.train.sequence_cross_entropy` (mean over all positions, nats per character;
    divide by ln 2 for bits per character).

    Every matrix product is an ``nn.Linear`` (two per layer plus the decoder) and the input is an
    ``nn.Embedding``, so precision and quantization wrappers of those module types cover the whole
    model. ``dropout`` applies between layers and before the decoder.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 32, hidden_size: int = 128, num_layers: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.layers = nn.ModuleList(
            LSTMLayer(embed_dim if k == 0 else hidden_size, hidden_size) for k in range(num_layers))
        self.drop = nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def forward(self, x: torch.Tensor,
                state: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        return self.forward_with_state(x, state)[0]

    def forward_with_state(self, x: torch.Tensor, state: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                           ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits and the final state of every layer (for carrying state across windows or sampling)."""
        if x.dim() != 2:
            raise ValueError(f"CharLSTM input must be (batch, time) token ids, got shape {tuple(x.shape)}")
        h = self.embed(x.long())
        new_state = []
        for k, layer in enumerate(self.layers):
            h, s = layer(h, None if state is None else state[k])
            new_state.append(s)
            h = self.drop(h)
        return self.decoder(h), new_state

    @torch.no_grad()
    def sample(self, prompt: torch.Tensor, length: int, *, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend 1-D ``prompt`` ids by ``length`` tokens sampled from softmax(logits / temperature)."""
        if prompt.dim() != 1 or len(prompt) < 1:
            raise ValueError("prompt must be a non-empty 1-D tensor of token ids")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        was_training = self.training
        self.eval()
        logits, state = self.forward_with_state(prompt[None])
        out = [prompt]
        for _ in range(length):
            p = torch.softmax(logits[0, -1] / temperature, dim=-1)
            nxt = torch.multinomial(p.cpu(), 1, generator=generator).to(prompt.device)
            out.append(nxt)
            logits, state = self.forward_with_state(nxt[None], state)
        self.train(was_training)
        return torch.cat(out)
