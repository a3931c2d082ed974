"""The fine-tuning recipe shared by the three downstream tasks (paper §4.1); the task scripts run
it.

    python finetune_attr.py --init runs/pretrain/teacher_backbone.pth --frac 0.01

What every task shares (and only that): the backbone from --init (random, ours, DINO, DeiT/timm,
MAE, MSN: Table 1's baselines), end-to-end training with layer-wise lr decay or --head-only (frozen
backbone), AdamW with per-iteration warmup + cosine, few-shot subsets (--frac), repeated runs
(--runs: mean and std over seeds; §4.3 averages five), batched evaluation on the test split,
results.json, DDP under torchrun, bf16 autocast (--bf16), checkpoint + resume (run.py).
A task script hands over a `Task`: its data, network, loss, predictions, metrics and recipe, as
plain functions and values; `train_one` is the loop, read top to bottom.

Each run's checkpoint and result.json record the settings that made them: a run is resumed or its
result reused only under the same settings (the console says so), and refused under others. Ctrl-C
or SIGTERM finishes the step on every process (they agree each step), saves and exits; a checkpoint
is also written every --save-every-min minutes.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms import v2
from tqdm import tqdm

from crops import IMAGENET_MEAN, IMAGENET_STD, eval_crop, normalize
from data import Views, collate, data_root, load_image, readable
from loss import cosine_schedule, ema_update
from run import (ArgumentParser, Run, above, add_run_args, at_least, check_settings, distributed,
                 fraction, ignore_stop_signals, patch_multiple, probability, read_everywhere,
                 read_json, run_cli, settings, setup_distributed, training, use_bf16, write_lines)
from vit import ARCHS, load_pretrained, no_weight_decay

BICUBIC = v2.InterpolationMode.BICUBIC


def add_common_args(p, datasets, defaults, notes=None):
    """The flags every task script has. `defaults` holds the task's lr, weight_decay, layer_decay,
    epochs, batch_size, warmup_epochs and drop_path (a value None is set per dataset by the task);
    `notes` give those flags' help, naming each default's source."""
    notes = notes or {}
    count, nonneg = at_least(1), at_least(0.0, float)
    p.add_argument("--dataset", default=datasets[0], choices=datasets,
                   help="the benchmark; toy: the toy world's layout of it (toyfaces.py)")
    p.add_argument("--data", default=None, help="dataset folder (default: <data root>/<dataset>)")
    p.add_argument("--init", default="random", help="'random' or a checkpoint: ours "
                   "(teacher_backbone.pth or checkpoint.pth), DINO, DeiT/timm, MAE, MSN")
    p.add_argument("--arch", default="vit_small", choices=ARCHS,
                   help="backbone (§4.1: vit_small; MAE: vit_base)")
    p.add_argument("--patch-size", type=count, default=None, help="ViT patch side (default: 16, "
                   "§3.2; with an --init checkpoint, the checkpoint's, and another is an error)")
    subset = p.add_mutually_exclusive_group()
    subset.add_argument("--frac", type=fraction, default=1.0,
                        help="few-shot: keep floor(frac * n_train) training images (Tables 2-4)")
    subset.add_argument("--n-train", type=count, default=None, help="few-shot: keep exactly this "
                        "many (the authors' --num_samples: 3255 1627 843 325 on CelebA)")
    p.add_argument("--runs", type=count, default=5, help="repeat with seeds seed..seed+runs-1, "
                   "report mean and std (§4.3: the average of five runs)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (data order, crops, init)")
    p.add_argument("--head-only", action="store_true",
                   help="freeze the backbone, train the head (§4.1's head-only fine-tuning)")
    p.add_argument("--epochs", type=count, default=defaults["epochs"], help=notes["epochs"])
    p.add_argument("--batch-size", type=count, default=defaults["batch_size"],
                   help=notes["batch_size"] + "; global, split over processes; a training "
                   "subset smaller than it is one batch, its lr still scaled by this (MAE)")
    p.add_argument("--lr", type=above(0.0), default=defaults["lr"], help=notes["lr"])
    p.add_argument("--min-lr", type=nonneg, default=0.0,
                   help="the lr decays to this (§4.1: to zero)")
    p.add_argument("--weight-decay", type=nonneg, default=defaults["weight_decay"],
                   help=notes["weight_decay"]
                   + "; none on biases, norms, pos_embed, cls_token (MAE)")
    p.add_argument("--layer-decay", type=fraction, default=defaults["layer_decay"],
                   help=notes["layer_decay"] + "; block i of L gets lr * layer_decay^(L+1-i)")
    p.add_argument("--warmup-epochs", type=nonneg, default=defaults["warmup_epochs"],
                   help=notes["warmup_epochs"])
    p.add_argument("--drop-path", type=nonneg, default=defaults["drop_path"],
                   help="stochastic depth: " + notes["drop_path"])
    p.add_argument("--img-size", type=patch_multiple, default=224,
                   help="input side (§4.3: 224)")
    p.add_argument("--eval-every", type=at_least(0), default=0,
                   help="also evaluate every this many epochs (0: at the end)")
    g = add_run_args(p, workers=4)
    g.add_argument("--out", default=None, help="results.json and checkpoints (default: "
                   "runs/<dataset>/<task>-<init>-<frac or nN>, e.g. runs/toy/attr-random-0.1)")


def set_dataset_defaults(args, recipes):
    """Fill the flags left None with the dataset's value from the task's `recipes`
    ({dataset: {flag: value}}); an explicit flag wins."""
    for key, value in recipes[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ----------------------------------------------------------------------------- data

class LabelledImages(torch.utils.data.Dataset):
    """(path, target) items -> transform(image, target); an unreadable image gives None (skipped).

    An item may carry a face box (path, target, (x0, y0, x1, y1)): the image is cropped to it when
    the box lies inside the image (a full photo); an image smaller than its box is taken to be a
    face crop already and used whole.
    """

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, target, *box = self.items[i]
        img = load_image(path)
        if img is None:
            return None
        if box and box[0] is not None:
            x0, y0, x1, y1 = box[0]
            inside = 0 <= x0 and 0 <= y0 and x1 <= img.width and y1 <= img.height
            if inside and (x1 - x0 < img.width or y1 - y0 < img.height):
                img = img.crop((x0, y0, x1, y1))
        return self.transform(img, target)

    def name(self, i):
        """How a skipped image is listed: its path."""
        return self.items[i][0]


def add_augmentation_args(p):
    """The training augmentation's flags (attributes and expressions), as MAE's --scale, --aa and
    --reprob."""
    p.add_argument("--min-crop", type=fraction, default=0.08, help="random resized crops keep "
                   "this share of the image at least (timm's default, which the authors ran)")
    p.add_argument("--randaug", action=argparse.BooleanOptionalAction, default=True,
                   help="timm's RandAugment rand-m9-mstd0.5-inc1 (the authors' scripts, through "
                   "MAE's create_transform)")
    p.add_argument("--erasing", type=probability, default=0.25,
                   help="random erasing probability (authors' scripts)")


# timm's RandAugment as rand-m9-mstd0.5-inc1 configures it (auto_augment.py): 2 ops drawn with
# replacement from these 15, each applied with probability 0.5 at a magnitude m ~ N(9, 0.5) clipped
# to [0, 10]; the 'increasing' variants grow stronger with m. Each op: (PIL image, level m / 10).
# Geometric ops resample bicubic and fill with the mean pixel, as create_transform sets them.

FILL = tuple(round(255 * c) for c in IMAGENET_MEAN)  # (124, 116, 104)
SOLARIZE_ADD = [[min(255, i + add) if i < 128 else i for i in range(256)] * 3
                for add in range(111)]  # a lookup table per added level, 0..110
POSTERIZE = [[i & (0xFF00 >> bits) & 0xFF for i in range(256)] * 3
             for bits in range(9)]  # keep the top `bits` bits; 0: black (m = 10)


def signed(v):
    """v or -v, at random (timm's _randomly_negate)."""
    return -v if torch.rand(()) > 0.5 else v


def enhance(level):
    return max(0.1, 1 + signed(0.9 * level))


def affine(img, *matrix):
    return img.transform(img.size, Image.AFFINE, matrix, Image.BICUBIC, fillcolor=FILL)


RAND_OPS = {
    "AutoContrast": lambda img, level: ImageOps.autocontrast(img),
    "Equalize": lambda img, level: ImageOps.equalize(img),
    "Invert": lambda img, level: ImageOps.invert(img),
    "Rotate": lambda img, level: img.rotate(signed(30 * level), Image.BICUBIC, fillcolor=FILL),
    "PosterizeIncreasing": lambda img, level: img.point(POSTERIZE[4 - int(4 * level)]),
    "SolarizeIncreasing": lambda img, level: ImageOps.solarize(img, 256 - int(256 * level)),
    "SolarizeAdd": lambda img, level: img.point(SOLARIZE_ADD[int(110 * level)]),
    "ColorIncreasing": lambda img, level: ImageEnhance.Color(img).enhance(enhance(level)),
    "ContrastIncreasing": lambda img, level: ImageEnhance.Contrast(img).enhance(enhance(level)),
    "BrightnessIncreasing": lambda img, level: ImageEnhance.Brightness(img).enhance(
        enhance(level)),
    "SharpnessIncreasing": lambda img, level: ImageEnhance.Sharpness(img).enhance(
        enhance(level)),
    "ShearX": lambda img, level: affine(img, 1, signed(0.3 * level), 0, 0, 1, 0),
    "ShearY": lambda img, level: affine(img, 1, 0, 0, signed(0.3 * level), 1, 0),
    "TranslateXRel": lambda img, level: affine(img, 1, 0, signed(0.45 * level) * img.width, 0,
                                               1, 0),
    "TranslateYRel": lambda img, level: affine(img, 1, 0, 0, 0, 1,
                                               signed(0.45 * level) * img.height),
}


def rand_augment(img, n_ops=2, magnitude=9, std=0.5):
    """timm's RandAugment rand-m9-mstd0.5-inc1 on an RGB PIL image."""
    ops = list(RAND_OPS.values())
    for k in torch.randint(len(ops), (n_ops,)).tolist():
        if torch.rand(()) < 0.5:
            m = min(max(magnitude + std * torch.randn(()).item(), 0.0), 10.0)
            img = ops[k](img, m / 10)
    return img


def train_transform(args):
    """The authors' training augmentation for attributes and expressions (MAE's fine-tuning, through
    timm's create_transform): random resized crop (bicubic), horizontal flip, RandAugment
    (rand_augment), random erasing. uint8 out: images are normalised on the device, a batch at
    once."""
    t = v2.Compose([v2.PILToTensor(),
                    v2.RandomResizedCrop(args.img_size, scale=(args.min_crop, 1.0),
                                         interpolation=BICUBIC, antialias=True),
                    v2.RandomHorizontalFlip()]
                   + ([v2.ToPILImage(), rand_augment, v2.PILToTensor()] if args.randaug else []))
    erasing = args.erasing
    return lambda img, target: (random_erasing(t(img), erasing), target)


def eval_transform(img_size):
    """MAE's evaluation view (crops.eval_crop) as an (image, target) transform."""
    t = eval_crop(img_size)
    return lambda img, target: (t(img), target)


def random_erasing(img, p, attempts=10):
    """timm's RandomErasing (mode 'pixel', one box) on a uint8 image (3, H, W): with probability p,
    a box of 2% to 1/3 of the image, aspect ratio log-uniform in [0.3, 1/0.3], filled with per-pixel
    noise. timm draws N(0, 1) after normalisation; here mean + std * N(0, 1) in pixel values."""
    if torch.rand(()) >= p:
        return img
    _, H, W = img.shape
    for _ in range(attempts):
        area = H * W * torch.empty(()).uniform_(0.02, 1 / 3).item()
        ratio = math.exp(torch.empty(()).uniform_(math.log(0.3), math.log(1 / 0.3)).item())
        h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if h < H and w < W:
            top = torch.randint(0, H - h + 1, ()).item()
            left = torch.randint(0, W - w + 1, ()).item()
            mean, std = torch.tensor(IMAGENET_MEAN)[:, None,
                                                    None], torch.tensor(IMAGENET_STD)[:, None, None]
            noise = ((mean + std * torch.randn(3, h, w)) * 255).round().clamp(0, 255)
            return v2.functional.erase(img, top, left, h, w, noise.to(torch.uint8))
    return img


def few_shot_indices(n_train, frac, seed, count=None):
    """A random subset of the training indices, chosen by `seed`: exactly `count` of them, or
    floor(frac * n_train)."""
    k = count if count is not None else int(math.floor(frac * n_train + 1e-9))
    if not 0 < k <= n_train:
        what = f"--n-train {count}" if count is not None else f"--frac {frac}"
        raise ValueError(f"{what} of {n_train} training images keeps {k}: need 1..{n_train}")
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_train, generator=g)[:k].tolist())


