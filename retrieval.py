"""Face-aware retrieval (paper §3, Fig. 3): keep the local crops that an ArcFace recogniser finds
similar to the global crops of the same image, displace the rest.

    python retrieval.py --arcface w600k_r50.onnx img1.jpg img2.jpg --out figure3.png
    python retrieval.py      # the toy world's recogniser on its first 4 faces

`select` applies the paper's rule with threshold theta = -0.5: a candidate whose cosine similarity
to the global crops is below theta is dropped, and the N local slots are filled from those that
pass; it works on a batch on the training device, in one pass. `ArcFace` runs any
insightface-style recognition model with onnxruntime (docs/formats.md): one input (B, 3, H, W) RGB
in (x - 127.5) / 127.5, H and W read from the model, output an embedding that we L2-normalise.
The figure draws, per image, its global crops, the uncurated local crops (rejected ones framed in
red, each with its similarity) and the curated crops that are kept.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import pil_to_tensor

from crops import MultiCrop, contact_sheet
from data import data_root, load_image, to_rgb, toy_faces
from run import ArgumentParser, at_least, is_rank_zero, run_cli


# ----------------------------------------------------------------------------- the rule (§3)

def similarity(global_emb, local_emb):
    """Cosine similarity of each local candidate to the global crops of its image: global_emb
    (..., M, D) and local_emb (..., C, D), unit norm -> (..., C).

    We take the MEAN over the M globals: Eq. 3 pairs every local view with every global view, so a
    kept crop should resemble the globals on average, not just one of them.
    """
    return (local_emb @ global_emb.transpose(-1, -2)).mean(-1)


def select(sim, n_local, threshold, priority, draw):
    """Indices (..., N) of the N local views to keep among an image's C candidates.

    sim (..., C): the candidates' similarities; priority (..., C) and draw (..., N): uniform numbers
    in [0, 1) that the image's worker drew with its other random numbers (MultiCrop). A candidate
    below theta is displaced. The N slots take the passing candidates in the order of their
    priority; when fewer than N pass, each slot left takes a passing one again (slot j: number
    floor(draw_j * passing) in that order; the step gives it other augmentation parameters,
    crops.take); when none passes, the N most similar are kept (a fallback, counted).
    """
    passing = sim >= threshold
    n_pass = passing.sum(-1, keepdim=True)  # (..., 1)
    # passing candidates first, in random order; then the others, the most similar first
    order = torch.where(passing, priority, 2 - sim).argsort(-1)
    slot = torch.arange(n_local, device=sim.device)
    again = (slot >= n_pass) & (n_pass > 0)
    return order.gather(-1, torch.where(again, (draw * n_pass).long(), slot))


SELECTION = ("candidates", "rejected", "reused", "fallbacks")


def selection_counts(sim, n_local, threshold):
    """What `select` does to a batch sim (B, C), summed over its images, as a (4,) tensor on sim's
    device: candidates, rejected (below theta), slots filled again, images with none passing."""
    n_pass = (threshold <= sim).sum(-1)  # (B,) passing candidates per image
    reused = (n_local - n_pass).clamp(min=0) * (n_pass > 0)
    return torch.stack([n_pass.new_tensor(sim.numel()), sim.numel() - n_pass.sum(), reused.sum(),
                        (n_pass == 0).sum()])


# ----------------------------------------------------------------------------- the recogniser

def onnx_providers(available, max_batch=512):
    """onnxruntime's providers: CUDA on this process's GPU where there is one (under torchrun
    LOCAL_RANK's, which run.setup_distributed makes current; onnxruntime would take GPU 0), its
    arena bounded by what chunks of max_batch crops need (an IResNet-50's largest activation is
    about 3 MB a crop: 16 MB a crop leaves room for the rest), then the CPU. With CUDA there and no
    CUDA provider, an error: ArcFace(providers=["CPUExecutionProvider"]) says so."""
    if not torch.cuda.is_available():
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:  # the recogniser would silently run on the CPU
        raise ValueError("CUDA is available but onnxruntime has no CUDA provider (the CPU build "
                         "'onnxruntime' is installed): pip uninstall -y onnxruntime && pip "
                         "install onnxruntime-gpu, or run the recogniser on the CPU on purpose: "
                         "--arcface-device cpu")
    limit = (512 + 16 * max_batch) * 2 ** 20
    return [("CUDAExecutionProvider", {"device_id": torch.cuda.current_device(),
                                       "gpu_mem_limit": limit,
                                       "arena_extend_strategy": "kSameAsRequested"}),
            "CPUExecutionProvider"]


class ArcFace:
    """An ONNX face recogniser. The onnxruntime session is created on first use, in the process that
    uses it, so the object can be pickled to DataLoader workers.

    normalize=False is for old MXNet-converted graphs whose first nodes subtract and scale by
    themselves: they are fed raw 0..255 values, as insightface does.
    """

    def __init__(self, onnx_path, providers=None, threads=None, normalize=True, max_batch=512):
        if not os.path.isfile(onnx_path):
            raise FileNotFoundError(f"{onnx_path}: ArcFace model not found")
        self.path, self.threads, self.normalize = onnx_path, threads, normalize
        self.providers, self.max_batch = providers, max_batch
        self._session = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_session"] = None
        return state

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort
            opts = ort.SessionOptions()
            # one call per training step between torch work: idle onnxruntime threads must not spin
            # on the cores
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            if self.threads:
                opts.intra_op_num_threads = self.threads
            providers = self.providers or onnx_providers(ort.get_available_providers(),
                                                         self.max_batch)
            try:
                self._session = ort.InferenceSession(self.path, opts, providers=providers)
            except Exception as e:
                raise ValueError(f"{self.path}: not a loadable ONNX model "
                                 f"({str(e).splitlines()[0][:120]})") from None
            if providers == ["CPUExecutionProvider"] and torch.cuda.is_available() \
                    and is_rank_zero():
                print("warning: the recogniser runs on the CPU (--arcface-device cpu), each "
                      "step's crops copied to the host; pip install onnxruntime-gpu runs it on "
                      "the GPU", file=sys.stderr)
            wanted = {p if isinstance(p, str) else p[0] for p in providers}
            if "CUDAExecutionProvider" in wanted - set(self._session.get_providers()):
                raise ValueError(f"{self.path}: onnxruntime has a CUDA provider but could not "
                                 f"load it (CUDA or cuDNN libraries of other versions?), so the "
                                 f"recogniser would run on the CPU unannounced: repair "
                                 f"onnxruntime-gpu, or choose the CPU: --arcface-device cpu")
            inp = self._session.get_inputs()[0]
            fixed_side = all(isinstance(s, int) for s in inp.shape[2:])
            if len(inp.shape) != 4 or inp.shape[1] != 3 or not fixed_side:
                raise ValueError(f"{self.path}: input {inp.name} has shape {inp.shape}, expected "
                                 f"(B, 3, H, W)")
            self.input_name, self.size = inp.name, tuple(inp.shape[2:])
            self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        return self._session

    def preprocess(self, images):
        """uint8 RGB (B, 3, H, W) tensor or a list of PIL images -> float32 (B, 3, h, w) model
        input."""
        self.session  # reads the model's input size
        if isinstance(images, (list, tuple)):  # PIL images may differ in size: resize each
            return torch.cat([self.preprocess(pil_to_tensor(to_rgb(im))[None]) for im in images])
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 RGB images (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        # one float copy, normalised in place: a second full-batch copy cost more than the
        # recogniser itself
        x = images.float()
        if tuple(x.shape[2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True,
                              align_corners=False)
        return x.sub_(127.5).div_(127.5) if self.normalize else x

    def run(self, x):
        """(B, 3, h, w) float32 -> (B, D) raw embeddings, on the CPU or the GPU alike: one call per
        chunk of at most max_batch crops (its activations bound the recogniser's memory), or, for a
        graph with a fixed batch, of that size (a last, short chunk padded)."""
        outs = []
        for chunk in x.split(self.fixed_batch or self.max_batch):
            n = len(chunk)
            if self.fixed_batch and n < self.fixed_batch:  # pad to the graph's batch
                chunk = torch.cat([chunk, chunk.new_zeros(self.fixed_batch - n, *chunk.shape[1:])])
            outs.append(self._run_one(chunk)[:n])
        return torch.cat(outs)

    def _run_one(self, x):
        """One onnxruntime call: from a CUDA tensor through IO binding, else through numpy."""
        if x.is_cuda and "CUDAExecutionProvider" in self.session.get_providers():
            return self._run_cuda(x)
        return torch.from_numpy(self.session.run(None, {self.input_name: x.cpu().numpy()})[0])

    def _run_cuda(self, x):
        """onnxruntime-gpu reading a CUDA tensor and writing the embeddings into one through IO
        binding: no host round trip (a graph whose embedding size is not fixed: copied back)."""
        x = x.contiguous().float()
        torch.cuda.current_stream(x.device).synchronize()  # onnxruntime reads x on its own stream
        out_meta, gpu = self.session.get_outputs()[0], x.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(self.input_name, "cuda", gpu, np.float32, tuple(x.shape), x.data_ptr())
        dim = out_meta.shape[-1]
        if not isinstance(dim, int):
            binding.bind_output(out_meta.name, "cuda", gpu)
            self.session.run_with_iobinding(binding)
            return torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(x.device)
        out = torch.empty(len(x), dim, dtype=torch.float32, device=x.device)
        binding.bind_output(out_meta.name, "cuda", gpu, np.float32, tuple(out.shape),
                            out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out

    @torch.no_grad()
    def embed(self, images):
        """uint8 RGB (B, 3, H, W) tensor (any H, W) or list of PIL images -> (B, D) float32, unit
        norm."""
        return F.normalize(self.run(self.preprocess(images)).float(), dim=-1)


# ----------------------------------------------------------------------------- Figure 3

def figure3(arcface, images, n_local=8, n_candidates=12, threshold=-0.5, seed=0):
    """Per image (PIL), three rows: its global crops; every local candidate, the uncurated crops,
    each with its similarity to the globals and the rejected ones framed in red; the N the rule
    keeps, the curated crops."""
    torch.manual_seed(seed)
    mc = MultiCrop(n_local=n_local, n_candidates=n_candidates)
    rows, boxes, captions, labels = [], [], [], []
    for k, img in enumerate(images):
        g, l = mc.sample(img)
        emb = arcface.embed(g + l)
        sim = similarity(emb[:len(g)], emb[len(g):])
        keep = select(sim, n_local, threshold, torch.rand(n_candidates), torch.rand(n_local))
        rows += [g, l, [l[i] for i in keep]]
        boxes += [[None] * len(g), [(255, 0, 0) if s < threshold else None for s in sim],
                  [None] * n_local]
        captions += [[None] * len(g), [f"#{i + 1}: {s:.2f}" for i, s in enumerate(sim)],
                     [f"#{i + 1}" for i in keep.tolist()]]
        labels += [f"image {k + 1}: global", f"{n_candidates} candidates",
                   f"kept (theta {threshold:g})"]
    return contact_sheet(rows, boxes=boxes, captions=captions, labels=labels)


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("images", nargs="*", help="face images (default: the toy world's first 4)")
    p.add_argument("--arcface", default=None, help="ONNX recognition model, insightface layout "
                   "(default: the toy world's arcface.onnx)")
    p.add_argument("--face-threshold", type=float, default=-0.5, help="theta: candidates below "
                   "are displaced (§3)")
    p.add_argument("--n-local", type=at_least(1), default=8, help="N local crops")
    p.add_argument("--n-candidates", type=at_least(1), default=12,
                   help="local candidates C per image")
    p.add_argument("--raw-input", action="store_true", help="the graph normalises inside (old "
                   "MXNet exports)")
    p.add_argument("--out", default="figure3.png", help="the Fig. 3 sheet (PNG)")
    a = p.parse_args()
    a.images = a.images or toy_faces(4)
    a.arcface = a.arcface or os.path.join(data_root(None), "toy", "arcface.onnx")
    images = [load_image(path) for path in a.images]
    bad = [path for path, img in zip(a.images, images) if img is None]
    if bad:
        raise ValueError(f"{bad[0]}: not a readable image")
    sheet = figure3(ArcFace(a.arcface, normalize=not a.raw_input), images, a.n_local,
                    a.n_candidates, a.face_threshold)
    sheet.save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    run_cli(main)
