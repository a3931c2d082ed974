"""The prototype-based self-distillation loss of ProS (paper §3.1-3.3), the projector, the EMA
teacher update and the schedules.

    s^l_n = softmax(p . f_s(x^l_n) / tau_l)
    s^g_m = softmax(p . f_t(x^g_m) / tau_g)                                         (Eq. 1)
    L     = 1/B sum_i H_i(s^g, s^l)  -  H(mean s^l)                                 (Eq. 2)
    H_i   = 1/(M N) sum_m sum_n H(s^g_m, s^l_n)   (cross-entropy, teacher -> student) (Eq. 3)
    H(mean s^l): entropy of the student prediction averaged over all B*N local views  (Eq. 4)

Eq. 4 as printed is the student predictions summed over the B images and their N local views and
divided by B x D, with no entropy taken; the text calls it "the entropy regularization [2]" and
MSN's me-max, which this loss follows, is the entropy of the mean prediction: that is what we
compute. Features and prototypes are L2-normalised ("All the output features are L2 normalized"),
so p . f is a cosine similarity. No centering: the mean-entropy term is the paper's anti-collapse
mechanism, and the sharp teacher (tau_g = 0.025 < tau_l = 0.1) gives the targets.
`sinkhorn=True` also spreads the targets over the prototypes with Sinkhorn-Knopp, as MSN's released
config does (pretrain.py's default; --no-sinkhorn is Eq. 2 alone).
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class ProjectionHead(nn.Module):
    """The projector: 3 fully connected layers, 384 -> 2048 -> 2048 -> 256, GELU between (§3.2).

    batch_norm=True puts BatchNorm1d after the two hidden layers, as MSN's released projector does
    (the paper says only "3 fully connected layers"): it standardises each feature over the batch,
    so images that a freshly initialised ViT maps to nearly the same vector get distinct
    projections from step 1.
    """

    def __init__(self, in_dim, out_dim=256, hidden_dim=2048, batch_norm=False):
        super().__init__()
        layers = []
        for d_in in (in_dim, hidden_dim):
            layers += [nn.Linear(d_in, hidden_dim), *([GlobalBatchNorm(hidden_dim)]
                                                      if batch_norm else []), nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, out_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.mlp(x)


class _AllReduceMean(torch.autograd.Function):
    """Average over processes. Every process's loss uses the average, so the gradient reaching this
    process's input is the average of all their gradients: backward is an all-reduce mean too."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x / dist.get_world_size()

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / dist.get_world_size()


def world_size():
    """The number of processes training together (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_mean(x):
    """Mean over dim 0 and over all processes, differentiable: (n, K) -> (K,)."""
    if world_size() > 1:
        return _AllReduceMean.apply(x.mean(0))
    return x.mean(0)


class GlobalBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the global batch: in training, the mean and variance of every process's
    batch together (one differentiable all-reduce each, as MSN's SyncBatchNorm on GPUs, here on any
    device), so that N processes of B images normalise as one of N x B. One process: BatchNorm1d.
    Every process holds the same number of images."""

    def forward(self, x):
        world = world_size()
        if not self.training or world == 1:
            return super().forward(x)
        mean = global_mean(x)  # (C,)
        var = global_mean(x * x) - mean * mean  # biased, as BatchNorm normalises
        n = len(x) * world
        with torch.no_grad():  # the running statistics take the unbiased variance, as BatchNorm1d
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


@torch.no_grad()
def sinkhorn(p, iterations=3):
    """Sinkhorn-Knopp (MSN's distributed_sinkhorn): rescale teacher predictions (n, K) so that every
    prototype gets an equal share of the global batch, each row still summing to 1."""
    reduce = dist.all_reduce if world_size() > 1 else (lambda t: t)
    Q = p.T.clone()  # (K, n)
    K, n = Q.shape[0], Q.shape[1] * world_size()
    total = Q.sum()
    reduce(total)
    Q /= total
    for _ in range(iterations):
        rows = Q.sum(1, keepdim=True)  # each prototype's share: made 1 / K
        reduce(rows)
        Q /= rows * K
        Q /= Q.sum(0, keepdim=True) * n  # each sample's total: made 1 / n
    return (Q * n).T


def entropy(p, dim=-1):
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


