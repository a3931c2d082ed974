"""Face alignment on 300W and WFLW (paper §3.5, §4.1; Tables 1 and 4).

    python finetune_align.py --dataset 300w --init runs/pretrain/teacher_backbone.pth --frac 0.1 --runs 5
    python finetune_align.py --dataset wflw
    python finetune_align.py --dataset toy --arch vit_tiny --img-size 112 --heatmap-size 64 --epochs 30   # CPU

Model (§4.1): the patch tokens of blocks 4, 6, 8 and 12 are reshaped to 14x14 maps, brought to four
scales (4x, 2x, 1x, 1/2x) and fused by a UperNet head (pyramid pooling on the coarsest map, top-down
lateral fusion; Xiao et al. 2018) into one heat-map logit map per landmark at 128x128. Targets are
Gaussian heat-maps with values in [0, 1]; the loss is FaRL's soft-label cross-entropy; landmarks are
decoded with sub-pixel precision and mapped back to the original image before scoring.
Metric: NME normalised by the inter-ocular distance (outer eye corners), in %, per image then averaged;
failure rate (NME > 10%) and AUC at 10%.

Data (docs/formats.md): 300W: afw/, helen/{trainset,testset}/, lfpw/{trainset,testset}/, ibug/ with
iBUG .pts beside the images. Train on afw + helen/trainset + lfpw/trainset (3,148); test Common =
helen/testset + lfpw/testset, Challenging = ibug, Full = both. --protocol private trains on all 3,837
and tests on the 300W private set (01_Indoor, 02_Outdoor). WFLW: WFLW_annotations/ and WFLW_images/;
98 points (the paper's "68 landmarks" for WFLW is a slip), six attribute subsets.
"""
import glob
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

import finetune
from data import above, at_least
from finetune import LabelledImages


def mirror_permutation(pairs, n):
    perm = list(range(n))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return perm


