"""The fine-tuning recipe shared by the three downstream tasks (paper §4.1); the task scripts run
it.

    python finetune_attr.py --init runs/pretrain/teacher_backbone.pth --frac 0.01

What every task shares (and only that): the backbone from --init (random, ours, DINO, DeiT/timm,
MAE, MSN: Table 1's baselines), end-to-end training with layer-wise lr decay or --head-only (frozen
backbone), AdamW with per-iteration warmup + cosine, few-shot subsets (--frac), repeated runs
(--runs: mean and std over seeds; §4.3 averages five), batched evaluation on the test split,
results.json, DDP under torchrun, bf16 autocast (--bf16), checkpoint + resume.
A task supplies its data, head, loss, predictions and metrics.

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
import signal
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms import v2
from tqdm import tqdm

from crops import IMAGENET_MEAN, IMAGENET_STD, eval_crop, normalize
import data
from data import (ArgumentParser, above, at_least, check_settings, data_root, fraction,
                  ignore_stop_signals, load_image, patch_multiple, probability, write_lines)
from loss import cosine_schedule, ema_update
from pretrain import (StopRequest, Views, all_mean, checkpoint_due, collate, distributed,
                      from_rank_zero, gather_names, load_resume, read_if_there, restore_rng,
                      rng_state, save_atomic, setup_distributed, stop_agreed, stop_exit, use_bf16)
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
    p.add_argument("--data-root", default=None, help="default: $PROS_DATA, else ./data")
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
    p.add_argument("--workers", type=at_least(0), default=4, help="DataLoader processes")
    p.add_argument("--log-every", type=count, default=10, help="steps between progress updates, "
                   "checks and time-based checkpoints (each a device sync)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on a GPU of compute capability 8.0 or later, "
                   "else off); faster on a CPU with native bf16 (AVX512-BF16, AMX), far slower on "
                   "one without")
    p.add_argument("--save-every-min", type=nonneg, default=10.0, help="also checkpoint when the "
                   "last one is this many minutes old (0: at the end only)")
    p.add_argument("--out", default=None, help="results.json and checkpoints (default: "
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
    i for item i, the index that pretrain.Views seeds each sample's augmentation from."""

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


# ----------------------------------------------------------------------------- tasks

class Task:
    """What a task script supplies. Subclasses set `name`, `main_metric` (a key of the flattened
    metrics, e.g. 'test/mean_accuracy'), `higher_is_better`, `shown` (keys printed), and implement
    add_args, datasets, build_model, loss, metrics. A train set with a `weights` tensor is sampled
    with replacement in proportion to it (class-balanced sampling)."""
    higher_is_better = True
    mix = None  # a batch transform (images, labels) -> (images, soft labels): mixup/cutmix

    def predict(self, model, images):
        return model(images)

    def lr_schedule(self, args, global_batch, total, steps_per_epoch):
        """step -> lr: warmup then cosine to --min-lr; --lr is for a global batch of 256 and scales
        with the nominal one, global_batch (the linear scaling rule of the authors' MAE scripts)."""
        peak = args.lr * global_batch / 256
        warmup = int(args.warmup_epochs * steps_per_epoch)
        return lambda step: cosine_schedule(step, total, peak, args.min_lr, warmup)

    def backbone_lr_scale(self, args):
        """The backbone's lr relative to the head's, before layer decay."""
        return 1.0

    def ema_decay(self, args):
        """Evaluate an EMA copy of the network with this decay (0: the trained network itself)."""
        return 0.0

    def summary(self, flat, std=None):
        return ", ".join(f"{k} {flat[k]:.4f}" + (f" ({std[k]:.4f})" if std else "")
                         for k in self.shown if k in flat)


# ----------------------------------------------------------------------------- train and evaluate

@torch.no_grad()
def evaluate(task, model, dataset, args, device):
    """Batched predictions over a test set -> (the task's metrics, the names of unreadable
    images)."""
    model.eval()
    loader = DataLoader(Views(dataset, None, 0), batch_size=max(1, args.batch_size),
                        num_workers=args.workers,
                        collate_fn=collate, worker_init_fn=ignore_stop_signals)
    preds, targets, skipped = [], [], []
    for batch, names in tqdm(loader, desc="eval", leave=False):
        skipped += names
        if batch is None:
            continue
        images, target = batch
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            preds.append(task.predict(model, normalize(images.to(device))).float().cpu())
        targets.append(target)
    if not preds:
        raise ValueError(f"{args.data}: none of the {len(dataset)} test images was readable")
    metrics = task.metrics(torch.cat(preds), torch.cat(targets), dataset)
    if skipped:
        metrics["unreadable_images"] = len(skipped)
    return metrics, skipped


