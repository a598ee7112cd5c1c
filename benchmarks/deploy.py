"""What a user pays per step for a meta-trained optimizer, against Adam and AdamW.

Every registered learned optimizer runs through ``LearnedOptimizerTorch`` as a user
would run it (default options: the fused, compiled ``step_`` for groups of 65,536
coordinates or more), next to ``torch.optim.Adam`` and ``torch.optim.AdamW(foreach=True)``
on the same parameters and gradients:

1. Step time at 1e4 to 1e7 parameters (a vector of N/2 and an N/4 × 2 matrix, fresh
   random gradients at each round), with one thread and with all threads. The
   optimizers are timed round-robin, each round with the same gradients, and each
   ratio is the median over rounds of the optimizer's time over Adam's in that round,
   so that the machine's load cancels. One thread is timed in CPU time of the calling
   thread (``time.thread_time``: the cost on a core of one's own); all threads in wall
   time.
2. At 1e6 parameters and one thread: the same step with compilation off (the eager
   kernels a machine without a C++ compiler runs) and with ``fused=False`` (the
   reference ``step``, bit for bit what meta-training validated).
3. State: bytes per parameter kept by each optimizer (and with ``state_dtype="bfloat16"``
   where the optimizer allows it) and the size of ``torch.save(state_dict())``.
4. FLOP/s: the multiply-adds of each per-coordinate network, what the step achieves
   with them, and what a plain matrix product of the network's layer shapes achieves on
   this machine; ``floor ×Adam`` is that matrix product's time over Adam's, the ratio a
   step would have if the network ran at matmul speed and everything else were free.
5. Where the time goes: one step at 1e6 under ``torch.profiler``, split into matrix
   products, the compiled elementwise kernels, compiled-call overhead and other operators.
6. End to end: training steps per second of a timm ResNet-18 at batch 32 with each
   optimizer (all threads), and the fraction of a step spent in ``optimizer.step()``.
   Each optimizer is timed in a block next to a block of AdamW(foreach).
7. The same step-time table on a GPU when CUDA is available (nothing here needs one).

The learned optimizers' weights are their initial ones, perturbed so that no two
hidden units coincide (a fresh ``learned_correction`` has its mirror equal to its net,
which the fused step would skip entirely); speed does not depend on the values.
The targets of the deployment work are marked met or not.

Step times print the median ms and the ratios to Adam and to AdamW. Run:
``python benchmarks/deploy.py [--quick] [--out runs/bench/deploy.json] [--report benchmarks/results/deploy.md]``;
``--report`` writes the printed tables, with the machine, to a markdown file (the
README quotes ``benchmarks/results/deploy.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flat_l2o_plugin import create_optimizer, get_plugin_manager
from flat_l2o_plugin.integrations.torch_optim import LearnedOptimizerTorch
from flat_l2o_plugin.optimizers import L2ODM, L2OScale, LearnedCorrection, RNNProp
from flat_l2o_plugin.optimizers._fused import COMPILE_ENV

# Ratio to torch.optim.Adam, one thread, 1e6 parameters; end to end, AdamW's steps/s
# over the learned optimizer's.
TARGETS = {"learned_correction": 8.0, "l2o_scale": 40.0, "rnnprop": 150.0, "l2o_dm": 150.0}
END_TO_END_TARGET = ("learned_correction", 1.5)
BASELINES = ("adam", "adamw")


# ------------------------------------------------------------------ building the optimizers


def learned_names() -> list[str]:
    """Every learned optimizer a plugin registers."""
    return list(get_plugin_manager().components.optimizers.names())


def perturbed(name: str, seed: int = 0) -> nn.Module:
    """The registered optimizer ``name`` with its initial weights nudged apart (timing only)."""
    torch.manual_seed(seed)
    module = create_optimizer(name)
    with torch.no_grad():
        for weight in module.parameters():
            weight.add_(torch.randn_like(weight), alpha=0.05)
    return module.eval()


def build(name: str, params: list[Tensor], learned: dict[str, nn.Module], **options: Any) -> torch.optim.Optimizer:
    """An optimizer over ``params``: a baseline by name, else ``LearnedOptimizerTorch``."""
    if name == "adam":
        return torch.optim.Adam(params)
    if name == "adamw":
        return torch.optim.AdamW(params, foreach=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LearnedOptimizerTorch(params, learned[name], **options)


def flat_params(size: int, device: torch.device, seed: int = 0) -> list[nn.Parameter]:
    """A vector of size/2 and a size/4 × 2 matrix: two tensors, ``size`` coordinates."""
    gen = torch.Generator().manual_seed(seed)
    half = size // 2
    shapes = [(half,), ((size - half) // 2, 2)]
    return [nn.Parameter(torch.randn(shape, generator=gen).to(device)) for shape in shapes]


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def compile_disabled() -> Iterator[None]:
    previous = os.environ.get(COMPILE_ENV)
    os.environ[COMPILE_ENV] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[COMPILE_ENV]
        else:
            os.environ[COMPILE_ENV] = previous


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ 1-2. step time


def time_steps(optimizers: dict[str, tuple[torch.optim.Optimizer, list[nn.Parameter]]], shapes: list[torch.Size],
               device: torch.device, rounds: int, clock: Callable[[], float], warmup: int = 2,
               seed: int = 0) -> dict[str, list[float]]:
    """Round-robin step times (seconds) of each optimizer, the same gradients in each round."""
    gen = torch.Generator().manual_seed(seed)
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for index in range(warmup + rounds):
        grads = [torch.randn(shape, generator=gen).to(device) for shape in shapes]
        for name, (opt, params) in optimizers.items():
            for p, g in zip(params, grads):
                p.grad = g
            _sync(device)
            start = clock()
            opt.step()
            _sync(device)
            if index >= warmup:
                times[name].append(clock() - start)
    return times


def ratios(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median time and median per-round ratio to Adam (``ratio``) and to AdamW (``ratio_adamw``)."""
    def ratio(values: list[float], baseline: str) -> float:
        return statistics.median(v / b for v, b in zip(values, times[baseline]))

    return {name: {"ms": 1e3 * statistics.median(values), "ratio": ratio(values, "adam"),
                   "ratio_adamw": ratio(values, "adamw")}
            for name, values in times.items()}


