"""Multi-crop views of one image (paper §3, Fig. 2): M global and N local crops, two sets of
augmentations.

    python crops.py face.jpg --out views.png     # global views on top, local candidates below
    python crops.py                              # the same for the toy world's first face

The teacher sees the M global views (224px), the student the N local views (96px). With the
face-aware retrieval (retrieval.py) we cut C >= N local candidates and keep N of them per image in
the training step. The paper's order is crop, retrieve, augment, and the work splits the same way:

- a DataLoader worker, per image (`MultiCrop.__call__`): decode, draw the crop boxes and every
  view's augmentation parameters from the sample's seeded RNG (`draw`), and ship the image as uint8;
- the training step, per batch on the training device: the crops are cut (`resized_crops`, all
  boxes at once in fp32), the recogniser looks at them, the kept views are augmented
  (`augment`, DINO's recipe as batched tensor operations, one short function per operation) and
  normalised (`normalize`).

A worker thus does no per-pixel work beyond decoding, and the views do not depend on --workers or
resuming: all randomness is drawn in the worker from (seed, sample index).
"""
import math

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import default_collate
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from data import load_image, to_rgb, toy_faces
from run import ArgumentParser, at_least, run_cli

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MAX_SIGMA = 2.0  # the top of DINO's blur radii, U(0.1, 2.0): the blur's taps reach 3x it


# ----------------------------------------------------------------------------- per image (workers)

