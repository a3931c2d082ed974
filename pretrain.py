r"""ProS pretraining (paper §3.1-3.3): a ViT student learns from its EMA teacher through shared
prototypes.

    python pretrain.py --data toy --arch vit_tiny --patch-size 8 --epochs 4 --batch-size 32 \
        --global-size 64 --local-size 32 --lr 8e-3 --warmup-epochs 0.5 --momentum-teacher 0.99 \
        --n-prototypes 64 --workers 1 --arcface data/toy/arcface.onnx   # the README's toy recipe
    torchrun --nproc_per_node 4 pretrain.py --data ms1m --arcface w600k_r50.onnx   # the paper's run
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        pretrain.py --data ms1m --arcface w600k_r50.onnx

Per image, M global views go to the teacher and N local views to the student (§1, Fig. 2). With
--arcface, C candidate local crops are cut and the face-aware retrieval keeps N of them in the
training step, one recogniser call for the whole batch (an ArcFace R50 on an image's 14 crops costs
more than its ViT-S step: in CPU workers it would starve the GPUs). The workers only decode and
draw the crop boxes and augmentation parameters; the crops are cut and the kept views augmented in
the training step, a batch at once on the training device (crops.py), so a GPU needs few CPU cores
to feed it.
Run the same command again with the same --out and it resumes from the last checkpoint; one made
with other settings is refused. Ctrl-C or SIGTERM (a cluster's preemption) finishes the step on
every process (they agree each step), saves and exits; a checkpoint is also written every
--save-every-min minutes and every epoch.

The progress bar: loss (Eq. 2: ce - H), ce (Eq. 3's cross-entropy between the student's and the
teacher's predictions), H (Eq. 4: the entropy of the mean student prediction; ln K at most),
protos (the share of the prototypes the teacher's predictions reach in a batch, of those its global
views could reach; under 25%: COLLAPSED), lr, img_s (images a second) and, with --arcface, reject
(the share of candidates below theta).

At the end (and every --probe-every epochs) the teacher's frozen features are probed (probe.py:
linear, k-NN, verification) beside its random init and raw pixels; the last lines say whether the
run collapsed, learned (beat its random init), or did not.

Outputs in --out: checkpoint.pth (everything to resume, and the settings it was made with),
teacher_backbone.pth (the teacher ViT, what fine-tuning loads), log.jsonl (one line per logging
step and per probe), skipped.txt (the unreadable images or records, each once).
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from crops import MultiCrop, batch_views, take
from crops import collate as collate_views
from data import (ArgumentParser, above, at_least, check_settings, data_root, fraction,
                  ignore_stop_signals, is_rank_zero, item_name, patch_multiple, pretrain_dataset,
                  random_subset, run_cli, write_lines)
from loss import (PrototypeLoss, ProjectionHead, cosine_schedule, ema_update, momentum_schedule,
                  weight_decay_schedule)
from probe import Judge, probe_sets, random_backbone, toy_sets, verdict
from retrieval import SELECTION, ArcFace, select, selection_counts, similarity
import toyfaces
from vit import ARCHS, read_checkpoint


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    count, positive, nonneg = at_least(1), above(0.0), at_least(0.0, float)
    p.add_argument("--data", default="toy",
                   help="toy, a name under the data root (ms1m), or a path")
    p.add_argument("--data-root", default=None, help="where dataset names resolve (default: "
                   "$PROS_DATA, else ./data)")
    p.add_argument("--arch", default="vit_small", choices=ARCHS, help="backbone (§3.2: ViT-S/16)")
    p.add_argument("--patch-size", type=count, default=16, help="ViT patch side (§3.2: /16)")
    p.add_argument("--epochs", type=count, default=20, help="§3.3")
    p.add_argument("--batch-size", type=count, default=64,
                   help="images per process (§3.3: 64 x 4 GPUs)")
    p.add_argument("--lr", type=positive, default=1e-3, help="peak lr after warmup for a global "
                   "batch of 256 (§3.3: 1e-3 at 64 x 4), scaled by global batch / 256 (DINO's "
                   "linear rule)")
    p.add_argument("--warmup-lr", type=nonneg, default=2e-4,
                   help="initial lr, scaled the same way (§3.3)")
    p.add_argument("--min-lr", type=nonneg, default=1e-6,
                   help="final lr of the cosine decay (§3.3)")
    p.add_argument("--warmup-epochs", type=nonneg, default=2, help="§3.3")
    p.add_argument("--weight-decay", type=nonneg, default=0.04,
                   help="AdamW, at the start (§3.3 prints 0.04, MSN config's start); none on "
                   "biases, norms, prototypes (MSN)")
    p.add_argument("--final-weight-decay", type=nonneg, default=0.4,
                   help="the weight decay rises by cosine to this (MSN config; §3.3 prints 0.04 "
                   "alone: --final-weight-decay 0.04 holds it)")
    p.add_argument("--schedules", default="msn", choices=["msn", "dino"],
                   help="the weight decay's and EMA momentum's curves: MSN's msn_train.py "
                   "(cosine, and linear towards 1, over 1.25x the run) or DINO's main_dino.py "
                   "(both cosine over the run; the authors' fine-tuning loads DINO-layout "
                   "checkpoints)")
    p.add_argument("--clip-grad", type=positive, default=3.0,
                   help="max gradient norm of the student encoder, prototypes excluded (MSN "
                   "config)")
    p.add_argument("--momentum-teacher", type=fraction, default=0.996,
                   help="EMA momentum at the start, rising towards 1 as --schedules says "
                   "(MSN's msn_train.py)")
    p.add_argument("--drop-path", type=nonneg, default=0.0,
                   help="student stochastic depth (MSN config)")
    p.add_argument("--n-prototypes", type=count, default=1024, help="K (§3.3)")
    p.add_argument("--out-dim", type=count, default=256,
                   help="projector output and prototype dim d (§3.2)")
    p.add_argument("--tau-teacher", type=positive, default=0.025, help="tau_g (§3.3)")
    p.add_argument("--tau-student", type=positive, default=0.1, help="tau_l (§3.3)")
    p.add_argument("--sinkhorn", action=argparse.BooleanOptionalAction, default=True,
                   help="Sinkhorn-Knopp on the teacher's targets (MSN config); --no-sinkhorn: Eq. "
                   "2 as printed, which collapses on the toy faces")
    p.add_argument("--projector-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="BatchNorm in the projector's hidden layers (MSN config); "
                   "--no-projector-bn: §3.2's 3 plain layers")
    p.add_argument("--global-size", type=patch_multiple, default=224,
                   help="global crop side (§3.2)")
    p.add_argument("--local-size", type=patch_multiple, default=96, help="local crop side (§3.2)")
    p.add_argument("--n-global", type=count, default=2,
                   help="M global views (unstated; DINO's 2, MSN config's 2 random views)")
    p.add_argument("--n-local", type=count, default=8,
                   help="N local views (unstated; DINO's 8, MSN config's 10 focal views)")
    p.add_argument("--arcface", default=None, help="ONNX recogniser: enables the face-aware "
                   "retrieval (§3)")
    p.add_argument("--arcface-raw-input", action="store_true", help="the ONNX graph normalises "
                   "inside (old MXNet exports): feed it 0..255")
    p.add_argument("--arcface-batch", type=count, default=512,
                   help="the most crops one recogniser call embeds: its activations bound the "
                   "recogniser's memory (an IResNet-50's largest: about 3 MB a crop)")
    p.add_argument("--arcface-device", default="auto", choices=["auto", "cpu"],
                   help="where the recogniser runs: the training device (auto; a GPU needs "
                   "onnxruntime-gpu), or onnxruntime's CPU provider on purpose (cpu: slower, the "
                   "crops copied to the host)")
    p.add_argument("--face-threshold", type=float, default=-0.5, help="theta: candidates below "
                   "are displaced (§3)")
    p.add_argument("--n-candidates", type=count, default=12, help="C local candidates per image "
                   "with --arcface, at least --n-local (unstated anywhere: 1.5 N, so that a third "
                   "can be rejected before a slot takes a candidate again)")
    p.add_argument("--n-images", type=count, default=None, help="pretrain on this many images "
                   "drawn at random by --seed (ProS-1M-real of Tables 1-4: 1000000 of MS1M; "
                   "default: all)")
    p.add_argument("--out", default="runs/pretrain",
                   help="checkpoints and logs; an existing run resumes")
    p.add_argument("--save-every", type=at_least(0), default=0, help="also checkpoint every this "
                   "many steps (0: never)")
    p.add_argument("--save-every-min", type=nonneg, default=10.0, help="also checkpoint when the "
                   "last one is this many minutes old, so a crash loses at most that much (0: "
                   "never)")
    p.add_argument("--log-every", type=count, default=10, help="steps between log.jsonl lines and "
                   "the checks (the loop reads the device only then)")
    p.add_argument("--workers", type=at_least(0), default=8, help="DataLoader processes per "
                   "training process")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast of the networks, the loss in fp32 (default: on a GPU of "
                   "compute capability 8.0 or later, else off). Faster on a CPU with native bf16 "
                   "(AVX512-BF16, AMX), far slower on one without (python bench.py --bf16)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (data order, crops, init)")
    p.add_argument("--probe-attr", default=None, help="CelebA-layout folder on which the "
                   "teacher's frozen features are probed (probe.py) at the end; default: the toy "
                   "world's with --data toy, else none")
    p.add_argument("--probe-expr", default=None, help="RAF-DB-layout folder, the same way")
    p.add_argument("--probe-images", type=at_least(10), default=4000,
                   help="at most this many images a probe split")
    p.add_argument("--probe-every", type=at_least(0), default=0,
                   help="also probe every this many epochs (0: at the end only)")
    args = p.parse_args(argv)
    for side in ("global_size", "local_size"):
        if getattr(args, side) % args.patch_size:
            p.error(f"--{side.replace('_', '-')} {getattr(args, side)}: expected a multiple of "
                    f"--patch-size ({args.patch_size})")
    if args.arcface and args.n_candidates < args.n_local:
        p.error(f"--n-candidates {args.n_candidates}: expected at least --n-local ({args.n_local})")
    return args


# Flags that do not change what a run computes: where it writes, how it loads, logs and probes.
NOT_SETTINGS = ("out", "data_root", "workers", "log_every", "save_every", "save_every_min",
                "probe_attr", "probe_expr", "probe_images", "probe_every", "arcface_device",
                "arcface_batch")


def run_settings(args, world, n_images):
    """What a checkpoint must match to be resumed: every flag that changes the result, the number of
    processes (it sets the global batch) and the number of images in the dataset."""
    flags = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    return dict(flags, processes=world, dataset_images=n_images)


# ----------------------------------------------------------------------------- distributed

def setup_distributed():
    """(rank, world size, device). Under torchrun: NCCL on CUDA, gloo on CPU; else one process."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        tasks = int(os.environ.get("SLURM_NTASKS", 1))
        if tasks > 1 and "SLURM_PROCID" in os.environ:  # srun started copies of this script
            raise ValueError(f"SLURM_NTASKS={tasks} but no RANK: the {tasks} tasks would train "
                             f"{tasks} separate runs into one --out. Launch one torchrun per node "
                             f"(srun --ntasks-per-node 1 torchrun ...), or export RANK, "
                             f"WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT per task")
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    # a scheduler that binds one GPU per task (SLURM) shows each process a single device
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())
    if cuda:
        torch.cuda.set_device(local_rank)
    # gloo for CPU tensors (logging, object gathers), NCCL for CUDA ones
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    return dist.get_rank(), dist.get_world_size(), device