class EpochSampler(torch.utils.data.Sampler):
    """epoch_indices() as a sampler, so one DataLoader (and its workers) serves every epoch:
    set_epoch(e, start) starts epoch e at its sample `start` (a resumed run). It yields epoch * n +
    i for item i, the index that data.Views seeds each sample's augmentation from."""

    def __init__(self, n, count, seed, rank, world, weights=None):
        self.n, self.count, self.seed, self.rank, self.world = n, count, seed, rank, world
        self.weights = weights
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        order = epoch_indices(self.n, self.epoch, self.seed, self.rank, self.world, self.weights)
        return iter([self.epoch * self.n + i for i in order[self.start:self.count]])

    def __len__(self):
        return self.count - self.start


def epoch_indices(n, epoch, seed, rank, world, weights=None):
    """This process's sample order for an epoch: a permutation, or with `weights` n draws with
    replacement (class-balanced sampling). The same on every process, then sharded rank::world."""
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    order = torch.multinomial(weights, n, replacement=True, generator=g) if weights is not None \
        else torch.randperm(n, generator=g)
    return order[rank::world].tolist()


# ----------------------------------------------------------------------------- a task

@dataclass
class Task:
    """What a task script hands the shared recipe: its data, its network, plain functions and
    values. model: backbone -> network; loss: (outputs, targets) -> scalar; predict: outputs ->
    what metrics reads; metrics: (predictions, targets) -> {name: number}; main_metric: a key of
    the flattened metrics (e.g. 'test/mean_accuracy'), which picks the best epoch; shown: the keys
    printed; mix: a batch transform (images, labels) -> (images, soft labels) (mixup, cutmix);
    schedule: total steps -> (step -> lr), else warmup and cosine (lr_schedule); backbone_lr: the
    backbone's lr relative to the head's; ema_decay: evaluate an EMA copy (0: the network)."""
    name: str
    train: torch.utils.data.Dataset
    tests: dict
    model: Callable
    loss: Callable
    metrics: Callable
    main_metric: str
    shown: list
    higher_is_better: bool = True
    predict: Callable = None
    mix: Callable = None
    schedule: Callable = None
    backbone_lr: float = 1.0
    ema_decay: float = 0.0


