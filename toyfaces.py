"""A procedural face world, so that every part of ProS runs on a laptop CPU (cf. the synthetic
faces of paper §3.4 and Fig. 4, which are StyleGAN2's).

    python toyfaces.py --out data/toy --images 4000 --seed 0

Each identity is a fixed set of traits (face shape, skin, eyes, brows, nose, lips, hair); each image
varies pose, expression (the 7 RAF-DB classes), accessories, lighting, background clutter and blur.
The 68 iBUG landmarks come from the same geometry that draws the face. The world is written in the
real on-disk formats (docs/formats.md), so the readers of real data read it:

    DIR/ms1m/         train.rec, train.idx, property: insightface RecordIO    (pretraining)
    DIR/celeba/       img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt,
                      identity_CelebA.txt
    DIR/rafdb/        EmoLabel/list_patition_label.txt, Image/aligned/       (expressions)
    DIR/300w/         afw/, helen/, lfpw/, ibug/ with .pts landmarks         (alignment)
    DIR/arcface.onnx  a small recogniser trained on the toy identities with the ArcFace loss

The same seed gives byte-identical files.
"""
import io
import math
import os
import shutil
import signal
import struct
import tempfile
import time
import warnings
from multiprocessing import Pool

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter
from torchvision.transforms.v2.functional import pil_to_tensor
from tqdm import tqdm

from crops import MultiCrop, collate, resized_crops
from data import RAFDB_EXPRESSIONS, RECORDIO_MAGIC
from loss import cosine_schedule
from retrieval import ArcFace, similarity
from run import ArgumentParser, at_least

# RAF-DB 1..7
EXPRESSIONS = RAFDB_EXPRESSIONS
ATTRIBUTES = ["Arched_Eyebrows", "Bald", "Bangs", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry",
              "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses", "Goatee", "Gray_Hair",
              "Mouth_Slightly_Open",
              "Mustache", "Narrow_Eyes", "No_Beard", "Pale_Skin", "Rosy_Cheeks", "Smiling",
              "Wearing_Earrings", "Wearing_Hat",
              "Wearing_Lipstick"]  # CelebA's names, CelebA's order
HAIR = {"black": (25, 22, 20), "blond": (222, 190, 120), "brown": (110, 70, 40),
        "gray": (165, 165, 160), "red": (170, 60, 30)}
SKIN = [(250, 225, 205), (235, 195, 160), (205, 160, 120), (165, 115, 80), (115, 75, 50)]
PALE = (255, 240, 230)
SS = 2  # supersampling factor: draw at 2x, then downsample (antialiasing)

# ----------------------------------------------------------------------------- identities and
# images


def identity_traits(seed, ident):
    """The fixed traits of one identity (its own RNG stream, so identities are stable)."""
    r = np.random.default_rng([seed, 7, ident])
    bald = r.random() < 0.1
    return dict(face_w=r.uniform(0.85, 1.0), face_h=r.uniform(1.2, 1.4),
                taper=r.uniform(0.05, 0.3), pale=r.random() < 0.2,
                skin=np.array(SKIN[r.integers(len(SKIN))]) + r.integers(-12, 12, 3),
                eye_dx=r.uniform(0.32, 0.44), eye_y=r.uniform(-0.22, -0.1),
                eye_w=r.uniform(0.13, 0.19), narrow=r.random() < 0.25,
                iris=np.array([(70, 45, 25), (60, 110, 160), (70, 120, 70),
                               (30, 25, 20)][r.integers(4)]), bushy=r.random() < 0.3,
                arched=r.random() < 0.35, nose_len=r.uniform(0.3, 0.4), big_nose=r.random() < 0.3,
                mouth_y=r.uniform(0.52, 0.62), mouth_w=r.uniform(0.27, 0.36),
                lip=np.array([(190, 110, 100), (170, 95, 90), (200, 125, 115)][r.integers(3)]),
                bald=bald,
                hair=["black", "blond", "brown", "gray",
                      "red"][r.choice(5, p=[.3, .2, .25, .15, .1])],
                style="none" if bald else ["short", "long", "bangs"][r.integers(3)],
                mustache=r.random() < 0.25, goatee=r.random() < 0.2,
                eyeglass_p=r.choice([0.05, 0.8], p=[.8, .2]),
                lipstick_p=r.choice([0.05, 0.85], p=[.75, .25]),
                earring_p=r.choice([0.05, 0.8], p=[.7, .3]))


# (brow raise, inner-brow raise, eye opening, mouth opening (lo, hi), smile, mouth width, disgust).
# Drawn
# strong enough to tell apart at 64 px: at half these deviations from Neutral, every init stayed at
# chance.
EXPRESSION_SHAPES = {
    "Surprise": (0.32, 0.04, 2.0, (0.32, 0.52), 0.0, 0.44, 0.0),
    "Fear": (0.20, 0.20, 1.7, (0.12, 0.24), -0.08, 1.4, 0.0),
    "Disgust": (-0.10, -0.08, 0.4, (0.0, 0.08), -0.10, 0.9, 2.0),
    "Happiness": (0.04, 0.0, 0.6, (0.0, 0.24), 0.26, 1.3, 0.0),
    "Sadness": (0.0, 0.18, 0.6, (0.0, 0.04), -0.18, 0.9, 0.0),
    "Anger": (-0.14, -0.22, 0.4, (0.0, 0.08), -0.04, 0.76, 0.0),
    "Neutral": (0.0, 0.0, 1.0, (0.0, 0.02), 0.0, 1.0, 0.0),
}


