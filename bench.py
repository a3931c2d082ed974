"""Speed and memory of ProS's hot paths, as numbers to compare across machines and changes.

    python bench.py                    # everything: ViT-S/16 at the paper's sizes, 4 images a step
    python bench.py --device cuda      # on a GPU: 64 images a step (§3.3's per-GPU batch), bf16
    python bench.py --only step        # sections: step, retrieval, loader, pipeline

step:      one ProS training step (teacher forward on 2 global 224 crops per image, student
           forward + backward on 8 local 96 crops per image, AdamW): images/s, peak memory and
           GFLOP per image; with timm importable, the same step with timm's
           vit_small_patch16_224, interleaved, and the ratio.
retrieval: crops/s of ArcFace.embed batched vs one crop per call, for the toy recogniser (a small
           CNN) and for a graph with no compute (its time per call is the overhead that batching
           saves).
loader:    a DataLoader worker's CPU milliseconds per image at the paper's sizes (2 x 224 globals,
           12 x 96 candidates) on one thread: DINO's per-crop pipeline (every candidate cut and
           augmented with PIL and torchvision, the baseline) vs crops.MultiCrop (boxes and
           parameters only); and the batch's crops (crops.resized_crops) and the augmentation of
           the kept views (crops.batch_views) on the device, per image and as shares of the model
           step.
pipeline:  the toy pretraining as reproduce.sh runs it (ViT-Ti, 64 / 32 px, batch 64, one worker,
           the toy recogniser), loading + crops + retrieval + augmentation + step, with the
           baseline's per-crop cuts and augmentation in the worker vs the batch cut and augmented
           on the device, interleaved: images/s of each and the ratio; and the host syncs of one
           batched step (run.HostSyncs).
The last line gives the CPU cores a training device needs for its loader workers, from the
worker's milliseconds per image, at the measured step rate and at --rate.
Medians over the timed steps; the first steps are warm-up.
"""
import argparse
import copy
import os
import statistics
import tempfile
import time
from functools import partial

import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, default_collate
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

import data
import pretrain
import run
from crops import MultiCrop, batch_views, collate, normalize, take
from data import to_rgb
from loss import PrototypeLoss, ProjectionHead
from retrieval import ArcFace
from run import ArgumentParser, at_least


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
    opt = torch.optim.AdamW(pretrain.param_groups(model), fused=True)
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
    with FlopCounterMode(display=False) as flops:
        steps["ours"]()
    print(f"step: {flops.get_total_flops() / args.batch_size / 1e9:.1f} GFLOP per image "
          f"(torch's flop counter: teacher forward, student forward and backward)")
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
                  f"crops/s one per call ({batched / single:.1f}x; "
                  f"{1000 / single:.2f} ms per call)")


# ----------------------------------------------------------------------------- the baseline loader

class PILBlur(torch.nn.Module):
    """DINO's blur: PIL's Gaussian blur, radius ~ U(0.1, 2.0)."""

    def forward(self, img):
        return img.filter(ImageFilter.GaussianBlur(0.1 + 1.9 * torch.rand(1).item()))


def pil_crops(img, boxes, size):
    """DINO's RandomResizedCrop on a PIL image: each box resized by PIL, a list of PIL crops."""
    return [img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
            for top, left, h, w in boxes.tolist()]


def to_tensor(crops):
    """PIL crops of one size -> (n, 3, size, size) uint8."""
    return torch.stack([pil_to_tensor(c) for c in crops])


