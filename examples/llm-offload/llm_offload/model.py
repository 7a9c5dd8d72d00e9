"""A decoder-only, GPT-style transformer written with torch.nn, built from a preset.

Pre-LayerNorm blocks (causal self-attention + 4x GELU MLP), learned position
embeddings, the output projection tied to the token embedding (so the state_dict
holds each weight once). Presets follow GPT-2/GPT-3 shapes; ``tiny`` is for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    d_model: int
    max_seq: int


#: ``model-size`` run-config values. Parameter counts are printed by
#: ``python -m llm_offload.model``.
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(vocab_size=512, n_layer=2, n_head=2, d_model=64, max_seq=128),
    "125m": GPTConfig(vocab_size=50304, n_layer=12, n_head=12, d_model=768, max_seq=1024),
    "350m": GPTConfig(vocab_size=50304, n_layer=24, n_head=16, d_model=1024, max_seq=1024),
    "760m": GPTConfig(vocab_size=50304, n_layer=24, n_head=16, d_model=1536, max_seq=1024),
    "1b": GPTConfig(vocab_size=50304, n_layer=16, n_head=16, d_model=2048, max_seq=1024),
}


def preset(name: str) -> GPTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model-size {name!r} (one of {', '.join(PRESETS)})") from None


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        if t > self.cfg.max_seq:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq={self.cfg.max_seq}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.tok.weight.t()  # tied output projection
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def init_weights(self, seed: int) -> GPT:
        """GPT-2 style init (normal 0.02, residual projections scaled), deterministic."""
        g = torch.Generator().manual_seed(seed)
        resid = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith(".bias"):
                    p.zero_()
                elif ".ln" in name or name.startswith("ln_f"):
                    p.fill_(1.0)
                else:
                    std = resid if name.endswith(("proj.weight", "out.weight")) else 0.02
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self


def empty_model(cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> GPT:
    """The module with uninitialised storage (fast for 1B parameters): load a
    state_dict into it, or call ``init_weights``."""
    with torch.device("meta"):
        model = GPT(cfg)
    return model.to_empty(device="cpu").to(dtype)


def initial_state_dict(size: str, seed: int) -> dict[str, torch.Tensor]:
    """Random-init weights of a preset, in bfloat16 (what travels)."""
    model = empty_model(preset(size)).init_weights(seed)
    return {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}


def n_params(cfg: GPTConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in GPT(cfg).parameters())


if __name__ == "__main__":
    for key, c in PRESETS.items():
        n = n_params(c)
        print(f"{key:>5}: {n / 1e6:8.1f} M parameters, {2 * n / 2**20:8.1f} MiB in bf16")
