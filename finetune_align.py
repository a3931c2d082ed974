r"""Face alignment on 300W and WFLW (paper §3.5, §4.1; Tables 1 and 4).

    python finetune_align.py --dataset 300w --init runs/pretrain/teacher_backbone.pth --frac 0.1
    python finetune_align.py --dataset wflw
    python finetune_align.py --dataset toy --arch vit_tiny --img-size 64 --heatmap-size 32 \
        --channels 64 --epochs 20 --ema-decay 0.99 --runs 1    # CPU

Model (§4.1): the patch tokens of blocks 4, 6, 8 and 12 are reshaped to 14x14 maps, brought to four
scales (4x, 2x, 1x, 1/2x) and fused by a UperNet head (pyramid pooling on the coarsest map, top-down
lateral fusion; Xiao et al. 2018) into one heat-map logit map per landmark at 128x128. Targets are
FaRL's heat-maps (a Gaussian of sigma radius / 4, cut at the radius) with values in [0, 1]; the
loss is FaRL's: soft-label cross-entropy plus the L1 of the heat-maps' soft-argmax, which also
decodes the landmarks (FaRL's heatmap2points), mapped back to the original image before scoring;
FaRL's absolute lrs, step schedule, EMA evaluation, augmenters, head width and dropout, and no drop
path (FaRL's face_alignment config: trainers/ibug300w_farl.yaml, augmenters/train.yaml,
network/mmseg.py, network/geometry.py).
Metric: NME normalised by the inter-ocular distance (outer eye corners), in %, per image then
averaged; failure rate (NME > 10%) and AUC at 10%.

Data (docs/formats.md): 300W: afw/, helen/{trainset,testset}/, lfpw/{trainset,testset}/, ibug/ with
iBUG .pts beside the images. Train on afw + helen/trainset + lfpw/trainset (3,148); test Common =
helen/testset + lfpw/testset, Challenging = ibug, Full = both. --protocol private trains on all
3,837 and tests on the 300W private set (01_Indoor, 02_Outdoor). WFLW: WFLW_annotations/ and
WFLW_images/; 98 points (the paper's "68 landmarks" for WFLW is a slip), six attribute subsets.
"""
import glob
import math
import os
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import finetune
from data import IMAGE_EXTENSIONS, data_root
from finetune import LabelledImages
from run import above, at_least, probability, run_cli


# The outer eye corners that normalise the NME: iBUG 68 and WFLW 98
EYES = {68: (36, 45), 98: (60, 72)}
WFLW_FLAGS = ["pose", "expression", "illumination", "makeup", "occlusion", "blur"]

# ----------------------------------------------------------------------------- parsers


