"""Amos in Hugging Face `Trainer`, its lr scheduled over the run's optimizer steps (`total_steps`).

Trainer knows the run's length (`max_steps`, or the epochs times the batches per epoch over the
gradient accumulation) only inside `train()`, after `state.max_steps` is set and just before it
calls `create_optimizer`; so a small subclass builds Amos there, and gives Trainer a stand-in
scheduler (`TotalStepsLR`) instead of the one it would build from `args.lr_scheduler_type`, which
would write over Amos's schedule. The subclass also works where `optimizers=` is refused (FSDP).
tests/test_integrations.py runs it (requirements.txt installs `transformers`; the package does not need it).
"""
from transformers import Trainer, TrainingArguments

from amos_fused import Amos, TotalStepsLR


class AmosTrainer(Trainer):
    """`Trainer` with Amos at its defaults and `total_steps` = the run's optimizer steps."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
            self.optimizer = Amos(params, total_steps=self.state.max_steps)
        return self.optimizer

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:  # Amos schedules its lr itself; this one reports it for the logs
            self.lr_scheduler = TotalStepsLR(self.optimizer if optimizer is None else optimizer)
        return self.lr_scheduler


def make_trainer(model, train_dataset, output_dir, max_steps=-1, epochs=1, batch_size=8, accumulation=1, **more):
    """`more`: further TrainingArguments (e.g. save_strategy="steps", save_steps=...)."""
    quiet = dict(report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True)
    args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, num_train_epochs=epochs,
                             per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                             **{**quiet, **more})
    # args.learning_rate, lr_scheduler_type and warmup are unused: Amos sets its own lr
    return AmosTrainer(model=model, args=args, train_dataset=train_dataset)
