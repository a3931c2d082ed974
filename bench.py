"""Speed and memory of ProS's hot paths, as numbers to compare across machines and changes.

    python bench.py                    # everything: ViT-S/16 at the paper's sizes, 4 images a step
    python bench.py --device cuda      # on a GPU: 64 images a step (§3.3's per-GPU batch), bf16
    python bench.py --only step        # one section: step, retrieval, pipeline

step:      one ProS training step (teacher forward on 2 global 224 crops per image, student
           forward + backward on 8 local 96 crops per image, AdamW): images/s and peak memory;
           with timm importable, the same step with timm's vit_small_patch16_224, interleaved,
           and the ratio.
retrieval: crops/s of ArcFace.embed batched vs one crop per call, for the toy recogniser (a small
           CNN) and for a graph with no compute (its time per call is the overhead that batching
           saves); per-image CPU milliseconds of crop sampling + augmentation + retrieval at the
           paper's sizes.
pipeline:  the full training step with data loading and retrieval vs the model-only step
           (images/s), and the retrieval's share of the step.
With step and retrieval both run, the last line gives the CPU cores one training device needs for
its loader: its images/s times the CPU seconds a worker spends per image.
Medians over the timed steps; the first steps are warm-up.
"""
import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

import pretrain
from crops import MultiCrop, normalize
from data import ArgumentParser, at_least
from loss import PrototypeLoss, ProjectionHead
from retrieval import ArcFace, select_batch


def peak_memory_reset(device):
    """Reset the peak-memory counter: CUDA's allocator, or the process's peak RSS on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory_mb(device, key="VmHWM"):
    """CUDA: peak allocated. CPU: VmHWM, the peak resident set since the last reset (VmRSS: now)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def make_step(backbone, device, args):
    """A ProS training step over `backbone` on fixed random views; returns step()."""
    student = pretrain.Encoder(backbone, ProjectionHead(backbone.embed_dim))
    teacher = copy.deepcopy(student).requires_grad_(False)
    model = pretrain.ProS(student, PrototypeLoss()).to(device)
    teacher.to(device)
    opt = torch.optim.AdamW(pretrain.param_groups(model))
    B = args.batch_size
    g = torch.randn(B, 2, 3, 224, 224, device=device)
    l = torch.randn(B, 8, 3, 96, 96, device=device)
    at = dict(lr=1e-4, weight_decay=0.04, momentum=0.996)
    return lambda: pretrain.training_step(model, teacher, opt, g, l, at=at, clip_grad=3.0,
                                          bf16=args.bf16)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def step_variants():
    import vit
    variants = {"ours": lambda: vit.vit_small(drop_path_rate=0.1)}
    try:
        import timm
        variants["timm"] = lambda: timm.create_model("vit_small_patch16_224", num_classes=0,
                                                     drop_path_rate=0.1,
                                                     dynamic_img_size=True)
    except ImportError:
        print("timm not installed: our step alone")
    return variants


def step_memory(name, args, device):
    """Peak memory of building and running one variant, in a fresh process so nothing else is
    counted."""
    peak_memory_reset(device)
    before = 0.0 if device.type == "cuda" else peak_memory_mb(device, "VmRSS")
    step = make_step(step_variants()[name](), device, args)
    for _ in range(args.warmup):
        step()
    return peak_memory_mb(device) - before


def bench_step(args, device):
    variants = step_variants()
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:  # a new process for each variant
        memory = {name: pool.apply(step_memory, (name, args, device)) for name in variants}
    steps, times = {}, {k: [] for k in variants}
    for name, make in variants.items():
        steps[name] = make_step(make(), device, args)
        for _ in range(args.warmup):
            steps[name]()
    for _ in range(args.steps):  # interleaved, so both see the same machine state
        for name in variants:
            times[name].append(timed(steps[name], device))
    rate = {k: args.batch_size / statistics.median(v) for k, v in times.items()}
    for k in variants:
        how = "CUDA allocator" if device.type == "cuda" else "peak RSS of its own process"
        print(f"step [{k}]: {rate[k]:.2f} images/s (median of {args.steps}), peak memory "
              f"{memory[k]:.0f} MB ({how})")
    if "timm" in rate:
        print(f"step: ours / timm = {rate['ours'] / rate['timm']:.3f}")
    return rate["ours"]


def onnx_file(model, folder, name):
    """Export a torch module with the recogniser's I/O (toyfaces.export_onnx) to
    folder/name.onnx."""
    from toyfaces import export_onnx
    path = os.path.join(folder, f"{name}.onnx")
    export_onnx(model.eval(), path)
    return path


def embed_rates(face, crops, device):
    """crops/s of face.embed: all crops in one call, and one crop per call."""
    face.embed(crops[:2])
    batched = statistics.median(timed(lambda: face.embed(crops), device) for _ in range(5))
    single = statistics.median(timed(lambda: [face.embed(c[None]) for c in crops], device)
                               for _ in range(3))
    return len(crops) / batched, len(crops) / single


