"""A short training run that checkpoints every `--every` steps: the subject of tests/test_resume.py.

    python tests/resume_worker.py DIR [--steps N] [--every K] [--pause-after S] [--hang-in-save-at S]
                                      [--backend B]

Resumes from the latest complete checkpoint in DIR if there is one. Prints `step t` after every
optimizer step (t = steps done) and `saved t` after every checkpoint, flushed, so a test can kill
it at a known point. Writes DIR/final.pt (model, optimizer, step, RNG states) when done.
`--pause-after S` makes it stop after printing `step S` (between checkpoints) until it is killed,
so the kill lands at a known point whatever the machine's load.
`--hang-in-save-at S` makes the checkpoint save at step S write part of its temporary file, print
`writing S` and hang, so the test can kill it in the middle of a write.
"""
import argparse
import os
import time

import torch

from amos_fused import Amos, checkpoint


def build(args):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Tanh(),
                                torch.nn.Linear(16, 3))
    # bf16 momentum: a resume that loaded m as fp32 would no longer round it and would drift
    opt = Amos(model.parameters(), lr=0.05, momentum=0.9, momentum_dtype=torch.bfloat16, backend=args.backend)
    return model, opt


def hang_in_torch_save(step):
    """Replace torch.save by one that writes a partial file and never finishes."""
    def partial_save(obj, f):
        f.write(b"PK\x03\x04 a partial checkpoint")
        f.flush()
        print(f"writing {step}", flush=True)
        time.sleep(600)
    torch.save = partial_save


def parse(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--pause-after", type=int, default=-1)
    parser.add_argument("--hang-in-save-at", type=int, default=-1)
    parser.add_argument("--backend", default="auto")
    return parser.parse_args(argv)


def main(argv=None):
    """Run (or resume) the training; tests call it in-process too, inside torch.random.fork_rng()."""
    args = parse(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order in every run, whatever the machine's load
    try:
        train(args)
    finally:
        torch.set_num_threads(threads)


def train(args):
    model, opt = build(args)
    data = torch.Generator().manual_seed(1)  # the data order has its own RNG, saved in checkpoints
    target = torch.nn.Linear(8, 3)
    path = checkpoint.latest(args.dir)
    step = checkpoint.restore(checkpoint.load(path), model, opt, generator=data) if path else 0
    print(f"start {step}", flush=True)
    while step < args.steps:
        x = torch.randn(32, 8, generator=data)
        with torch.no_grad():
            y = target(x).argmax(1)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        print(f"step {step}", flush=True)
        if step == args.pause_after:
            time.sleep(600)
        if step % args.every == 0:
            if step == args.hang_in_save_at:
                hang_in_torch_save(step)
            checkpoint.save(checkpoint.capture(model, opt, step, generator=data),
                            os.path.join(args.dir, f"ckpt_{step:08d}.pt"))
            print(f"saved {step}", flush=True)
    checkpoint.save(checkpoint.capture(model, opt, step, generator=data), os.path.join(args.dir, "final.pt"))
    print("done", flush=True)


if __name__ == "__main__":
    main()