def native_bf16(device):
    """Whether `device` computes in bf16 natively: a CUDA GPU of compute capability 8.0 or later
    (Ampere on; a V100 or T4 emulates it), or a CPU with AVX512-BF16 or AMX. Elsewhere autocast
    emulates bf16, many times slower than fp32 (python bench.py --bf16 measures it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def use_bf16(flag, device):
    """--bf16 / --no-bf16 as given (with a warning where bf16 is emulated); unset: bf16 autocast on
    a GPU that computes it natively, fp32 elsewhere."""
    if flag and not native_bf16(device):
        print(f"warning: --bf16 on a {device.type} without native bf16 is emulated and far slower "
              f"than fp32 (--no-bf16)", file=sys.stderr)
    if flag is None:
        return device.type == "cuda" and native_bf16(device)
    return flag


def stop_agreed(stop, world):
    """Whether any process was asked to stop (Ctrl-C, SIGTERM): each step, one all-reduce of a
    flag in host memory (gloo: no device sync), so that every process stops after the same step,
    well within a cluster's grace period before SIGKILL."""
    if world == 1:
        return bool(stop.signum)
    flag = torch.tensor([float(stop.signum > 0)])
    dist.all_reduce(flag)
    return flag.item() > 0


def distributed(model, world, device):
    """The model DDP-wrapped where several processes train it (gradients all-reduced in the
    backward pass), else itself."""
    if world == 1:
        return model
    return DistributedDataParallel(model, device_ids=None if device.index is None
                                   else [device.index])


