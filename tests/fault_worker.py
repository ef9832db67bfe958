"""One rank of a small training job, launched the way torchrun launches it, for tests/test_faults.py.

``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` come from the environment and
``fxdisag.disaggregate`` initialises the process group itself (so its ``timeout=`` reaches
``init_process_group``). Ranks: 1 attention rank (0) and ``WORLD_SIZE - 1`` expert ranks.
Rank ``--victim`` stops itself (SIGSTOP) right before step ``--at-step``; every other
rank prints ``fxdisag-fault-test: rank R step S start T`` (``time.time()``) before each
step and ``... rank R raised T`` when the step raised, so the test can time how long
after that step began the rank raised and exited. An error
propagates: the process exits non-zero with the traceback on stderr, as a user's script would.
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeout", type=float, required=True)
    ap.add_argument("--victim", type=int, required=True)
    ap.add_argument("--at-step", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--check-inputs", default="first")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import fxdisag
    from fxdisag.planner.plan import Plan
    from fxdisag.testing.models import example_batch, tiny_model

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model = tiny_model("mixtral", seed=0)
    batches = [example_batch(model, 4, 8, seed=s) for s in range(args.steps)]
    plan = Plan.manual(num_attention=1, num_expert=world - 1, num_experts=fxdisag.find_layout(model).moe[0].num_experts,
                       num_microbatches=2)
    dmodel = fxdisag.disaggregate(model, batches[0], plan, timeout=args.timeout, check_inputs=args.check_inputs)
    opt = torch.optim.AdamW(dmodel.parameters(), lr=1e-2)
    for step, batch in enumerate(batches):
        if rank == args.victim and step == args.at_step:
            os.kill(os.getpid(), signal.SIGSTOP)
        print(f"fxdisag-fault-test: rank {rank} step {step} start {time.time():.3f}", flush=True)
        try:
            out = dmodel(**batch)
            out.loss.backward()
        except Exception:
            print(f"fxdisag-fault-test: rank {rank} raised {time.time():.3f}", flush=True)
            raise  # -> the traceback on stderr and exit code 1, timed by the test
        opt.step()
        opt.zero_grad()
    print(f"fxdisag-fault-test: rank {rank} finished", flush=True)


if __name__ == "__main__":
    main()
