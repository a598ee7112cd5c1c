"""What a meta-iteration of the reference trainer costs: against optimizee size, trajectory length, processes.

Every configuration runs in a fresh subprocess, one torch thread per process, so that its
peak memory is its own. Memory is the growth of peak RSS (``resource.getrusage``
``ru_maxrss``) from just before the first meta-step to the end: tracemalloc does not see
torch's CPU allocations, and the bundled tasks run on the CPU, so there is no CUDA figure.

1. Size: time per meta-iteration and peak memory of RNNProp (unroll K=2, one trajectory,
   batch 128) on MLPs 64-h-10 on digits from 1e3 to 1e6 parameters, without and with the
   Hessian regularizer (``hessian_top_eigenvalue``, weight 0.01, warm start: 2 HVPs per
   step), and the least-squares slope of log(time) and log(memory) against
   log(parameters), fitted on the MLPs (the family we can size freely). Two timm models
   (``test_vit`` and ``test_resnet``, ~3e5 parameters each) on generated 32x32 images,
   batch 32, are measured alongside through the ``timm`` task.
2. Truncation: peak memory against trajectory length T at fixed K=10, running the whole
   trajectory (T/K meta-steps), next to untruncated backpropagation (K = T) for contrast.
   Truncation must keep the first flat.
3. Scale-out: meta-steps per second with a meta-batch of 4 trajectories in 1 process and
   in 2 gloo processes (``torchrun``), and their ratio.

Run: ``python benchmarks/meta_training.py [--quick] [--out runs/bench/meta_training.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

_RESULT = "RESULT "


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this process (the subprocess side of :func:`run_job`)."""
    torch.set_num_threads(1)
    from flat_l2o_plugin import FlatL2O, create_optimizer, create_task
    from flat_l2o_plugin.training import MetaTrainConfig, MetaTrainer, init_distributed, shutdown_distributed

    context = init_distributed()
    if "timm" in job:
        task = create_task("timm", model=job["timm"], model_kwargs=job.get("model_kwargs", {}),
                           dataset_options={"side": 32}, batch_size=32)
    else:
        task = create_task("mlp_digits", hidden_sizes=(job["hidden"],), batch_size=128)
    torch.manual_seed(0)
    regularizers = {"hessian_top_eigenvalue": {"weight": 0.01}} if job.get("hessian") else {}
    steps = job["warmup"] + job["steps"]
    config = MetaTrainConfig(meta_steps=steps, unroll=job["unroll"], horizon=job["horizon"],
                             meta_batch=job.get("meta_batch", 1), val_every=0, checkpoint_every=0)
    trainer = MetaTrainer(create_optimizer("rnnprop"),
                          lambda g: (task, 1000 + int(torch.randint(0, 10**6, (1,), generator=g))),
                          flat=FlatL2O(regularizers), config=config, distributed=context)
    before = _peak_rss_mb()
    for step in range(job["warmup"]):
        trainer.step(step)
    start = time.perf_counter()
    for step in range(job["warmup"], steps):
        trainer.step(step)
    seconds = time.perf_counter() - start
    result = {"params": task.num_params, "ms_per_step": 1e3 * seconds / max(job["steps"], 1),
              "steps_per_second": job["steps"] / seconds if seconds > 0 else math.nan,
              "peak_mb": _peak_rss_mb() - before, "processes": context.world_size}
    shutdown_distributed()
    return result if context.is_main else {}