def expression_look(expression, k, opening):
    """The face geometry of `expression` at intensity k (1 = the table above), without noise;
    opening in [0, 1] picks the mouth opening within the expression's range."""
    raise_, inner, eye_open, (o_lo, o_hi), smile, width, disgust = EXPRESSION_SHAPES[expression]
    return dict(brow_raise=k * raise_, brow_inner=k * inner, eye_open=1 + k * (eye_open - 1),
                mouth_open=(o_lo + opening * (o_hi - o_lo)) * k, smile=k * smile,
                mouth_width=1 + k * (width - 1), disgust=k * disgust)


def sample_look(r, t, expression):
    """Per-image state: expression (with random intensity and noise) and accessories."""
    k = r.uniform(0.6, 1.2)  # intensity: expressions are graded, not one template each
    # the draws' order fixes the world a seed gives: brow, inner brow, eye, mouth, smile
    brow_noise, inner_noise, eye_noise = r.normal(0, 0.015), r.normal(0, 0.015), r.normal(0, 0.05)
    look = expression_look(expression, k, r.random())
    look["smile"] += r.normal(0, 0.01)
    look["brow_raise"] += brow_noise
    look["brow_inner"] += inner_noise
    look["eye_open"] += eye_noise
    look.update(glasses=r.random() < t["eyeglass_p"], hat=r.random() < 0.15,
                earrings=r.random() < t["earring_p"],
                lipstick=r.random() < t["lipstick_p"], rosy=r.random() < 0.25,
                blurry=r.random() < 0.12)
    return look


def attributes(t, look):
    haired = not t["bald"]
    a = dict(Arched_Eyebrows=t["arched"], Bald=t["bald"], Bangs=t["style"] == "bangs",
             Big_Nose=t["big_nose"], Black_Hair=haired and t["hair"] == "black",
             Blond_Hair=haired and t["hair"] == "blond", Blurry=look["blurry"],
             Brown_Hair=haired and t["hair"] == "brown", Bushy_Eyebrows=t["bushy"],
             Eyeglasses=look["glasses"], Goatee=t["goatee"],
             Gray_Hair=haired and t["hair"] == "gray",
             Mouth_Slightly_Open=look["mouth_open"] > 0.05, Mustache=t["mustache"],
             Narrow_Eyes=t["narrow"], No_Beard=not (t["goatee"] or t["mustache"]),
             Pale_Skin=t["pale"], Rosy_Cheeks=look["rosy"], Smiling=look["smile"] > 0.06,
             Wearing_Earrings=look["earrings"], Wearing_Hat=look["hat"],
             Wearing_Lipstick=look["lipstick"])
    return [int(a[name]) for name in ATTRIBUTES]


def landmarks_canonical(t, look):
    """68 iBUG points in the face frame (x right, y down; face half-width ~1), frontal."""
    P = np.zeros((68, 2))
    fw, fh = t["face_w"], t["face_h"]
    s = np.linspace(0, np.pi, 17)  # jaw 0-16: image-left temple, chin (8), image-right temple
    P[0:17, 0] = -fw * np.cos(s) * (1 - t["taper"] * np.sin(s) ** 2)
    P[0:17, 1] = t["eye_y"] + (fh - t["eye_y"]) * np.sin(s) ** 0.9
    ex, ey, ew = t["eye_dx"], t["eye_y"], t["eye_w"]
    eh = (0.04 if t["narrow"] else 0.075) * look["eye_open"]
    brow_y, arch = ey - 0.17 - look["brow_raise"], 0.09 if t["arched"] else 0.025
    u = np.linspace(0, 1, 5)  # outer -> inner along the image-left brow
    bx = -ex - ew * 1.2 + u * ew * 2.1
    by = brow_y - arch * np.sin(np.pi * u) - look["brow_inner"] * u
    P[17:22] = np.stack([bx, by], 1)
    P[22:27] = np.stack([-bx[::-1], by[::-1]], 1)  # mirrored: inner -> outer
    nb = ey + t["nose_len"] + 0.05
    nw = 0.24 if t["big_nose"] else 0.15
    P[27:31] = np.stack([np.zeros(4), np.linspace(ey, nb, 4)], 1)
    P[31:36] = np.stack([np.linspace(-nw, nw, 5), nb + np.array([0.0, 0.03, 0.05, 0.03, 0.0])], 1)
    for cx, idx in ((-ex, [36, 37, 38, 39, 40, 41]), (ex, [42, 43, 44, 45, 46, 47])):
        pts = [(cx - ew, ey), (cx - ew / 3, ey - eh), (cx + ew / 3, ey - eh), (cx + ew, ey),
               (cx + ew / 3, ey + eh), (cx - ew / 3, ey + eh)]
        P[idx] = pts
    my = t["mouth_y"] + 0.1 * (1.3 - fh) / 0.2
    mw, op = t["mouth_w"] * look["mouth_width"], look["mouth_open"]

    def curve(x):  # smile lifts the corners, sadness drops them
        return -look["smile"] * (x / mw) ** 2

    def up(x):  # raised upper lip
        return -0.35 * look["disgust"] * 0.06 * max(0.0, 1 - abs(x + mw / 3) / mw)
    xs_up = np.array([-mw, -2 * mw / 3, -mw / 3, 0, mw / 3, 2 * mw / 3, mw])
    P[48:55] = [(x, my + curve(x) - (0.0 if abs(x) == mw else 0.045 + op / 2) + up(x))
                for x in xs_up]
    xs_lo = np.array([2 * mw / 3, mw / 3, 0, -mw / 3, -2 * mw / 3])
    P[55:60] = [(x, my + curve(x) + 0.06 + op / 2) for x in xs_lo]
    xi = 0.85 * mw
    P[60] = (-xi, my + curve(-xi))
    P[61:64] = [(x, my + curve(x) - op / 2 + up(x)) for x in (-mw / 3, 0, mw / 3)]
    P[64] = (xi, my + curve(xi))
    P[65:68] = [(x, my + curve(x) + op / 2) for x in (mw / 3, 0, -mw / 3)]
    return P