def read_pts(path, n_points=68):
    """An iBUG .pts file -> (n_points, 2) float array of 0-based pixel coordinates (the file is
    1-based)."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    try:
        declared = int(next(line for line in lines if line.startswith("n_points")).split(":")[1])
        inside = lines[lines.index("{") + 1:lines.index("}")]
        points = np.array([[float(v) for v in line.split()] for line in inside])
    except (StopIteration, ValueError, IndexError):
        raise ValueError(f"{path}: not an iBUG .pts file (version, n_points, "
                         f"{{ x y lines }})") from None
    if declared != len(points) or points.shape != (n_points, 2):
        raise ValueError(f"{path}: {len(points)} points (header says {declared}), expected "
                         f"{n_points}")
    return points - 1.0


def read_wflw(list_file):
    """A WFLW list file -> [dict(landmarks (98, 2), box (4,), flags (6,), image)]: 207 tokens a
    line."""
    items = []
    with open(list_file) as f:
        for n, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 207:
                raise ValueError(f"{list_file}:{n}: expected 207 tokens (196 coordinates, 4 box, "
                                 f"6 flags, image), got {len(tokens)}")
            values = np.array(tokens[:206], np.float64)
            items.append(dict(landmarks=values[:196].reshape(98, 2), box=values[196:200],
                              flags=values[200:206].astype(int), image=tokens[206]))
    return items


def _pts_items(folder, flag):
    """(image, landmarks, flags) for every .pts in a folder with an image beside it; the rest
    counted."""
    items, missing = [], 0
    for pts in sorted(glob.glob(os.path.join(folder, "**", "*.pts"), recursive=True)):
        image = next((os.path.splitext(pts)[0] + e for e in IMAGE_EXTENSIONS
                      if os.path.isfile(os.path.splitext(pts)[0] + e)), None)
        if image is None:
            missing += 1
            continue
        items.append((image, (read_pts(pts), np.array([flag]))))
    if missing:
        print(f"{folder}: skipped {missing} .pts files without an image beside them")
    return items


def read_300w(path, protocol="common"):
    """300W -> dict(train=[...], test=[...]); a test item's flag is 0 for Common, 1 for Challenging
    (private protocol: 0 indoor, 1 outdoor)."""

    def sub(*parts):
        return os.path.join(path, *parts)
    if not os.path.isdir(sub("afw")):
        raise FileNotFoundError(f"{path}: expected the 300W folders afw/, helen/, lfpw/, ibug/ "
                                f"with .pts files (or try --dataset toy)")
    train = _pts_items(sub("afw"), 0) + _pts_items(sub("helen", "trainset"),
                                                   0) + _pts_items(sub("lfpw", "trainset"), 0)
    common = _pts_items(sub("helen", "testset"), 0) + _pts_items(sub("lfpw", "testset"), 0)
    challenging = _pts_items(sub("ibug"), 1)
    if protocol == "common":
        return dict(train=train, test=common + challenging)
    private = next((d for d in (sub("300W"), path) if os.path.isdir(os.path.join(d, "01_Indoor"))),
                   None)
    if private is None:
        raise FileNotFoundError(f"{path}: --protocol private needs 300W/01_Indoor and "
                                f"300W/02_Outdoor")
    # Trained on all 3,837 images: Common/Challenging/Full are then never reported (they were seen).
    return dict(train=train + common + challenging,
                test=_pts_items(os.path.join(private, "01_Indoor"), 0)
                + _pts_items(os.path.join(private, "02_Outdoor"), 1))


def read_wflw_dataset(path):
    lists = os.path.join(path, "WFLW_annotations", "list_98pt_rect_attr_train_test")
    out = {}
    for split in ("train", "test"):
        list_file = os.path.join(lists, f"list_98pt_rect_attr_{split}.txt")
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f"{list_file}: missing (expected WFLW_annotations/ and "
                                    f"WFLW_images/)")
        out[split] = [(os.path.join(path, "WFLW_images", it["image"]),
                       (it["landmarks"], it["flags"], it["box"])) for it in read_wflw(list_file)]
    return out


# ----------------------------------------------------------------------------- geometry

def crop_matrix(center, side, size, angle=0.0):
    """2x3 affine A taking 0-based image pixels to crop pixels: the square of `side` around
    `center`, rotated by `angle` degrees, onto a size x size crop."""
    a = math.radians(angle)
    R = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) * size / side
    return np.hstack([R, ((size - 1) / 2 - R @ np.asarray(center, float))[:, None]])


def apply_affine(A, points):
    return points @ A[:, :2].T + A[:, 2]


def invert_affine(A):
    return np.linalg.inv(np.vstack([A, [0, 0, 1]]))[:2]


def warp(img, A, size):
    """The crop as PIL sees it: PIL maps output to input in pixel-corner coordinates (centre +
    0.5)."""
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    corner = shift @ np.vstack([A, [0, 0, 1]]) @ np.linalg.inv(shift)
    return img.transform((size, size), Image.AFFINE, tuple(np.linalg.inv(corner)[:2].flatten()),
                         Image.BILINEAR)


def farl_augment(crop):
    """FaRL's augmenters after the warp (augmenters/train.yaml; its blueprint library's
    RandomOcclusion, NoiseFusion, RandomGray, RandomGamma, RandomBlur), on a uint8 crop (3, H, W):
    always a black box, noise blended in with probability 0.5, gray with 0.1, a gamma of 1/2, 1 or
    2, and a box blur of up to 1% of the side (none below 200 px)."""
    x = crop.float() / 255
    _, H, W = x.shape
    u = torch.rand(6).tolist()
    rh = 0.2 + 0.6 * u[0]  # the box: 10-40% of the height, its width within +-10% of that
    dh, dw = int(H / 2 * rh), int(W / 2 * (rh - 0.2 + 0.4 * u[1]))
    cy, cx = int((H - 1) * u[2]), int((W - 1) * u[3])
    x[:, max(0, cy - dh // 2):min(H - 1, cy + dh // 2) + 1,
      max(0, cx - dw // 2):min(W - 1, cx + dw // 2) + 1] = 0
    if u[4] < 0.5:
        alpha = 0.5 * torch.rand(()).item()
        x = (1 - alpha) * x + alpha * torch.rand_like(x)
    if u[5] < 0.1:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    x = (x.sqrt(), x, x.square())[torch.randint(3, ()).item()]
    k = int((H + W) / 2 * 0.01 * torch.rand(()).item())
    if k > 1:  # cv2.blur: a k x k mean, borders reflected
        x = F.avg_pool2d(F.pad(x[None], (k // 2, (k - 1) // 2) * 2, mode="reflect"), k, 1)[0]
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


class AlignTransform:
    """Image + landmarks -> (uint8 crop, target); the crop is normalised on the device
    (crops.normalize). The square box around the landmarks (or WFLW's box), enlarged by
    `crop_scale`, is resized to img_size. Training draws FaRL's geometry, each uniform: rotation
    within +-0.174 rad, scale within +-10%, shift within +-5% of the box (no flip), then FaRL's
    augmenters (farl_augment). Train target: landmarks in crop pixels (P, 2); test target:
    [original landmarks (P*2), crop -> image affine (6), subset flags] so predictions can go
    back."""

    def __init__(self, img_size, train, crop_scale=1.25):
        self.size, self.train, self.crop_scale = img_size, train, crop_scale
        # FaRL's trainers/ibug300w_farl.yaml: rot_sigma 0.174, scale_sigma 0.1, shift_sigma 0.05
        self.rotation, self.scale, self.shift = math.degrees(0.174), 0.1, 0.05

    def __call__(self, img, target):
        landmarks, flags, *box = target
        x0, y0, x1, y1 = box[0] if box else (*landmarks.min(0), *landmarks.max(0))
        center, side = np.array([(x0 + x1) / 2,
                                 (y0 + y1) / 2]), max(x1 - x0, y1 - y0) * self.crop_scale
        angle = 0.0
        if self.train:
            r = (2 * torch.rand(4) - 1).tolist()  # uniform in [-1, 1]
            angle = r[0] * self.rotation
            side *= 1 + r[1] * self.scale
            center = center + np.array(r[2:4]) * self.shift * side
        A = crop_matrix(center, side, self.size, angle)
        crop = warp(img, A, self.size)
        points = apply_affine(A, landmarks)
        if self.train:
            return farl_augment(TF.pil_to_tensor(crop)), torch.tensor(points, dtype=torch.float32)
        packed = np.concatenate([landmarks.flatten(), invert_affine(A).flatten(),
                                 np.atleast_1d(flags)])
        return TF.pil_to_tensor(crop), torch.tensor(packed, dtype=torch.float32)


# ----------------------------------------------------------------------------- heat-maps

def to_heatmap_coords(points, img_size, heatmap_size):
    """Crop pixels -> heat-map pixels (both 0-based pixel centres)."""
    return (points + 0.5) * heatmap_size / img_size - 0.5


def gaussian_heatmaps(points, size, radius):
    """points (B, P, 2) in heat-map pixels -> (B, P, size, size) targets with peak value 1: FaRL's
    'gaussian_awing' kernel exp(-16 r^2 / (2 radius^2)), a Gaussian of sigma radius / 4, on the
    pixels within the radius, 0 beyond (network/geometry.py points2heatmap, ext/p2i_ops)."""
    grid = torch.arange(size, device=points.device, dtype=torch.float32)
    dx = (grid[None, None, :] - points[..., 0:1]) ** 2  # (B, P, size) along x
    dy = (grid[None, None, :] - points[..., 1:2]) ** 2
    r2 = dy[..., :, None] + dx[..., None, :]  # (B, P, size, size)
    return torch.where(r2 <= radius ** 2, torch.exp(-8 * r2 / radius ** 2), 0.0)


def soft_argmax(heat):
    """(B, P, H, W) non-negative heat-maps -> (B, P, 2) their centres of mass over the whole map,
    in heat-map pixels (FaRL's heatmap2points): the landmarks, and what the coordinate loss
    trains."""
    w = heat / heat.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    ys = torch.arange(heat.shape[-2], device=heat.device, dtype=heat.dtype)
    xs = torch.arange(heat.shape[-1], device=heat.device, dtype=heat.dtype)
    return torch.stack([(w.sum(-2) * xs).sum(-1), (w.sum(-1) * ys).sum(-1)], -1)


def nme(pred, gt, eyes):
    """Per-image NME: mean point error / inter-ocular distance (outer eye corners). (B, P, 2) ->
    (B,)."""
    ocular = (gt[:, eyes[0]] - gt[:, eyes[1]]).norm(dim=-1)
    return (pred - gt).norm(dim=-1).mean(-1) / ocular


def mean_shape_nme(gt, back, eyes):
    """The baseline: NME (%) of one shape for every image, the mean of the test landmarks in crop
    coordinates. gt (B, P, 2) in image pixels, back (B, 2, 3) crop -> image."""
    A, t = back[:, :, :2], back[:, None, :, 2]
    in_crop = torch.einsum("bij,bpj->bpi", torch.linalg.inv(A), gt - t)
    shape = in_crop.mean(0, keepdim=True).expand_as(in_crop)
    return nme(torch.einsum("bij,bpj->bpi", A, shape) + t, gt, eyes).mean().item() * 100


def nme_summary(errors, threshold=0.1):
    """NME (%), failure rate (% with NME > 10%) and AUC at 10% of the cumulative error curve."""
    t = torch.linspace(0, threshold, 1001)
    ced = (errors[None, :] <= t[:, None]).float().mean(1)
    return dict(nme=errors.mean().item() * 100,
                failure_rate=(errors > threshold).float().mean().item() * 100,
                auc=torch.trapezoid(ced, t).item() / threshold)


# ----------------------------------------------------------------------------- model

def conv_bn(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class UperNet(nn.Module):
    """UperNet (Xiao et al. 2018) over four maps, finest first: pyramid pooling on the coarsest,
    top-down lateral fusion, every level upsampled to the finest and fused."""

    def __init__(self, in_dim, channels, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s),
                                                conv_bn(in_dim, channels, 1)) for s in pool_scales])
        self.bottleneck = conv_bn(in_dim + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList([conv_bn(in_dim, channels, 1) for _ in range(3)])
        self.fpn = nn.ModuleList([conv_bn(channels, channels, 3) for _ in range(3)])
        self.fuse = conv_bn(4 * channels, channels, 3)

    def forward(self, maps):

        def up(x, ref):
            return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)
        top = maps[-1]
        levels = [self.bottleneck(torch.cat([top] + [up(p(top), top) for p in self.ppm], 1))]
        for i in (2, 1, 0):  # top-down: each level adds the upsampled coarser one
            levels.insert(0, self.lateral[i](maps[i]) + up(levels[0], maps[i]))
        levels = [self.fpn[i](levels[i]) for i in range(3)] + [levels[3]]
        return self.fuse(torch.cat([levels[0]] + [up(x, levels[0]) for x in levels[1:]], 1))


class AlignmentModel(nn.Module):
    def __init__(self, backbone, n_points, heatmap_size=128, blocks=(4, 6, 8, 12), channels=256):
        super().__init__()
        self.backbone, self.blocks, self.heatmap_size = backbone, blocks, heatmap_size
        # The final norm, and any block after the last one read, never reach the heat-maps: frozen,
        # so that
        # DDP does not wait for their gradients
        backbone.norm.requires_grad_(False)
        backbone.blocks[max(blocks):].requires_grad_(False)
        D = backbone.embed_dim
        self.scales = nn.ModuleList([  # 14x14 -> 56, 28, 14, 7 (as BEiT/MAE segmentation)
            nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2), nn.BatchNorm2d(D), nn.GELU(),
                          nn.ConvTranspose2d(D, D, 2, 2)),
            nn.ConvTranspose2d(D, D, 2, 2), nn.Identity(), nn.MaxPool2d(2)])
        self.upernet = UperNet(D, channels)
        self.dropout = nn.Dropout2d(0.1)  # mmseg's dropout_ratio before the last conv (FaRL)
        self.predict = nn.Conv2d(channels, n_points, 1)

    def forward(self, x):
        h, w = x.shape[-2] // self.backbone.patch_size, x.shape[-1] // self.backbone.patch_size
        tokens = self.backbone.get_intermediate_layers(x, self.blocks)  # 4 x (B, h*w, D)
        # (B, D, h, w)
        maps = [s(t.transpose(1, 2).reshape(len(x), -1, h, w)) for s, t in zip(self.scales, tokens)]
        fused = F.interpolate(self.upernet(maps), size=(self.heatmap_size,) * 2, mode="bilinear",
                              align_corners=False)
        return self.predict(self.dropout(fused))  # (B, P, heatmap, heatmap) logits


# ----------------------------------------------------------------------------- the task

def add_args(p):
    finetune.add_common_args(
        p, ["300w", "wflw", "toy"],
        dict(lr=0.01, weight_decay=1e-5, layer_decay=1.0, epochs=250, batch_size=64,
             warmup_epochs=0, drop_path=0.0),
        notes=dict(lr="the heads' lr, whatever the batch (§4.1, FaRL's "
                   "optimizers/refine_backbone.yaml); x0.1 for the last 20%% of the epochs "
                   "(there: at epoch 200 of 250)",
                   weight_decay="AdamW (§4.1)", layer_decay="none (FaRL)",
                   epochs="FaRL's trainers/ibug300w_farl.yaml", batch_size="unstated",
                   warmup_epochs="none (FaRL)",
                   drop_path="none: FaRL's backbone has no stochastic depth"))
    p.add_argument("--backbone-lr", type=above(0.0), default=1e-4,
                   help="the backbone's lr, whatever the batch (FaRL's "
                   "optimizers/refine_backbone.yaml)")
    p.add_argument("--ema-decay", type=probability, default=0.999,
                   help="evaluate an EMA copy of the network (FaRL's "
                   "trainers/ibug300w_farl.yaml); 0: the trained one. Few steps need less: "
                   "at 0.999 the copy keeps 0.999^steps of its initial weights")
    p.add_argument("--coord-weight", type=at_least(0.0, float), default=1.0,
                   help="weight of the coordinate L1 loss beside the heat-map loss's 1 "
                   "(FaRL's trainers/ibug300w_farl.yaml)")
    p.add_argument("--heatmap-size", type=at_least(4), default=128,
                   help="heat-map side (§4.1; FaRL's trainers/ibug300w_farl.yaml)")
    p.add_argument("--heatmap-radius", type=above(0.0), default=5.0,
                   help="target radius in heat-map pixels: a Gaussian of sigma radius / 4 "
                   "cut there (FaRL's trainers/ibug300w_farl.yaml heatmap_radius)")
    p.add_argument("--channels", type=at_least(1), default=768,
                   help="UperNet width (FaRL's trainers/ibug300w_farl.yaml head_channel)")
    p.add_argument("--crop-scale", type=above(0.0), default=1.25,
                   help="face box enlargement before the crop (FaRL's scale_mu 0.8: the face "
                   "at 0.8 of it)")
    p.add_argument("--protocol", default="common", choices=["common", "private"],
                   help="300W: train on 3,148 and test Common/Challenging/Full, or train on "
                   "3,837 and test on the private 600")


def step_down(lr, total):
    """FaRL's MultiStepLR: `lr`, then a tenth for the last 20% of the run (absolute rates)."""
    return lambda step: lr * (0.1 if step >= 0.8 * total else 1.0)


def heatmap_loss(logits, points, args):
    """FaRL's two terms: the heat-map loss, its soft-label cross-entropy in per-pixel binary form
    (every pixel a Bernoulli whose soft label is the Gaussian target in [0, 1], §4.1), plus the L1
    (Euclidean) distance of the heat-maps' soft-argmax to the landmarks, in units of the side."""
    target_points = to_heatmap_coords(points, args.img_size, args.heatmap_size)  # (B, P, 2)
    target = gaussian_heatmaps(target_points, args.heatmap_size, args.heatmap_radius)
    heat = F.binary_cross_entropy_with_logits(logits.float(), target)
    coord = (soft_argmax(torch.sigmoid(logits.float())) - target_points).norm(dim=-1).mean()
    return heat + args.coord_weight * coord / args.heatmap_size


def landmarks(logits, args):
    """The heat-maps' soft-argmax, in crop pixels."""
    points = soft_argmax(torch.sigmoid(logits.float()))
    return (points + 0.5) * args.img_size / args.heatmap_size - 0.5


def alignment_metrics(preds, targets, subsets):
    """NME (inter-ocular), failure rate and AUC over the test set and each subset (300W's
    common/challenging or indoor/outdoor, WFLW's six), beside the mean shape's NME. targets: the
    landmarks, the crop's affine back to the original image, the subset flags."""
    P = preds.shape[1]
    gt = targets[:, :2 * P].view(-1, P, 2).double()
    back = targets[:, 2 * P:2 * P + 6].view(-1, 2, 3).double()  # crop -> original image
    pred = torch.einsum("bij,bpj->bpi", back[:, :, :2], preds.double()) + back[:, None, :, 2]
    errors = nme(pred, gt, EYES[P])
    flags = targets[:, 2 * P + 6:]
    out = nme_summary(errors)
    out["nme_mean_shape"] = mean_shape_nme(gt, back, EYES[P])
    if subsets == WFLW_FLAGS:
        for i, name in enumerate(WFLW_FLAGS):
            out.update({f"{k}_{name}": v for k, v in nme_summary(errors[flags[:, i] > 0]).items()})
    else:
        for i, name in enumerate(subsets):
            if (flags[:, 0] == i).any():
                out[f"nme_{name}"] = nme_summary(errors[flags[:, 0] == i])["nme"]
    return out


def read_landmarks(args):
    if args.dataset == "wflw":
        return read_wflw_dataset(args.data)
    path = args.data
    if args.dataset == "toy":
        import toyfaces
        path = os.path.join(toyfaces.ensure_world(data_root(args.data_root)), "300w")
    return read_300w(path, args.protocol)


def task(args):
    data = read_landmarks(args)
    if not data["train"] or not data["test"]:
        raise ValueError(f"{args.data}: empty train or test split")
    n_points = len(data["train"][0][1][0])
    subsets = WFLW_FLAGS if args.dataset == "wflw" else (
        ["indoor", "outdoor"] if args.protocol == "private" else ["common", "challenging"])
    return finetune.Task(
        name="align", main_metric="test/nme", higher_is_better=False,
        shown=["test/nme", "test/nme_common", "test/nme_challenging", "test/failure_rate",
               "test/auc", "test/nme_mean_shape"],
        train=LabelledImages(data["train"], AlignTransform(args.img_size, True, args.crop_scale)),
        tests={"test": LabelledImages(data["test"],
                                      AlignTransform(args.img_size, False, args.crop_scale))},
        model=lambda backbone: AlignmentModel(backbone, n_points, args.heatmap_size,
                                              channels=args.channels),
        loss=partial(heatmap_loss, args=args), predict=partial(landmarks, args=args),
        metrics=partial(alignment_metrics, subsets=subsets),
        schedule=partial(step_down, args.lr), backbone_lr=args.backbone_lr / args.lr,
        ema_decay=args.ema_decay)


def main(argv=None):
    return finetune.main(__doc__, add_args, task, argv)


if __name__ == "__main__":
    run_cli(main)