def run_job(job: dict[str, Any], processes: int = 1) -> dict[str, Any]:
    """Run :func:`measure` for ``job`` in a fresh interpreter (under torchrun if ``processes > 1``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [str(Path(__file__).resolve()), "--measure", json.dumps(job)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   *script]
    else:
        command = [sys.executable, *script]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark job {job} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {**job, **json.loads(lines[-1][len(_RESULT):])}


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def _hidden_for(params: int) -> int:
    # 64-h-10 has 64h + h + 10h + 10 parameters.
    return max(1, round((params - 10) / 75))


def size_sweep(quick: bool) -> dict[str, Any]:
    targets = [10**3, 10**4] if quick else [10**3, 10**4, 10**5, 10**6]
    timed = {10**3: 10, 10**4: 5, 10**5: 3, 10**6: 2}
    rows = []
    for target in targets:
        for hessian in (False, True):
            job = {"hidden": _hidden_for(target), "hessian": hessian, "unroll": 2, "horizon": 1000, "warmup": 1,
                   "steps": 1 if quick else timed[target]}
            row = run_job(job)
            rows.append(row)
            print(f"   {row['params']:>9,}  {'hessian' if hessian else 'none':<8} {row['ms_per_step']:10.1f} ms"
                  f"  {row['peak_mb']:9.1f} MB", flush=True)
    timm_models = [("test_vit", {"img_size": 32, "patch_size": 8})] if quick else [
        ("test_vit", {"img_size": 32, "patch_size": 8}), ("test_resnet", {})]
    for model, kwargs in timm_models:
        for hessian in (False, True):
            job = {"timm": model, "model_kwargs": kwargs, "hessian": hessian, "unroll": 2, "horizon": 1000,
                   "warmup": 1, "steps": 1 if quick else 2}
            try:
                row = run_job(job)
            except RuntimeError as exc:
                # BatchNorm has no third-order derivative in torch, and the meta-gradient of
                # a Hessian term needs one: report the limit instead of a number.
                reason = str(exc).strip().splitlines()[-1]
                rows.append({**job, "error": reason})
                print(f"   {'':>9}  {'hessian' if hessian else 'none':<8} {'n/a':>13}  {'':>12}   (timm {model}: "
                      f"{reason})", flush=True)
                continue
            rows.append(row)
            print(f"   {row['params']:>9,}  {'hessian' if hessian else 'none':<8} {row['ms_per_step']:10.1f} ms"
                  f"  {row['peak_mb']:9.1f} MB   (timm {model})", flush=True)
    slopes = {}
    for hessian in (False, True):
        subset = [r for r in rows if r["hessian"] == hessian and "timm" not in r]
        name = "hessian" if hessian else "none"
        slopes[name] = {"time": loglog_slope([r["params"] for r in subset], [r["ms_per_step"] for r in subset]),
                        "memory": loglog_slope([r["params"] for r in subset],
                                               [max(r["peak_mb"], 1e-3) for r in subset])}
        print(f"   log-log slope vs parameters ({name}): time {slopes[name]['time']:.2f}, "
              f"memory {slopes[name]['memory']:.2f}")
    return {"rows": rows, "slopes": slopes}


def truncation_sweep(quick: bool) -> dict[str, Any]:
    hidden = _hidden_for(10**3 if quick else 10**4)
    lengths = [10, 20] if quick else [10, 40, 160, 640]
    rows = []
    for unroll_is_horizon in (False, True):
        for horizon in lengths:
            if unroll_is_horizon and horizon > 160:
                continue  # untruncated backpropagation through 640 steps would need several GB
            unroll = horizon if unroll_is_horizon else 10
            job = {"hidden": hidden, "hessian": False, "unroll": unroll, "horizon": horizon, "warmup": 0,
                   "steps": horizon // unroll}
            row = run_job(job)
            row["mode"] = "untruncated (K = T)" if unroll_is_horizon else "truncated (K = 10)"
            rows.append(row)
            print(f"   {row['mode']:<20} T={horizon:<5} {row['peak_mb']:9.1f} MB", flush=True)
    return {"params": rows[0]["params"], "rows": rows}


def scale_out(quick: bool) -> dict[str, Any]:
    job = {"hidden": _hidden_for(10**3 if quick else 10**4), "hessian": False, "unroll": 10, "horizon": 1000,
           "meta_batch": 4, "warmup": 1, "steps": 2 if quick else 6}
    rows = [run_job(job, processes) for processes in (1, 2)]
    for row in rows:
        print(f"   {row['processes']} process(es)  {row['steps_per_second']:7.3f} meta-steps/s"
              f"  ({row['ms_per_step']:.0f} ms per meta-step of 4 trajectories)", flush=True)
    ratio = rows[1]["steps_per_second"] / rows[0]["steps_per_second"]
    print(f"   throughput ratio 2 vs 1 process: {ratio:.2f}x")
    return {"params": rows[0]["params"], "rows": rows, "throughput_ratio": ratio}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke-test budget; numbers mean little")
    parser.add_argument("--out", default="runs/bench/meta_training.json")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one job, in this process
    args = parser.parse_args(argv)
    if args.measure:
        result = measure(json.loads(args.measure))
        if result:
            print(_RESULT + json.dumps(result), flush=True)
        return result
    started = time.perf_counter()
    results: dict[str, Any] = {"threads_per_process": 1, "torch": torch.__version__, "cpus": os.cpu_count()}
    print("1. Time per meta-iteration and peak memory vs optimizee size (RNNProp, K=2, MLP on digits)")
    print(f"   {'params':>9}  {'reg':<8} {'time':>13}  {'memory':>12}")
    results["size"] = size_sweep(args.quick)
    print("\n2. Peak memory vs trajectory length T (whole trajectory run)")
    results["truncation"] = truncation_sweep(args.quick)
    print("\n3. Data-parallel meta-training: meta-batch 4, 1 vs 2 processes (gloo)")
    results["scale_out"] = scale_out(args.quick)
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