def cycle(values, n):
    """(n,) tensor: values repeated over n views."""
    return torch.tensor(values).repeat(n // len(values) + 1)[:n]


class MultiCrop:
    """DINO's multi-crop recipe (flip, colour jitter, grayscale, blur, solarize) with its
    probabilities; blur_p is (first global, second global, local) and solarize hits the second
    global view only."""

    def __init__(self, global_size=224, local_size=96, n_global=2, n_local=8, n_candidates=None,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), flip_p=0.5,
                 jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=(1.0, 0.1, 0.5),
                 solarize_p=0.2, sigma=(0.1, MAX_SIGMA)):
        self.global_size, self.local_size, self.n_global = global_size, local_size, n_global
        # C >= N candidates; C == N when nothing is filtered
        self.n_candidates, self.n_local = n_candidates or n_local, n_local
        self.retrieval = n_candidates is not None
        if self.n_candidates < n_local:
            raise ValueError(f"n_candidates ({self.n_candidates}) must be >= n_local ({n_local})")
        if not 0 < sigma[0] <= sigma[1] <= MAX_SIGMA:
            raise ValueError(f"sigma {sigma}: expected 0 < low <= high <= {MAX_SIGMA} (MAX_SIGMA)")
        self.global_scale, self.local_scale = global_scale, local_scale
        self.flip_p, self.jitter_p, self.gray_p, self.sigma = flip_p, jitter_p, gray_p, sigma
        # ColorJitter's ranges: brightness, contrast, saturation around 1, hue around 0
        b, c, s, h = jitter
        self.jitter_lo = torch.tensor([1 - b, 1 - c, 1 - s, -h])
        self.jitter_hi = torch.tensor([1 + b, 1 + c, 1 + s, h])
        # Two separate sets of augmentations (§1): the first global view always blurred, the second
        # rarely blurred but sometimes solarised, the locals blurred half of the time (DINO).
        self.global_blur_p = [blur_p[i % 2] for i in range(n_global)]
        self.global_solarize_p = [solarize_p * (i % 2) for i in range(n_global)]
        self.local_blur_p, self.local_solarize_p = [blur_p[2]], [0.0]

    def boxes(self, img, n, scale):
        """(n, 4) random-resized-crop boxes over `img`, rows (top, left, height, width)."""
        return torch.tensor([v2.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3))
                             for _ in range(n)])

    def draw(self, n, blur_p, solarize_p):
        """The augmentation parameters of n views, one row each; blur_p and solarize_p cycle over
        the views. flip, jitter, gray, solarize: (n,) bool; factors: (n, 4) brightness, contrast,
        saturation, hue; order: (n, 4) the order of the four (ColorJitter's random order); sigma:
        (n,) blur's standard deviation, 0 for no blur."""
        coin = torch.rand(n, 5)
        lo, hi = self.jitter_lo, self.jitter_hi
        blurred = coin[:, 3] < cycle(blur_p, n)
        lo_s, hi_s = self.sigma
        return dict(flip=coin[:, 0] < self.flip_p, jitter=coin[:, 1] < self.jitter_p,
                    factors=lo + (hi - lo) * torch.rand(n, 4), order=torch.rand(n, 4).argsort(1),
                    gray=coin[:, 2] < self.gray_p,
                    sigma=torch.where(blurred, lo_s + (hi_s - lo_s) * torch.rand(n), 0.0),
                    solarize=coin[:, 4] < cycle(solarize_p, n))

    def __call__(self, img):
        """A DataLoader worker's output for one image: the image (3, H, W) uint8, its shorter side
        at most twice the global crop's (`shrink`), the crop boxes, global (M, 4) and local
        candidates (C, 4), and the parameters that `augment` applies to each view (with the
        retrieval, its random numbers too: `selection`). The training step cuts the crops
        (`crops`)."""
        img = shrink(to_rgb(img), 2 * self.global_size)
        return dict(image=TF.pil_to_tensor(img),
                    global_boxes=self.boxes(img, self.n_global, self.global_scale),
                    local_boxes=self.boxes(img, self.n_candidates, self.local_scale),
                    global_params=self.draw(self.n_global, self.global_blur_p,
                                            self.global_solarize_p),
                    local_params=self.draw(self.n_candidates, self.local_blur_p,
                                           self.local_solarize_p),
                    **(self.selection() if self.retrieval else {}))

    def selection(self):
        """The retrieval's random numbers for one image (retrieval.select): a priority per
        candidate (C,), a draw per local slot (N,), and spare augmentation parameters for the N
        slots, which a candidate kept again takes (always colour-jittered: no two views the
        same)."""
        spare = self.draw(self.n_local, self.local_blur_p, self.local_solarize_p)
        spare["jitter"][:] = True
        return dict(priority=torch.rand(self.n_candidates), reuse=torch.rand(self.n_local),
                    spare_params=spare)

    def crops(self, batch):
        """The raw crops of a collated batch, where the batch is: global (B, M, 3, G, G) and local
        candidates (B, C, 3, L, L), uint8."""
        return tuple(resized_crops(batch["image"], batch[f"{k}_boxes"], size)
                     for k, size in (("global", self.global_size), ("local", self.local_size)))

    def sample(self, img):
        """The raw crops of one image, not augmented: (M global crops of global_size, C local
        candidates of local_size), RGB PIL images, cut from this MultiCrop's draw for the image
        (`__call__`) by `crops`."""
        return tuple([TF.to_pil_image(c) for c in crops[0]]
                     for crops in self.crops(collate([self(img)])))


def shrink(img, side):
    """An image whose shorter side exceeds `side`, resized to it (antialiased): the crops lose
    nothing that a global view can show, and a batch of photos travels and is cut at a face
    dataset's cost."""
    short = min(img.size)
    if short <= side:
        return img
    return img.resize((round(img.width * side / short), round(img.height * side / short)),
                      Image.BICUBIC, reducing_gap=3.0)


def collate(samples):
    """Workers' outputs -> a batch: default_collate, with the images padded to the largest by
    repeating their last row and column (a box's samples near the border read the border)."""
    H, W = (max(s["image"].shape[d] for s in samples) for d in (1, 2))
    images = torch.empty(len(samples), 3, H, W, dtype=torch.uint8)
    for image, s in zip(images, samples):
        h, w = s["image"].shape[1:]
        image[:, :h, :w] = s["image"]
        image[:, h:, :w] = s["image"][:, -1:]
        image[:, :, w:] = image[:, :, w - 1:w]
    rest = default_collate([{k: v for k, v in s.items() if k != "image"} for s in samples])
    return dict(image=images, **rest)


