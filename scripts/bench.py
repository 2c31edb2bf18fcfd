"""Training speed of gvae's step in each mode, side by side with a loop written the common way.

    python scripts/bench.py --device cpu --batch 100 --steps 300
    python scripts/bench.py --device cuda --full-run
    python scripts/bench.py --device cpu --sweep 16    # a sweep's ways of using the cores

Everything runs in this one process, on the same model (the default 784-512-256-(20x10)
VAE, Gumbel-Softmax, analytic KL, Adam), so the ratios compare loop mechanics only. Prints
one JSON line per mode; `baseline` is a torchvision DataLoader with ToTensor, a per-batch
`.to(device)` and `loss.item()` every step, as the common public ports do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from gvae.config import StepMode, compose_config, validate
from gvae.engine import build_engine
from gvae.mnist import prepare_files
from gvae.objective import TrainStats
from gvae.step import CUDA_ONLY_MODES
from gvae.tasks import build_task

MODES = [m.value for m in StepMode if m is not StepMode.auto]
OVERRIDES: list[str] = []  # the command line's, for configs composed later


def cpu_name() -> str:
    """`MODEL, N cores` (the cores this process may use), so that a CPU record names its machine."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown model"
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_gvae(cfg, mode: str, steps: int, warmup: int) -> dict:
    """Steps/s of gvae's own step: device-resident batches, nothing read back per step."""
    cfg.train.compile = mode
    engine = build_engine([validate(cfg)], [None])
    t0 = time.perf_counter()
    for _ in range(warmup):  # includes compilation / graph capture
        engine.train_step()
    sync(engine.device)
    setup = time.perf_counter() - t0
    running = engine.train_step()  # the accumulator, shaped like a step's figures
    t0 = time.perf_counter()
    for _ in range(steps):
        running.add_(engine.train_step())
    sync(engine.device)
    seconds = time.perf_counter() - t0
    assert torch.isfinite(running.values).all()
    return {"mode": mode, "steps_per_sec": steps / seconds, "warmup_seconds": setup}