def ellipse(cx, cy, rx, ry, a0=0.0, a1=2 * np.pi, n=32):
    a = np.linspace(a0, a1, n)
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)


class Pose:
    """Face frame -> pixels: rotate by `angle` degrees, scale to `scale` px per unit, move to
    `center`."""

    def __init__(self, angle, scale, center):
        a = math.radians(angle)
        self.R = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) * scale
        self.c, self.scale = np.asarray(center, float), scale

    def __call__(self, pts):
        return np.asarray(pts, float) @ self.R.T + self.c


def draw_background(d, r, size):
    d.rectangle([0, 0, size, size], fill=tuple(int(v) for v in r.integers(40, 230, 3)))
    kind = r.integers(3)
    col = tuple(int(v) for v in r.integers(0, 255, 3))
    if kind == 0:  # stripes
        step = int(r.integers(8, 30)) * SS
        for x in range(-size, 2 * size, 2 * step):
            d.polygon([(x, 0), (x + step, 0), (x + step + size // 3, size), (x + size // 3, size)],
                      fill=col)
    elif kind == 1:  # checker
        step = int(r.integers(10, 32)) * SS
        for i in range(0, size, step):
            for j in range(0, size, step):
                if (i // step + j // step) % 2:
                    d.rectangle([i, j, i + step, j + step], fill=col)
    for _ in range(int(r.integers(3, 9))):  # non-face objects: the retrieval's things to reject
        c = tuple(int(v) for v in r.integers(0, 255, 3))
        x, y = r.uniform(0, size, 2)
        w, h = r.uniform(0.05, 0.3, 2) * size
        shape = r.integers(3)
        if shape == 0:
            d.rectangle([x, y, x + w, y + h], fill=c)
        elif shape == 1:
            d.ellipse([x, y, x + w, y + w], fill=c)
        else:
            d.polygon([(x, y), (x + w, y + h / 2), (x, y + h)], fill=c)


def render(t, look, pose, size, r):
    """Draw one face image; returns (PIL RGB of side `size`, (68, 2) landmarks in pixels, face
    box)."""
    big = Pose(0, 0, (0, 0))
    big.R, big.c = pose.R * SS, pose.c * SS
    img = Image.new("RGB", (size * SS, size * SS))
    d = ImageDraw.Draw(img)
    draw_background(d, r, size * SS)
    P = landmarks_canonical(t, look)
    skin = tuple(int(v) for v in np.clip(PALE if t["pale"] else t["skin"], 0, 255))
    hair = tuple(int(v) for v in HAIR[t["hair"]])

    def poly(pts, fill):
        d.polygon([tuple(p) for p in big(pts)], fill=fill)

    def line(pts, fill, w):
        d.line([tuple(p) for p in big(pts)], fill=fill, width=max(1, int(w * big.scale)),
               joint="curve")
    fw, fh, top = t["face_w"], t["face_h"], t["eye_y"] - 1.25
    shirt = tuple(int(v) for v in r.integers(0, 255, 3))
    poly([(-1.6, fh + 2.5), (-1.5, fh + 0.9), (-0.35, fh + 0.5), (0.35, fh + 0.5), (1.5, fh + 0.9),
          (1.6, fh + 2.5)], shirt)
    poly([(-0.35, fh - 0.4), (0.35, fh - 0.4), (0.4, fh + 0.7), (-0.4, fh + 0.7)], skin)  # neck
    if t["style"] == "long":
        poly(ellipse(0, t["eye_y"] + 0.2, fw * 1.3, fh + 0.55), hair)
    for side in (-1, 1):  # ears
        poly(ellipse(side * fw * 0.98, t["eye_y"] + 0.15, 0.14, 0.25), skin)
    head = np.concatenate([P[0:17],
                           ellipse(0, t["eye_y"], fw, t["eye_y"] - top, 0, -np.pi, 24)[1:-1]])
    poly(head, skin)
    if t["style"] != "none":  # hair cap down to the hairline; bangs cover the forehead
        hairline = t["eye_y"] - (0.3 if t["style"] == "bangs" else 0.62)
        cap = np.concatenate([ellipse(0, t["eye_y"], fw * 1.06, t["eye_y"] - top + 0.1, np.pi,
                                      2 * np.pi, 24),
                              [(fw * 1.02, hairline + 0.2), (0, hairline),
                               (-fw * 1.02, hairline + 0.2)]])
        poly(cap, hair)
    if look["rosy"]:
        cheek = tuple(int(0.6 * a + 0.4 * b) for a, b in zip(skin, (230, 60, 70)))
        for side in (-1, 1):
            poly(ellipse(side * 0.55, t["mouth_y"] - 0.25, 0.17, 0.11), cheek)
    for idx in ([36, 37, 38, 39, 40, 41], [42, 43, 44, 45, 46, 47]):
        poly(P[idx], (245, 245, 240))
        c = P[idx].mean(0)
        eh = (P[idx[4], 1] - P[idx[1], 1]) / 2
        rr = min(t["eye_w"] * 0.45, eh * 0.95)
        poly(ellipse(c[0], c[1], rr, rr, n=16), tuple(int(v) for v in t["iris"]))
        poly(ellipse(c[0], c[1], rr * 0.45, rr * 0.45, n=12), (10, 10, 10))
        line(P[idx + [idx[0]]], (60, 40, 30), 0.018)
    brow_col = tuple(int(v * 0.7) for v in hair) if not t["bald"] else (80, 60, 45)
    for idx in (slice(17, 22), slice(22, 27)):
        line(P[idx], brow_col, 0.09 if t["bushy"] else 0.035)
    shade = tuple(int(v * 0.8) for v in skin)
    if t["big_nose"]:
        wing = [P[35] + (0.02, -0.03), P[33], P[31] + (-0.02, -0.03)]
        poly([P[27] + (-0.06, 0), P[27] + (0.06, 0), *wing], shade)
    line(P[27:31], shade, 0.025)
    line(P[31:36], (int(skin[0] * .55), int(skin[1] * .5), int(skin[2] * .5)), 0.03)
    if look["disgust"] > 0.3:  # nose wrinkles
        for side in (-1, 1):
            line([P[28] + (side * 0.08, -0.02), P[29] + (side * 0.12, 0.02)], shade, 0.02)
    lip = (200, 30, 50) if look["lipstick"] else tuple(int(v) for v in t["lip"])
    poly(P[48:60], lip)
    if look["mouth_open"] > 0.02:
        poly(P[60:68], (60, 15, 20))
        if look["smile"] > 0.05:
            poly([P[60], P[61], P[62], P[63], P[64], (P[63] + P[65]) / 2, (P[61] + P[67]) / 2],
                 (240, 240, 235))
    else:
        line(P[[48, 60, 61, 62, 63, 64, 54]], (90, 30, 30), 0.015)
    if t["mustache"]:
        poly([P[48] + (-0.03, -0.02), P[31] + (-0.05, 0.04), P[33] + (0, 0.03),
              P[35] + (0.05, 0.04), P[54] + (0.03, -0.02), P[52] + (0, -0.01), P[50] + (0, -0.01)],
             brow_col)
    if t["goatee"]:
        poly([P[57] + (-0.17, 0.03), P[57] + (0.17, 0.03), P[8] + (0.12, -0.02), P[8] + (0, 0.04),
              P[8] + (-0.12, -0.02)], brow_col)
    if look["glasses"]:
        frame = (20, 20, 30)
        for idx in (slice(36, 42), slice(42, 48)):
            c = P[idx].mean(0)
            line(ellipse(c[0], c[1], t["eye_w"] * 1.5, 0.16, n=24), frame, 0.03)
        line([P[39] + (0.05, -0.03), P[42] + (-0.05, -0.03)], frame, 0.03)
    if look["hat"]:
        col = tuple(int(v) for v in r.integers(0, 255, 3))
        poly(ellipse(0, top + 0.45, fw * 1.45, 0.16), col)
        poly(np.concatenate([ellipse(0, top + 0.42, fw * 1.0, 0.9, np.pi, 2 * np.pi, 20)]), col)
    if look["earrings"]:
        for side in (-1, 1):
            poly(ellipse(side * fw * 0.98, t["eye_y"] + 0.45, 0.06, 0.06, n=12), (230, 190, 40))
    img = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
    light = np.linspace(r.uniform(0.55, 1.0), r.uniform(1.0, 1.3), size)  # lighting gradient
    grad = light[None, :, None] if r.random() < 0.5 else light[:, None, None]
    img = Image.fromarray(np.clip(np.asarray(img) * grad, 0, 255).astype(np.uint8))
    if look["blurry"]:
        img = img.filter(ImageFilter.GaussianBlur(radius=size / 60))
    lm = pose(P)
    box = np.concatenate([pose(head), pose(P[0:17])])
    return img, lm, np.array([*box.min(0), *box.max(0)])


# How each dataset frames its faces: (image side, face half-width in px (lo, hi), rotation (deg),
# centre jitter)
FRAMING = {
    # raw pretraining images: faces not always centred or large, but
    "ms1m": (112, (24, 40), 25, 0.15),
                                          # inside every global crop (>= 40% of the image), as in
                                          # MS1M
    "celeba": (112, (30, 36), 8, 0.04),   # aligned faces
    "rafdb": (100, (27, 32), 8, 0.04),    # aligned faces
    "300w": (160, (38, 52), 15, 0.08),    # faces in the wild, landmarks
    "ibug": (160, (38, 52), 40, 0.08),    # the Challenging subset: larger poses
}


def make_image(seed, kind, index, ident):
    """One image of identity `ident` (deterministic in seed, kind, index)."""
    r = np.random.default_rng([seed, list(FRAMING).index(kind), index])
    size, (w_lo, w_hi), max_angle, jitter = FRAMING[kind]
    t = identity_traits(seed, ident)
    expression = EXPRESSIONS[r.integers(7)]
    look = sample_look(r, t, expression)
    scale = r.uniform(w_lo, w_hi)
    center = size / 2 + r.uniform(-jitter, jitter, 2) * size + np.array([0, -0.15 * scale])
    pose = Pose(r.uniform(-max_angle, max_angle), scale, center)
    img, lm, box = render(t, look, pose, size, r)
    return dict(image=img, landmarks=lm, box=box, expression=EXPRESSIONS.index(expression),
                attributes=attributes(t, look), identity=ident)


def encode(img, fmt="JPEG"):
    buf = io.BytesIO()
    img.save(buf, fmt, quality=92) if fmt == "JPEG" else img.save(buf, fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------- writers (real
# formats)

def recordio_pack(payload):
    """dmlc RecordIO framing: split where the magic word sits at a 4-aligned offset (cflag
    1/2/3)."""
    magic = struct.pack("<I", RECORDIO_MAGIC)
    cuts = [i for i in range(0, len(payload) - 3, 4) if payload[i:i + 4] == magic]
    parts, start = [], 0
    for i in cuts:
        parts.append(payload[start:i])
        start = i + 4
    parts.append(payload[start:])
    out = b""
    for k, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else (1 if k == 0 else 3 if k == len(parts) - 1 else 2)
        out += magic + struct.pack("<I", cflag << 29 | len(part)) + part + b"\0" * (-len(part) % 4)
    return out


def recordio_payload(labels, image_bytes=b""):
    """insightface IRHeader '<IfQQ': flag = number of float labels following (0: the label is
    inline)."""
    labels = np.atleast_1d(np.asarray(labels, np.float32))
    if len(labels) == 1:
        return struct.pack("<IfQQ", 0, float(labels[0]), 0, 0) + image_bytes
    return struct.pack("<IfQQ", len(labels), 0.0, 0, 0) + labels.tobytes() + image_bytes


def write_recordio(folder, images_per_id, seed, workers):
    """MS1M layout: key 0 = header (first identity key, end key); images 1..n; one record per
    identity."""
    os.makedirs(folder, exist_ok=True)
    n_ids = len(images_per_id)
    identities = [ident for ident, count in enumerate(images_per_id) for _ in range(count)]
    jobs = [(seed, "ms1m", i, ident) for i, ident in enumerate(identities)]
    n = len(jobs)
    records = {0: recordio_payload([n + 1, n + 1 + n_ids])}
    start = 1
    for ident, count in enumerate(images_per_id):
        records[n + 1 + ident] = recordio_payload([start, start + count])
        start += count
    rec_path, idx_path = os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx")
    with open(rec_path, "wb") as rec, open(idx_path, "w") as idx:
        def put(key, payload):
            idx.write(f"{key}\t{rec.tell()}\n")
            rec.write(recordio_pack(payload))
        put(0, records[0])
        for key, sample in enumerate(generate(jobs, workers, "ms1m"), start=1):
            put(key, recordio_payload([sample["identity"]], sample["jpeg"]))
        for key in range(n + 1, n + 1 + n_ids):
            put(key, records[key])
    with open(os.path.join(folder, "property"), "w") as f:
        f.write(f"{n_ids},112,112")


def _make(job):
    s = make_image(*job)
    s["jpeg"] = encode(s.pop("image"))  # processes exchange the encoded file, as it will be written
    return s


def generate(jobs, workers, desc):
    """make_image over `jobs` in order, in `workers` processes, with a progress bar."""
    bar = dict(total=len(jobs), desc=f"toy {desc}", leave=False)
    if workers <= 1:
        yield from tqdm(map(_make, jobs), **bar)
        return
    with Pool(workers, initializer=_worker_signals) as pool:
        yield from tqdm(pool.imap(_make, jobs, chunksize=16), **bar)


def _worker_signals():
    """In a pool worker: Ctrl-C is the parent's to handle, and SIGTERM, how Pool stops its workers,
    kills, whatever handler the parent had set (pretrain.py catches it to save and exit)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_celeba(folder, n, seed, workers):
    os.makedirs(os.path.join(folder, "img_align_celeba"), exist_ok=True)
    jobs = [(seed, "celeba", i, 100000 + i // 4) for i in range(n)]  # 4 images per identity
    rows, parts, ids = [], [], []
    for i, s in enumerate(generate(jobs, workers, "celeba"), start=1):
        name = f"{i:06d}.jpg"
        with open(os.path.join(folder, "img_align_celeba", name), "wb") as f:
            f.write(s["jpeg"])
        rows.append(name + "".join(f" {1 if a else -1:2d}" for a in s["attributes"]))
        ids.append(f"{name} {s['identity'] - 100000 + 1}")  # CelebA numbers identities from 1
        split = (i - 1) * 10 // n  # 80% train, 10% val, 10% test, in file order as CelebA
        parts.append(f"{name} {0 if split < 8 else 1 if split < 9 else 2}")
    with open(os.path.join(folder, "list_attr_celeba.txt"), "w") as f:
        f.write(f"{n}\n{' '.join(ATTRIBUTES)} \n" + "\n".join(rows) + "\n")
    with open(os.path.join(folder, "list_eval_partition.txt"), "w") as f:
        f.write("\n".join(parts) + "\n")
    with open(os.path.join(folder, "identity_CelebA.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


def write_rafdb(folder, n, seed, workers):
    os.makedirs(os.path.join(folder, "Image", "aligned"), exist_ok=True)
    os.makedirs(os.path.join(folder, "EmoLabel"), exist_ok=True)
    n_train = n * 4 // 5
    jobs = [(seed, "rafdb", i, 200000 + i // 3) for i in range(n)]
    lines = []
    for i, s in enumerate(generate(jobs, workers, "rafdb")):
        stem = f"train_{i + 1:05d}" if i < n_train else f"test_{i - n_train + 1:04d}"
        with open(os.path.join(folder, "Image", "aligned", stem + "_aligned.jpg"), "wb") as f:
            f.write(s["jpeg"])
        lines.append(f"{stem}.jpg {s['expression'] + 1}")
    with open(os.path.join(folder, "EmoLabel", "list_patition_label.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


W300_SPLITS = {"afw": 0.11, "helen/trainset": 0.52, "lfpw/trainset": 0.2, "helen/testset": 0.09,
               "lfpw/testset": 0.04,
               "ibug": 0.04}  # proportions of the real 300W (3,148 train / 689 test)


def write_pts(path, lm):
    pts = "\n".join(f"{x + 1:.6f} {y + 1:.6f}" for x, y in lm)  # .pts is 1-based
    with open(path, "w") as f:
        f.write(f"version: 1\nn_points:  68\n{{\n{pts}\n}}\n")


def write_300w(folder, n, seed, workers):
    index = 0
    for split, share in W300_SPLITS.items():
        os.makedirs(os.path.join(folder, split), exist_ok=True)
        count = max(2, round(n * share))
        kind = "ibug" if split == "ibug" else "300w"
        jobs = [(seed, kind, index + i, 300000 + index + i) for i in range(count)]
        for i, s in enumerate(generate(jobs, workers, "300w " + split)):
            stem = os.path.join(folder, split, f"{split.split('/')[0]}_{index + i:05d}")
            with open(stem + ".jpg", "wb") as f:
                f.write(s["jpeg"])
            write_pts(stem + ".pts", s["landmarks"])
        index += count


# ----------------------------------------------------------------------------- the toy ArcFace

class ToyRecognizer(nn.Module):
    """A small CNN with insightface's I/O: (B, 3, 112, 112) RGB in (x - 127.5) / 127.5 -> (B,
    dim)."""

    def __init__(self, dim=64):
        super().__init__()
        layers, c = [nn.AvgPool2d(2)], 3  # 112 -> 56: the toy faces need no more resolution
        for w in (24, 48, 96, 128):
            layers += [nn.Conv2d(c, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                       nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, dim)

    def forward(self, x):
        return self.fc(self.features(x))


def arcface_logits(emb, weight, labels, s=30.0, m=0.4):
    """ArcFace (Deng et al. 2019): s * cos(theta + m) for the true class, s * cos(theta) for the
    others."""
    cos = F.linear(F.normalize(emb), F.normalize(weight)).clamp(-1 + 1e-6, 1 - 1e-6)
    target = torch.cos(torch.acos(cos.gather(1, labels[:, None])) + m)
    return s * cos.scatter(1, labels[:, None], target)


def recognizer_samples(seed, n_ids, per_id, workers):
    """Training crops for the recogniser: whole faces (identity known) and random crops of scenes,
    labelled face (most of the crop is face) or background (no face in the crop)."""
    jobs = [(seed + 1, "ms1m", i, 400000 + i // per_id) for i in range(n_ids * per_id)]
    faces, crops, is_face = [], [], []
    r = np.random.default_rng([seed, 11])
    for s in generate(jobs, workers, "recogniser data"):
        pil = Image.open(io.BytesIO(s["jpeg"])).convert("RGB")
        img = np.asarray(pil)
        x0, y0, x1, y1 = s["box"]
        pad = 0.15 * (x1 - x0)
        face = pil.crop((int(x0 - pad), int(y0 - pad), int(x1 + pad),
                         int(y1 + pad))).resize((112, 112))
        faces.append(np.asarray(face))
        n_face = n_background = 0
        for _ in range(12):  # up to 2 crops mostly of face and 2 with no face at all, per scene
            side = int(r.uniform(0.15, 0.65) * img.shape[0])
            cx, cy = r.integers(0, img.shape[0] - side, 2)
            ix = max(0, min(cx + side, x1) - max(cx, x0)) * max(0, min(cy + side, y1) - max(cy, y0))
            face_crop, background = ix / side ** 2 > 0.5, ix == 0
            if (face_crop and n_face < 2) or (background and n_background < 2):
                crop = Image.fromarray(img[cy:cy + side, cx:cx + side]).resize((112, 112))
                crops.append(np.asarray(crop))
                is_face.append(float(face_crop))
                n_face, n_background = n_face + face_crop, n_background + background
    ids = np.repeat(np.arange(n_ids), per_id)
    return (torch.from_numpy(np.stack(faces)).permute(0, 3, 1, 2), torch.from_numpy(ids),
            torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2), torch.tensor(is_face))


def train_recognizer(path, seed=0, n_ids=120, per_id=12, steps=600, workers=1):
    """ArcFace loss on identities + a 'faceness' term that aligns face crops with a fixed axis and
    pushes background crops to its opposite. A real ArcFace maps non-faces far from faces by itself;
    the toy one is taught that explicitly, so the paper's threshold -0.5 means the same here."""
    torch.manual_seed(seed)
    faces, ids, crops, is_face = recognizer_samples(seed, n_ids, per_id, workers)
    model = ToyRecognizer()
    weight = nn.Parameter(torch.randn(n_ids, 64) * 0.01)
    opt = torch.optim.AdamW(list(model.parameters()) + [weight], lr=2e-3, weight_decay=5e-4)

    def norm(x):
        return (x.float() - 127.5) / 127.5
    for step in tqdm(range(steps), desc="toy ArcFace", leave=False):
        i = torch.randint(len(faces), (48,))
        j = torch.randint(len(crops), (48,))
        x = norm(torch.cat([faces[i], crops[j]]))
        flip = torch.rand(len(x)) < 0.5
        x[flip] = x[flip].flip(-1)
        x = x * torch.empty(len(x), 1, 1, 1).uniform_(0.7, 1.2)  # brightness
        emb = F.normalize(model(x))
        id_loss = F.cross_entropy(arcface_logits(emb[:48], weight, ids[i]), ids[i])
        target = torch.cat([torch.ones(48), is_face[j]]) * 2 - 1  # +1 face, -1 background
        face_loss = F.relu(0.8 - target * emb[:, 0]).mean()
        loss = id_loss + 10 * face_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = cosine_schedule(step + 1, steps, 2e-3, 0.0)
    export_onnx(model.eval(), path)
    return model


def export_onnx(model, path):
    """insightface's I/O: input (B, 3, 112, 112) with a dynamic batch, output the embedding."""
    # the TorchScript exporter needs no onnxscript; it warns that it is old
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, 112, 112), path, input_names=["input.1"],
                          output_names=["embedding"],
                          dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}},
                          dynamo=False)


