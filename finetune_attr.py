r"""Face attributes on CelebA and LFWA (paper §3.5, §4.1; Tables 1 and 2).

    python finetune_attr.py --frac 0.002 --init runs/pretrain/teacher_backbone.pth   # CelebA 0.2%
    python finetune_attr.py --dataset lfwa --frac 0.05
    python finetune_attr.py --dataset toy --arch vit_tiny --img-size 64 --batch-size 32 --runs 1 \
        --lr 4e-3 --layer-decay 1.0 --min-crop 0.5 --no-randaug --erasing 0 --epochs 20 --frac 0.1

Model (§4.1): the cls token of the last layer, layer-normalised (the ViT's final LayerNorm), then
one logit per attribute: one Linear(D, A) is exactly A separate linear heads, computed together.
Mean binary cross-entropy over attributes; metric: mean accuracy over attributes (each one's in
results.json).

Data (docs/formats.md): CelebA's img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt
(train = partition 0, test = partition 2). LFWA: lfw_att_40.mat + indices_train_test.mat (needs
h5py), or the same plain-text layout as CelebA. The number of attributes comes from the file header.
"""
import os
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import finetune
from data import data_root, read_celeba
from finetune import LabelledImages, eval_transform, train_transform
from run import run_cli


def read_lfwa_mat(path):
    """LFWA as distributed: lfw_att_40.mat (name, label, AttrName) and indices_train_test.mat
    (1-based indices_img_train / indices_img_test), MATLAB v7.3 = HDF5; images under lfw/ (names
    use backslashes)."""
    try:
        import h5py
    except ImportError:
        raise ValueError("reading LFWA's .mat files needs h5py: pip install h5py "
                         "(or convert LFWA once to the CelebA text layout)") from None

    def text(f, ref):
        return "".join(chr(c) for c in np.asarray(f[ref]).flatten())
    with h5py.File(os.path.join(path, "lfw_att_40.mat"), "r") as f:
        names = [text(f, r) for r in np.asarray(f["name"]).flatten()]
        labels = np.asarray(f["label"], np.float32)
        attrs = [text(f, r) for r in np.asarray(f["AttrName"]).flatten()]
    if labels.shape[0] != len(names):  # MATLAB stores column-major: (A, N) arrives transposed
        labels = labels.T
    with h5py.File(os.path.join(path, "indices_train_test.mat"), "r") as f:
        train, test = (np.asarray(f[k]).flatten().astype(int) - 1
                       for k in ("indices_img_train", "indices_img_test"))
    root = os.path.join(path, "lfw") if os.path.isdir(os.path.join(path, "lfw")) else path

    def item(i):
        return os.path.join(root, *names[i].replace("\\", "/").split("/")), labels[i]
    return dict(attributes=attrs, train=[item(i) for i in train], val=[],
                test=[item(i) for i in test])


def read_attributes(args):
    if args.dataset == "toy":
        import toyfaces
        return read_celeba(os.path.join(toyfaces.ensure_world(data_root(args.data_root)),
                                        "celeba"))
    if args.dataset == "lfwa" and os.path.isfile(os.path.join(args.data, "lfw_att_40.mat")):
        return read_lfwa_mat(args.data)
    if args.dataset == "lfwa" and not os.path.isdir(args.data):
        raise FileNotFoundError(f"{args.data}: no such folder (expected LFWA's lfw_att_40.mat, "
                                f"indices_train_test.mat and lfw/, or LFWA in the CelebA text "
                                f"layout; or try --dataset toy)")
    return read_celeba(args.data)


class AttributeModel(nn.Module):
    """ViT -> normalised feature -> A logits. pool='cls': the last layer's cls token after the
    ViT's final LayerNorm (§4.1); pool='mean': mean of the last layer's patch tokens + a LayerNorm
    (MAE's global pool)."""

    def __init__(self, backbone, n_attributes, pool="cls"):
        super().__init__()
        self.backbone, self.pool = backbone, pool
        self.fc_norm = nn.LayerNorm(backbone.embed_dim,
                                    eps=1e-6) if pool == "mean" else nn.Identity()
        # the ViT's final norm is then off the path: frozen, so DDP does not wait for it
        if pool == "mean":
            backbone.norm.requires_grad_(False)
        # A separate linear heads, side by side
        self.head = nn.Linear(backbone.embed_dim, n_attributes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def features(self, x):
        if self.pool == "mean":
            last = self.backbone.get_intermediate_layers(x, [len(self.backbone.blocks)])[0]
            return self.fc_norm(last.mean(1))
        return self.backbone(x)

    def forward(self, x):
        return self.head(self.features(x))


def add_args(p):
    finetune.add_common_args(
        p, ["celeba", "lfwa", "toy"],
        dict(lr=5e-4, weight_decay=0.05, layer_decay=0.65, epochs=100, batch_size=256,
             warmup_epochs=1, drop_path=0.1),
        notes=dict(lr="at a global batch of 256 (§4.1); scaled by the nominal one, --batch-size "
                   "(the linear rule of MAE's main_finetune.py)",
                   weight_decay="AdamW (§4.1)", layer_decay="§4.1",
                   epochs="the lr reaches zero at the end (§4.1)",
                   batch_size="64 x 4 GPUs (authors' run_celeba.sh)",
                   warmup_epochs="linear warmup (authors' run_celeba.sh)",
                   drop_path="authors' run_celeba.sh"))
    finetune.add_augmentation_args(p)
    p.add_argument("--pool", default="cls", choices=["cls", "mean"],
                   help="cls token (§4.1) or mean of patch tokens (MAE's global_pool)")


def attribute_loss(logits, targets):
    """Binary cross-entropy, the mean over attributes and images."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def attribute_metrics(logits, targets, names):
    """Mean accuracy over attributes, beside the majority baseline (each attribute's more frequent
    test value), and each attribute's accuracy, in %."""
    acc = ((logits > 0).float() == targets).float().mean(0)  # (A,)
    share = targets.float().mean(0)
    return dict(mean_accuracy=acc.mean().item() * 100,
                majority_accuracy=torch.maximum(share, 1 - share).mean().item() * 100,
                per_attribute={n: a * 100 for n, a in zip(names, acc.tolist())})


def task(args):
    data = read_attributes(args)
    names = data["attributes"]
    if not data["train"] or not data["test"]:
        raise ValueError(f"{args.data}: empty train or test split")
    return finetune.Task(
        name="attr", main_metric="test/mean_accuracy",
        shown=["test/mean_accuracy", "test/majority_accuracy"],
        train=LabelledImages(data["train"], train_transform(args)),
        tests={"test": LabelledImages(data["test"], eval_transform(args.img_size))},
        model=lambda backbone: AttributeModel(backbone, len(names), args.pool),
        loss=attribute_loss, metrics=partial(attribute_metrics, names=names))


def main(argv=None):
    return finetune.main(__doc__, add_args, task, argv)


if __name__ == "__main__":
    run_cli(main)