# ------------------------------------------------------------------------ per batch (device): crops
# DINO's RandomResizedCrop resizes one box at a time with PIL's bicubic filter. Here roi_align cuts
# every box of the batch in one call, in fp32: each output pixel averages bilinear samples spread
# over its own area (about one per input pixel covered), so a shrunk crop is antialiased and an
# enlarged one bilinear. The crops differ from PIL's by the interpolation alone (test_all.py,
# TestCrops). Images travel whole, their shorter side at most twice the global crop's (`shrink`).

def resized_crops(images, boxes, n_out):
    """uint8 images (B, 3, H, W) padded as `collate` pads them, and boxes (B, n, 4) as (top, left,
    height, width) -> crops (B, n, 3, n_out, n_out) uint8, on the images' device."""
    B, n = boxes.shape[:2]
    top, left, h, w = boxes.to(images.device, torch.float32).unbind(-1)  # (B, n) each
    image = torch.arange(B, device=images.device, dtype=torch.float32)[:, None].expand(B, n)
    rois = torch.stack([image, left, top, left + w, top + h], -1).flatten(0, 1)  # (B * n, 5)
    # aligned: a box's edges are pixel edges; sampling_ratio 0: ceil(box / n_out) samples a side
    crops = roi_align(images.float(), rois, n_out, sampling_ratio=0, aligned=True)
    return crops.round_().clamp_(0, 255).to(torch.uint8).view(B, n, 3, n_out, n_out)


# ----------------------------------------------------------------- per batch (device): augmentation
# Each operation takes float views (V, 3, H, W) in [0, 1] and a per-view mask or parameter, and
# equals torchvision's per-image functional with that view's parameters (test_all.py, TestCrops).
# Each computes on every view and keeps the result where the view's mask holds: no boolean indexing
# and no size read from the data, so the host never waits for the device (test_all.py counts).

def masked(x, on, y):
    """y on the views where `on` (V,) holds, x on the others."""
    return torch.where(on.view(-1, 1, 1, 1), y, x)


def flip(x, on):
    """DINO: RandomHorizontalFlip(0.5)."""
    return masked(x, on, TF.horizontal_flip(x))


def blend(x, y, factor):
    """torchvision's blend with one factor per view: factor * x + (1 - factor) * y, in [0, 1]."""
    f = factor[:, None, None, None]
    return (f * x + (1 - f) * y).clamp_(0, 1)


def gray(x):
    """ITU-R 601 luma (torchvision's rgb_to_grayscale), (V, 1, H, W)."""
    return TF.rgb_to_grayscale(x)


def brightness(x, f):
    return blend(x, torch.zeros_like(x), f)


def contrast(x, f):
    return blend(x, gray(x).mean((-3, -2, -1), keepdim=True), f)


def saturation(x, f):
    return blend(x, gray(x), f)


def rgb_to_hsv(x):
    """(V, 3, H, W) RGB -> HSV, all in [0, 1] (torchvision's and PIL's formulas)."""
    r, g, b = x.unbind(-3)
    maxc, minc = x.amax(-3), x.amin(-3)
    delta = maxc - minc
    s = delta / torch.where(maxc > 0, maxc, 1.0)
    rc, gc, bc = ((maxc[:, None] - x) / torch.where(delta > 0, delta, 1.0)[:, None]).unbind(-3)
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    return torch.stack([(h / 6 + 1).fmod(1), s, maxc], -3)


