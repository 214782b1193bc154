"""Amos in PyTorch Lightning: `configure_optimizers` returns it, its lr scheduled over the run's
optimizer steps (`total_steps`, from the Trainer's `estimated_stepping_batches`); no LR scheduler.

tests/test_integrations.py runs it (requirements.txt installs `lightning`; the package does not need it).
"""
import math

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
        # max_steps, or the epochs times the batches per epoch over the gradient accumulation;
        # inf when the run has no end (max_steps=-1, max_epochs=-1): then the schedule without a run length
        steps = self.trainer.estimated_stepping_batches
        return Amos(self.named_parameters(), total_steps=None if math.isinf(steps) else int(steps))


def fit(loader, max_steps=-1, max_epochs=None, accumulation=1):
    model = Regressor()
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=max_epochs, accumulate_grad_batches=accumulation,
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    return model, trainer