# ----------------------------------------------------------------------------- model and optimiser

def build_backbone(args):
    backbone = ARCHS[args.arch](patch_size=args.patch_size or 16,
                                drop_path_rate=0.0 if args.head_only else args.drop_path)
    if args.init != "random":
        load_pretrained(backbone, args.init)  # takes the checkpoint's patch size
        if args.patch_size not in (None, backbone.patch_size):
            raise ValueError(f"--patch-size {args.patch_size}: {args.init} holds a ViT with "
                             f"{backbone.patch_size} px patches")
    return backbone


def build_model(task, args, proc):
    """(the task's network on the device, its EMA copy or None): the backbone from --init, frozen
    with --head-only; BatchNorm synchronised over GPUs (the landmark head, as mmseg)."""
    model = task.model(build_backbone(args))
    if args.head_only:
        model.backbone.requires_grad_(False)
    if proc.world > 1 and proc.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(proc.device)
    ema = copy.deepcopy(model).requires_grad_(False) if task.ema_decay else None
    return model, ema


def param_groups_layer_decay(model, weight_decay, layer_decay, backbone_lr_scale=1.0):
    """AdamW groups with an `lr_scale`: the embeddings (patch_embed, cls_token, pos_embed) are
    layer 0, block i (1-based) layer i, everything after the blocks (final norm, head) layer L+1;
    layer j gets layer_decay ** (L + 1 - j), and every backbone parameter also backbone_lr_scale.
    No weight decay on biases, norms, pos_embed, cls_token. `model` has the ViT as
    `model.backbone`."""
    n_layers = len(model.backbone.blocks)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(("backbone.patch_embed", "backbone.cls_token", "backbone.pos_embed")):
            layer = 0
        elif name.startswith("backbone.blocks."):
            layer = int(name.split(".")[2]) + 1
        else:
            layer = n_layers + 1
        decay = 0.0 if no_weight_decay(name, p) else weight_decay
        scale = layer_decay ** (n_layers + 1 - layer)
        if name.startswith("backbone."):
            scale *= backbone_lr_scale
        group = groups.setdefault((scale, decay),
                                  dict(params=[], weight_decay=decay, lr_scale=scale))
        group["params"].append(p)
    return list(groups.values())


