"""Frozen-feature probes: what a backbone's features know about faces, beside the same probes on a
random-init network and on raw pixels. Nothing here trains the backbone.

    python probe.py --arch vit_tiny --size 64       # random init against raw pixels, toy world
    python probe.py --checkpoint runs/pretrain/teacher_backbone.pth --arch vit_tiny --size 64
    python probe.py --checkpoint teacher_backbone.pth --attr data/celeba --expr data/rafdb

One feature per image: the cls token after the final norm (what the fine-tuning heads read) of the
centre crop (MAE's evaluation transform), less the training split's mean feature, so that a
direction every image shares (large in a random-init ViT) does not decide the cosines.
- linear: logistic regression by full-batch L-BFGS on the features standardised per dimension, its
  L2 strength chosen on a held-out fifth of the training split, then refit on all of it. Attributes
  (a CelebA-layout folder): one binary regression per attribute; mean accuracy and mean ROC AUC.
  Expressions (a RAF-DB-layout folder): a softmax regression; mean class accuracy and accuracy.
- k-NN: DINO's weighted k-NN (eval_knn.py: k = 20, T = 0.07) on the L2-normalised features.
- verification: the identities of CelebA's test split (identity_CelebA.txt; none of the toy
  world's is in its pretraining set): ROC AUC of the cosine over every pair of images, and rank-1
  (the nearest other image shows the same identity).
The references: the same probes on a random-init network of the same arch and seed (for a
pretraining with that seed, the teacher's own starting point) and on the pixels of the centre crop
at 16 x 16.
"""
import math
import os
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from crops import eval_crop, normalize
from data import data_root, load_image, read_celeba, read_celeba_identities, read_rafdb
from run import ArgumentParser, at_least, patch_multiple, run_cli, write_lines
import toyfaces
from vit import ARCHS, load_pretrained

PIXELS = 16  # the raw-pixel reference: the centre crop at 16 x 16 (768 numbers)
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # the linear probe's L2 strengths, chosen on held-out data
# The gain over random init that counts as learning: the mean, over the three headline metrics
# below, of the points gained. Random inits of different seeds differ from each other by well
# under this (python probe.py --seeds 5 prints their spread).
HEADLINE = ("attr_linear_auc", "expr_linear_mca", "verify_auc")
LEARNED_GAIN = 2.0
NAMES = {"attr_linear_acc": "attributes, linear, mean accuracy",
         "attr_linear_auc": "attributes, linear, mean AUC",
         "attr_knn_acc": "attributes, k-NN, mean accuracy",
         "expr_linear_mca": "expressions, linear, mean class accuracy",
         "expr_linear_acc": "expressions, linear, accuracy",
         "expr_knn_mca": "expressions, k-NN, mean class accuracy",
         "verify_auc": "verification, ROC AUC",
         "verify_rank1": "verification, rank-1"}


# ----------------------------------------------------------------------------- the probe sets

def load_images(items, size, desc):
    """(path, label) items -> (uint8 images (n, 3, size, size), labels (n, ...)); unreadable
    images are skipped, counted and said."""
    crop = eval_crop(size)
    images, labels, skipped = [], [], 0
    for path, label in tqdm(items, desc=desc, leave=False):
        img = load_image(path)
        if img is None:
            skipped += 1
            continue
        images.append(crop(img))
        labels.append(label)
    if skipped:
        print(f"probe: {skipped} unreadable images of {desc} skipped")
    if not images:
        raise ValueError(f"probe: none of the {len(items)} images of {desc} is readable "
                         f"(first: {items[0][0] if items else 'none listed'})")
    return torch.stack(images), torch.as_tensor(np.array(labels))