def hsv_to_rgb(x):
    """(V, 3, H, W) HSV -> RGB: channel n (red 5, green 3, blue 1) is v - v s clamp(min(k, 4 - k),
    0, 1) at k = (n + 6 h) mod 6, the sextant formula of torchvision and PIL in closed form."""
    h, s, v = x.unbind(-3)
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(3, 1, 1)
    k = (n + 6 * h[:, None]).remainder(6)  # (V, 3, H, W)
    return v[:, None] - (v * s)[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def hue(x, f):
    """Rotate the hue by f (a fraction of the circle) per view."""
    h, s, v = rgb_to_hsv(x).unbind(-3)
    return hsv_to_rgb(torch.stack([(h + f[:, None, None]).remainder(1), s, v], -3))


JITTER = (brightness, contrast, saturation, hue)  # ColorJitter's order of its factors


def blend_step(x, j, factors):
    """Each view's brightness (j = 0), contrast (1) or saturation (2) with its factor: a blend with
    black, the mean gray level, or the gray image (j = 3, hue, is left to color_jitter)."""
    g = gray(x)
    j4 = j.view(-1, 1, 1, 1)
    other = torch.where(j4 == 0, 0.0, torch.where(j4 == 1, g.mean((-3, -2, -1), keepdim=True), g))
    return blend(x, other, factors.gather(1, j.clamp(max=2)[:, None])[:, 0])


def color_jitter(x, on, factors, order):
    """DINO: RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), its four adjustments in a
    random order per view: at step k, view v applies JITTER[order[v, k]]. Hue, the costly one,
    runs once for all views: the steps before each view's hue, the hue, the steps after it."""
    hue_step = (order == 3).int().argmax(1)  # (V,)
    for k in range(4):
        x = masked(x, on & (k < hue_step), blend_step(x, order[:, k], factors))
    x = masked(x, on, hue(x, factors[:, 3]))
    for k in range(4):
        x = masked(x, on & (k > hue_step), blend_step(x, order[:, k], factors))
    return x


def grayscale(x, on):
    """DINO: RandomGrayscale(0.2), three equal channels."""
    return masked(x, on, gray(x).expand_as(x))


def gaussian_kernels(sigma, half):
    """(V, 2 * half + 1) normalised 1-D Gaussians, one per view (torchvision's kernel)."""
    d = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float32)
    return torch.softmax(-0.5 * (d / sigma[:, None]) ** 2, dim=1)


def blur_views(x, sigma):
    """A Gaussian blur with each view's sigma: two separable passes, reflect padding. The taps reach
    3 MAX_SIGMA, as PIL's reach 3 sigma (a smaller sigma's outer taps are zeros to float rounding);
    at most the image's side (reflect padding needs that)."""
    V, C, H, W = x.shape
    half = min(math.ceil(3 * MAX_SIGMA), H - 1, W - 1)
    k = gaussian_kernels(sigma, half).repeat_interleave(C, 0)  # (V * C, 2 * half + 1)
    y = F.pad(x.reshape(1, V * C, H, W), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=V * C)  # rows
    y = F.conv2d(y, k[:, None, :, None], groups=V * C)  # columns
    return y.view(V, C, H, W)


def gaussian_blur(x, sigma):
    """DINO: PIL's GaussianBlur with radius (its standard deviation) ~ U(0.1, 2.0), with the
    recipe's probability; sigma 0: no blur."""
    return masked(x, sigma > 0, blur_views(x, sigma.clamp(min=0.1)))


def invert_bright(x):
    """Solarize at 128 of 255: levels 128 and up inverted (127.5 sits between two levels)."""
    return TF.solarize(x, 127.5 / 255)


def solarize(x, on):
    """DINO: RandomSolarize(128) with probability 0.2, on the second global view only."""
    return masked(x, on, invert_bright(x))


def augment(crops, params):
    """uint8 crops (V, 3, H, W) and their drawn parameters -> augmented float views in [0, 1]:
    DINO's recipe in its order (flip, colour jitter, grayscale, blur, solarize)."""
    x = TF.to_dtype(crops, torch.float32, scale=True)
    x = flip(x, params["flip"])
    x = color_jitter(x, params["jitter"], params["factors"], params["order"])
    x = grayscale(x, params["gray"])
    x = gaussian_blur(x, params["sigma"])
    return solarize(x, params["solarize"])


def eval_crop(size):
    """MAE's evaluation view, PIL -> uint8 (3, size, size): the short side resized to size / 0.875
    (256 for 224, bicubic), then the centre crop. Fine-tuning and the probe evaluate on it."""
    return v2.Compose([v2.PILToTensor(),
                       v2.Resize(int(size / 0.875), interpolation=v2.InterpolationMode.BICUBIC,
                                 antialias=True),
                       v2.CenterCrop(size)])