def evaluate_recognizer(path, seed=0, n_ids=200):
    """Two numbers that say whether the toy recogniser can do the retrieval's job, on held-out
    identities: verification accuracy on same/different-identity pairs of face crops (threshold
    picked on one half of the pairs, accuracy measured on the other, both ways), and the mean
    similarity to the image's global crops of local crops with a face vs without one, with the
    share of each rejected at theta = -0.5."""
    face = ArcFace(path)
    r = np.random.default_rng([seed, 13])
    crops, ids, with_face, without_face = [], [], [], []
    mc = MultiCrop(n_candidates=16)
    torch.manual_seed(seed)
    for k in range(2 * n_ids):
        s = make_image(seed + 2, "ms1m", k, 900000 + k // 2)
        x0, y0, x1, y1 = s["box"]
        pad = 0.15 * (x1 - x0)
        crops.append(s["image"].crop((int(x0 - pad), int(y0 - pad), int(x1 + pad),
                                      int(y1 + pad))).resize((112, 112)))
        ids.append(k // 2)
        boxes = torch.cat([mc.boxes(s["image"], 2, mc.global_scale),
                           mc.boxes(s["image"], 16, mc.local_scale)])  # (18, 4)
        one = collate([dict(image=pil_to_tensor(s["image"]), boxes=boxes)])
        emb = face.embed(resized_crops(one["image"], one["boxes"], 112)[0])
        sims = similarity(emb[:2], emb[2:])
        for (top, left, h, w), sim in zip(boxes[2:].tolist(), sims.tolist()):
            overlap = max(0, min(left + w, x1) - max(left,
                                                     x0)) * max(0, min(top + h, y1) - max(top, y0))
            if overlap > 0.5 * w * h:
                with_face.append(sim)
            elif overlap == 0:
                without_face.append(sim)
    emb = face.embed(crops)
    a, b = emb[0::2], emb[1::2]  # genuine pairs: the two images of each identity
    genuine = (a * b).sum(1)
    impostor = (a * b.roll(1, 0)).sum(1)  # each identity against the next one's second image
    scores, labels = torch.cat([genuine,
                                impostor]), torch.cat([torch.ones(n_ids), torch.zeros(n_ids)])
    perm = torch.from_numpy(r.permutation(2 * n_ids))
    halves = perm[:n_ids], perm[n_ids:]
    accs = []
    for fit, test in (halves, halves[::-1]):
        ts = scores[fit]
        best = max(ts.tolist(),
                   key=lambda t: ((scores[fit] >= t).float() == labels[fit]).float().mean().item())
        accs.append(((scores[test] >= best).float() == labels[test]).float().mean().item())
    wf, wo = np.array(with_face), np.array(without_face)
    return dict(verification_accuracy=float(np.mean(accs)), similarity_with_face=float(wf.mean()),
                similarity_without_face=float(wo.mean()),
                rejected_with_face=float((wf < -0.5).mean()),
                rejected_without_face=float((wo < -0.5).mean()), crops_with_face=len(wf),
                crops_without_face=len(wo))


# ----------------------------------------------------------------------------- the whole world

DEFAULT_IMAGES = 4000


def write_world(out, images=DEFAULT_IMAGES, seed=0, workers=None, recognizer_steps=600):
    """Write every dataset of the toy world under `out` (ms1m gets `images`, the others fewer)."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    os.makedirs(out, exist_ok=True)
    per_id = 10
    n_ids = max(2, images // per_id)
    sizes = dict(celeba=max(20, images), rafdb=max(20, images * 3 // 4), w300=max(40, images // 2))
    recognizer_ids = max(4, min(120, images // 20))
    start = time.time()
    print(f"toy world, stage 1 of 7: MS1M, {n_ids * per_id} images", flush=True)
    write_recordio(os.path.join(out, "ms1m"), [per_id] * n_ids, seed, workers)
    rate = n_ids * per_id / (time.time() - start)
    rest = sum(sizes.values()) + recognizer_ids * 12
    print(f"  {rate:.0f} images/s here: stages 2-5 need about {rest / rate / 60:.1f} min more, "
          f"then the recogniser trains for {recognizer_steps} steps (stage 6)", flush=True)
    print(f"toy world, stage 2 of 7: CelebA, {sizes['celeba']} images", flush=True)
    write_celeba(os.path.join(out, "celeba"), sizes["celeba"], seed, workers)
    print(f"toy world, stage 3 of 7: RAF-DB, {sizes['rafdb']} images", flush=True)
    write_rafdb(os.path.join(out, "rafdb"), sizes["rafdb"], seed, workers)
    print(f"toy world, stage 4 of 7: 300W, {sizes['w300']} images", flush=True)
    write_300w(os.path.join(out, "300w"), sizes["w300"], seed, workers)
    # the recogniser seeds torch: leave the caller's RNG as it was, so that a seeded run that
    # generates the world on first use trains exactly as one that finds it already there
    with torch.random.fork_rng(devices=[]):
        print(f"toy world, stages 5 and 6 of 7: the recogniser's {recognizer_ids * 12} faces, "
              f"then its training", flush=True)
        train_recognizer(os.path.join(out, "arcface.onnx"), seed, n_ids=recognizer_ids,
                         steps=recognizer_steps, workers=workers)
        print("toy world, stage 7 of 7: the recogniser on held-out identities", flush=True)
        quality = evaluate_recognizer(os.path.join(out, "arcface.onnx"), seed)
    print("toy ArcFace on held-out identities: verification accuracy {verification_accuracy:.1%}; "
          "similarity to the global crops: {similarity_with_face:.2f} with a face, "
          "{similarity_without_face:.2f} without; rejected at -0.5: {rejected_with_face:.1%} with "
          "a face, {rejected_without_face:.1%} without".format(**quality))
    with open(os.path.join(out, "DONE"), "w") as f:
        f.write(f"images={images} seed={seed}\n")


def ensure_world(root, images=DEFAULT_IMAGES, seed=0):
    """The built-in default data: `<root>/toy`, generated on first use. Returns its path.

    The processes of a torchrun job all get here. On each node, LOCAL_RANK 0 generates the world
    into a temporary folder and renames it into place, and the node's other processes wait for it
    to appear: no file lock (some cluster filesystems have none) and no collective (generating
    takes minutes, longer than a process group waits). Where nodes share the filesystem, the first
    rename wins and the other copies are discarded."""
    out = os.path.join(root, "toy")
    done = os.path.join(out, "DONE")
    if os.path.exists(done):
        return out
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        while not os.path.exists(done):
            time.sleep(1)
        return out
    os.makedirs(root, exist_ok=True)
    print(f"generating the toy face world in {out} (first use, 7 stages)")
    tmp = tempfile.mkdtemp(prefix="toy.", dir=root)
    write_world(tmp, images, seed)
    try:
        os.rename(tmp, out)
    except OSError:  # another node's copy is already in place
        shutil.rmtree(tmp)
    return out


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", default="data/toy", help="output folder")
    p.add_argument("--images", type=at_least(20), default=DEFAULT_IMAGES, help="images in ms1m; "
                   "celeba gets as many, rafdb 3/4, 300w 1/2")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files")
    p.add_argument("--workers", type=at_least(1), default=None,
                   help="processes (default: up to 4 cores)")
    p.add_argument("--recognizer-steps", type=at_least(1), default=600, help="training steps of "
                   "the toy ArcFace")
    a = p.parse_args()
    write_world(a.out, a.images, a.seed, a.workers, a.recognizer_steps)
    print(f"wrote the toy world to {a.out}")


if __name__ == "__main__":
    main()