def lr_schedule(args, total, steps_per_epoch):
    """step -> lr: warmup then cosine to --min-lr; --lr is for a global batch of 256 and scales
    with the nominal one, --batch-size (the linear scaling rule of the authors' MAE scripts), also
    for a subset smaller than it."""
    peak = args.lr * args.batch_size / 256
    warmup = int(args.warmup_epochs * steps_per_epoch)
    return lambda step: cosine_schedule(step, total, peak, args.min_lr, warmup)


def ema_with_buffers(ema, model, decay):
    """The evaluated EMA copy (FaRL): parameters averaged, buffers (BatchNorm statistics) copied."""
    ema_update(ema, model, decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


# ----------------------------------------------------------------------------- train and evaluate

def batch_sizes(args, n_subset, world):
    """(images per process, steps per epoch): a subset smaller than --batch-size is one batch."""
    per_process = min(args.batch_size, n_subset) // world
    if per_process == 0:
        raise ValueError(f"--batch-size {args.batch_size} over {n_subset} training images and "
                         f"{world} processes leaves no image per process")
    return per_process, n_subset // world // per_process


def train_loader(task, subset, args, per_process, seed, proc):
    """(sampler, loader) of the training subset, for every epoch: an epoch's full batches of
    `per_process` images a process, class-balanced where the train set has `weights`."""
    weights = getattr(task.train, "weights", None)
    count = batch_sizes(args, len(subset), proc.world)[1] * per_process
    sampler = EpochSampler(len(subset), count, seed, proc.rank, proc.world,
                           None if weights is None else weights[subset])
    # its own generator: creating the loader's iterator must not advance the global RNG
    loader = DataLoader(Views(torch.utils.data.Subset(task.train, subset), None, seed),
                        batch_size=per_process, sampler=sampler, num_workers=args.workers,
                        collate_fn=collate, pin_memory=proc.device.type == "cuda",
                        persistent_workers=args.workers > 0, worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator().manual_seed(seed))
    return sampler, loader


def train_step(task, model, optimizer, batch, bf16):
    """One step on a batch: the images normalised on the device, mixed (mixup, cutmix), the task's
    loss, AdamW. Returns the loss, a 0-d tensor on the device."""
    images, targets = batch
    device = next(model.parameters()).device
    images = normalize(images.to(device, non_blocking=True))
    targets = targets.to(device, non_blocking=True)
    if task.mix is not None:
        images, targets = task.mix(images, targets)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = task.loss(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_one(task, args, run, seed):
    """One run (seed): the few-shot subset, the network, the epochs (an evaluation where due) and
    the result; an interrupted run resumes where its checkpoint is."""
    subset = few_shot_indices(len(task.train), args.frac, seed, args.n_train)
    torch.manual_seed(seed)
    model, ema = build_model(task, args, run)
    ddp = distributed(model, run.world, run.device)
    groups = param_groups_layer_decay(model, args.weight_decay, args.layer_decay, task.backbone_lr)
    optimizer = torch.optim.AdamW(groups, fused=True)  # fused: no host sync, CPU or GPU
    per_process, steps_per_epoch = batch_sizes(args, len(subset), run.world)
    total = args.epochs * steps_per_epoch
    lr_at = task.schedule(total) if task.schedule else lr_schedule(args, total, steps_per_epoch)
    parts = dict(model=model, optimizer=optimizer, **({} if ema is None else {"ema": ema}))
    ckpt = run.resume(**parts)
    start, first, history = ckpt.get("epoch", 0), ckpt.get("batch", 0), ckpt.get("history", [])
    if ckpt and run.rank == 0:
        print(f"resuming {run.ckpt_path} at epoch {start}, batch {first}")
    sampler, loader = train_loader(task, subset, args, per_process, seed, run)
    run.progress(total, start * steps_per_epoch + first, f"run {seed - args.seed}")
    for epoch in range(start, args.epochs):
        model.train()
        if args.head_only:
            model.backbone.eval()
        sampler.set_epoch(epoch, first * per_process)
        for i, (batch, names) in enumerate(readable(loader, args.data, "a training batch"), first):
            step = epoch * steps_per_epoch + i
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step) * g["lr_scale"]
            loss = train_step(task, ddp, optimizer, batch, args.bf16)
            if ema is not None:
                ema_with_buffers(ema, model, task.ema_decay)
            mid_epoch = i + 1 < steps_per_epoch  # at an epoch's end, its evaluation comes first
            if not run.step_done(names, not mid_epoch or (step + 1) % args.log_every == 0):
                continue  # no device sync between logging steps
            loss = run.sync(dict(loss=loss), f"epoch {epoch} step {i}")["loss"]
            run.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_at(step):.1e}")
            if mid_epoch and (run.stopping or run.save_due(args.save_every_min)):
                run.save(parts, epoch=epoch, batch=i + 1, history=history)
                run.exit_if_stopping(step + 1)
        first, last = 0, epoch + 1 == args.epochs
        if run.rank == 0 and (last or (args.eval_every and (epoch + 1) % args.eval_every == 0)):
            history.append(evaluate_all(task, ema or model, args, run, epoch + 1))
        if last or run.stopping or run.save_due(args.save_every_min):
            run.save(parts, epoch=epoch + 1, batch=0, history=history)
        if not last:
            run.exit_if_stopping((epoch + 1) * steps_per_epoch)
        if dist.is_initialized():
            dist.barrier()
    run.bar.close()
    return run_result(task, run, history, seed, len(subset))