def verification_items(path, test, n):
    """At most n of the test split's (path, identity), whole identities of two images or more, in
    identity order; None without identity_CelebA.txt."""
    identities = read_celeba_identities(path)
    if identities is None:
        return None
    by_id = defaultdict(list)
    for image, _ in test:
        name = os.path.basename(image)
        if name in identities:
            by_id[identities[name]].append(image)
    items = []
    for ident in sorted(by_id):
        if len(by_id[ident]) >= 2 and len(items) + len(by_id[ident]) <= n:
            items += [(image, ident) for image in by_id[ident]]
    return items


def probe_sets(attr, expr, size, n):
    """The decoded sets, at most n images a split: {'attr': (train x, y, test x, y), 'expr': ...,
    'verify': (x, identities)}, those whose folders are given."""
    sets = {}
    if attr:
        d = read_celeba(attr)
        x, y = load_images(d["train"][:n], size, "attributes train")
        xt, yt = load_images(d["test"][:n], size, "attributes test")
        sets["attr"] = (x, y, xt, yt)
        items = verification_items(attr, d["test"], n)
        if items:
            x, ids = load_images(items, size, "verification")
            sets["verify"] = (x, ids)
        else:
            print(f"probe: no {os.path.join(attr, 'identity_CelebA.txt')}: no verification")
    if expr:
        d = read_rafdb(expr)
        x, y = load_images(d["train"][:n], size, "expressions train")
        xt, yt = load_images(d["test"][:n], size, "expressions test")
        sets["expr"] = (x, y, xt, yt)
    return sets


def toy_sets(root, size, n=4000):
    """The toy world's attribute, expression and verification sets (generated on first use)."""
    world = toyfaces.ensure_world(root)
    return probe_sets(os.path.join(world, "celeba"), os.path.join(world, "rafdb"), size, n)


# ----------------------------------------------------------------------------- features

def backbone_features(backbone, device, batch=256):
    """images -> (n, D) cls features after the final norm, in eval mode."""
    @torch.no_grad()
    def embed(images):
        backbone.eval()
        return torch.cat([backbone(normalize(x.to(device))).float().cpu()
                          for x in images.split(batch)])
    return embed


def pixel_features(images):
    """images -> (n, 3 * 16 * 16): the raw-pixel reference."""
    x = F.interpolate(images.float() / 255, size=(PIXELS, PIXELS), mode="area")
    return x.flatten(1)


def centre(train, *others, scale=False):
    """Subtract `train`'s mean from every set (scale: and divide by its std, per feature)."""
    mean = train.mean(0)
    std = train.std(0) + 1e-6 if scale else 1.0
    return [(x - mean) / std for x in (train, *others)]


# ----------------------------------------------------------------------------- the probes

def fit_logistic(x, y, l2, multi_label, iterations=100):
    """Logistic regression by L-BFGS: mean binary (multi_label, y (n, A) in {0, 1}) or softmax
    (y (n,) classes) cross-entropy + l2 / 2 * |W|^2. Returns the logits function."""
    classes = y.shape[1] if multi_label else int(y.max()) + 1
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")
    loss_fn = F.binary_cross_entropy_with_logits if multi_label else F.cross_entropy
    target = y.float() if multi_label else y

    def closure():
        opt.zero_grad()
        loss = loss_fn(x @ w + b, target) + l2 / 2 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return lambda z: (z @ w + b).detach()


