"""How long Ray alone takes to start a job like the benchmark's, with no model: import Ray, start a local
Ray, and run a Ray Data plan of four one-actor pools at 0.25 CPU (the benchmark job's two rounds of generate and
embed) whose actors only record when their __init__ ran. The floor under the job's start-up (BENCHMARKS.md).

    python bench/ray_startup.py [--pools 4]
"""
from __future__ import annotations

import argparse
import time

STARTED = time.time()


class Stamp:
    def __init__(self):
        self.t_init = time.time()

    def __call__(self, batch):
        earlier = batch.get("t_init", [self.t_init] * len(batch["id"]))  # the earliest actor on this row's way
        batch["t_init"] = [min(t, self.t_init) for t in earlier]
        return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", type=int, default=4)
    args = parser.parse_args()
    import ray

    # not on loopback only: Ray 2.60 has no public way (pipeline/run.py); a bench Ray is short-lived
    ray.init(include_dashboard=False)
    ray_up = time.time()
    ds = ray.data.range(4, override_num_blocks=4)
    for _ in range(args.pools):
        ds = ds.map_batches(Stamp, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.25, batch_size=1)
    rows = ds.take_all()
    done = time.time()
    first = min(r["t_init"] for r in rows)  # the first actor of the plan to run its __init__
    print(f"| Ray imported and started, s | first actor __init__, s | plan done, s |\n|---|---|---|\n"
          f"| {ray_up - STARTED:.1f} | {first - STARTED:.1f} | {done - STARTED:.1f} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