@torch.no_grad()
def evaluate(task, model, dataset, args):
    """Batched predictions over a test set -> (the task's metrics, the names of unreadable
    images)."""
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(Views(dataset, None, 0), batch_size=max(1, args.batch_size),
                        num_workers=args.workers, collate_fn=collate,
                        worker_init_fn=ignore_stop_signals)
    preds, targets, skipped = [], [], []
    for batch, names in tqdm(loader, desc="eval", leave=False):
        skipped += names
        if batch is None:
            continue
        images, target = batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            out = model(normalize(images.to(device))).float()
        preds.append((task.predict(out) if task.predict else out).cpu())
        targets.append(target)
    if not preds:
        raise ValueError(f"{args.data}: none of the {len(dataset)} test images was readable")
    metrics = task.metrics(torch.cat(preds), torch.cat(targets))
    if skipped:
        metrics["unreadable_images"] = len(skipped)
    return metrics, skipped


def evaluate_all(task, model, args, run, epoch):
    """The history's row of `epoch`: every test set's metrics (rank 0), printed; the unreadable
    images join the run's list."""
    metrics = {}
    for name, dataset in task.tests.items():
        metrics[name], bad = evaluate(task, model, dataset, args)
        run.skipped.update(bad)
    tqdm.write(f"{run.bar.desc} epoch {epoch}: {summary(task, flatten(metrics))}")
    return dict(epoch=epoch, **metrics)


