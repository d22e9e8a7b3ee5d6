"""Run by tests/test_peers.py under torchrun (2 processes, gloo): process 1 announces a failure and
stays alive without taking part (as a process stuck in its own cleanup would); process 0 is either blocked in a
collective or busy in Python. ``python peers_two_process.py collective|python``."""

import sys
import time

import torch
import torch.distributed as dist

from rlcli import peers

dist.init_process_group("gloo")
peers.GRACE_S, peers.HARD_EXIT_S = 1.0, 4.0
peers.watch()
if dist.get_rank() == 1:
    peers.announce(RuntimeError("the grader crashed"))
    time.sleep(60)
    sys.exit(0)
start = time.monotonic()
try:
    if sys.argv[1] == "collective":
        dist.all_reduce(torch.ones(1))  # never completes: process 1 does not take part
    else:
        while True:
            sum(range(1000))
except peers.PeerFailed:
    print(f"process 0 stopped after {time.monotonic() - start:.1f} s: {peers.peer_failure()}", flush=True)
    sys.exit(3)