def all_mean(values):
    """Average numbers and 0-d tensors over processes in one all-reduce, on the tensors' device (for
    logging and the collective checks); returns floats. A logging step's one host sync."""
    device = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written
    checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StopRequest:
    """Ctrl-C (SIGINT) and a cluster's preemption (SIGTERM) set `signum`; the training loop
    finishes its step, saves and exits. A second Ctrl-C stops at once. On exit the previous
    handlers come back."""

    def __enter__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum == signal.SIGINT == signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def checkpoint_due(saved_at, args):
    """Whether the last checkpoint (written at time saved_at) is --save-every-min old."""
    return bool(args.save_every_min) and time.time() - saved_at >= 60 * args.save_every_min


def stop_exit(signum, step, path):
    """After an interruption's checkpoint: say where it is and how to resume; exit 128 + signal
    number."""
    if is_rank_zero():
        print(f"\n{signal.Signals(signum).name} at step {step}: checkpoint {path}; run the same "
              f"command again to resume", file=sys.stderr)
    raise SystemExit(128 + signum)


def gather_names(names, world):
    """Every process's list of skipped items, joined (a collective: every process calls it)."""
    if world == 1:
        return list(names)
    lists = [None] * world
    dist.all_gather_object(lists, list(names))
    return [n for names_of_one in lists for n in names_of_one]