def normalize(views):
    """uint8 views (..., 3, H, W), or float ones in [0, 1] -> ImageNet mean/std: the same arithmetic
    as torchvision's ToDtype(scale=True) + Normalize per view, done once for the whole batch."""
    x = TF.to_dtype(views, torch.float32, scale=True)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def batch_views(crops, params):
    """A batch's crops (B, V, 3, H, W) uint8 and parameters (B, V, ...) -> normalised float views
    (B, V, 3, H, W), augmented where they are (the training device), the whole batch at once."""
    B, V = crops.shape[:2]
    x = augment(crops.flatten(0, 1), {k: p.flatten(0, 1) for k, p in params.items()})
    return normalize(x).view(B, V, *x.shape[1:])


def take(crops, params, idx, spare):
    """Views idx (B, N) of each image: the crops (B, N, ...) and their parameters. A candidate kept
    a second time in a row takes that slot's spare parameters (MultiCrop.selection) instead of its
    own:
    the same crop, another view."""
    rows = torch.arange(len(idx), device=idx.device)[:, None]
    again = (idx[:, :, None] == idx[:, None, :]).tril(-1).any(-1)  # (B, N): kept earlier in the row
    return crops[rows, idx], {k: torch.where(again.view(*again.shape, *[1] * (p.ndim - 2)),
                                             spare[k], p[rows, idx]) for k, p in params.items()}


def contact_sheet(rows, tile=96, pad=4, boxes=None, captions=None, labels=None):
    """Rows of PIL images -> one PIL sheet; a None tile is left blank. boxes[r][c] = colour of a
    frame around tile (r, c) or None; captions[r][c] = text on a black band along the tile's top;
    labels[r] = text left of row r."""
    left = 8 + 7 * max(map(len, labels)) if labels else 0  # ~7 px a character
    width = left + max(len(r) for r in rows) * (tile + pad) + pad
    sheet = Image.new("RGB", (width, len(rows) * (tile + pad) + pad), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        y = pad + i * (tile + pad)
        if labels:
            d.text((4, y + tile // 2 - 6), labels[i], fill=(0, 0, 0))
        for j, im in enumerate(row):
            if im is None:
                continue
            x = left + pad + j * (tile + pad)
            sheet.paste(im.convert("RGB").resize((tile, tile)), (x, y))
            if captions and captions[i][j]:
                d.rectangle([x, y, x + tile - 1, y + 13], fill=(0, 0, 0))
                d.text((x + 3, y + 1), captions[i][j], fill=(255, 255, 255))
            if boxes and boxes[i][j]:
                d.rectangle([x, y, x + tile - 1, y + tile - 1], outline=boxes[i][j], width=3)
    return sheet


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("image", nargs="?", default=None,
                   help="a face image (default: the toy world's first face)")
    p.add_argument("--out", default="views.png", help="the contact sheet (PNG)")
    p.add_argument("--global-size", type=at_least(1), default=224, help="global crop side (§3.2)")
    p.add_argument("--local-size", type=at_least(1), default=96, help="local crop side (§3.2)")
    p.add_argument("--n-local", type=at_least(1), default=8,
                   help="local crops N (unstated; DINO's 8)")
    p.add_argument("--seed", type=int, default=0, help="crop sampling")
    a = p.parse_args()
    a.image = a.image or toy_faces(1)[0]
    img = load_image(a.image)
    if img is None:
        raise ValueError(f"{a.image}: not a readable image")
    torch.manual_seed(a.seed)
    # the training step's views: the worker's boxes and parameters, cut and augmented as a batch
    # of one
    mc = MultiCrop(a.global_size, a.local_size, n_local=a.n_local)
    views = mc(img)
    g, l = ([TF.to_pil_image(v) for v in augment(crops[0], views[f"{k}_params"])]
            for crops, k in zip(mc.crops(collate([views])), ("global", "local")))
    contact_sheet([g, l], tile=128).save(a.out)
    print(f"wrote {a.out}: {len(g)} global views on top, {len(l)} local views below")


if __name__ == "__main__":
    run_cli(main)