def time_baseline(cfg, steps: int, warmup: int) -> dict:
    """The common loop: DataLoader + ToTensor, .to(device) per batch, loss.item() per step."""
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    typed = validate(cfg)
    model = build_task(typed).to(device)  # the same model and estimator as gvae's
    estimator = model.build_estimator(typed.estimator).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)  # default kernels
    root = prepare_files(cfg.data.root, cfg.data.download)
    dataset = datasets.MNIST(str(root), train=True, transform=transforms.ToTensor())
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True)
    tau = torch.tensor(1.0)

    def batches():
        while True:
            yield from loader

    it = batches()

    def one_step() -> float:
        images, _ = next(it)
        x = images.view(images.shape[0], -1).to(device)
        loss, _ = model.training_loss(estimator, x, tau.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(warmup):
        one_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    return {"mode": "baseline", "steps_per_sec": steps / (time.perf_counter() - t0)}


def time_bookkeeping(cfg, steps: int, repeats: int = 3) -> dict:
    """Microseconds per step of the training loop's own work: gvae.trainer's loop against the bare
    loop of time_gvae, both with the engine's step replaced by one that returns at once, so that the
    difference is the loop's bookkeeping (schedule, cadences, logging) and nothing else."""
    import gvae.jobs as jobs

    build = jobs.build_engine

    def build_with_null_step(*args, **kwargs):
        engine = build(*args, **kwargs)
        stats = engine.train_step()  # one real step: what a step returns
        engine.train_step = lambda: stats
        return engine

    cfg.train.max_steps = cfg.train.eval_every = cfg.train.ckpt_every = steps
    cfg.data.num_val, cfg.eval.num_samples, cfg.eval.images = 1000, 1, False
    loop_us, bare_us = [], []
    for _ in range(repeats):
        jobs.build_engine = build_with_null_step
        try:
            with tempfile.TemporaryDirectory() as tmp:
                metrics = jobs.train(cfg.copy(), Path(tmp))
        finally:
            jobs.build_engine = build
        loop_us.append(1e6 / metrics["steps_per_sec"])
        engine = build_with_null_step([validate(cfg.copy())], [None])
        running = TrainStats.zeros(engine.train_step().names, engine.device, 1)
        t0 = time.perf_counter()
        for _ in range(steps):
            running.add_(engine.train_step())
        sync(engine.device)
        bare_us.append(1e6 * (time.perf_counter() - t0) / steps)
    loop_best, bare_best = min(loop_us), min(bare_us)  # least disturbed of the repeats
    return {"mode": "loop_bookkeeping", "us_per_step": loop_best - bare_best, "loop_us_per_step": loop_best,
            "bare_us_per_step": bare_best, "steps": steps, "repeats": repeats}


def time_packed(cfg, sizes: list[int], steps: int, warmup: int) -> list[dict]:
    """Model-steps per second of S runs packed into one batched step (gvae/packing.py) beside the
    same S runs stepped one after another, each in its own step, in this process: the runs differ
    in seed (each its own initial parameters, batches and noise)."""
    results = []
    for size in sizes:
        cfgs = [validate(compose_config([*OVERRIDES, f"seed={seed}"])) for seed in range(size)]
        shared = build_engine(cfgs[:1], [None]).splits
        separate = [build_engine([c], [None], splits=shared) for c in cfgs]
        packed = build_engine(cfgs, [None] * size, splits=shared, pack=True)
        timings = {}

        def step_separately(engines=separate) -> None:
            for engine in engines:
                engine.train_step()

        for label, step_all in (("separate", step_separately), ("packed", packed.train_step)):
            for _ in range(warmup):  # includes graph capture or compilation
                step_all()
            sync(packed.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step_all()
            sync(packed.device)
            timings[label] = size * steps / (time.perf_counter() - t0)
        results.append({"mode": f"packed_S{size}", "runs": size, "mode_of_step": packed.mode,
                        "separate_model_steps_per_sec": timings["separate"],
                        "packed_model_steps_per_sec": timings["packed"],
                        "packed_over_separate": timings["packed"] / timings["separate"]})
    return results


def timed_window(engine, steps: int, warmup: int) -> tuple[float, float]:
    """Wall-clock start and end of `steps` steps of `engine` after `warmup` untimed ones."""
    for _ in range(warmup):
        engine.train_step()
    sync(engine.device)
    start = time.time()
    for _ in range(steps):
        engine.train_step()
    sync(engine.device)
    return start, time.time()


def time_pack(size: int, steps: int, warmup: int, seed0: int = 0) -> dict:
    """One pack of `size` runs (seeds seed0, seed0 + 1, ...) stepped `steps` times after `warmup`:
    the timed window's wall-clock start and end, so that packs timed in parallel processes add up."""
    cfgs = [validate(compose_config([*OVERRIDES, f"seed={seed}"])) for seed in range(seed0, seed0 + size)]
    start, end = timed_window(build_engine(cfgs, [None] * size, pack=True), steps, warmup)
    return {"start": start, "end": end, "model_steps": size * steps, "threads": torch.get_num_threads()}


def matmul_ceiling(workers: int) -> dict:
    """What the cores' matrix products allow: one thread's GFLOP/s on a product of the largest layer's
    shape, and the model's matrix-product GFLOP per step (forward; backward twice that, less the first
    layer's input gradient, which the images do not need), so that workers x GFLOP/s / (GFLOP per
    step) bounds the model-steps/s of any way of running the sweep at that speed."""
    cfg = validate(compose_config(OVERRIDES))
    engine = build_engine([cfg], [None])
    weights = [p for p in engine.runs[0].model.parameters() if p.dim() == 2]  # weights[0] reads the images
    batch = cfg.train.batch_size
    forward = 2 * batch * sum(w.numel() for w in weights)
    gflop_per_step = (3 * forward - 2 * batch * weights[0].numel()) / 1e9
    rows, cols = max(weights, key=lambda w: w.numel()).shape
    a, b = torch.randn(batch, cols), torch.randn(cols, rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(5):
            a @ b
        t0, repeats = time.perf_counter(), 200
        for _ in range(repeats):
            a @ b
        gflops = 2 * batch * rows * cols * repeats / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(threads)
    return {"matmul_gflops_one_thread": gflops, "model_matmul_gflop_per_step": gflop_per_step,
            "ceiling_model_steps_per_sec": workers * gflops / gflop_per_step}


MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
# The optimizer's fused update: it reads and writes every parameter and its state once a step, so
# it runs at the memory's speed, whichever way the runs are laid out.
OPTIMIZER_UPDATES = ("aten::_fused_adam_", "aten::_fused_adamw_", "aten::_fused_sgd_")


def pack_matmul_share(size: int, steps: int, warmup: int) -> dict:
    """Where one thread's time goes in a pack's step: the seconds per model-step spent in matrix
    products (the profiler's self time of the product kernels), in the optimizer's fused update and
    in everything, so that workers / (product seconds per model-step) bounds any way of running the
    sweep whose products run at this speed, with every other kernel free, and workers / (product and
    update seconds) the same with only the update kept."""
    from torch.profiler import ProfilerActivity, profile

    cfgs = [validate(compose_config([*OVERRIDES, f"seed={seed}"])) for seed in range(size)]
    engine = build_engine(cfgs, [None] * size, pack=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(warmup):
            engine.train_step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.train_step()
    finally:
        torch.set_num_threads(threads)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    products = sum(e.self_cpu_time_total for e in events if e.key in MATRIX_PRODUCTS) / 1e6
    update = sum(e.self_cpu_time_total for e in events if e.key in OPTIMIZER_UPDATES) / 1e6
    model_steps = size * steps
    return {"pack_profiled": size, "pack_seconds_per_model_step": total / model_steps,
            "pack_matmul_seconds_per_model_step": products / model_steps,
            "pack_matmul_share": products / total,
            "pack_update_seconds_per_model_step": update / model_steps,
            "pack_update_share": update / total}


def time_sweep(size: int, steps: int, warmup: int, workers: int) -> list[dict]:
    """The ways a sweep of `size` jobs of the default model can use this machine's cores, side by side
    (model-steps per second of training, start-up and evaluation left out): the jobs one after another,
    each alone with the default threads (what a plain `gvae-train -m` does); all of them in one pack
    with the default threads (hydra/launcher=packed hydra.launcher.workers=1); and `workers`
    single-thread processes at once, each training a pack of its share of the jobs (what
    hydra/launcher=packed does on a CPU by default: gvae/pack_workers.py)."""
    cfgs = [validate(compose_config([*OVERRIDES, f"seed={seed}"])) for seed in range(size)]
    seconds = 0.0
    for cfg in cfgs:  # one after another: each its own engine, as each its own job
        start, end = timed_window(build_engine([cfg], [None]), steps, warmup)
        seconds += end - start
    alone = size * steps / seconds
    one = time_pack(size, steps, warmup)
    packed = one["model_steps"] / (one["end"] - one["start"])
    shares = [size // workers + (w < size % workers) for w in range(workers)]
    firsts = [sum(shares[:w]) for w in range(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--pack-worker", str(n), str(first),
                               "--steps", str(steps), "--warmup", str(warmup), *OVERRIDES],
                              stdout=subprocess.PIPE, env=env, text=True)
             for n, first in zip(shares, firsts, strict=True) if n]
    parts = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in procs]
    if any(proc.returncode for proc in procs):
        raise SystemExit("a pack worker failed")
    window = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    in_workers = sum(p["model_steps"] for p in parts) / window
    ceiling = {}
    if OVERRIDES[0] == "device=cpu":
        ceiling = {**matmul_ceiling(workers), **pack_matmul_share(shares[0], steps, warmup)}
        ceiling["matmul_bound_model_steps_per_sec"] = workers / ceiling["pack_matmul_seconds_per_model_step"]
        ceiling["matmul_bound_over_one_after_another"] = ceiling["matmul_bound_model_steps_per_sec"] / alone
        both = ceiling["pack_matmul_seconds_per_model_step"] + ceiling["pack_update_seconds_per_model_step"]
        ceiling["matmul_update_bound_model_steps_per_sec"] = workers / both
        ceiling["matmul_update_bound_over_one_after_another"] = workers / both / alone
    return [{"mode": f"sweep_S{size}", "machine": cpu_name(), "jobs": size, "steps": steps,
             "one_after_another_model_steps_per_sec": alone,
             "one_after_another_threads": torch.get_num_threads(),
             "one_pack_model_steps_per_sec": packed, "one_pack_threads": one["threads"],
             f"{workers}_workers_model_steps_per_sec": in_workers, "worker_packs": shares,
             "one_pack_over_one_after_another": packed / alone,
             "workers_over_one_after_another": in_workers / alone, **ceiling}]


def class_axis_ops(repeats: int = 20) -> list[dict]:
    """Microseconds per call, forward and backward, of the latent's reductions over its class axis,
    written both ways side by side: torch's softmax and log_softmax over the last axis against the
    transposed view gvae.latents uses on the CPU, and the conditional Gumbel's logaddexp with a
    broadcast operand against a whole one; on a training batch (100, 20, 10) and on ReinMax-Rao's
    100 draws of it (100, 100, 20, 10)."""
    from gvae.latents import log_softmax, softmax

    def timed(fn, *tensors) -> float:
        leaves = [t.clone().requires_grad_() for t in tensors]
        for _ in range(3):
            fn(*leaves).sum().backward()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(*leaves).sum().backward()
        return 1e6 * (time.perf_counter() - t0) / repeats

    out = []
    for shape in ((100, 20, 10), (100, 100, 20, 10)):
        x, y = torch.randn(shape), torch.randn(*shape[:-1], 1)
        pairs = {"softmax": (lambda a: torch.softmax(a, -1), softmax, (x,)),
                 "log_softmax": (lambda a: torch.log_softmax(a, -1), log_softmax, (x,)),
                 "logaddexp": (torch.logaddexp,
                               lambda a, b: torch.logaddexp(a, b.expand(a.shape).contiguous()), (x, y))}
        for op, (plain, gvae_way, args) in pairs.items():
            before, after = timed(plain, *args), timed(gvae_way, *args)
            out.append({"mode": f"class_axis_{op}", "shape": list(shape), "torch_us": before,
                        "gvae_us": after, "speedup": before / after, "threads": torch.get_num_threads()})
    return out


def full_run(device: str, overrides: list[str]) -> dict:
    """Wall time of a complete default run (50,000 steps and the m=1000 test bound), start-up included."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "gvae.train", f"device={device}", f"hydra.run.dir={tmp}", *overrides]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        metrics = json.loads((Path(tmp) / "metrics.json").read_text())
    return {"mode": "full_run", "wall_seconds": wall, "steps": metrics["step"],
            "test_bound": metrics["test_bound"], "steps_per_sec": metrics["steps_per_sec"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps (compilation included)")
    parser.add_argument("--modes", nargs="+", default=None, help=f"gvae modes, from {MODES}")
    parser.add_argument("--full-run", action="store_true", help="also time a complete default run")
    parser.add_argument("--bookkeeping", action="store_true",
                        help="only time the training loop's own work per step (no model step)")
    parser.add_argument("--packed", type=int, nargs="+", metavar="S",
                        help="only time S runs packed against S separate runs, for each S (e.g. 1 4 8 16)")
    parser.add_argument("--sweep", type=int, metavar="S",
                        help="only time a sweep of S jobs: one after another, in one pack, and in packs "
                             "in --workers single-thread processes")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes for --sweep (default: this machine's cores)")
    parser.add_argument("--softmax", action="store_true",
                        help="only time the latent's class-axis reductions, torch's way and gvae's (CPU)")
    parser.add_argument("--pack-worker", type=int, nargs=2, metavar=("S", "SEED0"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for gvae's config")
    args = parser.parse_args()
    OVERRIDES[:] = [f"device={args.device}", f"train.batch_size={args.batch}", *args.overrides]
    if args.pack_worker:  # one of --sweep's processes
        print(json.dumps(time_pack(args.pack_worker[0], args.steps, args.warmup, seed0=args.pack_worker[1])))
        return

    if args.softmax:
        for r in class_axis_ops():
            print(json.dumps({"device": "cpu", "torch": torch.__version__, **r}), flush=True)
        return
    cfg = compose_config([f"device={args.device}", f"train.batch_size={args.batch}", *args.overrides])
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.sweep:
        for r in time_sweep(args.sweep, args.steps, args.warmup, args.workers):
            # The overrides in the line: a bf16 line must say so (train.precision=bf16).
            print(json.dumps({"device": name, "batch": args.batch, "torch": torch.__version__,
                              "overrides": args.overrides, **r}), flush=True)
        return
    if args.packed:
        for r in time_packed(cfg, args.packed, args.steps, args.warmup):
            print(json.dumps({"device": name, "batch": args.batch, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), **r}), flush=True)
        return
    if args.bookkeeping:
        torch.set_num_threads(1)  # the loop's bookkeeping is Python: no thread-pool waits in the figure
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(json.dumps({"device": name, **time_bookkeeping(cfg.copy(), args.steps)}), flush=True)
        return
    modes = args.modes or [m for m in MODES if device.type == "cuda" or m not in CUDA_ONLY_MODES]
    results = [time_baseline(cfg.copy(), args.steps, args.warmup)]
    results += [time_gvae(cfg.copy(), mode, args.steps, args.warmup) for mode in modes]
    baseline = results[0]["steps_per_sec"]
    for r in results:
        r.update(device=name, batch=args.batch, images_per_sec=r["steps_per_sec"] * args.batch,
                 ratio_to_baseline=r["steps_per_sec"] / baseline, torch=torch.__version__,
                 threads=torch.get_num_threads())
        print(json.dumps(r), flush=True)
    if args.full_run:
        print(json.dumps({"device": name, **full_run(args.device, args.overrides)}), flush=True)


if __name__ == "__main__":
    main()
