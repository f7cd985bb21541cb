"""Data-parallel and sharded (ZeRO) optimizer steps with 1 and 2 processes on this machine,
and the cost model of ``docs/distributed.md`` fed with what was measured.

    python benchmarks/distributed_step.py [--params 4000000] [--steps 20] [--json out.json]
    python benchmarks/distributed_step.py --jax [--steps 20]   # JAX, 1 vs 2 CPU devices

For 1 process and for 2 (loopback gloo, started here as subprocesses), replicated
(``shard_state=False``) and sharded: the median time of one ``DataParallel.update`` of fp32
Adam (gradients already computed), the payload bytes each rank hands to collectives per
step, the wire bytes a ring algorithm sends per rank for them, and the optimizer state bytes
per rank. Also the bare collectives on the same buffers (loopback bandwidth) and the fused
update alone (bytes/s of the kernel), which calibrate the cost model printed last: a
1B-parameter model on 8 GPUs, with the link and memory bandwidths it assumes (published
figures) stated beside the result.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

#: assumed (published) figures of the worked example; everything else is measured here
ASSUMED = {
    "gpus": 8, "params": 1_000_000_000,
    "nvlink_GBps": 450.0,      # NVLink 4 (H100 SXM): 900 GB/s bidirectional, 450 each way
    "ib_GBps": 50.0,           # one 400 Gb/s InfiniBand NIC per GPU (across hosts)
    "hbm_GBps": 3350.0,        # H100 SXM HBM3
    "tflops": 400.0,           # sustained bf16 matmul throughput per GPU (~40% of peak)
    "tokens_per_gpu": 16384,   # per step (e.g. 8 sequences of 2048)
}
ADAM_BYTES_PER_PARAM = 28  # fp32 Adam's fused update: reads p, g, m, v; writes p, m, v


def _shapes(n: int) -> list[tuple[int, ...]]:
    """A transformer-like set of tensors holding about ``n`` parameters."""
    d = int((n / 12 / 2) ** 0.5)
    out = []
    for _ in range(2):
        out += [(d, 3 * d), (3 * d,), (d, d), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return out


def _bench(rank: int, world: int, n: int, steps: int) -> dict:
    from mithril.distributed import DataParallel
    from mithril.distributed import process_group as pg
    from mithril.utils.optimizers import Adam

    rng = np.random.default_rng(0)
    params = {f"t{i}": rng.normal(size=s).astype(np.float32) for i, s in enumerate(_shapes(n))}
    grads = {k: rng.normal(size=v.shape).astype(np.float32) * 1e-3 for k, v in params.items()}
    out: dict = {"world": world, "params": int(sum(p.size for p in params.values()))}
    for shard in (False, True):
        dp = DataParallel(Adam(1e-3), shard_state=shard)
        p, st = dict(params), dp.init(params)
        times = []
        for i in range(steps + 3):
            t0 = time.perf_counter()
            p, st = dp.update(p, grads, st)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        mode = "sharded" if shard else "replicated"
        out[mode] = {"step_s": float(np.median(times)), "state_bytes": st.state_bytes(),
                     "payload_bytes": dict(st.bytes_communicated)}
    # the pieces: the bare collectives on a buffer of every gradient, the update alone
    buf = np.zeros(out["params"], dtype=np.float32)
    if world > 1:
        chunk = np.zeros(-(-len(buf) // world), dtype=np.float32)
        full = np.zeros(len(chunk) * world, dtype=np.float32)
        ar, rsag = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            pg.all_reduce(buf)
            ar.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            pg.reduce_scatter(chunk, full)
            pg.all_gather(full, chunk)
            rsag.append(time.perf_counter() - t0)
        out["all_reduce_s"], out["rs_ag_s"] = float(np.median(ar)), float(np.median(rsag))
    opt = Adam(1e-3)
    st, p = opt.init(params), dict(params)
    times = []
    for i in range(steps + 3):
        t0 = time.perf_counter()
        p, st = opt.update(p, grads, st)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    out["update_only_s"] = float(np.median(times))
    return out


def _wire(payload: dict, world: int) -> int:
    """Bytes a ring algorithm sends per rank for these collectives' payloads."""
    f = (world - 1) / world
    return int(sum(2 * f * b if k == "all_reduce" else f * b for k, b in payload.items()))


def _two_processes(n: int, steps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r")
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--port", str(port),
                                   "--params", str(n), "--steps", str(steps), "--out", out])
                 for r in range(2)]
        for p in procs:
            if p.wait(timeout=600) != 0:
                raise RuntimeError("a rank failed")
        with open(f"{out}.0.json") as f:
            return json.load(f)