def step_table(names: list[str], learned: dict[str, nn.Module], sizes: list[int], thread_counts: list[int],
               device: torch.device, rounds: dict[int, int], **options: Any) -> list[dict[str, Any]]:
    """Step times per size and thread count: each learned optimizer round-robin with the baselines.

    One learned optimizer at a time (with its own rounds of Adam and AdamW), so that at
    1e7 parameters only one recurrent state of several GB is alive.
    """
    rows = []
    for count in thread_counts:
        # One thread: the calling thread's CPU time; several: wall time (the workers are
        # other threads).
        clock = time.thread_time if count == 1 and device.type == "cpu" else time.perf_counter
        with threads(count):
            for size in sizes:
                result: dict[str, dict[str, float]] = {}
                for name in [n for n in names if n not in BASELINES]:
                    optimizers = {}
                    for member in (*BASELINES, name):
                        params = flat_params(size, device)
                        optimizers[member] = (build(member, params, learned, **options), params)
                    shapes = [p.shape for p in optimizers[name][1]]
                    measured = ratios(time_steps(optimizers, shapes, device, rounds[size], clock))
                    for member in BASELINES:
                        result.setdefault(member, measured[member])
                    result[name] = measured[name]
                    del optimizers
                    gc.collect()
                rows.append({"size": size, "threads": count, "device": device.type,
                             "clock": clock.__name__, "rounds": rounds[size], "results": result})
                print(f"  {size:>10,d} params, {count} thread(s): " + ", ".join(
                    f"{n} {r['ms']:.1f} ms ({r['ratio']:.1f}x)" for n, r in result.items()), flush=True)
    return rows


