"""A small Transformer encoder language model; the loss is computed inside forward.

    python examples/transformer_lm.py --steps 10
    rannc profile examples/transformer_lm.py -- --layers 4

Tied input/output embeddings, padding mask passed as a keyword argument.
"""

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from rannc_cli import RaNNCModule


class TransformerLM(nn.Module):
    """Token + position embeddings, pre-norm encoder layers, tied LM head; forward returns the loss."""

    def __init__(self, vocab: int = 512, d_model: int = 128, heads: int = 4, layers: int = 4,
                 seq_len: int = 32, dropout: float = 0.1):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied parameters
        self.register_buffer("causal", torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        n = tokens.shape[1]
        positions = torch.arange(n, device=tokens.device)
        h = self.tok(tokens) + self.pos(positions)
        h = self.encoder(h, mask=self.causal[:n, :n], src_key_padding_mask=padding, is_causal=True)
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def batches(steps: int, batch_size: int, seq_len: int, vocab: int, seed: int):
    """Synthetic next-token task: each sequence counts up modulo the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch_size, 1), generator=gen)
        seq = (start + torch.arange(seq_len + 1)) % vocab
        padding = torch.zeros(batch_size, seq_len, dtype=torch.bool)
        yield seq[:, :-1], seq[:, 1:], padding


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = TransformerLM(d_model=args.d_model, layers=args.layers, seq_len=args.seq_len)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model = RaNNCModule(model, optimizer)  # the one added line

    for step, (tokens, targets, padding) in enumerate(batches(args.steps, args.batch_size, args.seq_len, 512, args.seed)):
        loss = model(tokens, targets, padding=padding)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