def cost_model(one: dict, two: dict, a: dict = ASSUMED) -> dict:
    """The worked example: per-step times of fp32 Adam on ``a['params']`` over ``a['gpus']``
    GPUs, replicated and sharded, within one host (NVLink) and across hosts (one NIC each)."""
    n, p = a["gpus"], a["params"]
    f = (n - 1) / n
    grad_bytes = 4 * p
    compute = 6 * p * a["tokens_per_gpu"] / (a["tflops"] * 1e12)
    kernel_GBps = ADAM_BYTES_PER_PARAM * one["params"] / one["update_only_s"] / 1e9  # measured
    res = {"compute_s": compute, "cpu_kernel_GBps_measured": kernel_GBps}
    for link in ("nvlink", "ib"):
        bw = a[f"{link}_GBps"] * 1e9
        res[f"allreduce_{link}_s"] = 2 * f * grad_bytes / bw
        res[f"rs_ag_{link}_s"] = 2 * f * grad_bytes / bw  # the same volume, in two halves
    res["update_replicated_s"] = ADAM_BYTES_PER_PARAM * p / (a["hbm_GBps"] * 1e9)
    res["update_sharded_s"] = res["update_replicated_s"] / n
    res["state_bytes_replicated"] = 8 * p
    res["state_bytes_sharded"] = 8 * p / n
    if "all_reduce_s" in two:  # loopback gloo on this machine, measured
        res["loopback_allreduce_GBps_measured"] = (2 * 0.5 * 4 * two["params"]
                                                   / two["all_reduce_s"] / 1e9)
    return res


def _jax_bench(steps: int) -> list[dict]:
    """JAX (``--jax``, run with 2 CPU devices): the fused train step of an MLP on 1 and 2
    devices, replicated and sharded state: median step time and state bytes per device."""
    import jax

    import mithril as ml
    from mithril.backends import JaxBackend
    from mithril.cli.networks import mlp_spec
    from mithril.distributed.jax_parallel import make_sharded_train_step, state_bytes_per_device
    from mithril.utils.optimizers import Adam

    spec = mlp_spec(256, 10, (1024, 1024))
    rng = np.random.default_rng(0)
    data = {"input": rng.normal(size=(512, 256)).astype(np.float32),
            "target": rng.integers(0, 10, size=512)}
    out = []
    for devices, shard in ((1, False), (2, False), (2, True)):
        model = ml.compile(spec.model, JaxBackend(dtype="float32", seed=0), shapes=spec.shapes)
        params = model.get_parameters()
        step = make_sharded_train_step(model, Adam(1e-3), loss="loss", devices=devices,
                                       shard_state=shard)
        state = step.init(params)
        times = []
        for _ in range(steps + 2):
            t0 = time.perf_counter()
            params, state, res = step(params, state, data)
            jax.block_until_ready((params, state))
            times.append(time.perf_counter() - t0)
        per = state_bytes_per_device(state.slots)
        out.append({"devices": devices, "shard_state": shard,
                    "params": int(sum(np.prod(v.shape) for v in params.values())),
                    "step_s": float(np.median(times[2:])),
                    "state_bytes_per_device": [per[k] for k in sorted(per)]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=4_000_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--jax", action="store_true", help="time the JAX step on 1 and 2 CPU "
                    "devices instead (jax.sharding; a subprocess with 2 devices)")
    ap.add_argument("--jax-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.jax_child:
        print(json.dumps(_jax_bench(args.steps)))
        return
    if args.jax:
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        done = subprocess.run([sys.executable, __file__, "--jax-child", "--steps",
                               str(args.steps)], env=env, capture_output=True, text=True,
                              check=True)
        rows = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"JAX fp32 Adam, MLP of {rows[0]['params']:,} parameters, batch 512 (measured, "
              f"median of {args.steps} steps, 2 CPU devices of this 2-core machine)")
        for r in rows:
            mode = "sharded" if r["shard_state"] else "replicated"
            print(f"  {r['devices']} device(s) {mode:>10}: {1e3 * r['step_s']:8.2f} ms/step, "
                  f"state bytes per device {r['state_bytes_per_device']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    if args.rank is not None:  # one of the two ranks
        from mithril import distributed as dist

        dist.init(args.rank, 2, master_port=args.port, timeout=120)
        res = _bench(args.rank, 2, args.params, args.steps)
        with open(f"{args.out}.{args.rank}.json", "w") as f:
            json.dump(res, f)
        dist.shutdown()
        return
    one = _bench(0, 1, args.params, args.steps)
    two = _two_processes(args.params, args.steps)
    print(f"fp32 Adam, {one['params']:,} parameters in {len(_shapes(args.params))} tensors "
          f"(measured, median of {args.steps} steps)")
    print(f"{'procs':>5} {'mode':>10} {'step ms':>9} {'payload MB':>11} {'wire MB':>8} "
          f"{'state MB/rank':>14}")
    for res in (one, two):
        for mode in ("replicated", "sharded"):
            r = res[mode]
            pay = sum(r["payload_bytes"].values())
            print(f"{res['world']:>5} {mode:>10} {1e3 * r['step_s']:>9.2f} {pay / 1e6:>11.2f} "
                  f"{_wire(r['payload_bytes'], res['world']) / 1e6:>8.2f} "
                  f"{r['state_bytes'] / 1e6:>14.2f}")
    print(f"update alone: {1e3 * one['update_only_s']:.2f} ms; 2 procs: bare all-reduce "
          f"{1e3 * two['all_reduce_s']:.2f} ms, reduce-scatter + all-gather "
          f"{1e3 * two['rs_ag_s']:.2f} ms (measured)")
    cm = cost_model(one, two)
    print(f"\ncost model: {ASSUMED['params'] / 1e9:.0f}B params, {ASSUMED['gpus']} GPUs "
          f"(assumed: {json.dumps(ASSUMED)})")
    for k, v in cm.items():
        print(f"  {k:34} {v:.4g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"one": one, "two": two, "cost_model": cm, "assumed": ASSUMED}, f, indent=1)


if __name__ == "__main__":
    main()
