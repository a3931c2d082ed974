r"""ProS pretraining (paper §3.1-3.3): a ViT student learns from its EMA teacher through shared
prototypes.

    python pretrain.py --data toy --arch vit_tiny --patch-size 8 --epochs 4 --batch-size 32 \
        --global-size 64 --local-size 32 --lr 8e-3 --warmup-epochs 0.5 --momentum-teacher 0.99 \
        --n-prototypes 64 --workers 1 --arcface data/toy/arcface.onnx   # the README's toy recipe
    torchrun --nproc_per_node 4 pretrain.py --data ms1m --arcface w600k_r50.onnx   # the paper's run

In the paper's order: arguments; models (§3.2); one step: crop, retrieve (with --arcface: N of C
local candidates kept, one recogniser call a batch), augment (crops.py, on the training device),
teacher, student, Eq. 1-4 (loss.py), AdamW, EMA; the loop. run.py keeps the machinery.

Progress bar: loss (Eq. 2: ce - H), ce (Eq. 3's cross-entropy), H (Eq. 4: the entropy of the mean
student prediction; ln K at most), protos (the share of the prototypes the teacher's predictions
reach in a batch, of those reachable; under 25%: COLLAPSED), lr, img_s (images a second) and, with
--arcface, reject (the share of candidates below theta). At the end the teacher is probed beside
its random init and raw pixels (probe.py); the last line says collapsed, learned or not learned.

In --out: checkpoint.pth (the same command resumes; other settings are refused),
teacher_backbone.pth (what fine-tuning loads), log.jsonl, skipped.txt. Ctrl-C or SIGTERM: every
process finishes the step, saves and exits.
"""
import argparse
import sys
from functools import partial

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from crops import MultiCrop, batch_views, collate as collate_views, take
from data import Views, collate, data_root, pretrain_dataset, random_subset, readable
from loss import (PrototypeLoss, ProjectionHead, cosine_schedule, ema_update, momentum_schedule,
                  weight_decay_schedule)
from probe import add_probe_args, collapse_state, make_judge, summary
from retrieval import SELECTION, ArcFace, select, selection_counts, similarity
from run import (ArgumentParser, Run, above, add_run_args, at_least, distributed, fraction,
                 ignore_stop_signals, last_row, patch_multiple, run_cli, settings,
                 setup_distributed, to_device, training, use_bf16)
import toyfaces
from vit import ARCHS


# ----------------------------------------------------------------------------- arguments

