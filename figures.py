"""The paper's pictures from a pretraining run (§4.4-4.5), each a PNG, each a subcommand.

    python figures.py fig3 --arcface data/toy/arcface.onnx            # Fig. 3: uncurated vs curated
    python figures.py fig5 --checkpoint runs/pretrain/checkpoint.pth  # Fig. 5: prototypes in 2-D
    python figures.py fig6 --checkpoint runs/pretrain/teacher_backbone.pth --finetuned a.pth b.pth
    python figures.py curves --log runs/pretrain/log.jsonl            # training curves
    python figures.py table --dir runs/repro                          # reproduce.sh's table

Images default to a few of the toy world's; pass --images to use your own. matplotlib is imported
here only, for the curves and the 2-D prototype layout.
"""
import argparse
import contextlib
import io
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.transforms.v2.functional import pil_to_tensor

import data
import run
import vit
from crops import contact_sheet, normalize
from retrieval import ArcFace, figure3


def default_images(args, split="celeba", n=6):
    """--images, or the first n test images of the toy world's CelebA layout (MS1M-style for
    'ms1m')."""
    if args.images:
        return args.images
    import toyfaces
    world = toyfaces.ensure_world(data.data_root(args.data_root))
    if split == "ms1m":
        ds = data.RecordIO(os.path.join(world, "ms1m"))
        return [ds[i] for i in range(0, n * 37, 37)]
    return [p for p, _ in data.read_celeba(os.path.join(world, "celeba"))["test"][:n]]


def as_image(x):
    img = x if isinstance(x, Image.Image) else data.load_image(x)
    if img is None:
        raise ValueError(f"{x}: not a readable image")
    return img


def load_backbone(path, arch):
    model = vit.ARCHS[arch]()
    vit.load_pretrained(model, path)
    return model.eval()


def preprocess(img, size):
    return normalize(pil_to_tensor(img.convert("RGB").resize((size, size), Image.BICUBIC)))


# ----------------------------------------------------------------------------- Figure 3

def fig3(args):
    images = [as_image(x) for x in default_images(args, "ms1m", args.n)]
    return figure3(ArcFace(args.arcface), images, args.n_local, args.n_candidates,
                   args.face_threshold, args.seed)


# ----------------------------------------------------------------------------- Figure 5

def layout_2d(points):
    """(K, d) -> (K, 2): t-SNE when scikit-learn is installed, else PCA; returns (xy, method
    name)."""
    try:
        from sklearn.manifold import TSNE
        return TSNE(2, init="pca", perplexity=min(30, len(points) - 1),
                    random_state=0).fit_transform(points), "t-SNE"
    except ImportError:
        centred = points - points.mean(0)
        _, _, v = np.linalg.svd(centred, full_matrices=False)
        return centred @ v[:2].T, "PCA (scikit-learn not installed, so no t-SNE)"


