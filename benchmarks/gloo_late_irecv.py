"""Minimal reproduction: gloo moves an isend's bytes only after the receiver posts its irecv.

Contract: prints, for rank 1, the arrival times of four 1 MiB messages that rank 0
isends at t=0, when rank 1 posts all four irecvs at once ("early") and when it posts
irecv i only at t = i x 60 ms, as a compute loop that needs message i would ("late").

Run (root; 400 Mbit links):  python benchmarks/netns.py --nproc 2 --rate 400mbit -- benchmarks/gloo_late_irecv.py

Measured 2026-11-24 (1 MiB = 21 ms at 400 Mbit):
    early arrivals ms: [21, 43, 64, 86]     # the link is kept busy
    late  arrivals ms: [21, 80, 140, 200]   # each transfer starts at its irecv: post + 20 ms

So a receiver that posts a receive only when it needs the data (the AF-pipe Mailbox
posts one receive per peer at a time, and a dispatch's payload only once its header
arrived) cannot overlap that transfer with its compute.
"""

import time

import torch
import torch.distributed as dist

N = 1 << 20


def trial(rank: int, late: bool) -> list[float] | None:
    dist.barrier()
    t0 = time.perf_counter()
    if rank == 0:
        for w in [dist.isend(torch.ones(N, dtype=torch.uint8), 1, tag=i) for i in range(4)]:
            w.wait()
        return None
    bufs = [torch.empty(N, dtype=torch.uint8) for _ in range(4)]
    arrivals = []
    if not late:
        for w in [dist.irecv(bufs[i], 0, tag=i) for i in range(4)]:
            w.wait()
            arrivals.append(time.perf_counter() - t0)
        return arrivals
    for i in range(4):
        while time.perf_counter() - t0 < i * 0.060:  # "compute" until message i is needed
            pass
        dist.irecv(bufs[i], 0, tag=i).wait()
        arrivals.append(time.perf_counter() - t0)
    return arrivals


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for late in (False, True, False, True):
        arrivals = trial(rank, late)
        if rank == 1:
            print(("late " if late else "early"), "arrivals ms:", [round(x * 1e3) for x in arrivals], flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