class PrototypeLoss(nn.Module):
    """Holds the K learnable prototypes, shared by teacher and student, and computes Eq. 1-4."""

    def __init__(self, n_prototypes=1024, dim=256, tau_teacher=0.025, tau_student=0.1,
                 sinkhorn=False):
        super().__init__()
        self.sinkhorn = sinkhorn
        bound = 1 / math.sqrt(dim)  # U(-1/sqrt(d), 1/sqrt(d)) (§3.3)
        self.prototypes = nn.Parameter(torch.empty(n_prototypes, dim).uniform_(-bound, bound))
        self.tau_teacher, self.tau_student = tau_teacher, tau_student

    def cosine(self, z):
        """Cosine similarities to the prototypes, z (..., d) -> (..., K), in fp32 even under bf16
        autocast (which casts a matmul of fp32 tensors too): at tau_teacher = 0.025, bf16's
        rounding of a cosine, up to 2^-9, would move a logit by up to 0.08."""
        with torch.autocast(z.device.type, enabled=False):
            return F.normalize(z.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).T

    def predictions(self, z, tau):
        """Eq. 1: softmax over prototypes of the cosine similarity / tau. z (..., d) -> (..., K)."""
        return (self.cosine(z) / tau).softmax(-1)

    def distillation(self, s_g, z_student):
        """Eq. 1-4 from the teacher's predictions s_g (B, M, K) and the student's raw projector
        outputs z_student (B, N, d) -> (loss, cross-entropy, mean entropy), each a 0-d tensor.
        The student's predictions: softmax of the cosine to each prototype (self.cosine) over
        tau_student. The cross-entropy averages every image's M x N (global, local) pairs; the
        mean entropy is the entropy of the student's prediction averaged over all B x N local
        views (global_mean, entropy), not a mean of per-view entropies; loss = cross-entropy -
        mean entropy. Gradients reach z_student and the prototypes."""
        log_s_l = F.log_softmax(self.cosine(z_student) / self.tau_student, -1)  # Eq. 1, (B, N, K)
        # Eq. 3: the cross-entropy of every (global m, local n) pair of an image, (B, M, N)
        ce = -(s_g[:, :, None] * log_s_l[:, None]).sum(-1)
        cross_entropy = ce.mean()  # Eq. 2, first term
        mean_s_l = global_mean(log_s_l.exp().flatten(0, 1))  # Eq. 4: (K,), over all B x N views
        mean_entropy = entropy(mean_s_l)
        return cross_entropy - mean_entropy, cross_entropy, mean_entropy             # Eq. 2

    def forward(self, z_teacher, z_student):
        """z_teacher (B, M, d) from the global views, z_student (B, N, d) from the local views ->
        (loss, stats)."""
        # the teacher side gives targets only: no gradient, not to the prototypes either
        with torch.no_grad():
            s_g = self.predictions(z_teacher, self.tau_teacher)                      # (B, M, K)
            # not in the paper: MSN's equipartition of the targets (see --sinkhorn)
            if self.sinkhorn:
                s_g = sinkhorn(s_g.flatten(0, 1)).view_as(s_g)
        loss, cross_entropy, mean_entropy = self.distillation(s_g, z_student)
        # 0-d tensors on the device: read on logging steps only (no host sync here)
        with torch.no_grad():
            s_l = self.predictions(z_student, self.tau_student)
            hit = s_g.new_zeros(s_g.shape[-1]).index_fill_(0, s_g.argmax(-1).flatten(), 1.0)
            if world_size() > 1:  # the prototypes the whole global batch reaches
                dist.all_reduce(hit, op=dist.ReduceOp.MAX)
            used = hit.sum()
            stats = dict(loss=loss.detach(), cross_entropy=cross_entropy.detach(),
                         mean_entropy=mean_entropy.detach(), teacher_entropy=entropy(s_g).mean(),
                         student_entropy=entropy(s_l).mean(), prototypes_used=used)
        return loss, stats


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (same
    names)."""
    student_params = dict(student.named_parameters())
    names, t = zip(*teacher.named_parameters())
    # one fused kernel per op on a GPU instead of two launches per parameter (about 300 a step)
    torch._foreach_mul_(list(t), momentum)
    torch._foreach_add_(list(t), [student_params[n].detach() for n in names], alpha=1 - momentum)


# ----------------------------------------------------------------------------- schedules

def cosine_schedule(step, total_steps, base, final, warmup_steps=0, warmup_start=0.0):
    """Linear warmup from warmup_start to base over warmup_steps, then cosine from base to final.

    A pure function of the step, so a resumed run follows exactly the same curve.
    """
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * t))


STRETCH = 1.25  # MSN lays its momentum and weight-decay schedules over 1.25x the run's steps


def momentum_schedule(step, total_steps, base=0.996):
    """EMA momentum, linear from base towards 1 over 1.25x the run, so it ends near 0.9992 (MSN's
    msn_train.py; the paper does not state it)."""
    return base + (1.0 - base) * step / (STRETCH * total_steps)


def weight_decay_schedule(step, total_steps, base=0.04, final=0.4):
    """Weight decay, cosine from base towards final over 1.25x the run (MSN's CosineWDSchedule)."""
    return cosine_schedule(step, STRETCH * total_steps, base, final)


# ----------------------------------------------------------------------------- demo

def main():
    """Eq. 1-4 on made-up features, a healthy batch beside a collapsed one (python loss.py)."""
    import argparse
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="prints the loss and its statistics for two made-up "
                            "batches").parse_args()
    torch.manual_seed(0)
    criterion = PrototypeLoss(n_prototypes=1024, dim=256)
    B, M, N, d = 64, 2, 8, 256
    images = torch.randn(B, 1, d)  # one feature per image; its views are noisy copies of it
    healthy = images.expand(B, M, d) + 0.3 * torch.randn(B, M, d)
    # every image alike
    collapsed = torch.randn(1, 1, d).expand(B, M, d) + 0.01 * torch.randn(B, M, d)
    print(f"K = 1024 prototypes, B = {B} images, M = {M} global and N = {N} local views; "
          f"ln K = {math.log(1024):.3f}")
    used = {}
    for name, z_teacher in (("healthy", healthy), ("collapsed", collapsed)):
        z_student = z_teacher[:, :1].expand(B, N, d) + 0.3 * torch.randn(B, N, d)
        loss, s = criterion(z_teacher, z_student)
        used[name] = int(s["prototypes_used"])
        print(f"{name:>9}: loss {s['loss']:.3f} = cross-entropy {s['cross_entropy']:.3f} - mean "
              f"entropy {s['mean_entropy']:.3f}; the teacher's argmax reaches {used[name]} of the "
              f"prototypes for {B * M} views; entropies: teacher {s['teacher_entropy']:.2f}, "
              f"student {s['student_entropy']:.2f}")
    print(f"What tells them apart is not the loss, nearly the same, but the prototypes the "
          f"teacher's predictions reach: {used['healthy']} for images that differ, "
          f"{used['collapsed']} when every image looks alike (a collapse: its targets teach "
          f"nothing). pretrain.py reports this share of the reachable prototypes and calls a "
          f"run COLLAPSED under 25%.")


if __name__ == "__main__":
    main()
