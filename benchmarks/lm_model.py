"""A small byte-level decoder-only transformer (GPT-2 layout: pre-norm blocks, learned positions).

Initialisation follows GPT-2: every Linear and Embedding weight ~ N(0, 0.02), biases 0,
LayerNorm gains 1. So every matrix has RMS 0.02 and Amos's default eta (the measured RMS,
docs/algorithm.md, "The scale eta") is 0.02 for all of them, embeddings included. (torch's own
nn.Embedding init is N(0, 1), which would give the embeddings eta = 1, fifty times the other
matrices'; with this init the question does not arise.)
"""
import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x):
        B, T, W = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(W, dim=2)
        q, k, v = (z.view(B, T, self.heads, W // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, W))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class ByteLM(nn.Module):
    def __init__(self, layers, width, heads, context, vocab=256):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be a multiple of heads={heads}")
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, INIT_STD)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # nats per byte