def rewind_log(path, step):
    """A resumed run's log.jsonl keeps its rows up to the checkpoint's step, so that no step appears
    twice; a row cut short by the interruption goes too."""
    if not os.path.exists(path):
        return
    rows = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    rows.append(line.rstrip("\n"))
            except (ValueError, KeyError, TypeError):
                continue
    write_lines(path, rows)


def rng_state(device):
    """The RNG states a resumed run restores: the CPU's and, on a GPU, the GPU's (drop-path draws
    there)."""
    state = dict(rng=torch.get_rng_state())
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(ckpt, device):
    torch.set_rng_state(ckpt["rng"])
    if device.type == "cuda" and "cuda_rng" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)


def from_rank_zero(read, rank, world):
    """read() on rank 0, and its result (or its error) on every process: on a cluster without a
    shared filesystem only rank 0's disk holds the run's folder."""
    box = [None]
    if rank == 0:
        try:
            box = [(read(), None)]
        except (FileNotFoundError, ValueError) as e:
            box = [(None, e)]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        raise error
    return value


def read_if_there(path):
    """A checkpoint, or None where there is none."""
    return read_checkpoint(path) if os.path.exists(path) else None


def load_resume(ckpt, path, settings, **parts):
    """Load checkpoint `ckpt` (read from `path`) into each named module or optimizer, to resume. One
    made with other settings is a one-line error naming them, not a page of size mismatches."""
    check_settings(ckpt.get("settings"), settings, path)
    for key, part in parts.items():
        try:
            part.load_state_dict(ckpt[key])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: cannot resume its '{key}' ({type(e).__name__}): a run with "
                             f"other settings? Delete it or choose another --out") from None
    return ckpt


# ----------------------------------------------------------------------------- data

class Views(torch.utils.data.Dataset):
    """Index epoch * n + i -> transform(item i). Each sample seeds its own RNG from (seed, index),
    so its random crops do not depend on workers, ranks or resuming; with --workers 0 the seeding
    happens in a fork of the training process's RNG, so drop-path draws the same as with workers.
    An unreadable item gives its name (data.item_name), to be skipped and listed."""

    def __init__(self, images, transform, seed):
        self.images, self.transform, self.seed = images, transform, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + index)
            i = index % len(self.images)
            item = self.images[i]
            if item is None:
                return item_name(self.images, i)
            return item if self.transform is None else self.transform(item)


def collate(samples, stack=torch.utils.data.default_collate):
    """(the readable samples stacked by `stack`, or None if none is; the names of the unreadable
    ones, which Views gives in their place). Never fatal: the training loops skip, count and list
    them."""
    ok = [s for s in samples if not isinstance(s, str)]
    names = [s for s in samples if isinstance(s, str)]
    return (stack(ok) if ok else None), names


