"""Multi-crop views of one image (paper §3, Fig. 2): M global and N local crops, two sets of
augmentations.

    python crops.py face.jpg --out views.png     # global views on top, local candidates below

The teacher sees the M global views (224px), the student the N local views (96px). With the
face-aware retrieval (retrieval.py) we cut C >= N local candidates and keep N of them per image in
the training step; the recogniser looks at the raw crops (before augmentation), which `__call__`
also returns at 112x112. The augmentations are DINO's (flip, colour jitter, grayscale, Gaussian
blur, solarize), built with torchvision.transforms.v2. Views leave the DataLoader workers as uint8
and are normalised on the training device, a whole batch at once (`normalize`): a quarter of the
bytes to pass between processes and to the GPU, and no per-view float work in the workers.
"""
import torch
from PIL import Image, ImageDraw, ImageFilter
from torchvision.transforms import v2

from data import ArgumentParser, at_least, load_image, to_rgb

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class GaussianBlur(torch.nn.Module):
    """DINO's blur: PIL's Gaussian blur with radius ~ U(0.1, 2.0), applied with probability p.
    (PIL's blur costs a fraction of a 23-tap convolution on a tensor.)"""

    def __init__(self, p, radius=(0.1, 2.0)):
        super().__init__()
        self.p, self.radius = p, radius

    def forward(self, img):
        if torch.rand(1).item() >= self.p:
            return img
        lo, hi = self.radius
        return img.filter(ImageFilter.GaussianBlur(lo + (hi - lo) * torch.rand(1).item()))


class MultiCrop:
    def __init__(self, global_size=224, local_size=96, n_global=2, n_local=8, n_candidates=None,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), recognizer_size=112, flip_p=0.5,
                 jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_p=(1.0, 0.1, 0.5),
                 solarize_p=0.2):
        self.global_size, self.local_size, self.n_global = global_size, local_size, n_global
        # C >= N candidates; C == N when nothing is filtered
        self.n_candidates = n_candidates or n_local
        if self.n_candidates < n_local:
            raise ValueError(f"n_candidates ({self.n_candidates}) must be >= n_local ({n_local})")
        self.global_scale, self.local_scale = global_scale, local_scale
        # side of the raw crops; None: no recogniser, no raw crops
        self.recognizer_size = recognizer_size

        # one of DINO's view recipes, on PIL images; blur and solarize differ
        def views(blur, solarize=0.0):
            return v2.Compose([
                v2.RandomHorizontalFlip(flip_p),
                v2.RandomApply([v2.ColorJitter(*jitter)], p=jitter_p),
                v2.RandomGrayscale(gray_p),
                GaussianBlur(blur),
                v2.RandomSolarize(128, p=solarize),
                v2.PILToTensor(),
            ])
        # Two separate sets of augmentations (§1): the first global view always blurred, the second
        # rarely blurred but sometimes solarised, the locals blurred half of the time (DINO).
        self.global_views = [views(blur_p[0]), views(blur_p[1], solarize_p)]
        self.local_view = views(blur_p[2])

    def boxes(self, img, n, scale):
        """n random-resized-crop boxes (top, left, height, width) over `img`."""
        return [v2.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3)) for _ in range(n)]

    def cut(self, img, boxes, size):
        return [img.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
                for top, left, h, w in boxes]

    def sample(self, img):
        """Raw (un-augmented) crops: (M global PIL crops, C local candidate PIL crops)."""
        img = to_rgb(img)
        g = self.boxes(img, self.n_global, self.global_scale)
        l = self.boxes(img, self.n_candidates, self.local_scale)
        return self.cut(img, g, self.global_size), self.cut(img, l, self.local_size)

    def augment(self, global_crops, local_crops):
        """Raw crops -> augmented views: (M, 3, G, G) and (C, 3, L, L) uint8 tensors."""
        g = [self.global_views[i % len(self.global_views)](c) for i, c in enumerate(global_crops)]
        return torch.stack(g), torch.stack([self.local_view(c) for c in local_crops])

    def __call__(self, img):
        """A DataLoader worker's output for one image, all uint8: augmented global views (M, 3, G,
        G), augmented views of all C candidates (C, 3, L, L) and, when there is a recogniser
        (recognizer_size), the raw crops it looks at, (M + C, 3, 112, 112) (the selection happens
        per batch in the training step)."""
        global_crops, local_crops = self.sample(img)
        g, l = self.augment(global_crops, local_crops)
        views = dict(global_views=g, local_views=l)
        if self.recognizer_size:
            size = (self.recognizer_size, self.recognizer_size)
            views["raw"] = torch.stack([v2.functional.pil_to_tensor(c.resize(size, Image.BILINEAR))
                                        for c in global_crops + local_crops])
        return views


def normalize(views):
    """uint8 views (..., 3, H, W) -> float32 in [0, 1], then ImageNet mean/std: the same arithmetic
    as torchvision's ToDtype(scale=True) + Normalize per view, done once for the whole batch."""
    x = v2.functional.to_dtype(views, torch.float32, scale=True)
    return v2.functional.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def contact_sheet(rows, tile=96, pad=4, boxes=None, captions=None):
    """Rows of PIL images -> one PIL sheet; a None tile is left blank. boxes[r][c] = colour of a
    frame around tile (r, c) or None; captions[r][c] = text written on it."""
    width = max(len(r) for r in rows) * (tile + pad) + pad
    sheet = Image.new("RGB", (width, len(rows) * (tile + pad) + pad), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            if im is None:
                continue
            x, y = pad + j * (tile + pad), pad + i * (tile + pad)
            sheet.paste(im.convert("RGB").resize((tile, tile)), (x, y))
            if boxes and boxes[i][j]:
                d.rectangle([x, y, x + tile - 1, y + tile - 1], outline=boxes[i][j], width=3)
            if captions and captions[i][j]:
                d.text((x + 4, y + 2), captions[i][j], fill=(255, 0, 0))
    return sheet


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("image", help="a face image")
    p.add_argument("--out", default="views.png", help="the contact sheet (PNG)")
    p.add_argument("--global-size", type=at_least(1), default=224, help="global crop side (§3.2)")
    p.add_argument("--local-size", type=at_least(1), default=96, help="local crop side (§3.2)")
    p.add_argument("--n-local", type=at_least(1), default=8,
                   help="local crops N (unstated; DINO's 8)")
    p.add_argument("--seed", type=int, default=0, help="crop sampling")
    a = p.parse_args()
    img = load_image(a.image)
    if img is None:
        raise SystemExit(f"error: {a.image}: not a readable image")
    torch.manual_seed(a.seed)
    views = MultiCrop(a.global_size, a.local_size, n_local=a.n_local, recognizer_size=None)(img)
    g, l = ([v2.functional.to_pil_image(v) for v in views[k]]
            for k in ("global_views", "local_views"))
    contact_sheet([g, l], tile=128).save(a.out)
    print(f"wrote {a.out}: {len(g)} global views on top, {len(l)} local views below")


if __name__ == "__main__":
    main()
