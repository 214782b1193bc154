"""Amos in a plain PyTorch training loop; run it: `python examples/plain_loop.py`.

tests/test_integrations.py runs `train` in CI.
"""
import torch

from amos_fused import Amos


def train(steps=200, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    # lr, eta and the decay: automatic. total_steps (the number of opt.step() calls) gives the lr a
    # warmup and a decay to 0 at the end, which trains better than the schedule without a run length.
    opt = Amos(model.named_parameters(), total_steps=steps)
    teacher = torch.randn(16, 1)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 16)
        loss = torch.nn.functional.mse_loss(model(x), torch.tanh(x @ teacher))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model, opt, losses


if __name__ == "__main__":
    _, _, losses = train()
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