class PerCropViews:
    """The baseline worker: DINO's (and MSN's) pipeline, one PIL / torchvision call chain per crop,
    every candidate cut and augmented; it ships the raw crops too, for the retrieval."""

    def __init__(self, mc):
        def recipe(blur, solarize=0.0):
            return v2.Compose([v2.RandomHorizontalFlip(0.5),
                               v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                               v2.RandomGrayscale(0.2), v2.RandomApply([PILBlur()], p=blur),
                               v2.RandomSolarize(128, p=solarize), v2.PILToTensor()])
        self.mc, self.recipes, self.local_recipe = mc, [recipe(1.0), recipe(0.1, 0.2)], recipe(0.5)

    def __call__(self, img):
        mc, img = self.mc, to_rgb(img)
        g, l = (pil_crops(img, mc.boxes(img, n, scale), size)
                for n, scale, size in ((mc.n_global, mc.global_scale, mc.global_size),
                                       (mc.n_candidates, mc.local_scale, mc.local_size)))
        return dict(global_crops=to_tensor(g), local_crops=to_tensor(l),
                    global_views=torch.stack([self.recipes[i % 2](c) for i, c in enumerate(g)]),
                    local_views=torch.stack([self.local_recipe(c) for c in l]),
                    priority=torch.rand(mc.n_candidates), reuse=torch.rand(mc.n_local))


# ----------------------------------------------------------------------------- loader, pipeline

def worker_ms(transform, img, args):
    """Median CPU milliseconds of transform(img) on one thread, over 10 x --steps calls (one call
    takes milliseconds) after --warmup ones."""
    for _ in range(args.warmup):
        transform(img)
    times = []
    for _ in range(10 * args.steps):
        t = time.process_time()
        transform(img)
        times.append((time.process_time() - t) * 1000)
    return statistics.median(times)


def median_time(fn, args, device):
    """Median seconds of fn() over the timed steps, after the warm-up ones."""
    for _ in range(args.warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(args.steps))


def bench_loader(args, device):
    import numpy as np
    mc = MultiCrop(n_candidates=12)
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (218, 178, 3), np.uint8))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a DataLoader worker
    before, after = (worker_ms(t, img, args) for t in (PerCropViews(mc), mc))
    torch.set_num_threads(threads)
    print(f"loader: a worker's CPU ms per image (2 x 224 globals, 12 x 96 candidates, one "
          f"thread): per-crop pipeline {before:.1f}, boxes + parameters {after:.1f} "
          f"({before / after:.1f}x less)")
    # a batch of B images on the device: its crops, then the kept views augmented
    batch = run.to_device(collate([mc(img) for _ in range(args.batch_size)]), device)
    g, l = mc.crops(batch)
    keep = torch.arange(8, device=device).expand(args.batch_size, 8)
    local = take(l, batch["local_params"], keep, batch["spare_params"])
    t_crops = median_time(lambda: mc.crops(batch), args, device)
    t_aug = median_time(lambda: (batch_views(g, batch["global_params"]), batch_views(*local)),
                        args, device)
    t_step = median_time(make_step(step_variants()["ours"](), device, args), args, device)
    per_image = [t / args.batch_size * 1000 for t in (t_crops, t_aug)]
    print(f"loader: on {device.type}, per image, crops (2 + 12) {per_image[0]:.2f} ms and "
          f"augmentation (2 + 8 kept views) {per_image[1]:.2f} ms = {t_crops / t_step:.1%} and "
          f"{t_aug / t_step:.1%} of the model step")
    return after