def batch_sizes(args, n_subset, world):
    """(images per process, steps per epoch): a subset smaller than --batch-size is one batch."""
    per_process = min(args.batch_size, n_subset) // world
    if per_process == 0:
        raise ValueError(f"--batch-size {args.batch_size} over {n_subset} training images and "
                         f"{world} processes leaves no image per process")
    return per_process, n_subset // world // per_process


def train_one(task, args, train_set, tests, run, ctx):
    """One run (seed = args.seed + run): subset, model, training, final (and best) metrics. A
    finished run with the same settings is reused, one with others refused."""
    rank, world, device, stop = ctx
    seed = args.seed + run
    settings = dict(args.settings, seed=seed)
    run_dir = os.path.join(args.out, f"run{run}")
    result_path = os.path.join(run_dir, "result.json")
    result = from_rank_zero(lambda: read_json(result_path), rank, world)
    if result is not None:
        check_settings(result.get("settings"), settings, result_path)
        if rank == 0:
            print(f"run {run}: {result_path} holds this run's result (same settings): reused, not "
                  f"retrained")
        return result
    os.makedirs(run_dir, exist_ok=True)
    subset = few_shot_indices(len(train_set), args.frac, seed, args.n_train)
    train = torch.utils.data.Subset(train_set, subset)
    torch.manual_seed(seed)
    model = task.build_model(build_backbone(args), args)
    if args.head_only:
        model.backbone.requires_grad_(False)
    # BatchNorm statistics over all GPUs (the landmark head, as mmseg)
    if world > 1 and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    ddp = distributed(model, world, device)
    decay = task.ema_decay(args)
    ema = copy.deepcopy(model).requires_grad_(False) if decay else None
    groups = param_groups_layer_decay(model, args.weight_decay, args.layer_decay,
                                      task.backbone_lr_scale(args))
    optimizer = torch.optim.AdamW(groups, fused=device.type == "cuda")
    per_process, steps_per_epoch = batch_sizes(args, len(subset), world)
    total = args.epochs * steps_per_epoch
    # MAE's scripts scale by the nominal batch (--batch-size), also for a subset smaller than it
    lr_at = task.lr_schedule(args, args.batch_size, total, steps_per_epoch)
    weights = train_set.weights[subset] if getattr(train_set, "weights", None) is not None else None

    ckpt_path = os.path.join(run_dir, "checkpoint.pth")
    start_epoch, start_batch, history, skipped = 0, 0, [], set()
    ckpt = from_rank_zero(lambda: read_if_there(ckpt_path), rank, world)
    if ckpt is not None:
        load_resume(ckpt, ckpt_path, settings, model=model, optimizer=optimizer,
                    **({"ema": ema} if ema is not None else {}))
        start_epoch, start_batch, history = ckpt["epoch"], ckpt["batch"], ckpt["history"]
        skipped = set(ckpt["skipped"])
        restore_rng(ckpt, device)
        if rank == 0:
            print(f"resuming {ckpt_path} at epoch {start_epoch}, batch {start_batch}")

    def save(epoch, batch):
        if rank == 0:
            parts = dict(model=model.state_dict(), optimizer=optimizer.state_dict())
            if ema is not None:
                parts["ema"] = ema.state_dict()
            save_atomic(dict(parts, epoch=epoch, batch=batch, history=history,
                             skipped=sorted(skipped),
                             settings=settings, **rng_state(device)), ckpt_path)

    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch + start_batch, disable=rank != 0,
               desc=f"run {run}", dynamic_ncols=True)
    sampler = EpochSampler(len(subset), steps_per_epoch * per_process, seed, rank, world, weights)
    # its own generator: creating the loader's iterator must not advance the global RNG (exact
    # resume)
    loader = DataLoader(Views(train, None, seed), batch_size=per_process, sampler=sampler,
                        num_workers=args.workers, collate_fn=collate,
                        pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0, worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator().manual_seed(seed))
    # pending: this process's unreadable images since the last sync
    saved_at, pending = time.time(), []
    for epoch in range(start_epoch, args.epochs):
        model.train()
        if args.head_only:
            model.backbone.eval()
        first = start_batch if epoch == start_epoch else 0
        sampler.set_epoch(epoch, first * per_process)
        stopping = False
        for i, (batch, names) in enumerate(loader, first):
            if batch is None:
                raise ValueError(f"{args.data}: all {len(names)} images of a training batch were "
                                 f"unreadable, e.g. {names[0]}")
            images, targets = batch
            step = epoch * steps_per_epoch + i
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step) * g["lr_scale"]
            images = normalize(images.to(device, non_blocking=True))
            targets = targets.to(device, non_blocking=True)
            if task.mix is not None:  # mixup/cutmix: the whole batch, on the device
                images, targets = task.mix(images, targets)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = task.loss(ddp(images), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema_with_buffers(ema, model, decay)
            bar.update(1)
            pending += names
            # at an epoch's end, the epoch's evaluation comes first
            mid_epoch = i + 1 < steps_per_epoch
            stopping = stop_agreed(stop, world)
            if mid_epoch and (step + 1) % args.log_every and not stopping:
                continue  # no device sync between logging steps
            # the same step on every process: one all-reduce for the progress bar and the checks
            loss_value, n_skipped = all_mean([loss.detach(), len(pending)])
            if n_skipped:  # the same on every process: all join the gather
                skipped.update(gather_names(pending, world))
            pending = []
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} step {i}; last "
                                         f"checkpoint {ckpt_path}")
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_at(step):.1e}")
            if mid_epoch and (stopping or checkpoint_due(saved_at, args)):
                save(epoch, i + 1)
                saved_at = time.time()
            if mid_epoch and stopping:
                bar.close()
                stop_exit(stop.signum or signal.SIGTERM, step + 1, ckpt_path)
        last = epoch + 1 == args.epochs
        if rank == 0 and (last or (args.eval_every and (epoch + 1) % args.eval_every == 0)):
            metrics = {}
            for name, ds in tests.items():
                metrics[name], bad = evaluate(task, ema or model, ds, args, device)
                skipped.update(bad)
            history.append(dict(epoch=epoch + 1, **metrics))
            tqdm.write(f"run {run} epoch {epoch + 1}: {task.summary(flatten(metrics))}")
        if last or stopping or checkpoint_due(saved_at, args):
            save(epoch + 1, 0)
            saved_at = time.time()
        if stopping and not last:
            bar.close()
            stop_exit(stop.signum or signal.SIGTERM, (epoch + 1) * steps_per_epoch, ckpt_path)
        if dist.is_initialized():
            dist.barrier()
    bar.close()
    if dist.is_initialized():  # only rank 0 evaluated: every process returns its history
        shared = [history, sorted(skipped)]
        dist.broadcast_object_list(shared, src=0)
        history, skipped = shared
    sign = 1 if task.higher_is_better else -1
    best = max(history, key=lambda h: sign * flatten(h)[task.main_metric])
    result = dict(seed=seed, n_train=len(subset), skipped=sorted(skipped), final=history[-1],
                  best_epoch=best, history=history, settings=settings)
    if rank == 0:
        write_lines(result_path, [json.dumps(result, indent=1)])
    return result