def epoch_loader(views, args, epoch, start_batch=0, *, world=1, rank=0, pin=False):
    """This process's batches of `epoch`, from batch `start_batch` on (to resume mid-epoch); pin:
    pinned host memory, for a GPU."""
    sampler = DistributedSampler(views, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = [epoch * len(views) + i for i in sampler][start_batch * args.batch_size:]
    # its own generator: creating a loader must not advance the global RNG (exact resume)
    return DataLoader(views, batch_size=args.batch_size, sampler=indices, num_workers=args.workers,
                      collate_fn=partial(collate, stack=collate_views), pin_memory=pin,
                      drop_last=True,
                      worker_init_fn=ignore_stop_signals,
                      generator=torch.Generator().manual_seed(args.seed + epoch))


# ----------------------------------------------------------------------------- model

class Encoder(nn.Module):
    """Backbone + projector: teacher and student have this same layout (DINO's keys: backbone.*,
    head.*)."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))


class ProS(nn.Module):
    """The trainable part, wrapped whole by DDP: student encoder and prototypes (inside the
    loss)."""

    def __init__(self, student, criterion):
        super().__init__()
        self.student, self.criterion = student, criterion

    def forward(self, local_views, z_teacher):
        B, N = local_views.shape[:2]
        z_student = self.student(local_views.flatten(0, 1)).view(B, N, -1)  # (B, N, d)
        return self.criterion(z_teacher, z_student)


def build_models(args):
    """(ProS student module, teacher encoder): the teacher starts as a copy of the student
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
    return ProS(student, criterion), teacher


def param_groups(model):
    """[decayed, not decayed]: MSN decays every weight matrix (position embedding and cls token
    too), not biases, norms (1-D) or the prototypes. The weight decay is set at each step."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith("prototypes") else decay).append(p)
    return [dict(params=decay), dict(params=no_decay, weight_decay=0.0)]


def to_device(batch, device):
    """The batch's tensors, nested dicts too, on `device` (from pinned memory: asynchronously)."""
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True)
            for k, v in batch.items()}


def retrieve(global_crops, local_crops, batch, arcface, args):
    """Face-aware retrieval for a batch, on the raw crops (before any augmentation, §3): one
    recogniser call for the global crops (B, M, ...) and one for the candidates (B, C, ...), where
    they are (the GPU when there is one), then the rule with the batch's drawn numbers. Returns the
    indices (B, N) of the kept candidates and the selection counts (retrieval.SELECTION), on the
    crops' device."""
    device = global_crops.device
    g, l = (arcface.embed(c.flatten(0, 1)).to(device).view(*c.shape[:2], -1)
            for c in (global_crops, local_crops))  # (B, M, D), (B, C, D)
    sim = similarity(g, l)  # (B, C)
    keep = select(sim, args.n_local, args.face_threshold, batch["priority"], batch["reuse"])
    return keep, selection_counts(sim, args.n_local, args.face_threshold)


def training_step(model, teacher, optimizer, global_views, local_views, *, at, clip_grad, bf16):
    """One ProS step: teacher on the global views, student on the local views, Eq. 2, AdamW, EMA.

    global_views (B, M, 3, G, G), local_views (B, N, 3, L, L) on the model's device; at: this step's
    lr, weight_decay and momentum (schedules(); a test may give fixed ones); bf16: autocast the
    networks. Returns the loss stats, 0-d tensors on the device.
    """
    device = global_views.device
    for g in optimizer.param_groups:
        g["lr"] = at["lr"]
    # the decayed group (param_groups)
    optimizer.param_groups[0]["weight_decay"] = at["weight_decay"]
    B, M = global_views.shape[:2]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            z_teacher = teacher(global_views.flatten(0, 1)).view(B, M, -1)  # (B, M, d)
        loss, stats = model(local_views, z_teacher)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    student = model.module.student if isinstance(model, DistributedDataParallel) else model.student
    # MSN: encoder only
    stats["grad_norm"] = nn.utils.clip_grad_norm_(student.parameters(), clip_grad)
    optimizer.step()
    ema_update(teacher, student, at["momentum"])
    return stats


