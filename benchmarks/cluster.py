"""Engine replicas on Ray behind the bridge: images/s with 1 vs 2 replicas, and the dispatch
overhead per job against a local engine (issue 17's benchmark).

A local Ray cluster (``--cpus`` CPUs, default 2) runs the embedded model; each CPU replica
reserves one CPU and runs torch on one thread.  Throughput: ``--jobs`` txt2img jobs sent at
once from ``--clients`` bridge clients, end to end (sent to last result).  Overhead: one
job at a time, a client's wall time minus the engine's own ``timings.total``, median over
``--repeat`` jobs, through a Ray replica and through a local engine in this process,
alternated for ``--rounds`` rounds (the load of a shared machine drifts; the difference
within a round is the number, its median over rounds the result).  The profile shows the
Ray costs the bridge's admission saves or pays: a separate `check` round trip to a replica
(what a batch pays per row; the bridge folds it into the job's own call when a replica is
idle, `RayEngines.admit`) and a bare actor round trip.

    .venv/bin/python benchmarks/cluster.py [--jobs 16] [--steps 8] [--repeat 15] [--rounds 3]

On a machine with 2 cores the second replica can at best double the rate, and only if
nothing else runs: other processes (and the server, Ray's own daemons, the clients)
share the same cores, so expect less, and read the load average printed with the result.
Prints only; never fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

PROMPT = "a red circle on a blue background"


def _throughput(address: str, jobs: int, clients: int, fields: dict) -> float:
    from sdkit.bridge import Client

    done: list[int] = []

    def run(ci: int) -> None:
        with Client(address, timeout=3600) as c:
            mine = [
                c.submit(prompt=PROMPT, seed=ci * 1000 + j, **fields)
                for j in range(ci, jobs, clients)
            ]
            for job in mine:
                done.append(len(job.result()))

    threads = [threading.Thread(target=run, args=(ci,)) for ci in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def _overhead(address: str, repeat: int, fields: dict) -> tuple[float, float]:
    """(median client wall time - engine time, median engine time), in ms, one job at a time."""
    from sdkit.bridge import Client

    extra, engine = [], []
    with Client(address, timeout=3600) as c:
        c.submit(prompt=PROMPT, seed=0, **fields).result()  # warm-up
        for i in range(repeat):
            t0 = time.perf_counter()
            r = c.submit(prompt=PROMPT, seed=i, **fields).result()
            wall = time.perf_counter() - t0
            extra.append(wall - r.timings["total"])
            engine.append(r.timings["total"])
    return statistics.median(extra) * 1000, statistics.median(engine) * 1000


def _round_trips(engines, fields: dict, repeat: int) -> tuple[float, float]:
    """(median `check` through Ray, median bare actor call), in ms."""
    from sdkit.request import Request

    request = Request(prompt=PROMPT, **fields)
    actor, ray = engines._actors[0], engines._ray

    def median_ms(fn) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    return median_ms(lambda: engines.check(request)), median_ms(
        lambda: ray.get(actor.hello.remote())
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3, help="local/Ray overhead alternations")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    args = parser.parse_args(argv)

    import torch
    from sdkit.bridge import serve
    from sdkit.bridge.ray_engines import RayEngines, start_ray

    import sdkit

    torch.set_num_threads(1)  # as each replica does
    fields = {"num_inference_steps": args.steps, "width": args.size, "height": args.size}
    tiny = {"num_inference_steps": 1, "width": args.size, "height": args.size}
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    ray = start_ray(num_cpus=args.cpus)
    print(f"Ray local cluster up in {time.perf_counter() - t0:.1f} s")

    local = sdkit.load()
    with serve(local, "tcp://127.0.0.1:0") as h:
        local_rate = _throughput(h.address, args.jobs, args.clients, fields)
    print(f"local engine (1 thread): {local_rate:.2f} images/s")

    engines = RayEngines(None, 1)
    rounds = []
    with serve(local, "tcp://127.0.0.1:0") as hl, serve(engines, "tcp://127.0.0.1:0") as hr:
        _overhead(hr.address, 2, tiny)  # warm-up
        for _ in range(args.rounds):
            local_extra, _ = _overhead(hl.address, args.repeat, tiny)
            ray_extra, _ = _overhead(hr.address, args.repeat, tiny)
            rounds.append((local_extra, ray_extra))
            print(
                f"overhead round: local {local_extra:.1f} ms, Ray {ray_extra:.1f} ms, "
                f"adds {ray_extra - local_extra:.1f} ms (load average {os.getloadavg()[0]:.1f})"
            )
        check_ms, call_ms = _round_trips(engines, tiny, args.repeat)
    engines.close()

    rates = {}
    for n in (1, 2):
        t0 = time.perf_counter()
        engines = RayEngines(None, n)
        print(f"{n} replica(s) up in {time.perf_counter() - t0:.1f} s")
        with serve(engines, "tcp://127.0.0.1:0") as h:
            _throughput(h.address, n * 2, args.clients, fields)  # warm-up
            rates[n] = _throughput(h.address, args.jobs, args.clients, fields)
            load = os.getloadavg()[0]
        engines.close()
        print(f"{n} replica(s): {rates[n]:.2f} images/s (load average {load:.1f})")
    ray.shutdown()

    print()
    print(f"| setup | images/s ({args.jobs} jobs, {args.steps} steps, {args.size}px) |")
    print("|---|---|")
    print(f"| local engine, 1 thread | {local_rate:.2f} |")
    print(f"| 1 Ray replica | {rates[1]:.2f} |")
    print(f"| 2 Ray replicas | {rates[2]:.2f} ({rates[2] / rates[1]:.2f}x of 1 replica) |")
    adds = statistics.median(r - lo for lo, r in rounds)
    print()
    print(
        f"dispatch overhead per job (client wall - engine time, median of {args.repeat}, 1 step,"
        f" {args.rounds} alternated rounds):"
    )
    print(f"  local engine: {statistics.median(lo for lo, _ in rounds):.1f} ms")
    print(f"  Ray replica:  {statistics.median(r for _, r in rounds):.1f} ms")
    print(f"  Ray adds:     {adds:.1f} ms per job, median of the rounds (target <= 5 ms)")
    print(f"  for scale: a separate check on a replica {check_ms:.1f} ms (the bridge's admission")
    print(f"  folds it into the job's call); a bare actor round trip {call_ms:.1f} ms")


if __name__ == "__main__":
    main()
