"""A k-NN probe of a pretrained backbone on labelled faces: no training, seconds on a CPU.

    python knn.py --checkpoint runs/pretrain/teacher_backbone.pth --arch vit_tiny --size 64
    python knn.py --checkpoint teacher_backbone.pth --attr data/celeba --expr data/rafdb

DINO's weighted k-NN (eval_knn.py): each test image's label scores are its k = 20 nearest training
images' labels (cosine of the L2-normalised cls features after the final norm), weighted by
exp(cosine / 0.07). Attributes (a CelebA-layout folder): the mean accuracy over attributes;
expressions (a RAF-DB-layout folder): the accuracy. Run it on the checkpoints of a pretraining to
follow how the representation grows; random init is the floor.
"""
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from crops import normalize
from data import ArgumentParser, at_least, data_root, patch_multiple, run_cli
from finetune import LabelledImages, eval_transform
from finetune_attr import read_celeba
from finetune_expr import RAFDB_CLASSES, read_rafdb
from pretrain import Views, collate
import toyfaces
from vit import ARCHS, load_pretrained


def knn_sets(attr, expr, n):
    """{name: (train items, test items, multi_label)}: at most n train and n test images of each
    set; expression labels one-hot."""
    sets = {}
    if attr:
        d = read_celeba(attr)
        sets["knn_attr"] = (d["train"][:n], d["test"][:n], True)
    if expr:
        d = read_rafdb(expr)
        k = len(RAFDB_CLASSES)
        sets["knn_expr"] = tuple([(p, F.one_hot(torch.tensor(y), k).float()) for p,
                                  y in d[split][:n]]
                                 for split in ("train", "test")) + (False,)
    return sets


@torch.no_grad()
def features(backbone, items, size, device):
    """L2-normalised cls features (after the final norm) and stacked labels of (path, label)
    items."""
    images = Views(LabelledImages(items, eval_transform(size)), None, 0)
    feats, labels = [], []
    for batch, _ in DataLoader(images, batch_size=128, collate_fn=collate):
        if batch is not None:
            x, y = batch
            feats.append(F.normalize(backbone(normalize(x.to(device))).float(), dim=-1).cpu())
            labels.append(y.float())
    if not feats:
        raise ValueError(f"k-NN probe: none of the {len(items)} images was readable "
                         f"(first: {items[0][0]})")
    return torch.cat(feats), torch.cat(labels)


def knn_vote(bank, bank_labels, queries, k=20, temperature=0.07, chunk=256):
    """DINO's weighted k-NN: each query's label scores are the neighbours' labels weighted by
    exp(cosine / T), over its k nearest (cosine) neighbours; chunked so memory stays bounded."""
    out = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(min(k, len(bank)), dim=1)  # (chunk, k)
        w = (sim / temperature).exp()
        out.append((w[..., None] * bank_labels[idx]).sum(1) / w.sum(1, keepdim=True))
    return torch.cat(out)


def knn_probe(backbone, sets, size, device):
    """{'knn_attr': mean attribute accuracy, 'knn_expr': expression accuracy} in %."""
    backbone.eval()
    result = {}
    for name, (train, test, multi_label) in sets.items():
        bank, bank_y = features(backbone, train, size, device)
        q, q_y = features(backbone, test, size, device)
        votes = knn_vote(bank, bank_y, q)
        if multi_label:
            correct = ((votes > 0.5) == (q_y > 0.5)).float().mean()
        else:
            correct = (votes.argmax(1) == q_y.argmax(1)).float().mean()
        result[name] = correct.item() * 100
    return result


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default="random",
                   help="'random' or a backbone checkpoint (ours, DINO, DeiT/timm, MAE, MSN)")
    p.add_argument("--arch", default="vit_small", choices=ARCHS, help="backbone (§3.2: ViT-S/16)")
    p.add_argument("--size", type=patch_multiple, default=224, help="input side (§3.2: 224)")
    p.add_argument("--attr", default=None, help="CelebA-layout folder (default: the toy world's)")
    p.add_argument("--expr", default=None, help="RAF-DB-layout folder (default: the toy world's)")
    p.add_argument("--images", type=at_least(1), default=1000,
                   help="at most this many train and test images per set")
    p.add_argument("--data-root", default=None, help="default: $PROS_DATA, else ./data")
    a = p.parse_args()
    attr, expr = a.attr, a.expr
    if attr is None and expr is None:
        world = toyfaces.ensure_world(data_root(a.data_root))
        attr, expr = os.path.join(world, "celeba"), os.path.join(world, "rafdb")
    torch.manual_seed(0)
    backbone = ARCHS[a.arch]()
    if a.checkpoint != "random":
        load_pretrained(backbone, a.checkpoint)
    result = knn_probe(backbone, knn_sets(attr, expr, a.images), a.size, torch.device("cpu"))
    print(f"{a.checkpoint}: " + ", ".join(f"{k} {v:.2f}%" for k, v in result.items()))


if __name__ == "__main__":
    run_cli(main)
