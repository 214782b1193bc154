"""Small byte-level language models: a decoder-only transformer and a GRU.

`ByteLM` has GPT-2's layout (pre-norm blocks, learned positions). With `init="gpt2"` (default)
every Linear and Embedding weight ~ N(0, 0.02), biases 0, LayerNorm gains 1, so every matrix has
RMS 0.02. `init="torch"` keeps torch's own initialisation: nn.Embedding ~ N(0, 1), nn.Linear
kaiming-uniform (RMS 1/sqrt(3 fan_in)), the case of a model whose initial scale is not its scale at
the optimum (benchmarks/quality.py trains both).

`ByteGRU` is a one-layer GRU language model with torch's initialisation (embedding N(0, 1), GRU
weights and biases uniform +-1/sqrt(width), head kaiming-uniform).
"""
import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02
INITS = ("gpt2", "torch")


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
    def __init__(self, layers, width, heads, context, vocab=256, init="gpt2"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init={init!r}: use one of {INITS}")
        if width % heads:
            raise ValueError(f"width={width} must be a multiple of heads={heads}")
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for m in self.modules() if init == "gpt2" else ():
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


class ByteGRU(nn.Module):
    def __init__(self, width, vocab=256):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.rnn = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx, targets):
        h, _ = self.rnn(self.tok(idx))
        return F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten())  # nats per byte
