"""Optimizer step time on sharded parameters: Amos beside torch AdamW on the same FSDP2 shards.

Spawns `--world` ranks (gloo on CPU, nccl on GPU: one GPU per rank) that shard a stack of
`--layers` `Linear(--width, --width)` layers with `fully_shard` (FSDP2: DTensor parameters split
on dim 0, biases included unless `--no-bias`), set random gradients on the shards, and time
`optimizer.step()` of every row once per round, interleaved, for `--rounds` rounds, all rows on
the same parameters (every optimizer keeps its own state). Ranks enter each step after a barrier,
which releases them a little apart. A step's time runs from the moment the last rank enters
step() to the moment the last rank leaves it (the ranks share one machine's monotonic clock): the
step's share of a training iteration, where a rank that arrives early waits at the next
collective anyway. The slowest rank's own time (each rank's from its own entry) is printed
beside it: it also charges a collective inside the step with the ranks' arrival skew, which a
step without one does not pay. Rows:
  default                        Amos(params, lr=...) as shipped: every other option at its default
  Amos m=0 guard=slice           the lightest step: no momentum, no extra read of the gradients
  Amos m=0.9 bf16 guard=slice    momentum stored in bf16
  Amos inverse_time m=0          a closed form: every matrix takes the two-phase path
  AdamW fused / foreach          torch.optim.AdamW(fused=True) / (foreach=True)
A bias is one slice (its sum of squares spans the ranks), so with biases an `amos` step carries
one small all-reduce (overlapped with the kernels); without them it has no collective at all (the
closed forms still complete each matrix's ||u||^2 over the ranks).
On CPU ranks the compute reference row (`x.sin_()` in cache on every rank) shows how fast the
cores ran. With --world 1 the same rows also run on plain (unsharded) parameters of the same shapes, so
the cost of the sharded path itself shows. Prints the median step time per row, fused AdamW's
median over the row's, and the median over rounds of that ratio within each round.

    python benchmarks/sharded_step.py --world 2 --layers 24 --width 1024 --rounds 15

Rows are appended to benchmarks/results/<device>/sharded_step.jsonl (bench_common.record; one per
optimizer row: its per-round step times, median, min, and the two ratios to fused AdamW).
"""
import argparse
import datetime
import os
import queue
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

ROWS = [
    ("default", dict()),
    ("Amos m=0 guard=slice", dict(momentum=0.0, guard="slice")),
    ("Amos m=0.9 bf16 guard=slice", dict(momentum_dtype=torch.bfloat16, guard="slice")),
    ("Amos inverse_time m=0 guard=slice", dict(schedule="inverse_time", half_life=1000, momentum=0.0, guard="slice")),
    ("AdamW fused", "fused"),
    ("AdamW foreach", "foreach"),
]


def _optimizer(params, spec):
    from amos_fused import Amos

    if spec in ("fused", "foreach"):
        return torch.optim.AdamW(params, lr=1e-3, **{spec: True})
    return Amos(params, lr=1e-3, **spec)


def _model(args, device):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(args.width, args.width, bias=not args.no_bias) for _ in range(args.layers)]
    return torch.nn.Sequential(*layers).to(device)


def _grads(params):
    from torch.distributed.tensor import DTensor

    gen = torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    for p in params:
        x = p.to_local() if isinstance(p, DTensor) else p
        g = (torch.randn(x.shape, generator=gen) * 1e-3).to(x.device)
        p.grad = DTensor.from_local(g, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                    stride=p.stride()) if isinstance(p, DTensor) else g