def run_result(task, run, history, seed, n_train):
    """A finished run's result.json (rank 0 writes it): its last and best evaluated epochs and the
    settings; every process returns the same."""
    if dist.is_initialized():  # only rank 0 evaluated
        shared = [history, sorted(run.skipped)]
        dist.broadcast_object_list(shared, src=0)
        history, run.skipped = shared[0], set(shared[1])
    sign = 1 if task.higher_is_better else -1
    best = max(history, key=lambda h: sign * flatten(h)[task.main_metric])
    result = dict(seed=seed, n_train=n_train, skipped=sorted(run.skipped), final=history[-1],
                  best_epoch=best, history=history, settings=run.settings)
    if run.rank == 0:
        write_lines(os.path.join(run.folder, "result.json"), [json.dumps(result, indent=1)])
    return result


def reused(run):
    """A finished run's result.json, where its settings are these (refused where they are not);
    None where there is none."""
    path = os.path.join(run.folder, "result.json")
    result = read_everywhere(lambda: read_json(path), run.rank, run.world)
    if result is None:
        return None
    check_settings(result.get("settings"), run.settings, path)
    if run.rank == 0:
        print(f"{run.folder}: result.json holds this run's result (same settings): reused, not "
              f"retrained")
    return result


def flatten(metrics, prefix=""):
    """Nested metric dicts -> {'test/mean_accuracy': x, ...} of the numbers alone."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and k != "epoch":
            out[f"{prefix}{k}"] = v
    return out


def summary(task, flat, std=None):
    """The task's shown metrics on one line, each with its std over runs where given."""
    return ", ".join(f"{k} {flat[k]:.4f}" + (f" ({std[k]:.4f})" if std else "")
                     for k in task.shown if k in flat)