def bench_retrieval(args, device):
    from PIL import Image
    import numpy as np
    from torch import nn
    from toyfaces import ToyRecognizer
    with tempfile.TemporaryDirectory() as tmp:
        crops = torch.randint(0, 256, (64, 3, 112, 112), dtype=torch.uint8)
        # the compute-free graph (a global average pool): its time per call is the overhead batching
        # saves
        pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        models = {"recogniser": args.arcface or onnx_file(ToyRecognizer(), tmp, "toy_arcface"),
                  "compute-free graph": onnx_file(pool, tmp, "compute_free")}
        for name, path in models.items():
            batched, single = embed_rates(ArcFace(path), crops, device)
            print(f"retrieval: embed, {name}: {batched:.0f} crops/s batched vs {single:.0f} "
                  f"crops/s one per call ({batched / single:.1f}x; {1000 / single:.2f} ms per "
                  f"call)")
        # one image as a DataLoader worker sees it: one thread (onnxruntime too)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        face = ArcFace(models["recogniser"], threads=1)
        mc = MultiCrop(n_candidates=12)
        img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (218, 178, 3), np.uint8))
        parts = {"sample": [], "augment": [], "retrieval": []}
        for _ in range(args.steps):
            t0 = time.perf_counter()
            g, l = mc.sample(img)
            t1 = time.perf_counter()
            mc.augment(g, l)
            t2 = time.perf_counter()
            select_batch(face.embed(g + l)[None], 2, 8)
            t3 = time.perf_counter()
            for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
                parts[k].append(dt * 1000)
        torch.set_num_threads(threads)
        print("per image on one thread, ms (2 x 224 globals, 12 x 96 candidates, 112 recogniser): "
              "" +
              ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in parts.items()))
    # a worker's ms per image
    return statistics.median(parts["sample"]) + statistics.median(parts["augment"])


def bench_pipeline(args, device):
    """Full step (loader + retrieval + model) vs model-only, on the toy world's MS1M-format
    images."""
    import data
    import toyfaces
    world = toyfaces.ensure_world(data.data_root(None))
    argv = ["--data", os.path.join(world, "ms1m"), "--arch", "vit_small", "--batch-size",
            str(args.batch_size),
            "--workers", str(args.workers), "--arcface", os.path.join(world, "arcface.onnx")]
    pa = pretrain.get_args(argv)
    model, teacher = pretrain.build_models(pa)
    model.to(device)
    teacher.to(device)
    opt = torch.optim.AdamW(pretrain.param_groups(model))
    views = pretrain.Views(data.pretrain_dataset(pa.data), MultiCrop(n_candidates=pa.n_candidates),
                           0)
    arcface = ArcFace(pa.arcface)
    loader = iter(pretrain.epoch_loader(views, pa, epoch=0, pin=device.type == "cuda"))
    full, model_only, retrieval = [], [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch, _ = next(loader)
        t1 = time.perf_counter()
        local, _ = pretrain.select_local_views(batch, arcface, pa,
                                               torch.Generator().manual_seed(i), device)
        t2 = time.perf_counter()
        g, l = normalize(batch["global_views"].to(device)), normalize(local.to(device))
        at = dict(lr=1e-4, weight_decay=0.04, momentum=0.996)

        def step():
            return pretrain.training_step(model, teacher, opt, g, l, at=at, clip_grad=3.0,
                                          bf16=args.bf16)
        step_time = timed(step, device)
        if i >= args.warmup:
            full.append(time.perf_counter() - t0)
            model_only.append(step_time)
            retrieval.append(t2 - t1)
    B = args.batch_size
    print(f"pipeline: full step {B / statistics.median(full):.2f} images/s, model-only "
          f"{B / statistics.median(model_only):.2f} images/s; retrieval "
          f"{statistics.median(retrieval) * 1000:.0f} ms = "
          f"{statistics.median(retrieval) / statistics.median(full):.1%} of the step "
          f"({args.workers} loader workers)")


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--only", choices=["step", "retrieval", "pipeline"], default=None, help="one "
                   "section (default: all)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA "
                   "if there is one")
    p.add_argument("--batch-size", type=at_least(1), default=None, help="images per training step "
                   "(default: 64 on CUDA, §3.3's per-GPU batch; 4 on a CPU)")
    p.add_argument("--steps", type=at_least(1), default=7, help="timed steps (median)")
    p.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps first")
    p.add_argument("--workers", type=at_least(0), default=2, help="DataLoader processes in the "
                   "pipeline section")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 "
                   "autocast in the training steps (default: on CUDA only)")
    p.add_argument("--arcface", default=None, help="an ONNX recogniser for the retrieval section "
                   "(default: an untrained toy CNN)")
    args = p.parse_args()
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: torch sees no CUDA device")
    device = torch.device("cuda" if cuda else "cpu")
    args.batch_size = args.batch_size or (64 if cuda else 4)
    args.bf16 = pretrain.use_bf16(args.bf16, device)
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, bf16 "
          f"{args.bf16}, batch {args.batch_size}")
    out = {}
    for name, fn in (("step", bench_step), ("retrieval", bench_retrieval),
                     ("pipeline", bench_pipeline)):
        if args.only in (None, name):
            out[name] = fn(args, device)
    if out.get("step") and out.get("retrieval"):
        print(f"loader: {out['retrieval']:.1f} CPU ms per image x {out['step']:.1f} images/s = "
              f"{out['step'] * out['retrieval'] / 1000:.1f} CPU cores per {device.type} device "
              f"for its workers")


if __name__ == "__main__":
    main()