def toy_pipeline(baseline, argv, device, bf16):
    """A toy pretraining set up as reproduce.sh runs it; returns step(), one training step that
    loads a batch, retrieves, augments and trains: with the baseline's per-crop cuts and
    augmentation in the worker, or with the batch cut and augmented on the device."""
    pa = pretrain.get_args(argv)
    model, teacher = pretrain.build_models(pa, device)
    opt = torch.optim.AdamW(pretrain.param_groups(model), fused=True)
    mc = MultiCrop(pa.global_size, pa.local_size, pa.n_global, pa.n_local, pa.n_candidates)
    views = data.Views(data.pretrain_dataset(pa.data), PerCropViews(mc) if baseline else mc, 0)
    stack = default_collate if baseline else collate
    loader = iter(DataLoader(views, batch_size=pa.batch_size, shuffle=True,
                             num_workers=pa.workers, pin_memory=device.type == "cuda",
                             collate_fn=partial(data.collate, stack=stack),
                             generator=torch.Generator().manual_seed(0)))
    arcface = ArcFace(pa.arcface)
    at = dict(lr=1e-4, weight_decay=0.04, momentum=0.996)

    def step():
        batch = run.to_device(next(loader)[0], device)
        crops = (batch["global_crops"], batch["local_crops"]) if baseline else mc.crops(batch)
        keep, _ = pretrain.retrieve(*crops, batch, arcface, pa)
        if baseline:  # augmented in the worker
            g = normalize(batch["global_views"])
            l = normalize(take(batch["local_views"], {}, keep, {})[0])
        else:
            g = batch_views(crops[0], batch["global_params"])
            l = batch_views(*take(crops[1], batch["local_params"], keep, batch["spare_params"]))
        pretrain.training_step(model, teacher, opt, g, l, at=at, clip_grad=3.0, bf16=bf16)
    return step


def bench_pipeline(args, device):
    import toyfaces
    world = toyfaces.ensure_world(data.data_root(None))
    argv = ["--data", os.path.join(world, "ms1m"), "--arch", "vit_tiny", "--batch-size", "64",
            "--global-size", "64", "--local-size", "32", "--workers", "1",
            "--arcface", os.path.join(world, "arcface.onnx")]
    steps = {"per-crop pipeline": toy_pipeline(True, argv, device, args.bf16),
             "batched on the device": toy_pipeline(False, argv, device, args.bf16)}
    times = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):  # interleaved, so both see the same machine state
        for name, step in steps.items():
            dt = timed(step, device)
            if i >= args.warmup:
                times[name].append(dt)
    rate = {k: 64 / statistics.median(v) for k, v in times.items()}
    (a, ra), (b, rb) = rate.items()
    print(f"pipeline: toy pretraining as reproduce.sh runs it, {a} {ra:.1f} images/s, {b} "
          f"{rb:.1f} images/s ({rb / ra:.2f}x)")
    with run.HostSyncs() as syncs:
        steps[b]()
    print(f"pipeline: {b}, host syncs in a step (counted on the {device.type}: value reads, "
          f"data-dependent sizes; the recogniser's own copies aside): {syncs.count} "
          f"{syncs.ops or ''}")


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--only", nargs="+", choices=["step", "retrieval", "loader", "pipeline"],
                   default=None, help="these sections (default: all)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA "
                   "if there is one")
    p.add_argument("--batch-size", type=at_least(1), default=None, help="images per training step "
                   "(default: 64 on CUDA, §3.3's per-GPU batch; 4 on a CPU)")
    p.add_argument("--steps", type=at_least(1), default=7, help="timed steps (median)")
    p.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps first")
    p.add_argument("--rate", type=at_least(1), default=4500, help="images/s of a training "
                   "device to size the loader for (an H100 at a quarter of its dense bf16 peak on "
                   "ViT-S/16's 55 GFLOP per ProS image, which the step section prints)")
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
    args.bf16 = run.use_bf16(args.bf16, device)
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, bf16 "
          f"{args.bf16}, batch {args.batch_size}")
    out = {}
    for name, fn in (("step", bench_step), ("retrieval", bench_retrieval),
                     ("loader", bench_loader), ("pipeline", bench_pipeline)):
        if args.only is None or name in args.only:
            out[name] = fn(args, device)
    if out.get("loader"):
        ms = out["loader"]
        measured = f"{out['step']:.1f} images/s here: {out['step'] * ms / 1000:.2f}; " \
            if out.get("step") else ""
        print(f"loader: {ms:.1f} CPU ms per image -> CPU cores per device for its workers at "
              f"{measured}{args.rate} images/s: {args.rate * ms / 1000:.1f}")


if __name__ == "__main__":
    main()