def roc_auc(scores, positive):
    """The area under the ROC curve: the chance that a positive outscores a negative, ties half
    (Mann-Whitney, from the average ranks of the scores)."""
    s, order = scores.double().sort()
    _, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    mean_rank = counts.cumsum(0) - (counts - 1) / 2  # 1-based, ties averaged
    ranks = torch.empty_like(s)
    ranks[order] = mean_rank[inverse].double()
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    return ((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def attribute_scores(logits, y):
    """(mean accuracy, mean ROC AUC) over attributes, in %; AUC over those with both values."""
    acc = ((logits > 0) == (y > 0.5)).float().mean(0)
    aucs = [roc_auc(logits[:, a], y[:, a] > 0.5) for a in range(y.shape[1])
            if 0 < y[:, a].sum() < len(y)]
    return 100 * acc.mean().item(), 100 * sum(aucs) / max(1, len(aucs))


def expression_scores(predicted, y):
    """(mean class accuracy, accuracy) in %, over the classes present in y."""
    correct = (predicted == y).float()
    per_class = [correct[y == c].mean() for c in y.unique()]
    return 100 * torch.stack(per_class).mean().item(), 100 * correct.mean().item()


def linear_probe(x, xt, y, yt, multi_label):
    """The logistic regression's test scores, its L2 strength chosen on a held-out fifth of
    (x, y) by the headline score (mean accuracy; mean class accuracy)."""
    score = attribute_scores if multi_label else (
        lambda logits, y: expression_scores(logits.argmax(1), y))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    held, fit = order[:len(x) // 5], order[len(x) // 5:]
    best = max(L2_GRID, key=lambda l2: score(
        fit_logistic(x[fit], y[fit], l2, multi_label)(x[held]), y[held])[0])
    return score(fit_logistic(x, y, best, multi_label)(xt), yt)


def knn_vote(bank, bank_labels, queries, k=20, temperature=0.07, chunk=256):
    """DINO's weighted k-NN: each query's label scores are the neighbours' labels weighted by
    exp(cosine / T), over its k nearest (cosine) neighbours; chunked so memory stays bounded."""
    out = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(min(k, len(bank)), dim=1)  # (chunk, k)
        w = (sim / temperature).exp()
        out.append((w[..., None] * bank_labels[idx]).sum(1) / w.sum(1, keepdim=True))
    return torch.cat(out)


def verification(z, identities):
    """(ROC AUC of the cosine over every pair, rank-1 identification) in %."""
    z = F.normalize(z, dim=1)
    sim = z @ z.T
    same = identities[:, None] == identities[None, :]
    i, j = torch.triu_indices(len(z), len(z), offset=1)
    auc = roc_auc(sim[i, j], same[i, j])
    nearest = sim.fill_diagonal_(-2).argmax(1)
    return 100 * auc, 100 * (identities[nearest] == identities).float().mean().item()


def run_probes(features, sets):
    """{metric: value in %} of every probe on `sets`, the features given by features(images)."""
    out = {}
    for name, multi_label in (("attr", True), ("expr", False)):
        if name not in sets:
            continue
        x, y, xt, yt = sets[name]
        z, zt = centre(features(x), features(xt))
        first, second = linear_probe(*centre(z, zt, scale=True), y, yt, multi_label)
        labels = y.float() if multi_label else F.one_hot(y).float()
        votes = knn_vote(F.normalize(z, dim=1), labels, F.normalize(zt, dim=1))
        if multi_label:
            out.update(attr_linear_acc=first, attr_linear_auc=second,
                       attr_knn_acc=attribute_scores(votes - 0.5, yt)[0])
        else:
            out.update(expr_linear_mca=first, expr_linear_acc=second,
                       expr_knn_mca=expression_scores(votes.argmax(1), yt)[0])
    if "verify" in sets:
        x, identities = sets["verify"]
        out["verify_auc"], out["verify_rank1"] = verification(*centre(features(x)), identities)
    return out


# ----------------------------------------------------------------------------- the verdict

def random_backbone(arch, seed, **kw):
    """The random-init network of `arch` (and `kw`, e.g. patch_size) that torch.manual_seed(seed)
    gives first: for a pretraining with that seed, its teacher's starting point. The caller's RNG is
    left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ARCHS[arch](**kw)


def distance_from(backbone, init):
    """|theta - theta_0| / |theta_0| over the backbone's weights."""
    now, then = backbone.state_dict(), init.state_dict()
    diff = sum((now[k].float().cpu() - then[k].float()).pow(2).sum() for k in then)
    return (diff / sum(v.float().pow(2).sum() for v in then.values())).sqrt().item()


def gain(scores, random_scores):
    """The mean, over the headline metrics both have, of the points gained over random init."""
    keys = [k for k in HEADLINE if k in scores and k in random_scores]
    return sum(scores[k] - random_scores[k] for k in keys) / len(keys) if keys else None


class Judge:
    """The probes of a pretraining's teacher beside its random init (random_backbone()) and the
    raw pixels, whose scores are computed once: judge(backbone) -> the backbone's scores,
    probe_gain (gain()) and weight_change (distance_from() its init)."""

    def __init__(self, sets, init, device):
        self.sets, self.init, self.device = sets, init, device
        self.references = None

    def __call__(self, backbone):
        if self.references is None:
            init = self.init.to(self.device)
            self.references = dict(random=run_probes(backbone_features(init, self.device),
                                                     self.sets),
                                   pixels=run_probes(pixel_features, self.sets))
            self.init = init.cpu()
        training = backbone.training
        scores = run_probes(backbone_features(backbone, self.device), self.sets)
        backbone.train(training)
        return dict(scores, probe_gain=gain(scores, self.references["random"]),
                    weight_change=distance_from(backbone, self.init))

    def compare(self, scores):
        """The headline metrics, teacher / random init / raw pixels, on one line."""
        r, p = self.references["random"], self.references["pixels"]
        return "; ".join(f"{NAMES[k]} {scores[k]:.1f} / {r[k]:.1f} / {p[k]:.1f}"
                         for k in HEADLINE if k in scores)


def verdict(scores):
    """'learned' or 'not learned' (a gain under LEARNED_GAIN) and the words that say it."""
    g = scores["probe_gain"]
    state = "learned" if g >= LEARNED_GAIN else "not learned"
    return state, (f"probe gain over random init {g:+.1f} points (learned from "
                   f"{LEARNED_GAIN:+.1f}), weights {100 * scores['weight_change']:.1f}% from init")


# ----------------------------------------------------------------------------- a pretraining's end

COLLAPSED_SHARE = 0.25  # under a quarter of the prototypes a batch's global views could reach


def collapse_state(row, args, world=1):
    """(share, 'collapsed' or 'healthy'): the share of the prototypes the teacher's predictions
    reach in a global batch, of the most they could (min(K, its global views)). A collapsed
    teacher sends nearly every image to a handful of prototypes, and its targets teach the student
    nothing."""
    reachable = min(args.n_prototypes, args.batch_size * world * args.n_global)
    share = row["prototypes_used"] / reachable
    return share, "collapsed" if share < COLLAPSED_SHARE else "healthy"


def summary(row, args, judge=None, probed=None):
    """The end-of-run lines: the prototype statistics, the probe beside its references, and the
    verdict: COLLAPSED, NOT LEARNED (the probe within noise of random init), LEARNED, or not judged
    (no probe sets). Spread prototypes alone prove nothing: Sinkhorn spreads a random init's."""
    if row is None:
        return "no logged step"
    share, state = row["prototype_share"], row["state"]
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


def add_probe_args(g):
    """A pretraining's probe flags (make_judge reads them), in its argument group `g`."""
    g.add_argument("--probe-attr", default=None, help="CelebA-layout folder to probe the "
                   "teacher on at the end (probe.py; default: the toy world's with --data toy)")
    g.add_argument("--probe-expr", default=None, help="RAF-DB-layout folder, the same way")
    g.add_argument("--probe-images", type=at_least(10), default=4000,
                   help="at most this many images a probe split")
    g.add_argument("--probe-every", type=at_least(0), default=0,
                   help="also probe every this many epochs (0: at the end only)")


def make_judge(args, device):
    """The probe of a pretraining's teacher on the sets --probe-attr/--probe-expr name (the toy
    world's with --data toy), or None where there are none."""
    if args.probe_attr or args.probe_expr:
        sets = probe_sets(args.probe_attr, args.probe_expr, args.global_size, args.probe_images)
    elif args.data == "toy":
        sets = toy_sets(data_root(args.data_root), args.global_size, args.probe_images)
    else:
        return None
    return Judge(sets, random_backbone(args.arch, args.seed, patch_size=args.patch_size), device)


# ----------------------------------------------------------------------------- tables

def table(columns):
    """{column name: {metric: value}} -> the printed table, one metric a row."""
    metrics = [k for k in NAMES if any(k in c for c in columns.values())]
    width = max(len(NAMES[k]) for k in metrics)
    sides = [max(14, len(name)) for name in columns]  # each column, 2 spaces apart
    lines = [" " * width + "".join(f"  {name:>{w}}" for name, w in zip(columns, sides))]
    for k in metrics:
        cells = "".join(f"  {c[k]:{w}.2f}" if k in c else "  " + " " * w
                        for c, w in zip(columns.values(), sides))
        lines.append(f"{NAMES[k]:<{width}}{cells}")
    return "\n".join(lines)


def markdown(columns):
    """{column name: {metric: value}} -> a markdown table, one metric a row."""
    metrics = [k for k in NAMES if any(k in c for c in columns.values())]
    lines = ["| probe | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {NAMES[k]} | " + " | ".join(f"{c[k]:.2f}" if k in c else "" for c in
                                             columns.values()) + " |" for k in metrics]
    return "\n".join(lines)


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", nargs="*", default=[],
                   help="backbone checkpoints (ours, DINO, DeiT/timm, MAE, MSN), a column each, "
                   "named by its folder; none: the references alone")
    p.add_argument("--arch", default="vit_small", choices=ARCHS, help="backbone (§3.2: ViT-S/16)")
    p.add_argument("--size", type=patch_multiple, default=224, help="input side (§3.2: 224)")
    p.add_argument("--seed", type=int, default=0,
                   help="the random-init reference's seed (pretrain.py's --seed)")
    p.add_argument("--seeds", type=at_least(1), default=1,
                   help="random-init references of this many seeds from --seed, to see their "
                   "spread")
    p.add_argument("--attr", default=None, help="CelebA-layout folder (default: the toy world's)")
    p.add_argument("--expr", default=None, help="RAF-DB-layout folder (default: the toy world's)")
    p.add_argument("--images", type=at_least(10), default=4000,
                   help="at most this many images a split")
    p.add_argument("--data-root", default=None, help="default: $PROS_DATA, else ./data")
    p.add_argument("--patch-size", type=at_least(1), default=16,
                   help="the random inits' patch side without --checkpoint (§3.2: 16); with one, "
                   "the first checkpoint's")
    p.add_argument("--out", default=None, help="also write the table here, in markdown")
    a = p.parse_args()
    if a.attr is None and a.expr is None:
        sets = toy_sets(data_root(a.data_root), a.size, a.images)
    else:
        sets = probe_sets(a.attr, a.expr, a.size, a.images)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    columns, patches = {}, []
    for path in a.checkpoint:
        backbone = ARCHS[a.arch]()
        load_pretrained(backbone, path)
        patches.append(backbone.patch_size)
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        name = path if name in columns else name
        columns[name] = run_probes(backbone_features(backbone.to(device), device), sets)
    for seed in range(a.seed, a.seed + a.seeds):
        random_init = random_backbone(a.arch, seed, patch_size=(patches or [a.patch_size])[0])
        columns[f"random, seed {seed}"] = run_probes(backbone_features(random_init.to(device),
                                                                       device), sets)
    columns["raw pixels"] = run_probes(pixel_features, sets)
    print(table(columns))
    for name in list(columns)[:len(a.checkpoint)]:
        g = gain(columns[name], columns[f"random, seed {a.seed}"])
        print(f"{name}: gain over random init (mean of {', '.join(HEADLINE)}): {g:+.2f} points")
    if a.out:
        write_lines(a.out, [markdown(columns)])

if __name__ == "__main__":
    run_cli(main)