def mean_std(rows):
    """Per key, the mean and the sample std over runs' flattened metrics (0 for one run)."""
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    std = {k: (sum((r[k] - mean[k]) ** 2 for r in rows) / max(1, len(rows) - 1)) ** 0.5
           for k in rows[0]}
    return mean, std


# ----------------------------------------------------------------------------- the runs

# Flags beside run.RUN_FLAGS that do not change a run's result: how many runs, the --init path (its
# digest is a setting)
NOT_SETTINGS = ("runs", "init")


def file_digest(path):
    """sha256 of a file, to tell two --init checkpoints with one path apart."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_out(name, args):
    """runs/<dataset>/<task name>-<init>-<frac or nN>: runs from other inits or subsets never share
    a folder, and `figures.py table --dir runs/<dataset>` reads them. A checkpoint's init is named
    by its folder and file."""
    init = "random"
    if args.init != "random":
        parent = os.path.basename(os.path.dirname(os.path.abspath(args.init)))
        init = re.sub(r"[^A-Za-z0-9]+", "_",
                      f"{parent}_{os.path.splitext(os.path.basename(args.init))[0]}")
    subset = f"n{args.n_train}" if args.n_train else f"{args.frac:g}"
    return os.path.join("runs", args.dataset, f"{name}-{init}-{subset}")


def main(doc, add_args, make_task, argv=None):
    """A task script's main: its flags (add_args(parser)), its Task (make_task(args)); --runs runs,
    <out>/results.json. Ctrl-C and SIGTERM handled from the start (run.training)."""
    p = ArgumentParser(description=doc)
    add_args(p)
    args = p.parse_args(argv)
    if args.init != "random" and not os.path.isfile(args.init):
        p.error(f"--init {args.init}: no such file (expected 'random' or a checkpoint)")
    with training() as stop:
        return run_all(make_task, args, stop)


def run_all(make_task, args, stop):
    args.data = args.data or os.path.join(data_root(args.data_root), args.dataset)
    proc = setup_distributed()
    args.bf16 = use_bf16(args.bf16, proc.device)
    torch.backends.cudnn.benchmark = True  # fixed input sizes: the landmark head's convolutions
    task = make_task(args)  # reads the data, sets the dataset's defaults
    args.out = args.out or default_out(task.name, args)
    digest = "random" if args.init == "random" else file_digest(args.init)
    current = settings(args, NOT_SETTINGS, init_sha256=digest, processes=proc.world,
                       n_train_total=len(task.train))
    n_keep = len(few_shot_indices(len(task.train), args.frac, 0, args.n_train))
    if proc.rank == 0:
        print(f"{args.dataset}: {len(task.train)} training images, {n_keep} kept; test: "
              + ", ".join(f"{k} {len(v)}" for k, v in task.tests.items())
              + f"; results in {args.out}")
    runs = []
    for r in range(args.runs):
        seed = args.seed + r
        run = Run(os.path.join(args.out, f"run{r}"), dict(current, seed=seed), proc, stop)
        runs.append(reused(run) or train_one(task, args, run, seed))
    results = dict(args=vars(args), settings=current, n_train_total=len(task.train),
                   n_train=n_keep, runs=runs)
    results.update(zip(("mean", "std"), mean_std([flatten(r["final"]) for r in runs])))
    results.update(zip(("best_mean", "best_std"),
                       mean_std([flatten(r["best_epoch"]) for r in runs])))
    if proc.rank == 0:
        report(task, args, results)
    return results


def report(task, args, results):
    """results.json and skipped.txt in --out, and the last lines: the last epoch's metrics and,
    where several epochs were evaluated, the best one's; a std only over several runs."""
    runs = results["runs"]
    write_lines(os.path.join(args.out, "results.json"), [json.dumps(results, indent=1)])
    skipped = sorted({name for r in runs for name in r["skipped"]})
    if skipped:
        write_lines(os.path.join(args.out, "skipped.txt"), skipped)
    several = len(runs) > 1
    what = f"{len(runs)} runs, mean (std)" if several else "1 run"
    print(f"last epoch, {what}: "
          + summary(task, results["mean"], results["std"] if several else None)
          + (f"; {len(skipped)} unreadable images skipped, listed in {args.out}/skipped.txt"
             if skipped else ""))
    if any(len(r["history"]) > 1 for r in runs):  # --eval-every: several epochs evaluated
        print(f"best evaluated epoch of each run by {task.main_metric} (the authors' logs: 'Max "
              f"accuracy'; chosen on the test split), {what}: "
              + summary(task, results["best_mean"], results["best_std"] if several else None))