def schedules(args, total_steps, steps_per_epoch, scale):
    """step -> {lr, weight_decay, momentum}: pure functions of the step, so a resumed run follows
    the same curves. lr: linear warmup then cosine to --min-lr (§3.3), scaled by global batch /
    256; weight decay and EMA momentum as MSN's code (over 1.25x the run) or DINO's."""
    warmup = int(args.warmup_epochs * steps_per_epoch)
    wd, m = (args.weight_decay, args.final_weight_decay), args.momentum_teacher

    def at(step):
        lr = cosine_schedule(step, total_steps, args.lr * scale, args.min_lr, warmup,
                             args.warmup_lr * scale)
        if args.schedules == "dino":  # main_dino.py: both cosine over the run
            return dict(lr=lr, weight_decay=cosine_schedule(step, total_steps, *wd),
                        momentum=cosine_schedule(step, total_steps, m, 1.0))
        return dict(lr=lr, weight_decay=weight_decay_schedule(step, total_steps, *wd),
                    momentum=momentum_schedule(step, total_steps, m))
    return at


# ----------------------------------------------------------------------------- collapse

COLLAPSED_SHARE = 0.25  # under a quarter of the prototypes a batch's global views could reach


def collapse_state(row, args):
    """(share, 'collapsed' or 'healthy'): the share of the prototypes the teacher's predictions
    reach in a batch, of the most they could (min(K, the process's global views)). A collapsed
    teacher sends nearly every image to a handful of prototypes, and its targets teach the student
    nothing."""
    share = row["prototypes_used"] / min(args.n_prototypes, args.batch_size * args.n_global)
    return share, "collapsed" if share < COLLAPSED_SHARE else "healthy"


def summary(row, args, judge=None, probed=None):
    """The end-of-run lines: the prototype statistics, the probe beside its references, and the
    verdict: COLLAPSED, NOT LEARNED (the probe within noise of random init), LEARNED, or not judged
    (no probe sets). Spread prototypes alone prove nothing: Sinkhorn spreads a random init's."""
    if row is None:
        return "no logged step"
    share, state = collapse_state(row, args)
    text = (f"teacher predictions on {row['prototypes_used']:.0f} prototypes a batch ({share:.0%} "
            f"of those reachable), teacher entropy {row['teacher_entropy']:.2f}, student entropy "
            f"{row['student_entropy']:.2f} of ln K = {math.log(args.n_prototypes):.2f}")
    if probed is not None:
        text += f"\nprobe, teacher / random init / raw pixels: {judge.compare(probed)}"
    if state == "collapsed":
        text += "\nverdict: COLLAPSED: the teacher assigns nearly every image to a few prototypes"
        if not (args.sinkhorn and args.projector_bn):
            text += " (--sinkhorn and --projector-bn, the defaults, keep them spread)"
    elif probed is None:
        text += ("\nverdict: not judged: no probe sets (--probe-attr, --probe-expr) to tell "
                 "learning from a random init")
    else:
        learned, words = verdict(probed)
        text += (f"\nverdict: LEARNED: {words}" if learned == "learned" else
                 f"\nverdict: NOT LEARNED: the teacher is within noise of its random init; {words}")
    return text


def make_judge(args, device):
    """The probe of the teacher (probe.py) on the sets --probe-attr/--probe-expr name (the toy
    world's with --data toy), or None where there are none."""
    if args.probe_attr or args.probe_expr:
        sets = probe_sets(args.probe_attr, args.probe_expr, args.global_size, args.probe_images)
    elif args.data == "toy":
        sets = toy_sets(data_root(args.data_root), args.global_size, args.probe_images)
    else:
        return None
    return Judge(sets, random_backbone(args.arch, args.seed, patch_size=args.patch_size), device)


def probe_row(judge, teacher, step, steps_per_epoch, log):
    """Probe the teacher's backbone; its scores go to log.jsonl as a row of their own."""
    scores = judge(teacher.backbone)
    log.write(json.dumps(dict(step=step, epoch=step / steps_per_epoch, **scores)) + "\n")
    log.flush()
    return scores