# Which point a horizontal flip turns each point into. iBUG 68: jaw, brows, nostrils, eyes, mouth.
FLIP_68 = mirror_permutation([(i, 16 - i) for i in range(8)] + [(17 + i, 26 - i) for i in range(5)] +
                             [(31, 35), (32, 34), (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
                              (48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)], 68)
# WFLW 98 (as in HRNet's MATCHED_PARTS): jaw 0-32, brows 33-50, nose 51-59, eyes 60-75, mouth 76-95, pupils.
FLIP_98 = mirror_permutation([(i, 32 - i) for i in range(16)] +
                             [(33, 46), (34, 45), (35, 44), (36, 43), (37, 42), (38, 50), (39, 49), (40, 48),
                              (41, 47), (55, 59), (56, 58), (60, 72), (61, 71), (62, 70), (63, 69), (64, 68),
                              (65, 75), (66, 74), (67, 73), (76, 82), (77, 81), (78, 80), (87, 83), (86, 84),
                              (88, 92), (89, 91), (95, 93), (96, 97)], 98)
SCHEMES = {68: dict(flip=FLIP_68, eyes=(36, 45)), 98: dict(flip=FLIP_98, eyes=(60, 72))}
WFLW_FLAGS = ["pose", "expression", "illumination", "makeup", "occlusion", "blur"]
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg")

# ----------------------------------------------------------------------------- parsers


def read_pts(path, n_points=68):
    """An iBUG .pts file -> (n_points, 2) float array of 0-based pixel coordinates (the file is 1-based)."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    try:
        declared = int(next(line for line in lines if line.startswith("n_points")).split(":")[1])
        points = np.array([[float(v) for v in line.split()] for line in lines[lines.index("{") + 1:lines.index("}")]])
    except (StopIteration, ValueError, IndexError):
        raise ValueError(f"{path}: not an iBUG .pts file (version, n_points, {{ x y lines }})") from None
    if declared != len(points) or points.shape != (n_points, 2):
        raise ValueError(f"{path}: {len(points)} points (header says {declared}), expected {n_points}")
    return points - 1.0


def read_wflw(list_file):
    """A WFLW list file -> [dict(landmarks (98, 2), box (4,), flags (6,), image)]: 207 tokens a line."""
    items = []
    with open(list_file) as f:
        for n, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 207:
                raise ValueError(f"{list_file}:{n}: expected 207 tokens (196 coordinates, 4 box, 6 flags, image), "
                                 f"got {len(tokens)}")
            values = np.array(tokens[:206], np.float64)
            items.append(dict(landmarks=values[:196].reshape(98, 2), box=values[196:200],
                              flags=values[200:206].astype(int), image=tokens[206]))
    return items


def _pts_items(folder, flag):
    """(image, landmarks, flags) for every .pts in a folder with an image beside it; the rest counted."""
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
    sub = lambda *p: os.path.join(path, *p)
    if not os.path.isdir(sub("afw")):
        raise FileNotFoundError(f"{path}: expected the 300W folders afw/, helen/, lfpw/, ibug/ with .pts files "
                                "(or try --dataset toy)")
    train = _pts_items(sub("afw"), 0) + _pts_items(sub("helen", "trainset"), 0) + _pts_items(sub("lfpw", "trainset"), 0)
    common = _pts_items(sub("helen", "testset"), 0) + _pts_items(sub("lfpw", "testset"), 0)
    challenging = _pts_items(sub("ibug"), 1)
    if protocol == "common":
        return dict(train=train, test=common + challenging)
    private = next((d for d in (sub("300W"), path) if os.path.isdir(os.path.join(d, "01_Indoor"))), None)
    if private is None:
        raise FileNotFoundError(f"{path}: --protocol private needs 300W/01_Indoor and 300W/02_Outdoor")
    # Trained on all 3,837 images: Common/Challenging/Full are then never reported (they were seen).
    return dict(train=train + common + challenging,
                test=_pts_items(os.path.join(private, "01_Indoor"), 0) + _pts_items(os.path.join(private, "02_Outdoor"), 1))


def read_wflw_dataset(path):
    lists = os.path.join(path, "WFLW_annotations", "list_98pt_rect_attr_train_test")
    out = {}
    for split in ("train", "test"):
        list_file = os.path.join(lists, f"list_98pt_rect_attr_{split}.txt")
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f"{list_file}: missing (expected WFLW_annotations/ and WFLW_images/)")
        out[split] = [(os.path.join(path, "WFLW_images", it["image"]), (it["landmarks"], it["flags"], it["box"]))
                      for it in read_wflw(list_file)]
    return out


# ----------------------------------------------------------------------------- geometry

def crop_matrix(center, side, size, angle=0.0, flip=False):
    """2x3 affine A taking 0-based image pixels to crop pixels: the square of `side` around `center`,
    rotated by `angle` degrees, onto a size x size crop (mirrored when flip)."""
    a = math.radians(angle)
    R = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) * size / side
    A = np.hstack([R, ((size - 1) / 2 - R @ np.asarray(center, float))[:, None]])
    if flip:
        A = np.array([[-1.0, 0, size - 1], [0, 1, 0]]) @ np.vstack([A, [0, 0, 1]])
    return A


def apply_affine(A, points):
    return points @ A[:, :2].T + A[:, 2]


def invert_affine(A):
    return np.linalg.inv(np.vstack([A, [0, 0, 1]]))[:2]


def warp(img, A, size):
    """The crop as PIL sees it: PIL maps output to input in pixel-corner coordinates (centre + 0.5)."""
    shift = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    corner = shift @ np.vstack([A, [0, 0, 1]]) @ np.linalg.inv(shift)
    return img.transform((size, size), Image.AFFINE, tuple(np.linalg.inv(corner)[:2].flatten()), Image.BILINEAR)


class AlignTransform:
    """Image + landmarks -> (uint8 crop, target); the crop is normalised on the device (crops.normalize).
    The square box around the landmarks (or WFLW's box), enlarged by `crop_scale`, is resized to img_size.
    Training adds rotation, scale, shift, colour and a flip with the scheme's point permutation. Train
    target: landmarks in crop pixels (P, 2); test target: [original landmarks (P*2), crop -> image affine
    (6), subset flags] so predictions can go back."""

    def __init__(self, img_size, train, crop_scale=1.25, rotation=15.0, scale=0.1, shift=0.05):
        self.size, self.train, self.crop_scale = img_size, train, crop_scale
        self.rotation, self.scale, self.shift = rotation, scale, shift
        self.colour = v2.ColorJitter(0.3, 0.3, 0.2)

    def __call__(self, img, target):
        landmarks, flags, *box = target
        x0, y0, x1, y1 = box[0] if box else (*landmarks.min(0), *landmarks.max(0))
        center, side = np.array([(x0 + x1) / 2, (y0 + y1) / 2]), max(x1 - x0, y1 - y0) * self.crop_scale
        angle, flip = 0.0, False
        if self.train:
            r = torch.rand(5).tolist()
            angle = (2 * r[0] - 1) * self.rotation
            side *= 1 + (2 * r[1] - 1) * self.scale
            center = center + (np.array(r[2:4]) * 2 - 1) * self.shift * side
            flip = r[4] < 0.5
        A = crop_matrix(center, side, self.size, angle, flip)
        crop = warp(img, A, self.size)
        if self.train:
            crop = self.colour(crop)
        points = apply_affine(A, landmarks)
        if flip:
            points = points[SCHEMES[len(points)]["flip"]]
        if self.train:
            return v2.functional.pil_to_tensor(crop), torch.tensor(points, dtype=torch.float32)
        packed = np.concatenate([landmarks.flatten(), invert_affine(A).flatten(), np.atleast_1d(flags)])
        return v2.functional.pil_to_tensor(crop), torch.tensor(packed, dtype=torch.float32)


# ----------------------------------------------------------------------------- heat-maps

def to_heatmap_coords(points, img_size, heatmap_size):
    """Crop pixels -> heat-map pixels (both 0-based pixel centres)."""
    return (points + 0.5) * heatmap_size / img_size - 0.5


def gaussian_heatmaps(points, size, sigma):
    """points (B, P, 2) in heat-map pixels -> (B, P, size, size) Gaussians with peak value 1."""
    grid = torch.arange(size, device=points.device, dtype=torch.float32)
    dx = (grid[None, None, :] - points[..., 0:1]) ** 2  # (B, P, size) along x
    dy = (grid[None, None, :] - points[..., 1:2]) ** 2
    return torch.exp(-(dy[..., :, None] + dx[..., None, :]) / (2 * sigma ** 2))


def decode_heatmaps(heat, sigma):
    """(B, P, H, W) heat-maps in [0, 1] -> (B, P, 2) sub-pixel positions: the weighted mean of the
    heat (minus its local floor) in a window of radius ceil(3 sigma) + 1 around the peak."""
    B, P, H, W = heat.shape
    r = int(math.ceil(3 * sigma)) + 1
    peak = heat.flatten(2).argmax(-1)
    py, px = peak // W, peak % W
    offsets = torch.arange(-r, r + 1, device=heat.device)
    ys = (py[..., None] + offsets).clamp(0, H - 1)  # (B, P, 2r+1)
    xs = (px[..., None] + offsets).clamp(0, W - 1)
    flat = heat.flatten(2)
    idx = ys[..., :, None] * W + xs[..., None, :]  # (B, P, 2r+1, 2r+1)
    win = flat.gather(2, idx.flatten(2)).view(B, P, 2 * r + 1, 2 * r + 1)
    valid = ((py[..., None] + offsets >= 0) & (py[..., None] + offsets < H))[..., :, None] & \
            ((px[..., None] + offsets >= 0) & (px[..., None] + offsets < W))[..., None, :]
    w = (win - win.amin(dim=(-2, -1), keepdim=True)).clamp_min(0) * valid
    total = w.sum(dim=(-2, -1)).clamp_min(1e-12)
    x = (w * xs[..., None, :]).sum(dim=(-2, -1)) / total
    y = (w * ys[..., :, None]).sum(dim=(-2, -1)) / total
    return torch.stack([x, y], -1).float()


def nme(pred, gt, eyes):
    """Per-image NME: mean point error / inter-ocular distance (outer eye corners). (B, P, 2) -> (B,)."""
    ocular = (gt[:, eyes[0]] - gt[:, eyes[1]]).norm(dim=-1)
    return (pred - gt).norm(dim=-1).mean(-1) / ocular


def nme_summary(errors, threshold=0.1):
    """NME (%), failure rate (% with NME > 10%) and AUC at 10% of the cumulative error curve."""
    t = torch.linspace(0, threshold, 1001)
    ced = (errors[None, :] <= t[:, None]).float().mean(1)
    return dict(nme=errors.mean().item() * 100, failure_rate=(errors > threshold).float().mean().item() * 100,
                auc=torch.trapezoid(ced, t).item() / threshold)


# ----------------------------------------------------------------------------- model

def conv_bn(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class UperNet(nn.Module):
    """UperNet (Xiao et al. 2018) over four maps, finest first: pyramid pooling on the coarsest,
    top-down lateral fusion, every level upsampled to the finest and fused."""

    def __init__(self, in_dim, channels, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn(in_dim, channels, 1))
                                  for s in pool_scales])
        self.bottleneck = conv_bn(in_dim + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList([conv_bn(in_dim, channels, 1) for _ in range(3)])
        self.fpn = nn.ModuleList([conv_bn(channels, channels, 3) for _ in range(3)])
        self.fuse = conv_bn(4 * channels, channels, 3)

    def forward(self, maps):
        up = lambda x, ref: F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)
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
        # The final norm, and any block after the last one read, never reach the heat-maps: frozen, so that
        # DDP does not wait for their gradients
        backbone.norm.requires_grad_(False)
        backbone.blocks[max(blocks):].requires_grad_(False)
        D = backbone.embed_dim
        self.scales = nn.ModuleList([  # 14x14 -> 56, 28, 14, 7 (as BEiT/MAE segmentation)
            nn.Sequential(nn.ConvTranspose2d(D, D, 2, 2), nn.BatchNorm2d(D), nn.GELU(), nn.ConvTranspose2d(D, D, 2, 2)),
            nn.ConvTranspose2d(D, D, 2, 2), nn.Identity(), nn.MaxPool2d(2)])
        self.upernet = UperNet(D, channels)
        self.predict = nn.Conv2d(channels, n_points, 1)

    def forward(self, x):
        h, w = x.shape[-2] // self.backbone.patch_size, x.shape[-1] // self.backbone.patch_size
        tokens = self.backbone.get_intermediate_layers(x, self.blocks)  # 4 x (B, h*w, D)
        maps = [s(t.transpose(1, 2).reshape(len(x), -1, h, w)) for s, t in zip(self.scales, tokens)]  # (B, D, h, w)
        fused = F.interpolate(self.upernet(maps), size=(self.heatmap_size,) * 2, mode="bilinear", align_corners=False)
        return self.predict(fused)  # (B, P, heatmap, heatmap) logits


# ----------------------------------------------------------------------------- the task

class Alignment(finetune.Task):
    __doc__ = __doc__
    name, main_metric, higher_is_better = "align", "test/nme", False
    shown = ["test/nme", "test/nme_common", "test/nme_challenging", "test/failure_rate", "test/auc"]

    def add_args(self, p):
        finetune.add_common_args(p, ["300w", "wflw", "toy"], lr=0.01, weight_decay=1e-5, layer_decay=0.65,
                                 epochs=60, batch_size=64, notes=dict(
                                     lr="§4.1: 0.01, for the head;", layer_decay="unstated for alignment: "
                                     "the 0.65 of the other tasks;", epochs="unstated in the paper"))
        p.add_argument("--backbone-lr-scale", type=above(0.0), default=0.1, help="the backbone's lr relative to "
                       "the head's (before layer decay). §4.1 gives one lr, 0.01, 20x what it gives the backbone "
                       "for attributes and expressions: we read it as the head's (README); 1.0 gives one rate")
        p.add_argument("--heatmap-size", type=at_least(4), default=128, help="heat-map side (§4.1: 128)")
        p.add_argument("--channels", type=at_least(1), default=256, help="UperNet width (unstated; mmseg's name). At 64 px "
                       "inputs the head, not the ViT, is the step's cost: reproduce.sh uses 128")
        p.add_argument("--sigma", type=above(0.0), default=1.5, help="Gaussian sigma in heat-map pixels")
        p.add_argument("--crop-scale", type=above(0.0), default=1.25, help="face box enlargement before the crop")
        p.add_argument("--protocol", default="common", choices=["common", "private"], help="300W: train on "
                       "3,148 and test Common/Challenging/Full, or train on 3,837 and test on the private 600")

    def datasets(self, args):
        if args.dataset == "wflw":
            data = read_wflw_dataset(args.data)
        else:
            path = args.data
            if args.dataset == "toy":
                import toyfaces
                path = os.path.join(toyfaces.ensure_world(finetune.data_root(args.data_root)), "300w")
            data = read_300w(path, args.protocol)
        if not data["train"] or not data["test"]:
            raise ValueError(f"{args.data}: empty train or test split")
        self.args, self.n_points = args, len(data["train"][0][1][0])
        self.subsets = WFLW_FLAGS if args.dataset == "wflw" else (
            ["indoor", "outdoor"] if args.protocol == "private" else ["common", "challenging"])
        make = lambda train: AlignTransform(args.img_size, train, args.crop_scale)
        return LabelledImages(data["train"], make(True)), {"test": LabelledImages(data["test"], make(False))}

    def build_model(self, backbone, args):
        return AlignmentModel(backbone, self.n_points, args.heatmap_size, channels=args.channels)

    def loss(self, logits, points):
        # FaRL's soft-label cross-entropy in its per-pixel binary form: every heat-map pixel is a Bernoulli
        # whose soft label is the Gaussian target in [0, 1] (§4.1). A softmax over the map would need targets
        # summing to 1, which Gaussian heat-maps with peak 1 are not.
        a = self.args
        target = gaussian_heatmaps(to_heatmap_coords(points, a.img_size, a.heatmap_size), a.heatmap_size, a.sigma)
        return F.binary_cross_entropy_with_logits(logits.float(), target)

    def predict(self, model, images):
        a = self.args
        points = decode_heatmaps(torch.sigmoid(model(images).float()), a.sigma)
        return (points + 0.5) * a.img_size / a.heatmap_size - 0.5  # heat-map -> crop pixels

    def metrics(self, preds, targets, dataset):
        P = self.n_points
        gt = targets[:, :2 * P].view(-1, P, 2).double()
        back = targets[:, 2 * P:2 * P + 6].view(-1, 2, 3).double()  # crop -> original image
        pred = torch.einsum("bij,bpj->bpi", back[:, :, :2], preds.double()) + back[:, None, :, 2]
        errors = nme(pred, gt, SCHEMES[P]["eyes"])
        flags = targets[:, 2 * P + 6:]
        out = nme_summary(errors)
        if self.subsets == WFLW_FLAGS:
            for i, name in enumerate(WFLW_FLAGS):
                out.update({f"{k}_{name}": v for k, v in nme_summary(errors[flags[:, i] > 0]).items()})
        else:
            for i, name in enumerate(self.subsets):
                if (flags[:, 0] == i).any():
                    out[f"nme_{name}"] = nme_summary(errors[flags[:, 0] == i])["nme"]
        return out


if __name__ == "__main__":
    finetune.run_cli(Alignment())