# ------------------------------------------------------------------ 3. state


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of per-coordinate optimizer state (0-d step counters excluded)."""
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if isinstance(v, Tensor) and v.dim() > 0)


def checkpoint_bytes(opt: torch.optim.Optimizer) -> int:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    return buffer.tell()


def state_table(names: list[str], learned: dict[str, nn.Module], size: int) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        variants: list[tuple[str, dict[str, Any]]] = [(name, {})]
        if name in learned and callable(getattr(learned[name], "reduced_precision_state_keys", None)):
            variants.append((f"{name} (bfloat16 state)", {"state_dtype": "bfloat16"}))
        for label, options in variants:
            params = flat_params(size, torch.device("cpu"))
            opt = build(name, params, learned, **options)
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn_like(p)
                opt.step()
            numel = sum(p.numel() for p in params)
            rows.append({"optimizer": label, "bytes_per_param": state_bytes(opt) / numel,
                         "checkpoint_mb": checkpoint_bytes(opt) / 2**20, "params": numel})
            del opt, params
            gc.collect()
    return rows


# ------------------------------------------------------------------ 4. FLOP/s


def network_layers(module: nn.Module) -> list[tuple[int, int]] | None:
    """The (in, out) shapes of the matrix products a zoo optimizer runs per coordinate."""
    if isinstance(module, LearnedCorrection):
        units = int(module._merged_mlp()[0].shape[0])  # what the deployed step runs
        return [(4, units), (units, 2)]
    if isinstance(module, RNNProp):
        h = module.hidden_size
        return [(2, h)] + [(2 * h, 4 * h)] * module.num_layers + [(h, 1)]
    if isinstance(module, L2ODM):
        h = module.hidden_size
        return [(2 + h, 4 * h)] + [(2 * h, 4 * h)] * (module.num_layers - 1) + [(h, 1)]
    if isinstance(module, L2OScale):
        h = module.hidden_size
        return [(module.num_features + h, 3 * h), (h, 2), (len(module.momentum_decays), 1)]
    return None


def matmul_seconds(layers: list[tuple[int, int]], size: int, repeats: int = 3, block: int = 2048) -> float:
    """Time of plain ``torch.mm`` products of those shapes over ``size`` rows (outputs preallocated).

    Per layer the fastest of three ways to run it: row-major over all rows, feature-major
    over all rows, and feature-major in blocks of ``block`` rows that stay in cache (as
    the deployed kernels run them). The floor is then what the products alone cost done
    as well as we know how, not a layout the kernels avoid.
    """
    total = 0.0
    for fan_in, fan_out in layers:
        rows, weight, out = torch.randn(size, fan_in), torch.randn(fan_in, fan_out), torch.empty(size, fan_out)
        columns, weight_t, out_t = torch.randn(fan_in, size), torch.randn(fan_out, fan_in), torch.empty(fan_out, size)
        blocks = [torch.randn(fan_in, block) for _ in range(4)]
        out_block = torch.empty(fan_out, block)

        def blocked() -> None:
            for k in range(size // block):
                torch.mm(weight_t, blocks[k % 4], out=out_block)

        ways = (lambda: torch.mm(rows, weight, out=out), lambda: torch.mm(weight_t, columns, out=out_t), blocked)
        best = float("inf")
        for way in ways:
            way()
            samples = []
            for _ in range(repeats):
                start = time.thread_time()
                way()
                samples.append(time.thread_time() - start)
            best = min(best, statistics.median(samples))
        total += best
    return total


def flops_table(learned: dict[str, nn.Module], step_row: dict[str, Any], size: int) -> list[dict[str, Any]]:
    rows = []
    adam_ms = step_row["results"]["adam"]["ms"]
    with threads(1):
        for name, module in learned.items():
            layers = network_layers(module)
            if layers is None or name not in step_row["results"]:
                continue
            flops = 2 * sum(i * o for i, o in layers)
            step_ms = step_row["results"][name]["ms"]
            mm_ms = 1e3 * matmul_seconds(layers, size)
            rows.append({"optimizer": name, "flops_per_coordinate": flops, "step_ms": step_ms,
                         "step_gflops": flops * size / step_ms / 1e6, "matmul_ms": mm_ms,
                         "matmul_gflops": flops * size / mm_ms / 1e6, "floor_ratio": mm_ms / adam_ms})
    return rows


# ------------------------------------------------------------------ 5. profile


_PROFILE_GROUPS = (
    ("python around the kernels", ("Optimizer.step#",)),
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("compiled kernels", ("## Call CompiledFxGraph",)),
    ("compiled-call overhead", ("Torch-Compiled Region", "TorchDynamo Cache Lookup", "Pregraph bytecode",
                                "AOTDispatcher")),
)


def profile_step(name: str, learned: dict[str, nn.Module], size: int) -> dict[str, float]:
    """Share of one step's self CPU time per kind of work (see _PROFILE_GROUPS)."""
    from torch.profiler import ProfilerActivity, profile

    with threads(1):
        params = flat_params(size, torch.device("cpu"))
        opt = build(name, params, learned)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
    shares = {group: 0.0 for group, _ in _PROFILE_GROUPS}
    shares["other operators"] = 0.0
    total = 0.0
    for event in prof.key_averages():
        total += event.self_cpu_time_total
        for group, prefixes in _PROFILE_GROUPS:
            if event.key.startswith(prefixes):
                shares[group] += event.self_cpu_time_total
                break
        else:
            shares["other operators"] += event.self_cpu_time_total
    return {group: value / total for group, value in shares.items()} | {"total_ms": total / 1e3}


