"""BERT-class encoder used by the profiling benchmarks: forward returns the masked-LM loss.

    model = BertLike(layers=24, hidden=768)      # BERT-base width
    loss = model(tokens, labels)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BertLike(nn.Module):
    def __init__(self, layers: int = 24, hidden: int = 768, heads: int = 12, vocab: int = 30522, seq_len: int = 128):
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(seq_len, hidden)
        self.norm = nn.LayerNorm(hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout=0.1, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.norm(self.tok(tokens) + self.pos(positions))
        logits = self.head(self.encoder(h))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def batch(size: int, seq_len: int = 128, vocab: int = 30522, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (size, seq_len), generator=gen)
    labels = torch.where(torch.rand(size, seq_len, generator=gen) < 0.15, tokens, torch.full_like(tokens, -100))
    return tokens, labels
