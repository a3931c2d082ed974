"""Vision Transformer backbone of ProS (paper §3.2): ViT-S/16 for teacher and student.

    python vit.py                  # parameter count and one timed forward+backward on this machine
    python vit.py --arch vit_tiny

ViT-S/16 is 12 pre-norm blocks of width 384 with 6 heads, 16x16 patches and one cls token (~21.7M
parameters). The 14x14 position embedding is resampled to any grid, so 224 globals (14x14 patches)
and 96 locals (6x6) go through the same weights. State-dict keys are timm's / DINO's, so
checkpoints of DINO, DeiT, MAE and MSN load directly (Table 1 baselines) through `load_pretrained`.
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from run import ArgumentParser, at_least, patch_multiple, read_checkpoint


# ----------------------------------------------------------------------------- building blocks

class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch per sample during training."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention=False):
        """x (B, T, D) -> (B, T, D): multi-head self-attention. qkv(x)'s last dim holds q, k
        and v one after the other, each split into num_heads heads of D / num_heads: reshape it
        (B, T, 3, heads, D / heads). Each head attends with softmax(q k^T / sqrt(D / heads)) over
        the keys; the heads' outputs, side by side again (B, T, D), go through proj.
        return_attention: the attention maps (B, heads, T, T) instead."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads,
                                  D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, T, D/heads)
        if return_attention:  # explicit softmax(QK^T / sqrt(d)), for Figure 6
            return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def resample_pos_embed(pos_embed, grid):
    """(1, 1 + h*w, D) -> (1, 1 + H*W, D) for grid (H, W): bicubic on the patch part, cls kept.

    Antialiased like timm's resample_abs_pos_embed, so a 224 model looks the same to a 96 crop here
    as in timm. The identity when the grid already matches.
    """
    n_old = pos_embed.shape[1] - 1
    side = int(math.sqrt(n_old))
    if (side, side) == tuple(grid):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, h, w)
    patch_pos = F.interpolate(patch_pos.float(), size=tuple(grid), mode="bicubic", antialias=True,
                              align_corners=False).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


# ----------------------------------------------------------------------------- the model

class PatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D)


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, drop_path_rate=0.0):
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        n_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # deeper blocks drop more (DeiT)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def tokens(self, x):
        """Images (B, 3, H, W), H and W multiples of the patch size -> tokens (B, 1 + h*w, D)."""
        B, _, H, W = x.shape
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {self.patch_size}")
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        return x + resample_pos_embed(self.pos_embed, (H // self.patch_size, W // self.patch_size))

    def forward(self, x):
        x = self.tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]  # (B, D): cls feature after the final norm

    def get_intermediate_layers(self, x, indices=(4, 6, 8, 12)):
        """Patch tokens (no cls) at the output of the given blocks, 1-based as in the paper (§4.1).

        Returned as the blocks produce them (before the final norm): list of (B, h*w, D).
        """
        bad = [i for i in indices if not 1 <= i <= len(self.blocks)]
        if bad:
            raise ValueError(f"block indices {bad} outside 1..{len(self.blocks)}")
        x, out = self.tokens(x), {}
        for i, blk in enumerate(self.blocks, start=1):
            x = blk(x)
            if i in indices:
                out[i] = x[:, 1:]
            if i == max(indices):
                break
        return [out[i] for i in indices]

    def get_last_selfattention(self, x):
        """Attention maps of the last block, (B, heads, T, T), rows summing to 1 (Figure 6)."""
        x = self.tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        return last.attn(last.norm1(x), return_attention=True)


def vit_tiny(**kw):
    return VisionTransformer(embed_dim=192, depth=12, num_heads=3, **kw)


def vit_small(**kw):
    return VisionTransformer(embed_dim=384, depth=12, num_heads=6, **kw)


def vit_base(**kw):
    return VisionTransformer(embed_dim=768, depth=12, num_heads=12, **kw)


ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base}


def no_weight_decay(name, param):
    """Biases, norms, pos_embed and cls_token get no weight decay (MAE and BEiT, as timm's
    no_weight_decay; DINO and MSN exempt only biases and norms)."""
    return param.ndim <= 1 or name.split(".")[-1] in ("pos_embed", "cls_token")


