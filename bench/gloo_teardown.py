"""How often a two-process gloo run hangs at exit, with the process group destroyed before or after the DDP model.

rlcli once hung at the end of multi-process CPU runs (the run printed "done" and never exited; CI timed out): DDP's
C++ Reducer, freed by Python with the GIL held, dropped the last reference to the gloo process group, whose
destructor joined a worker thread that needed the GIL to drop a finished collective's tensors. rlcli now frees the
model first and destroys the group last (``rlcli.launch.release_distributed``). This script runs the same ending
many times, both ways, each trial in two fresh processes with a time limit, and counts the hangs:

    python bench/gloo_teardown.py --trials 40              # both orders
    python bench/gloo_teardown.py --trials 40 --order new  # only rlcli's order

``--load N`` adds N busy-looping processes while it runs (the hang is a race; load makes it more likely).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import time


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, order: str) -> None:
    import gc

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(4):
        model(torch.randn(16, 64)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    stats = torch.tensor([1.0, 2.0])
    dist.all_reduce(stats)  # the trainers' metric reduction, then the final wait_for_everyone
    dist.barrier()
    if order == "old":  # what rlcli did: destroy the group, then let the model go (the Reducer frees the group)
        dist.destroy_process_group()
        del model, optimizer
    else:  # rlcli now: the model goes first, the group last (rlcli.launch.release_distributed)
        del model, optimizer
        gc.collect()
        dist.destroy_process_group()


def _trial(order: str, timeout: float) -> bool:
    """True when both processes exited in time."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, order)) for rank in range(2)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    hung = any(p.is_alive() for p in procs)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return not hung


def _spin() -> None:
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--order", choices=["old", "new", "both"], default="both")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a trial counts as hung")
    parser.add_argument("--load", type=int, default=0, help="busy-looping processes to run beside the trials")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    spinners = [mp.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(args.load)]
    for s in spinners:
        s.start()
    orders = ["old", "new"] if args.order == "both" else [args.order]
    try:
        for order in orders:
            hung = sum(not _trial(order, args.timeout) for _ in range(args.trials))
            print(f"order {order}: {hung}/{args.trials} trials hung at exit", flush=True)
    finally:
        for s in spinners:
            s.kill()


if __name__ == "__main__":
    main()
