"""Amos in Hugging Face `Trainer`: pass it (and a scheduler) as `optimizers=(opt, sched)`.

tests/test_integrations.py runs it (requirements.txt installs `transformers`; the package does not need it).
"""
import torch
from transformers import Trainer, TrainingArguments

from amos_fused import Amos


def make_trainer(model, train_dataset, output_dir, max_steps, batch_size=8):
    opt = Amos(model.parameters())  # the lr by the model's size (docs/defaults.md)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 20))
    args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
                             report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             use_cpu=True)
    # Trainer uses the given optimizer and scheduler as they are (args.learning_rate is unused)
    return Trainer(model=model, args=args, train_dataset=train_dataset, optimizers=(opt, warmup))