def worker(rank, args, port, out):
    from torch.distributed.fsdp import fully_shard

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, args.threads // args.world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=600))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = _model(args, device)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    params = list(model.parameters())
    _grads(params)
    rows = {name: _optimizer(params, spec).step for name, spec in ROWS}
    if args.world == 1:  # the same rows on plain tensors of the same shapes
        plain = [p.detach().full_tensor().clone().requires_grad_() for p in params]
        _grads(plain)
        rows.update({f"{name} (unsharded)": _optimizer(plain, spec).step for name, spec in ROWS})
    if not cuda:  # how fast each rank's core ran (bench_common.compute_reference)
        rows[bc.COMPUTE_ROW] = bc.compute_reference()
    for step in rows.values():  # warm-up: state, plans, first-call costs
        step()
        step()
    times = {name: [] for name in rows}
    own = {name: [] for name in rows}
    for k in range(args.rounds):
        for name, step in bc.rotated(list(rows.items()), k):  # no row always after the same other row
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            t1 = time.perf_counter()
            # the ranks run on this machine (127.0.0.1) and share its monotonic clock; nccl reduces CUDA tensors
            span = torch.tensor([t0, t1, t1 - t0], dtype=torch.float64, device=device)
            dist.all_reduce(span, op=dist.ReduceOp.MAX)  # last rank in, last rank out, slowest rank's own
            times[name].append((span[1] - span[0]).item() * 1e3)
            own[name].append(span[2].item() * 1e3)
    if rank == 0:
        numel = sum(p.numel() for p in params)
        out.put(dict(times_ms=times, own_times_ms=own, numel=numel, tensors=len(params)))
    dist.barrier()  # no rank tears its connections down while another still reads the last all-reduce
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads shared by the ranks")
    ap.add_argument("--no-bias", action="store_true",
                    help="layers without biases: no tensor's slice spans ranks, so Amos's step has no collective")
    bc.add_results_option(ap)
    args = ap.parse_args(argv)
    started = bc.now_utc()
    if torch.cuda.is_available() and torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs {args.world} GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args.world == 1:  # one rank: in this process
        out = queue.Queue()
        worker(0, args, port, out)
    else:
        out = mp.get_context("spawn").Queue()
        procs = mp.start_processes(worker, args=(args, port, out), nprocs=args.world, join=False,
                                   start_method="spawn")
    result = out.get()
    if args.world > 1:
        procs.join()
    times = result["times_ms"]
    med = {name: statistics.median(ts) for name, ts in times.items()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = dict(bc.machine_info(device), **bc.versions(), git_commit=bc.git_commit())
    print(f"# {args.world} ranks ({'nccl' if device.type == 'cuda' else 'gloo'}), {args.layers} x Linear({args.width}, "
          f"{args.width}{', bias=False' if args.no_bias else ''}) under fully_shard: {result['numel'] / 1e6:.1f}M fp32 "
          f"parameters in {result['tensors']} "
          f"tensors; {args.rounds} interleaved rounds; {info.get('gpu') or info['cpu']}, torch {torch.__version__}, "
          f"commit {info['git_commit']}")
    print("| row | median ms | min ms | fused AdamW time / row time | the same, median of per-round ratios "
          "| the same, slowest rank's own time |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    own = result["own_times_ms"]
    for name, ts in times.items():
        adamw = "AdamW fused (unsharded)" if name.endswith("(unsharded)") else "AdamW fused"
        ref = times[adamw]
        per_round = statistics.median(a / t for a, t in zip(ref, ts))
        own_per_round = statistics.median(a / t for a, t in zip(own[adamw], own[name]))
        print(f"| {name} | {med[name]:.2f} | {min(ts):.2f} | {statistics.median(ref) / med[name]:.2f} "
              f"| {per_round:.2f} | {own_per_round:.2f} |")
        rows.append(dict(row=name, world=args.world, layers=args.layers, width=args.width, bias=not args.no_bias,
                         numel=result["numel"],
                         tensors=result["tensors"], rounds=args.rounds, times_ms=ts, median_ms=med[name],
                         min_ms=min(ts), adamw_ratio=statistics.median(ref) / med[name], adamw_ratio_per_round=per_round,
                         own_times_ms=own[name], adamw_ratio_own_per_round=own_per_round))
    if args.world == 1:
        for name, _ in ROWS:
            print(f"{name}: sharded / unsharded step time {med[name] / med[name + ' (unsharded)']:.3f}")
    path = bc.record("sharded_step", rows, device=device, date=started,
                     command=bc.command_line(__file__, argv), results_dir=args.results)
    print(f"recorded {path}")


if __name__ == "__main__":
    main()