def layer_decay_table(arch="vit_small", layer_decay=0.65, weight_decay=0.05):
    """(python finetune.py) The lr scale and weight decay of each layer of a ViT with a linear
    head, as param_groups_layer_decay gives them (§4.1: layer decay 0.65)."""
    model = torch.nn.Module()
    model.backbone = ARCHS[arch]()
    model.head = torch.nn.Linear(model.backbone.embed_dim, 40)
    names = {id(p): n for n, p in model.named_parameters()}
    rows = {}
    for g in param_groups_layer_decay(model, weight_decay, layer_decay):
        for p in g["params"]:
            parts = names[id(p)].split(".")
            layer = ".".join(parts[:3] if parts[1] == "blocks" else parts[:2])
            rows.setdefault((g["lr_scale"], layer), set()).add(g["weight_decay"])
    print(f"{arch}, layer decay {layer_decay}, weight decay {weight_decay}: lr = --lr x scale")
    for (scale, layer), decays in sorted(rows.items(), key=lambda r: r[0][0]):
        print(f"  {layer:<24} lr scale {scale:.5f}  weight decay "
              f"{' and '.join(map(str, sorted(decays)))}")


def main_table():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="vit_small", choices=ARCHS, help="backbone (§4.1: ViT-S/16)")
    p.add_argument("--layer-decay", type=fraction, default=0.65, help="§4.1")
    a = p.parse_args()
    layer_decay_table(a.arch, a.layer_decay)


if __name__ == "__main__":
    run_cli(main_table)