# ------------------------------------------------------------------ 6. end to end


def end_to_end(names: list[str], learned: dict[str, nn.Module], model_name: str, batch: int, resolution: int,
               steps: int, warmup: int) -> list[dict[str, Any]]:
    """Training steps/s on a timm model, each optimizer in a block next to a block of AdamW."""
    import timm

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, resolution, resolution, generator=gen)
    labels = torch.randint(0, 1000, (batch,), generator=gen)

    def run(name: str) -> dict[str, float]:
        torch.manual_seed(0)
        model = timm.create_model(model_name, num_classes=1000)
        opt = build(name, list(model.parameters()), learned)
        totals, in_step = [], []
        for index in range(warmup + steps):
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            mid = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            if index >= warmup:
                totals.append(end - start)
                in_step.append(end - mid)
        params = sum(p.numel() for p in model.parameters())
        del opt, model
        gc.collect()
        return {"steps_per_s": 1.0 / statistics.median(totals), "step_ms": 1e3 * statistics.median(in_step),
                "optimizer_fraction": sum(in_step) / sum(totals), "params": params}

    rows = []
    order = [n for n in names if n != "adamw"]
    for name in order:
        reference = run("adamw")
        result = run(name)
        result["adamw_steps_per_s"] = reference["steps_per_s"]
        result["adamw_optimizer_fraction"] = reference["optimizer_fraction"]
        result["slowdown_vs_adamw"] = reference["steps_per_s"] / result["steps_per_s"]
        rows.append({"optimizer": name, **result})
        print(f"  {name}: {result['steps_per_s']:.3f} steps/s ({result['slowdown_vs_adamw']:.2f}x slower than "
              f"AdamW's {reference['steps_per_s']:.3f}), {100 * result['optimizer_fraction']:.0f}% in step()",
              flush=True)
    return rows


# ------------------------------------------------------------------ report


def print_step_rows(rows: list[dict[str, Any]], names: list[str]) -> None:
    """Per size and thread count: each optimizer's median ms, its ratio to Adam and to AdamW."""
    header = f"{'params':>10} {'thr':>3} " + " ".join(f"{n[:24]:>26}" for n in names)
    print(header)
    print(f"{'':>14} " + " ".join(f"{'ms   xAdam  xAdamW':>26}" for _ in names))
    print("-" * len(header))
    for row in rows:
        cells = [f"{r['ms']:10.1f} {r['ratio']:7.1f} {r['ratio_adamw']:7.1f}"
                 for r in (row['results'][n] for n in names)]
        print(f"{row['size']:>10,d} {row['threads']:>3} " + " ".join(f"{c:>26}" for c in cells))


def targets(step_rows: list[dict[str, Any]], e2e_rows: list[dict[str, Any]], flops: list[dict[str, Any]],
            size: int) -> list[dict[str, Any]]:
    """Each target with the value reached; a step target also carries its matmul floor."""
    row = next((r for r in step_rows if r["size"] == size and r["threads"] == 1 and r["device"] == "cpu"), None)
    floors = {f["optimizer"]: f["floor_ratio"] for f in flops}
    marks = []
    for name, bound in TARGETS.items():
        if row is not None and name in row["results"]:
            value = row["results"][name]["ratio"]
            marks.append({"target": f"{name} step at {size:,d} params, 1 thread", "bound": f"<= {bound:g}x Adam",
                          "value": value, "met": value <= bound, "matmul_floor": floors.get(name)})
    name, bound = END_TO_END_TARGET
    e2e = next((r for r in e2e_rows if r["optimizer"] == name), None)
    if e2e is not None:
        marks.append({"target": f"{name} end to end", "bound": f"<= {bound:g}x AdamW's step time",
                      "value": e2e["slowdown_vs_adamw"], "met": e2e["slowdown_vs_adamw"] <= bound})
    return marks


def parse_threads(text: str, parser: argparse.ArgumentParser) -> list[int]:
    """``--threads``: positive thread counts, one of them 1 (the targets are for one thread)."""
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        parser.error(f"--threads: expected comma-separated integers such as 1,2, got {text!r}")
    if not counts or counts[0] < 1 or 1 not in counts:
        parser.error(f"--threads: the counts must be positive and include 1 (the targets are for one thread), "
                     f"got {text!r}")
    return counts


