"""A synthetic token stream, generated locally (no downloads), that a model can learn.

The "language": ``active`` token ids (a fixed random subset of the vocabulary, the
same on every client) and a fixed successor for each (a random permutation). Each
next token is the successor of the current one with probability ``p_follow``,
otherwise a uniformly random active token. The best achievable loss is the entropy
of that mixture (:func:`floor_loss`); an untrained model starts near ln(vocab).
Clients share the language and differ in their samples (the seed).
"""

from __future__ import annotations

import math

import torch


class Language:
    def __init__(self, vocab_size: int, active: int, p_follow: float = 0.9,
                 seed: int = 0) -> None:
        if not 2 <= active <= vocab_size:
            raise ValueError(f"data-vocab must be in [2, {vocab_size}], got {active}")
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randperm(vocab_size, generator=g)[:active]
        self.successor = self.tokens[torch.randperm(active, generator=g)]
        self.index = torch.full((vocab_size,), -1, dtype=torch.long)
        self.index[self.tokens] = torch.arange(active)
        self.active = active
        self.p_follow = p_follow

    def batch(self, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)`` of shape (batch, seq): targets are inputs shifted by one."""
        g = torch.Generator().manual_seed(seed)
        out = torch.empty(batch, seq + 1, dtype=torch.long)
        out[:, 0] = self.tokens[torch.randint(self.active, (batch,), generator=g)]
        follow = torch.rand(batch, seq, generator=g) < self.p_follow
        noise = self.tokens[torch.randint(self.active, (batch, seq), generator=g)]
        for t in range(seq):
            nxt = self.successor[self.index[out[:, t]]]
            out[:, t + 1] = torch.where(follow[:, t], nxt, noise[:, t])
        return out[:, :-1], out[:, 1:]

    def floor_loss(self) -> float:
        """Entropy (nats) of the next token given the current one."""
        p_succ = self.p_follow + (1 - self.p_follow) / self.active
        p_other = (1 - self.p_follow) / self.active
        return -(p_succ * math.log(p_succ) + (self.active - 1) * p_other * math.log(p_other))
