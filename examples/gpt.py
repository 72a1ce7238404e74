"""A small GPT (decoder-only transformer) and a byte-level corpus that every machine has.

The corpus is the Python standard library's own source files, read as bytes: real text,
present wherever Python is, no download.
"""

import math
import os
import random
import sysconfig

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d_model, n_head, dropout):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout))

    def forward(self, x, mask):
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        x = x + a
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=256, d_model=256, n_layer=4, n_head=4, seq_len=128, dropout=0.0):
        super().__init__()
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(d_model, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        mask = torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.drop(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)))
        mask = self.mask[:t, :t]
        for b in self.blocks:
            x = b(x, mask)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def stdlib_corpus(max_bytes=8 << 20, seed=0):
    """Bytes of the standard library's .py files, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "test", "tests"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                files.append(os.path.join(dirpath, name))
    random.Random(seed).shuffle(files)
    chunks, total = [], 0
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if total == 0:
        raise RuntimeError(f"no Python sources found under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


class Batches:
    """Deterministic random windows of the corpus (train and held-out split)."""

    def __init__(self, data, seq_len, batch, seed=0):
        n = int(len(data) * 0.95)
        self.train, self.val = data[:n], data[n:]
        self.seq_len, self.batch = seq_len, batch
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, split="train"):
        data = self.train if split == "train" else self.val
        ix = torch.randint(len(data) - self.seq_len - 1, (self.batch,), generator=self.gen)
        x = torch.stack([data[i : i + self.seq_len] for i in ix.tolist()])
        y = torch.stack([data[i + 1 : i + 1 + self.seq_len] for i in ix.tolist()])
        return x, y


def param_count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def bits_per_byte(loss):
    return loss / math.log(2)