def plan(args: argparse.Namespace, cpus: int) -> tuple[list[int], dict[int, int], list[int], int, dict[str, Any]]:
    """Sizes, rounds per size, thread counts, the target size and the end-to-end run's settings."""
    if args.quick:
        return ([10**4, 10**5], {10**4: 2, 10**5: 2}, [1], 10**5,
                dict(model_name="resnet18", batch=2, resolution=32, steps=1, warmup=1))
    return ([10**4, 10**5, 10**6, 10**7], {10**4: 15, 10**5: 9, 10**6: 7, 10**7: 3},
            [1] + ([cpus] if cpus > 1 else []), 10**6,
            dict(model_name=args.model, batch=32, resolution=args.resolution, steps=4, warmup=2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke-test budget; numbers mean nothing")
    parser.add_argument("--out", default="runs/bench/deploy.json")
    parser.add_argument("--model", default="resnet18", help="timm model of the end-to-end run")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", default=None,
                        help="thread counts of the step table, comma-separated (default: 1 and all); the end-to-end "
                             "run uses the largest. On a machine other jobs load, threads wait for each other and "
                             "wall times of several threads say little")
    parser.add_argument("--report", default=None,
                        help="also write the tables to this markdown file (benchmarks/results/deploy.md)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    learned = {name: perturbed(name) for name in learned_names()}
    names = [*BASELINES, *learned]
    cpus = os.cpu_count() or 1
    sizes, rounds, thread_counts, target_size, e2e = plan(args, cpus)
    if args.threads:
        thread_counts = parse_threads(args.threads, parser)
    cpu = torch.device("cpu")

    print(f"[1/7] step time, {', '.join(names)}; sizes {sizes}, threads {thread_counts}", flush=True)
    step_rows = step_table(names, learned, sizes, thread_counts, cpu, rounds)

    print(f"[2/7] step time at {target_size:,d} params, 1 thread: compiled, eager (no compiler), reference", flush=True)
    with compile_disabled():
        eager = step_table(names, learned, [target_size], [1], cpu, rounds)[0]
    reference = step_table(names, learned, [target_size], [1], cpu, rounds, fused=False)[0]
    compiled = next(r for r in step_rows if r["size"] == target_size and r["threads"] == 1)
    fallback = [{"optimizer": n, "compiled_ratio": compiled["results"][n]["ratio"],
                 "eager_ratio": eager["results"][n]["ratio"], "reference_ratio": reference["results"][n]["ratio"]}
                for n in learned]

    print(f"[3/7] state size at {target_size:,d} params", flush=True)
    states = state_table(names, learned, target_size)

    print("[4/7] FLOP/s of the per-coordinate networks", flush=True)
    flops = flops_table(learned, compiled, target_size)

    print(f"[5/7] profile of one step at {target_size:,d} params, 1 thread", flush=True)
    profiles = {name: profile_step(name, learned, target_size) for name in learned}

    e2e_threads = max(thread_counts)
    print(f"[6/7] end to end: timm {e2e['model_name']}, batch {e2e['batch']}, {e2e['resolution']}px, "
          f"{e2e_threads} thread(s)", flush=True)
    with threads(e2e_threads):
        e2e_rows = end_to_end(names, learned, **e2e)
    e2e["threads"] = e2e_threads

    gpu_rows: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        print("[7/7] step time on the GPU", flush=True)
        gpu_rows = step_table(names, learned, sizes, [torch.get_num_threads()], torch.device("cuda"), rounds)
    else:
        print("[7/7] no GPU: skipped", flush=True)
    marks = targets(step_rows, e2e_rows, flops, target_size)
    seconds = time.perf_counter() - start

    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        print_report(names, step_rows, gpu_rows, fallback, states, flops, profiles, e2e, e2e_rows, marks,
                     target_size)
    print("\n" + report.getvalue(), end="")
    print(f"\n{seconds / 60:.1f} min")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"quick": args.quick, "torch": torch.__version__, "cpus": cpus, "seconds": seconds,
              "steps": step_rows, "gpu_steps": gpu_rows, "fallback": fallback, "state": states, "flops": flops,
              "profile": profiles, "end_to_end": {"config": e2e, "rows": e2e_rows}, "targets": marks}
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if args.report:
        write_report(Path(args.report), report.getvalue(), args, cpus, seconds)
        print(f"wrote {args.report}")
    return result


def cpu_model() -> str:
    """The CPU's model name where the platform tells it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def write_report(path: Path, tables: str, args: argparse.Namespace, cpus: int, seconds: float) -> None:
    """The printed tables as a markdown file, with the machine and command that produced them."""
    command = "python benchmarks/deploy.py" + (" --quick" if args.quick else "")
    if args.model != "resnet18" or args.resolution != 224:
        command += f" --model {args.model} --resolution {args.resolution}"
    if args.threads:
        command += f" --threads {args.threads}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# `{command}`\n\n"
        f"{cpu_model()}, {cpus} logical CPUs, torch {torch.__version__}, {seconds / 60:.0f} min. "
        f"One thread is CPU time of the calling thread; all threads and end to end are wall time, "
        f"on a machine other jobs share: read the ratios, measured side by side, not the absolute times.\n\n"
        f"```\n{tables.strip()}\n```\n"
    )


def print_report(names: list[str], step_rows: list[dict[str, Any]], gpu_rows: list[dict[str, Any]],
                 fallback: list[dict[str, Any]], states: list[dict[str, Any]], flops: list[dict[str, Any]],
                 profiles: dict[str, dict[str, float]], e2e: dict[str, Any], e2e_rows: list[dict[str, Any]],
                 marks: list[dict[str, Any]], target_size: int) -> None:
    """The tables of every section, then the targets."""
    print("Step time (median ms) and ratio to torch.optim.Adam and AdamW(foreach) (median over rounds), CPU")
    print_step_rows(step_rows, names)
    if gpu_rows:
        print("\nStep time on the GPU")
        print_step_rows(gpu_rows, names)
    print(f"\nAt {target_size:,d} params, 1 thread, x Adam: compiled | eager kernels (no compiler) | reference step()")
    for row in fallback:
        print(f"  {row['optimizer']:<20} {row['compiled_ratio']:8.1f} {row['eager_ratio']:8.1f} "
              f"{row['reference_ratio']:8.1f}")
    print(f"\nOptimizer state at {target_size:,d} params")
    for row in states:
        print(f"  {row['optimizer']:<34} {row['bytes_per_param']:7.1f} bytes/param   checkpoint "
              f"{row['checkpoint_mb']:8.2f} MB")
    print("\nPer-coordinate network: FLOP/s of the step against a plain matmul of the same layer shapes")
    print(f"  {'optimizer':<20} {'flop/coord':>10} {'step ms':>9} {'GFLOP/s':>8} {'matmul ms':>10} "
          f"{'GFLOP/s':>8} {'floor xAdam':>12}")
    for row in flops:
        print(f"  {row['optimizer']:<20} {row['flops_per_coordinate']:>10,d} {row['step_ms']:>9.1f} "
              f"{row['step_gflops']:>8.1f} {row['matmul_ms']:>10.1f} {row['matmul_gflops']:>8.1f} "
              f"{row['floor_ratio']:>12.1f}")
    print(f"\nWhere one step's time goes ({target_size:,d} params, 1 thread, share of self CPU time)")
    for name, shares in profiles.items():
        parts = ", ".join(f"{group} {100 * share:.0f}%" for group, share in shares.items() if group != "total_ms")
        print(f"  {name:<20} {parts}")
    print(f"\nEnd to end: timm {e2e['model_name']}, batch {e2e['batch']}, {e2e['resolution']}px, "
          f"{e2e['threads']} thread(s); each optimizer next to a block of AdamW(foreach)")
    for row in e2e_rows:
        print(f"  {row['optimizer']:<20} {row['steps_per_s']:7.3f} steps/s  {row['slowdown_vs_adamw']:6.2f}x AdamW's "
              f"step time  {100 * row['optimizer_fraction']:5.1f}% in step() (AdamW "
              f"{row['adamw_steps_per_s']:.3f} steps/s, {100 * row['adamw_optimizer_fraction']:.1f}%)")
    print("\nTargets")
    for mark in marks:
        floor = mark.get("matmul_floor")
        note = f"; at matmul speed the network alone would be {floor:.1f}x" if floor is not None else ""
        print(f"  [{'met' if mark['met'] else 'NOT met'}] {mark['target']}: {mark['value']:.2f} ({mark['bound']}{note})")


if __name__ == "__main__":
    main()