def add_model_args(p):
    g = p.add_argument_group("models and loss (§3.1-3.3)")
    g.add_argument("--arch", default="vit_small", choices=ARCHS, help="backbone (§3.2: ViT-S/16)")
    g.add_argument("--patch-size", type=at_least(1), default=16, help="ViT patch side (§3.2)")
    g.add_argument("--out-dim", type=at_least(1), default=256, help="projector output d (§3.2)")
    g.add_argument("--projector-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="BatchNorm in the projector's hidden layers (MSN config; off: §3.2)")
    g.add_argument("--n-prototypes", type=at_least(1), default=1024, help="K (§3.3)")
    g.add_argument("--tau-teacher", type=above(0.0), default=0.025, help="tau_g (§3.3)")
    g.add_argument("--tau-student", type=above(0.0), default=0.1, help="tau_l (§3.3)")
    g.add_argument("--sinkhorn", action=argparse.BooleanOptionalAction, default=True,
                   help="Sinkhorn-Knopp on the teacher's targets (MSN config; off: Eq. 2 as "
                   "printed, which collapses on the toy faces)")
    g.add_argument("--drop-path", type=at_least(0.0, float), default=0.0,
                   help="student stochastic depth (MSN config)")


def add_optimisation_args(p):
    nonneg = at_least(0.0, float)
    g = p.add_argument_group("optimisation (§3.3)")
    g.add_argument("--epochs", type=at_least(1), default=20, help="§3.3")
    g.add_argument("--batch-size", type=at_least(1), default=64, help="per process (§3.3: 64 x 4)")
    g.add_argument("--lr", type=above(0.0), default=1e-3, help="peak lr for a global batch of "
                   "256 (§3.3), scaled by global batch / 256 (DINO's linear rule)")
    g.add_argument("--warmup-lr", type=nonneg, default=2e-4, help="start lr, scaled so (§3.3)")
    g.add_argument("--min-lr", type=nonneg, default=1e-6, help="end of the cosine (§3.3)")
    g.add_argument("--warmup-epochs", type=nonneg, default=2, help="§3.3")
    g.add_argument("--weight-decay", type=nonneg, default=0.04, help="AdamW's at the start "
                   "(§3.3, MSN config); none on biases, norms, prototypes (MSN)")
    g.add_argument("--final-weight-decay", type=nonneg, default=0.4,
                   help="rises to this (MSN config; 0.04 holds §3.3's 0.04)")
    g.add_argument("--schedules", default="msn", choices=["msn", "dino"], help="weight decay and "
                   "EMA momentum: MSN's msn_train.py (cosine, and linear towards 1, over 1.25x "
                   "the run) or DINO's main_dino.py (both cosine over the run)")
    g.add_argument("--clip-grad", type=above(0.0), default=3.0,
                   help="max gradient norm of the student encoder (MSN config)")
    g.add_argument("--momentum-teacher", type=fraction, default=0.996,
                   help="EMA momentum at the start, rising towards 1 (MSN's msn_train.py)")
    g.add_argument("--seed", type=int, default=0, help="RNG seed (data order, crops, init)")


def add_view_args(p):
    g = p.add_argument_group("views and face-aware retrieval (§3)")
    g.add_argument("--global-size", type=patch_multiple, default=224, help="global side (§3.2)")
    g.add_argument("--local-size", type=patch_multiple, default=96, help="local side (§3.2)")
    g.add_argument("--n-global", type=at_least(1), default=2, help="M (unstated; DINO's, MSN's)")
    g.add_argument("--n-local", type=at_least(1), default=8, help="N (unstated; DINO's 8)")
    g.add_argument("--arcface", default=None, help="ONNX recogniser: the retrieval on (§3)")
    g.add_argument("--face-threshold", type=float, default=-0.5, help="theta (§3)")
    g.add_argument("--n-candidates", type=at_least(1), default=12, help="C >= N candidates an "
                   "image (unstated: 1.5 N, so that a third can go before a slot takes one again)")
    g.add_argument("--arcface-raw-input", action="store_true",
                   help="the ONNX graph normalises inside (old MXNet exports): feed it 0..255")
    g.add_argument("--arcface-batch", type=at_least(1), default=512, help="the most crops a "
                   "recogniser call embeds, which bounds its memory (IResNet-50: ~3 MB a crop)")
    g.add_argument("--arcface-device", default="auto", choices=["auto", "cpu"], help="the "
                   "training device (auto; a GPU needs onnxruntime-gpu) or onnxruntime's CPU")


def add_data_args(p):
    g = add_run_args(p, workers=8)
    g.add_argument("--data", default="toy", help="toy, a name under the data root, or a path")
    g.add_argument("--n-images", type=at_least(1), default=None, help="this many images drawn "
                   "by --seed (ProS-1M-real, Tables 1-4: 1000000 of MS1M; default: all)")
    g.add_argument("--out", default="runs/pretrain", help="an existing run there resumes")
    g.add_argument("--save-every", type=at_least(0), default=0,
                   help="also checkpoint every this many steps (0: never)")
    add_probe_args(g)


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    for add in (add_model_args, add_optimisation_args, add_view_args, add_data_args):
        add(p)
    args = p.parse_args(argv)
    for side in ("global_size", "local_size"):
        if getattr(args, side) % args.patch_size:
            p.error(f"--{side.replace('_', '-')} {getattr(args, side)}: expected a multiple of "
                    f"--patch-size ({args.patch_size})")
    if args.arcface and args.n_candidates < args.n_local:
        p.error(f"--n-candidates {args.n_candidates}: expected at least --n-local ({args.n_local})")
    return args


# ----------------------------------------------------------------------------- models (§3.2)

class Encoder(nn.Module):
    """Backbone + projector, the layout of teacher and student (DINO's keys: backbone.*, head.*)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))


class ProS(nn.Module):
    """The trainable part, wrapped whole by DDP: student encoder, prototypes (inside the loss)."""

    def __init__(self, student, criterion):
        super().__init__()
        self.student, self.criterion = student, criterion

    def forward(self, local_views, z_teacher):
        B, N = local_views.shape[:2]
        z_student = self.student(local_views.flatten(0, 1)).view(B, N, -1)  # (B, N, d)
        return self.criterion(z_teacher, z_student)


def build_models(args, device="cpu"):
    """(ProS student module, teacher encoder) on `device`: the teacher starts as the student's copy
    (§3.3)."""
    def make(drop):
        backbone = ARCHS[args.arch](patch_size=args.patch_size, drop_path_rate=drop)
        return Encoder(backbone, ProjectionHead(backbone.embed_dim, args.out_dim,
                                                batch_norm=args.projector_bn))
    student, teacher = make(args.drop_path), make(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    criterion = PrototypeLoss(args.n_prototypes, args.out_dim, args.tau_teacher, args.tau_student,
                              args.sinkhorn)
    return ProS(student, criterion).to(device), teacher.to(device)


def param_groups(model):
    """[decayed, not decayed]: MSN decays every weight matrix (position embedding and cls token
    too), not biases, norms (1-D) or the prototypes. The weight decay is set at each step."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith("prototypes") else decay).append(p)
    return [dict(params=decay), dict(params=no_decay, weight_decay=0.0)]


# ----------------------------------------------------------------------------- one step (§3)

def retrieve(global_crops, local_crops, batch, arcface, args):
    """Face-aware retrieval on the raw crops (before augmentation, §3): one recogniser call for the
    global crops (B, M, ...), one for the candidates (B, C, ...), then the rule with the numbers the
    workers drew. Returns the kept candidates (B, N) and the counts (retrieval.SELECTION)."""
    device = global_crops.device
    g, l = (arcface.embed(c.flatten(0, 1)).to(device).view(*c.shape[:2], -1)
            for c in (global_crops, local_crops))  # (B, M, D), (B, C, D)
    sim = similarity(g, l)  # (B, C)
    keep = select(sim, args.n_local, args.face_threshold, batch["priority"], batch["reuse"])
    return keep, selection_counts(sim, args.n_local, args.face_threshold)


def make_views(batch, multicrop, arcface, args):
    """Crop, retrieve, augment (§3, Fig. 2), on the batch's device: global views (B, M, 3, G, G),
    local views (B, N, 3, L, L), and the retrieval's counts (zeros without --arcface)."""
    global_crops, local_crops = multicrop.crops(batch)
    local_params = batch["local_params"]
    counts = torch.zeros(len(SELECTION), device=global_crops.device)
    if arcface is not None:  # else C == N: all are kept
        keep, counts = retrieve(global_crops, local_crops, batch, arcface, args)
        local_crops, local_params = take(local_crops, local_params, keep, batch["spare_params"])
    return (batch_views(global_crops, batch["global_params"]),
            batch_views(local_crops, local_params), counts)


def training_step(model, teacher, optimizer, global_views, local_views, *, at, clip_grad, bf16):
    """One ProS step: teacher on the global views (B, M, 3, G, G), student on the local views (B,
    N, 3, L, L), Eq. 1-4, AdamW, EMA. at: this step's lr, weight_decay and momentum (schedules());
    bf16: autocast the networks. Returns the loss stats, 0-d tensors on the device."""
    for g in optimizer.param_groups:
        g["lr"] = at["lr"]
    optimizer.param_groups[0]["weight_decay"] = at["weight_decay"]  # the decayed group
    B, M = global_views.shape[:2]
    with torch.autocast(global_views.device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            z_teacher = teacher(global_views.flatten(0, 1)).view(B, M, -1)  # (B, M, d)
        loss, stats = model(local_views, z_teacher)  # Eq. 1-4 (loss.py)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    student = model.module.student if isinstance(model, DistributedDataParallel) else model.student
    stats["grad_norm"] = nn.utils.clip_grad_norm_(student.parameters(), clip_grad)  # MSN: encoder
    optimizer.step()
    ema_update(teacher, student, at["momentum"])
    return stats


def schedules(args, n_images, world):
    """(steps per epoch, total steps, step -> {lr, weight_decay, momentum}): pure functions of the
    step, so a resumed run follows the same curves. lr: linear warmup then cosine to --min-lr
    (§3.3), scaled by the global batch / 256 (the paper's rates are for 64 x 4); weight decay and
    EMA momentum as MSN's code (over 1.25x the run) or DINO's."""
    global_batch = args.batch_size * world
    steps_per_epoch = n_images // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"dataset {args.data}: {n_images} images, fewer than one global batch "
                         f"of {global_batch}")
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    scale, m = global_batch / 256, args.momentum_teacher
    wd = (args.weight_decay, args.final_weight_decay)

    def at(step):
        lr = cosine_schedule(step, total, args.lr * scale, args.min_lr, warmup,
                             args.warmup_lr * scale)
        if args.schedules == "dino":  # main_dino.py: both cosine over the run
            return dict(lr=lr, weight_decay=cosine_schedule(step, total, *wd),
                        momentum=cosine_schedule(step, total, m, 1.0))
        return dict(lr=lr, weight_decay=weight_decay_schedule(step, total, *wd),
                    momentum=momentum_schedule(step, total, m))
    return steps_per_epoch, total, at


# ----------------------------------------------------------------------------- the loop

# Flags beside run.RUN_FLAGS that do not change what a run computes: how it saves, probes, embeds.
NOT_SETTINGS = ("save_every", "probe_attr", "probe_expr", "probe_images", "probe_every",
                "arcface_device", "arcface_batch")


def train(args, stop):
    if args.data == "toy":  # before the process group: generating takes longer than it waits
        toyfaces.ensure_world(data_root(args.data_root))
    proc = rank, world, device = setup_distributed()
    args.bf16 = use_bf16(args.bf16, device)
    torch.manual_seed(args.seed)
    images = pretrain_dataset(args.data, args.data_root)
    run = Run(args.out, settings(args, NOT_SETTINGS, processes=world, dataset_images=len(images)),
              proc, stop)
    images = random_subset(images, args.n_images, args.seed) if args.n_images else images
    arcface = load_arcface(args)
    multicrop = MultiCrop(args.global_size, args.local_size, args.n_global, args.n_local,
                          args.n_candidates if arcface else None)
    views = Views(images, multicrop, args.seed)
    model, teacher = build_models(args, device)
    ddp = distributed(model, world, device)
    optimizer = torch.optim.AdamW(param_groups(model), fused=True)  # no host sync
    steps_per_epoch, total_steps, at = schedules(args, len(images), world)
    parts = dict(student=model, teacher=teacher, optimizer=optimizer)
    step = run.resume(**parts).get("step", 0)
    announce(args, run, len(images), step, total_steps)
    judge = make_judge(args, device) if rank == 0 else None
    run.progress(total_steps, step, "pretrain")
    selection = torch.zeros(len(SELECTION), device=device)  # the retrieval's counts since the log
    while step < total_steps:
        epoch = step // steps_per_epoch
        for batch, names in epoch_loader(views, args, epoch, step % steps_per_epoch, proc):
            global_views, local_views, counts = make_views(to_device(batch, device), multicrop,
                                                           arcface, args)
            now = at(step)
            stats = training_step(ddp, teacher, optimizer, global_views, local_views, at=now,
                                  clip_grad=args.clip_grad, bf16=args.bf16)
            selection += counts
            step += 1
            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            by_steps = args.save_every and step % args.save_every == 0
            if not run.step_done(names, step % args.log_every == 0 or epoch_end or by_steps):
                continue  # no device sync between logging steps
            stats.update(zip(SELECTION, selection))
            row = dict(step=step, epoch=step / steps_per_epoch, **now,
                       **run.sync(stats, f"step {step}"))
            selection.zero_()
            report(run, row, args, arcface is not None)
            if epoch_end or by_steps or run.save_due(args.save_every_min) or run.stopping:
                run.save(parts, step=step, args=vars(args))
                run.export(teacher.backbone, "teacher_backbone.pth")
            every = args.probe_every * steps_per_epoch
            if judge and every and step % every == 0 and step < total_steps:
                run.log(dict(step=step, epoch=step / steps_per_epoch, **judge(teacher.backbone)))
            run.exit_if_stopping(step)
            if step >= total_steps:
                break
    run.bar.close()
    if rank == 0:
        finish(args, run, judge, teacher, step)


def epoch_loader(views, args, epoch, start_batch, proc):
    """This process's batches of `epoch` from batch `start_batch` on (resumed), pinned on a GPU."""
    rank, world, device = proc
    sampler = DistributedSampler(views, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = [epoch * len(views) + i for i in sampler][start_batch * args.batch_size:]
    # its own generator: creating a loader must not advance the global RNG (exact resume)
    loader = DataLoader(views, batch_size=args.batch_size, sampler=indices,
                        num_workers=args.workers, collate_fn=partial(collate, stack=collate_views),
                        drop_last=True, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator().manual_seed(args.seed + epoch))
    return readable(loader, args.data)


def load_arcface(args):
    """--arcface's recogniser (None without), loaded now: a broken file fails before training."""
    if not args.arcface:
        return None
    on_cpu = ["CPUExecutionProvider"] if args.arcface_device == "cpu" else None
    arcface = ArcFace(args.arcface, normalize=not args.arcface_raw_input, providers=on_cpu,
                      max_batch=args.arcface_batch)
    arcface.session
    return arcface


def announce(args, run, n_images, step, total_steps):
    """The run's first lines (rank 0): resumed or complete, its sizes, what is off or odd."""
    if run.rank != 0:
        return
    if step:
        print(f"{args.out} holds this run, complete ({step} steps): nothing to train; delete it or "
              f"choose another --out to train again" if step >= total_steps else
              f"resuming {run.ckpt_path} at step {step} of {total_steps}")
    global_batch = args.batch_size * run.world
    print(f"{n_images} images, global batch {global_batch} ({run.world} x {args.batch_size}), "
          f"{total_steps // args.epochs} steps/epoch, {total_steps} steps, peak lr "
          f"{args.lr * global_batch / 256:.2e}"
          + ("" if args.arcface else "; no --arcface: local crops uncurated (no retrieval)"))
    if args.warmup_epochs >= args.epochs / 2:
        part = "the whole" if args.warmup_epochs >= args.epochs else "most of the"
        print(f"warning: --warmup-epochs {args.warmup_epochs:g} of --epochs {args.epochs}: {part} "
              f"run is warmup (the paper warms up 2 of 20 epochs)", file=sys.stderr)


def report(run, row, args, retrieval):
    """A logging step's row (rank 0): log.jsonl and the progress bar's postfix."""
    if run.rank != 0:
        return
    counts = {k: round(row.pop(k) * run.world) for k in SELECTION}  # sums over processes
    reject = counts["rejected"] / max(counts["candidates"], 1)
    share, state = collapse_state(row, args, run.world)
    row.update(images_per_s=run.rate(row["step"]) * args.batch_size * run.world,
               reject_rate=reject, all_rejected=counts["fallbacks"], skipped=len(run.skipped),
               prototype_share=share, state=state)
    run.log(row)
    run.bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['cross_entropy']:.3f}",
                        H=f"{row['mean_entropy']:.2f}", protos=f"{share:.0%}",
                        lr=f"{row['lr']:.1e}", img_s=f"{row['images_per_s']:.0f}",
                        **({"reject": f"{reject:.0%}"} if retrieval else {}),
                        **({"state": "COLLAPSED"} if state == "collapsed" else {}))


def finish(args, run, judge, teacher, step):
    """The last lines: where the teacher is, the probe, and the verdict (probe.summary)."""
    probed = judge and judge(teacher.backbone)
    if probed:
        run.log(dict(step=step, epoch=args.epochs, **probed))
    skipped = f"; {len(run.skipped)} unreadable images skipped, listed in {args.out}/skipped.txt"
    print(f"done: {step} steps; teacher backbone in {args.out}/teacher_backbone.pth"
          + (skipped if run.skipped else "")
          + f"\nat the end: {summary(last_row(run.log_path), args, judge, probed)}")


def main(args):
    """Pretrain; Ctrl-C, SIGTERM and the process group handled on every exit (run.training)."""
    with training() as stop:
        train(args, stop)


if __name__ == "__main__":
    run_cli(lambda: main(get_args()))
