"""Amos in PyTorch Lightning: return it (and a scheduler) from `configure_optimizers`.

tests/test_integrations.py runs it (requirements.txt installs `lightning`; the package does not need it).
"""
import lightning.pytorch as pl
import torch

from amos_fused import Amos


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = Amos(self.parameters())  # the lr by the model's size (docs/defaults.md)
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 20))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


def fit(loader, max_steps):
    model = Regressor()
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    return model, trainer