# ----------------------------------------------------------------------------- checkpoints

# Where each known layout keeps its backbone: ours (pretrain.py) is DINO's, {'teacher':
# {'backbone.*', 'head.*'}, 'student': ..., ...}, plus a bare `teacher_backbone.pth`; then MSN's,
# DeiT's and MAE's, and other trainers'.
CONTAINER_KEYS = ("teacher", "target_encoder", "model", "state_dict")
PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.")
# Heads and pretraining-only parts that a backbone never uses; dropped and reported.
DROP_PREFIXES = ("head.", "fc_norm.", "fc.", "decoder", "mask_token", "criterion.", "prototypes")


def extract_backbone_state(ckpt, source="state dict"):
    """Any supported checkpoint -> (backbone state dict with timm keys, list of dropped keys)."""
    for key in CONTAINER_KEYS:
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict):
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not any(torch.is_tensor(v) for v in ckpt.values()):
        raise ValueError(f"{source}: no state dict found (expected one of the keys "
                         f"{CONTAINER_KEYS} or a bare ViT state dict)")
    state, dropped = {}, []
    for k, v in ckpt.items():
        if not torch.is_tensor(v):
            continue
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        if k.startswith(DROP_PREFIXES):
            dropped.append(k)
        else:
            state[k] = v
    return state, dropped


def load_pretrained(model, path_or_state_dict):
    """Load a ProS / DINO / DeiT / timm / MAE / MSN checkpoint into `model`.

    Strips wrappers and prefixes, drops heads, adopts the checkpoint's patch size, resamples
    pos_embed to the model's grid, then loads; returns (missing_keys, unexpected_keys) and prints
    them with what was dropped. Raises ValueError naming the source when nothing matches or a shape
    differs (e.g. a ViT-B checkpoint into ViT-S).
    """
    source = path_or_state_dict if isinstance(path_or_state_dict, str) else "state dict"
    ckpt = read_checkpoint(source) if isinstance(path_or_state_dict, str) else path_or_state_dict
    state, dropped = extract_backbone_state(ckpt, source)
    kernel = state.get("patch_embed.proj.weight")
    if kernel is not None and kernel.shape[-1] != model.patch_size:  # a ViT/8 makes a ViT/8
        model.patch_size = kernel.shape[-1]
        model.patch_embed = PatchEmbed(model.patch_size, model.embed_dim)
        if "pos_embed" in state:  # and keeps its grid
            model.pos_embed = nn.Parameter(torch.zeros_like(state["pos_embed"]))
        print(f"{source}: patch size {model.patch_size}, the checkpoint's")
    own = model.state_dict()
    if not set(state) & set(own):
        raise ValueError(f"{source}: none of its {len(state)} tensors is a ViT backbone weight "
                         f"(first keys: {sorted(state)[:3]})")
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        side = int(math.sqrt(own["pos_embed"].shape[1] - 1))
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], (side, side))
        print(f"{source}: pos_embed resampled to a {side}x{side} grid")
    for k, v in state.items():
        if k in own and v.shape != own[k].shape:
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)} (wrong --arch?)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    for what, keys in (("dropped", dropped), ("missing", missing), ("unexpected", unexpected)):
        if keys:
            print(f"{source}: {what} {len(keys)} keys: "
                  f"{', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
    return missing, unexpected


# ----------------------------------------------------------------------------- python vit.py

def main():
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="vit_small", choices=ARCHS,
                        help="backbone (§3.2: ViT-S/16)")
    parser.add_argument("--batch-size", type=at_least(1), default=8,
                        help="images in the timed step")
    parser.add_argument("--img-size", type=patch_multiple, default=224, help="input side, a "
                        "multiple of 16")
    args = parser.parse_args()
    model = ARCHS[args.arch]()
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {n / 1e6:.2f}M parameters")
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        model(x).sum().backward()
        times.append(time.perf_counter() - t)
    best = min(times[1:])
    print(f"forward+backward of {args.batch_size} x {args.img_size}px on "
          f"{torch.get_num_threads()} threads: {best * 1000:.0f} ms ({args.batch_size / best:.1f} "
          f"images/s)")


if __name__ == "__main__":
    main()