@torch.no_grad()
def fig5(args):
    """Each prototype drawn at its 2-D position as its nearest training image (teacher features)."""
    ckpt = run.read_checkpoint(args.checkpoint)
    if not (isinstance(ckpt, dict) and {"args", "student", "teacher"} <= ckpt.keys()):
        raise ValueError(f"{args.checkpoint}: not pretrain.py's checkpoint.pth (Fig. 5 needs its "
                         f"prototypes and projector; teacher_backbone.pth holds the ViT alone)")
    run_args = ckpt["args"]
    backbone = vit.ARCHS[run_args["arch"]]()
    with contextlib.redirect_stdout(io.StringIO()):  # the projector's keys go to the head below
        vit.load_pretrained(backbone, ckpt)
    from loss import ProjectionHead
    head = ProjectionHead(backbone.embed_dim, run_args["out_dim"],
                          batch_norm=run_args.get("projector_bn", False)).eval()
    head.load_state_dict({k[len("head."):]: v for k, v in ckpt["teacher"].items()
                          if k.startswith("head.")})
    prototypes = F.normalize(ckpt["student"]["criterion.prototypes"].float(), dim=-1)
    images = data.pretrain_dataset(args.data or run_args["data"], args.data_root
                                   or run_args["data_root"])
    picks = range(0, len(images), max(1, len(images) // args.n_images))
    # each image decoded once
    pool = [img for img in map(images.__getitem__, picks) if img is not None]
    size = run_args["global_size"]
    backbone.eval()
    feats = []
    for i in range(0, len(pool), 64):
        batch = torch.stack([preprocess(im, size) for im in pool[i:i + 64]])
        feats.append(F.normalize(head(backbone(batch)), dim=-1))
    feats = torch.cat(feats)
    sim = prototypes @ feats.T  # (K, n)
    used = sim.argmax(0).unique()  # prototypes that are some image's best match: the ones in use
    nearest = sim[used].argmax(1)  # each one's nearest training image (§4.4)
    xy, method = layout_2d(prototypes[used].numpy())
    canvas, tile = args.canvas, 32
    xy = (xy - xy.min(0)) / np.maximum(xy.max(0) - xy.min(0), 1e-9) * (canvas - tile)
    out = Image.new("RGB", (canvas, canvas + 20), (255, 255, 255))
    for (x, y), j in zip(xy, nearest.tolist()):
        out.paste(pool[j].resize((tile, tile)), (int(x), int(y) + 20))
    ImageDraw.Draw(out).text((4, 4), f"the {len(used)} of {len(prototypes)} prototypes in use "
                             f"(some image's best match), each as its nearest image; {method}",
                             fill=(0, 0, 0))
    print(f"fig5: {len(used)} prototypes used by {len(pool)} images; layout by {method}")
    return out


# ----------------------------------------------------------------------------- Figure 6

def heat_overlay(img, heat):
    """img PIL, heat (h, w) in [0, 1] -> the image blended with a red-yellow heat-map."""
    heat = Image.fromarray((heat * 255).astype(np.uint8)).resize(img.size, Image.BICUBIC)
    h = np.asarray(heat) / 255.0
    colour = np.stack([np.ones_like(h), h, np.zeros_like(h)], -1) * 255
    base = np.asarray(img.convert("RGB"), np.float64)
    h = h[..., None]
    return Image.fromarray((base * (1 - 0.6 * h) + colour * 0.6 * h).astype(np.uint8))


@torch.no_grad()
def attention_maps(model, images):
    """Per image (RGB, already at the model's input size), the last layer's cls attention of every
    head, each overlaid on the image."""
    maps = []
    for img in images:
        # (heads, patches)
        att = model.get_last_selfattention(preprocess(img, img.width)[None])[0, :, 0, 1:]
        side = img.width // model.patch_size
        att = att.view(-1, side, side)
        low, high = att.amin((1, 2), keepdim=True), att.amax((1, 2), keepdim=True)
        att = (att - low) / (high - low + 1e-9)
        maps.append([heat_overlay(img, a.numpy()) for a in att])
    return maps


def fig6(args):
    """Attention heat-maps of the last block per head, one row per image: the image, then the heads
    of (a) the pretrained teacher and of each fine-tuned model, (b), (c), ... (the paper's CelebA
    and RAF-DB), a blank column between two models. The first row's tiles are captioned with the
    model's letter and the head."""
    images = [as_image(p).convert("RGB").resize((args.size, args.size))
              for p in default_images(args, "celeba", args.n)]
    rows = [[img] for img in images]
    header = [None]
    for i, path in enumerate([args.checkpoint] + (args.finetuned or [])):
        maps = attention_maps(load_backbone(path, args.arch), images)
        if i:  # a blank column between two models
            header.append(None)
            for row in rows:
                row.append(None)
        for row, heads in zip(rows, maps):
            row += heads
        header += [f"({chr(ord('a') + i)}) {h + 1}" for h in range(len(maps[0]))]
    captions = [header] + [[None] * len(row) for row in rows[1:]]
    sheet = contact_sheet(rows, tile=max(112, args.size), captions=captions,
                          labels=[f"image {k + 1}" for k in range(len(rows))])
    models = [args.checkpoint] + (args.finetuned or [])
    legend = ["the last block's attention from the cls token, one tile a head (a number):"] + [
        f"({chr(ord('a') + i)}) {'pretrained' if i == 0 else 'fine-tuned'}: {path}"
        for i, path in enumerate(models)]
    out = Image.new("RGB", (sheet.width, sheet.height + 16 * len(legend) + 8), (255, 255, 255))
    out.paste(sheet, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, line in enumerate(legend):
        draw.text((8, sheet.height + 4 + 16 * k), line, fill=(0, 0, 0))
    return out


# ----------------------------------------------------------------------------- curves

CURVES = {"loss": "loss (Eq. 2: ce - H)", "cross_entropy": "cross-entropy ce (Eq. 3)",
          "mean_entropy": "mean entropy H (Eq. 4)",
          "prototype_share": "share of the reachable prototypes\nthe teacher predicts",
          "reject_rate": "candidates rejected (theta)"}


def curves(args):
    """The training curves of log.jsonl against the step, each titled by what it is; ln K drawn on
    the entropy (its ceiling) and the collapse line on the prototype share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    log, unreadable = run.training_rows(args.log)
    keys = [k for k in CURVES if any(k in r for r in log)
            and not (k == "reject_rate" and not any(r[k] for r in log))]
    if not keys:
        raise ValueError(f"{args.log}: no training rows (expected pretrain.py's log.jsonl)")
    if unreadable:
        print(f"curves: skipped {unreadable} unreadable line(s) of {args.log}")
    n_prototypes = run_prototypes(args.log)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.0))
    for ax, k in zip(np.atleast_1d(axes), keys):
        ax.plot(*zip(*[(r["step"], r[k]) for r in log if k in r]))
        if k == "mean_entropy" and n_prototypes:
            ax.axhline(math.log(n_prototypes), ls="--", c="gray", label=f"ln K, K = {n_prototypes}")
            ax.legend(fontsize=8)
        if k == "prototype_share":
            ax.axhline(0.25, ls="--", c="red", label="collapse below")
            ax.set_ylim(0, 1.05)
            ax.legend(fontsize=8)
        ax.set_title(CURVES[k], fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    plt.close(fig)


def run_prototypes(log_path):
    """K of the run whose log this is, from the checkpoint.pth beside it; None without one."""
    path = os.path.join(os.path.dirname(log_path), "checkpoint.pth")
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["args"][
        "n_prototypes"]


# ----------------------------------------------------------------------------- the results table

# task: its rows, each (a metric, the row's label, the metric's baseline: no learning at all)
TASKS = {"attr": [("test/mean_accuracy", "attributes, mean accuracy %",
                   "test/majority_accuracy")],
         "expr": [("test/accuracy", "expressions, accuracy %", "test/majority_accuracy"),
                  ("test/mean_class_accuracy", "expressions, mean class accuracy %",
                   "test/chance_mean_class_accuracy")],
         "align": [("test/nme", "landmarks, NME % (lower is better)", "test/nme_mean_shape")]}


def cell(results, metric):
    """One init's entry: the mean over its runs of the last epoch's metric, with the std and the
    number of runs where there are several."""
    if results is None:
        return ""
    n = len(results["runs"])
    spread = f" ({results['std'][metric]:.2f}, {n} runs)" if n > 1 else " (1 run)"
    return f"{results['mean'][metric]:.2f}" + spread


def table(args):
    """A markdown table from <dir>/<task>-<init>-<frac>/results.json: mean (std) of each task's
    metric over the runs, one row per task and label fraction, one column per initialisation, and
    the baseline (majority per attribute, chance, one mean shape)."""
    found = {}
    for name in sorted(os.listdir(args.dir)):
        path = os.path.join(args.dir, name, "results.json")
        if name.count("-") == 2 and name.split("-")[0] in TASKS and os.path.isfile(path):
            task, init, frac = name.split("-")
            with open(path) as f:
                try:
                    found[task, init, float(frac)] = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    if not found:
        raise FileNotFoundError(f"{args.dir}: no <task>-<init>-<frac>/results.json")
    inits = [i for i in args.inits if any(k[1] == i for k in found)]
    lines = ["| task | labels | train images | " + " | ".join(inits) + " | baseline |",
             "|---" * (4 + len(inits)) + "|"]
    for task, frac in sorted({(t, f) for t, _, f in found},
                             key=lambda k: (list(TASKS).index(k[0]), k[1])):
        first = next(r for (t, _, f), r in found.items() if (t, f) == (task, frac))
        for metric, label, baseline in TASKS[task]:
            cells = [cell(found.get((task, init, frac)), metric) for init in inits]
            lines.append(f"| {label} | {frac:.0%} | {first['n_train']} | " + " | ".join(cells)
                         + f" | {first['mean'][baseline]:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


def main(argv=None):
    p = run.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="figure", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default=None, help="PNG to write (default: <figure>.png)")
    common.add_argument("--images", nargs="*", default=None,
                        help="image files (default: from the toy world)")
    common.add_argument("--data-root", default=None, help="default: $PROS_DATA, else ./data")
    common.add_argument("--n", type=run.at_least(1), default=4, help="how many images")
    common.add_argument("--seed", type=int, default=0, help="random crops (fig3)")

    def add(name, text):
        return sub.add_parser(name, parents=[common], help=text)
    f3 = add("fig3", "uncurated vs curated local crops (Fig. 3)")
    f3.add_argument("--arcface", required=True, help="ONNX recogniser")
    f3.add_argument("--face-threshold", type=float, default=-0.5, help="theta (§3)")
    f3.add_argument("--n-local", type=run.at_least(1), default=8, help="N local crops")
    f3.add_argument("--n-candidates", type=run.at_least(1), default=12, help="C candidates")
    f5 = add("fig5", "prototypes in 2-D with their nearest images (Fig. 5)")
    f5.add_argument("--checkpoint", required=True, help="pretrain.py's checkpoint.pth")
    f5.add_argument("--data", default=None, help="training images (default: the run's --data)")
    f5.add_argument("--n-images", type=run.at_least(1), default=1000, help="training images "
                    "searched for neighbours")
    f5.add_argument("--canvas", type=run.at_least(32), default=900,
                    help="side of the picture in pixels")
    f6 = add("fig6", "last-layer attention per head (Fig. 6)")
    f6.add_argument("--checkpoint", required=True, help="the pretrained teacher (any "
                    "vit.load_pretrained input)")
    f6.add_argument("--finetuned", nargs="+", default=None, help="fine-tuned models' checkpoints, "
                    "drawn to the right of the pretrained one as (b), (c), ... (Fig. 6: CelebA, "
                    "then RAF-DB)")
    f6.add_argument("--arch", default="vit_small", choices=vit.ARCHS,
                    help="backbone of both checkpoints")
    f6.add_argument("--size", type=run.patch_multiple, default=224, help="input side")
    fc = add("curves", "training curves from log.jsonl")
    fc.add_argument("--log", required=True, help="pretrain.py's log.jsonl")
    ft = add("table", "markdown table of fine-tuning results (reproduce.sh)")
    ft.add_argument("--dir", required=True, help="folder of <task>-<init>-<frac>/results.json")
    ft.add_argument("--inits", nargs="+", default=["random", "pros", "pros_noretrieval"],
                    help="column order")
    args = p.parse_args(argv)
    args.out = args.out or (os.path.join(args.dir, "table.md")
                            if args.figure == "table" else f"{args.figure}.png")
    picture = {"fig3": fig3, "fig5": fig5, "fig6": fig6, "curves": curves,
               "table": table}[args.figure](args)
    if picture is not None:
        picture.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run.run_cli(main)