def ema_with_buffers(ema, model, decay):
    """The evaluated EMA copy (FaRL): parameters averaged, buffers (BatchNorm statistics) copied."""
    ema_update(ema, model, decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def flatten(metrics, prefix=""):
    """Nested metric dicts -> {'test/mean_accuracy': x, ...} of the numbers alone."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and k != "epoch":
            out[f"{prefix}{k}"] = v
    return out


def file_digest(path):
    """sha256 of a file, to tell two --init checkpoints with one path apart."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# Flags that do not change a run's result: where it writes, how it loads, how many runs there are.
NOT_SETTINGS = ("out", "data_root", "workers", "runs", "save_every_min", "log_every", "init")


def run_settings(args, world, n_train_total):
    """What a checkpoint or result must match to be resumed or reused: every flag that changes the
    result, the --init file's digest (not its path), the number of processes and the training set's
    size."""
    flags = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    digest = "random" if args.init == "random" else file_digest(args.init)
    return dict(flags, init_sha256=digest, processes=world, n_train_total=n_train_total)


def default_out(task, args):
    """runs/<dataset>/<task>-<init>-<frac or nN>: runs from other inits or subsets never share a
    folder, and `figures.py table --dir runs/<dataset>` reads them. A checkpoint's init is named by
    its folder and file."""
    init = "random"
    if args.init != "random":
        parent = os.path.basename(os.path.dirname(os.path.abspath(args.init)))
        init = re.sub(r"[^A-Za-z0-9]+", "_",
                      f"{parent}_{os.path.splitext(os.path.basename(args.init))[0]}")
    subset = f"n{args.n_train}" if args.n_train else f"{args.frac:g}"
    return os.path.join("runs", args.dataset, f"{task.name}-{init}-{subset}")


def main(task, argv=None):
    """Parse the task's command line, run --runs runs, write <out>/results.json."""
    p = ArgumentParser(description=task.__doc__)
    task.add_args(p)
    args = p.parse_args(argv)
    if args.init != "random" and not os.path.isfile(args.init):
        p.error(f"--init {args.init}: no such file (expected 'random' or a checkpoint)")
    try:
        with StopRequest() as stop:
            return run_all(task, args, stop)
    finally:  # on every exit, an error's and a stop's too
        if dist.is_initialized():
            dist.destroy_process_group()


def run_all(task, args, stop):
    args.data = args.data or os.path.join(data_root(args.data_root), args.dataset)
    args.out = args.out or default_out(task, args)
    rank, world, device = setup_distributed()
    args.bf16 = use_bf16(args.bf16, device)
    # fixed input sizes: the landmark head's convolutions gain
    torch.backends.cudnn.benchmark = True
    train_set, tests = task.datasets(args)
    args.settings = run_settings(args, world, len(train_set))
    n_keep = len(few_shot_indices(len(train_set), args.frac, 0, args.n_train))
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        print(f"{args.dataset}: {len(train_set)} training images, {n_keep} kept; test: "
              + ", ".join(f"{k} {len(v)}" for k, v in tests.items())
              + f"; results in {args.out}")
    ctx = (rank, world, device, stop)
    runs = [train_one(task, args, train_set, tests, r, ctx) for r in range(args.runs)]
    mean, std = mean_std([flatten(r["final"]) for r in runs])
    best_mean, best_std = mean_std([flatten(r["best_epoch"]) for r in runs])
    settings = vars(args).pop("settings")
    results = dict(args=vars(args), settings=settings, n_train_total=len(train_set),
                   n_train=n_keep, runs=runs, mean=mean, std=std, best_mean=best_mean,
                   best_std=best_std)
    skipped = sorted({name for r in runs for name in r["skipped"]})
    if rank == 0:
        write_lines(os.path.join(args.out, "results.json"), [json.dumps(results, indent=1)])
        if skipped:
            write_lines(os.path.join(args.out, "skipped.txt"), skipped)
        several = len(runs) > 1
        what = f"{len(runs)} runs, mean (std)" if several else "1 run"
        print(f"last epoch, {what}: " + task.summary(mean, std if several else None)
              + (f"; {len(skipped)} unreadable images skipped, listed in {args.out}/skipped.txt"
                 if skipped else ""))
        if any(len(r["history"]) > 1 for r in runs):  # --eval-every: several epochs evaluated
            print(f"best evaluated epoch of each run by {task.main_metric} (the authors' logs: "
                  f"'Max accuracy'; chosen on the test split), {what}: "
                  + task.summary(best_mean, best_std if several else None))
    return results


def mean_std(rows):
    """Per key, the mean and the sample std over runs' flattened metrics (0 for one run)."""
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    std = {k: (sum((r[k] - mean[k]) ** 2 for r in rows) / max(1, len(rows) - 1)) ** 0.5
           for k in rows[0]}
    return mean, std


def read_json(path):
    """A result file, or None where there is none."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno}); delete it to "
                             f"rerun") from None


def run_cli(task):
    """Entry point of a task script: bad input is one line on stderr and a non-zero exit."""
    data.run_cli(lambda: main(task))


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
    main_table()