def last_row(path):
    """The last training row of a log.jsonl, or None."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if '"loss"' in line]
    return rows[-1] if rows else None


# ----------------------------------------------------------------------------- main

def main(args):
    """Pretrain with Ctrl-C and SIGTERM handled from the start (see StopRequest); the process
    group is left on every exit, an error's and a stop's too."""
    try:
        with StopRequest() as stop:
            train(args, stop)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, stop):
    # before the process group: generating it takes longer than a collective waits
    if args.data == "toy":
        toyfaces.ensure_world(data_root(args.data_root))
    rank, world, device = setup_distributed()
    args.bf16 = use_bf16(args.bf16, device)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    images = pretrain_dataset(args.data, args.data_root)
    settings = run_settings(args, world, len(images))
    if args.n_images is not None:
        images = random_subset(images, args.n_images, args.seed)
    arcface = None
    if args.arcface:
        on_cpu = args.arcface_device == "cpu"
        arcface = ArcFace(args.arcface, normalize=not args.arcface_raw_input,
                          providers=["CPUExecutionProvider"] if on_cpu else None,
                          max_batch=args.arcface_batch)
        arcface.session  # a broken model file fails here, before any training
        if on_cpu and device.type == "cuda" and rank == 0:
            print("warning: --arcface-device cpu: the recogniser runs on the CPU, each step's "
                  "crops copied to the host (pip install onnxruntime-gpu runs it on the GPU)",
                  file=sys.stderr)
    elif rank == 0:
        print("no --arcface: local crops are uncurated (no face-aware retrieval)")
    multicrop = MultiCrop(args.global_size, args.local_size, args.n_global, args.n_local,
                          args.n_candidates if arcface else None)
    views = Views(images, multicrop, args.seed)

    model, teacher = build_models(args)
    model.to(device)
    teacher.to(device)
    ddp = distributed(model, world, device)
    optimizer = torch.optim.AdamW(param_groups(model), fused=device.type == "cuda")
    judge = make_judge(args, device) if rank == 0 else None

    global_batch = args.batch_size * world
    steps_per_epoch = len(images) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"dataset {args.data}: {len(images)} images, fewer than one global batch "
                         f"of {global_batch}")
    total_steps = args.epochs * steps_per_epoch
    scale = global_batch / 256  # linear scaling rule: the paper's rates are for 64 x 4 = 256 images
    at = schedules(args, total_steps, steps_per_epoch, scale)

    ckpt_path = os.path.join(args.out, "checkpoint.pth")
    log_path = os.path.join(args.out, "log.jsonl")
    skipped_path = os.path.join(args.out, "skipped.txt")
    step, skipped = 0, set()  # skipped: the unreadable images or records, each once
    ckpt = from_rank_zero(lambda: read_if_there(ckpt_path), rank, world)
    # every process loads rank 0's checkpoint: teacher and student alike everywhere
    if ckpt is not None:
        load_resume(ckpt, ckpt_path, settings, student=model, teacher=teacher, optimizer=optimizer)
        step, skipped = ckpt["step"], set(ckpt["skipped"])
        restore_rng(ckpt, device)
        if rank == 0:
            print(f"resuming {ckpt_path} at step {step} of {total_steps}" if step < total_steps else
                  f"{args.out} holds this run, complete ({step} steps): nothing to train; delete "
                  f"it or choose another --out to train again")

    if rank == 0:
        rewind_log(log_path, step)

    def save():
        if rank == 0:
            save_atomic(dict(student=model.state_dict(), teacher=teacher.state_dict(),
                             optimizer=optimizer.state_dict(), step=step, skipped=sorted(skipped),
                             args=vars(args), settings=settings, **rng_state(device)), ckpt_path)
            save_atomic(teacher.backbone.state_dict(),
                        os.path.join(args.out, "teacher_backbone.pth"))
            if skipped:
                write_lines(skipped_path, sorted(skipped))

    if rank == 0 and step < total_steps:
        print(f"{len(images)} images, global batch {global_batch} ({world} x {args.batch_size}), "
              f"{steps_per_epoch} steps/epoch, {total_steps} steps, peak lr {args.lr * scale:.2e}")
        if args.warmup_epochs >= args.epochs / 2:
            part = "the whole" if args.warmup_epochs >= args.epochs else "most of the"
            print(f"warning: --warmup-epochs {args.warmup_epochs:g} of --epochs {args.epochs}: "
                  f"{part} run is warmup (the paper warms up 2 of 20 epochs)", file=sys.stderr)
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="pretrain",
               dynamic_ncols=True)
    log = open(log_path, "a") if rank == 0 else None
    tick, tick_step, saved_at = time.time(), step, time.time()
    pending_skipped = []  # this process's unreadable items since the last logging step
    selection = torch.zeros(len(SELECTION), device=device)  # the retrieval's counts (SELECTION)
    while step < total_steps:
        epoch = step // steps_per_epoch
        loader = epoch_loader(views, args, epoch, step % steps_per_epoch, world=world, rank=rank,
                              pin=device.type == "cuda")
        for batch, names in loader:
            if batch is None:
                raise ValueError(f"{args.data}: all {len(names)} images of a batch were "
                                 f"unreadable, e.g. {names[0]}")
            batch = to_device(batch, device)
            # crop, retrieve, augment (§3), here on the device
            global_crops, local_crops = multicrop.crops(batch)
            local_params = batch["local_params"]
            if arcface is not None:  # else C == N: all are kept
                keep, counts = retrieve(global_crops, local_crops, batch, arcface, args)
                selection += counts
                local_crops, local_params = take(local_crops, local_params, keep,
                                                 batch["spare_params"])
            now = at(step)
            global_views = batch_views(global_crops, batch["global_params"])
            local_views = batch_views(local_crops, local_params)
            stats = training_step(ddp, teacher, optimizer, global_views, local_views, at=now,
                                  clip_grad=args.clip_grad, bf16=args.bf16)
            step += 1
            bar.update(1)
            pending_skipped += names
            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            by_steps = args.save_every and step % args.save_every == 0
            stopping = stop_agreed(stop, world)
            if not (step % args.log_every == 0 or epoch_end or by_steps or stopping):
                continue  # no device sync between logging steps
            # a logging step, the same on every process: one all-reduce for the log and the checks
            keys = ["loss", "cross_entropy", "mean_entropy", "teacher_entropy", "student_entropy",
                    "prototypes_used", "grad_norm"]
            *means, n_skipped = all_mean([stats[k] for k in keys] + list(selection)
                                         + [len(pending_skipped)])
            stats = dict(zip(keys, means[:len(keys)]))
            # the retrieval's counts over every process since the last logging step
            counts = {k: round(m * world) for k, m in zip(SELECTION, means[len(keys):])}
            selection.zero_()
            if n_skipped:  # the same on every process: all join the gather
                skipped.update(gather_names(pending_skipped, world))
            pending_skipped = []
            if not math.isfinite(stats["loss"]):
                raise FloatingPointError(f"non-finite loss at step {step}; the last good "
                                         f"checkpoint is {ckpt_path}")
            if rank == 0:
                rate = (step - tick_step) * global_batch / (time.time() - tick)
                reject = counts["rejected"] / max(counts["candidates"], 1)
                share, state = collapse_state(stats, args)
                row = dict(step=step, epoch=step / steps_per_epoch, **now,
                           images_per_s=rate, reject_rate=reject,
                           all_rejected=counts["fallbacks"], skipped=len(skipped), **stats,
                           prototype_share=share, state=state)
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{stats['loss']:.3f}", ce=f"{stats['cross_entropy']:.3f}",
                                H=f"{stats['mean_entropy']:.2f}", protos=f"{share:.0%}",
                                lr=f"{now['lr']:.1e}",
                                img_s=f"{rate:.0f}",
                                **({"reject": f"{reject:.0%}"} if arcface else {}),
                                **({"state": "COLLAPSED"} if state == "collapsed" else {}))
                tick, tick_step = time.time(), step
            if epoch_end or by_steps or checkpoint_due(saved_at, args) or stopping:
                save()
                saved_at = time.time()
            every = args.probe_every * steps_per_epoch
            if judge and every and step % every == 0 and step < total_steps:
                probe_row(judge, teacher, step, steps_per_epoch, log)
            if stopping:
                bar.close()
                stop_exit(stop.signum or signal.SIGTERM, step, ckpt_path)
            if step >= total_steps:
                break
    bar.close()
    if rank == 0:
        probed = judge and probe_row(judge, teacher, step, steps_per_epoch, log)
        print(f"done: {total_steps} steps; teacher backbone in "
              f"{os.path.join(args.out, 'teacher_backbone.pth')}"
              + (f"; {len(skipped)} unreadable images skipped, listed in {skipped_path}"
                 if skipped else "")
              + f"\nat the end: {summary(last_row(log_path), args, judge, probed)}")


if __name__ == "__main__":
    run_cli(lambda: main(get_args()))
