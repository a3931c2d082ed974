"""The test suite: every piece of ProS checked on CPU with tiny configs.

    python -m pytest -q test_all.py          # all
    python -m pytest -q test_all.py -k loss  # one part

Values are computed independently (explicit loops, hand-made examples), not copied from the code.
"""
import io
import json
import math
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vit

HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(*args, cwd=None, env=None):
    """Run one of the scripts as a user would; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, args[0]), *args[1:]], capture_output=True, text=True,
                       cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)
    return p.returncode, p.stdout, p.stderr


def last_line(text):
    return text.strip().splitlines()[-1]


# ============================================================================= vit.py (issue 2)

@pytest.mark.parametrize("arch,D", [("vit_tiny", 192), ("vit_small", 384)])
def test_vit_parameter_count(arch, D):
    L, P, T = 12, 16, 197
    block = 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + 2 * D + (D * 4 * D + 4 * D) + (4 * D * D + D)
    expected = (3 * P * P * D + D) + D + T * D + L * block + 2 * D
    model = vit.ARCHS[arch]()
    assert sum(p.numel() for p in model.parameters()) == expected and model.embed_dim == D
    if arch == "vit_small":
        assert expected == 21_665_664  # timm's vit_small_patch16_224 without its classifier


@pytest.mark.parametrize("size,tokens", [(224, 196), (112, 49), (96, 36)])
def test_vit_output_shapes(size, tokens):
    m = vit.vit_tiny().eval()
    x = torch.randn(2, 3, size, size)
    assert m(x).shape == (2, 192)
    assert [t.shape for t in m.get_intermediate_layers(x, (4, 12))] == [(2, tokens, 192)] * 2
    assert m.get_last_selfattention(x).shape == (2, 3, tokens + 1, tokens + 1)


def test_vit_rejects_sizes_not_multiple_of_patch():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit.vit_tiny()(torch.randn(1, 3, 100, 100))


def test_pos_embed_interpolation_is_identity_at_224():
    m = vit.vit_tiny()
    assert vit.resample_pos_embed(m.pos_embed, (14, 14)) is m.pos_embed
    out = vit.resample_pos_embed(m.pos_embed, (6, 6))
    assert out.shape == (1, 37, 192) and torch.equal(out[:, 0], m.pos_embed[:, 0])


def test_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    attn = vit.Attention(24, 3).eval()
    x = torch.randn(2, 5, 24)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 3, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 24))
    assert torch.allclose(attn(x), expected, atol=1e-5)
    assert torch.allclose(attn(x, return_attention=True), weights, atol=1e-6)


def test_attention_maps_sum_to_one():
    a = vit.vit_tiny().eval().get_last_selfattention(torch.randn(2, 3, 96, 96))
    assert torch.allclose(a.sum(-1), torch.ones(2, 3, 37), atol=1e-5) and (a >= 0).all()


def test_intermediate_layers_are_one_based():
    m = vit.vit_tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        t = m.tokens(x)
        outs = []
        for blk in m.blocks:
            t = blk(t)
            outs.append(t[:, 1:])
        first, fourth, last = m.get_intermediate_layers(x, (1, 4, 12))
    assert torch.allclose(first, outs[0]) and torch.allclose(fourth, outs[3]) and torch.allclose(last, outs[11])
    with pytest.raises(ValueError):
        m.get_intermediate_layers(x, (0,))


def test_drop_path_inactive_in_eval():
    m = vit.vit_tiny(drop_path_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    a = m(x)
    assert not torch.allclose(a, m(x))


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("layout", ["dino", "dino_bare", "timm", "msn", "ours"])
def test_load_pretrained_layouts_round_trip(layout, tmp_path):
    src = vit.vit_tiny()
    sd = src.state_dict()
    head = {"head.weight": torch.randn(10, 192), "head.bias": torch.randn(10)}
    ckpt = {"dino": {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.mlp.0.weight": torch.ones(3)},
                     "student": {}},
            "dino_bare": dict(sd),
            "timm": {"model": {**sd, **head}},
            "msn": {"target_encoder": {f"module.{k}": v for k, v in sd.items()}},
            "ours": {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.mlp.0.weight": torch.ones(3)},
                     "student": {"criterion.prototypes": torch.ones(4, 4)}, "step": 3}}[layout]
    path = str(tmp_path / "ckpt.pth")
    torch.save(ckpt, path)
    dst = vit.vit_tiny()
    missing, unexpected = vit.load_pretrained(dst, path)
    assert missing == [] and unexpected == []
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_outputs(src, x), _outputs(dst, x))


def test_load_pretrained_interpolates_other_grid():
    src = vit.vit_tiny(img_size=112)  # a 7x7 grid
    dst = vit.vit_tiny()
    vit.load_pretrained(dst, src.state_dict())
    assert torch.allclose(dst.pos_embed, vit.resample_pos_embed(src.pos_embed, (14, 14)))


def test_load_pretrained_bad_files(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt.pth"):
        vit.load_pretrained(vit.vit_tiny(), str(bad))
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3), "fc.bias": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="resnet.pth"):
        vit.load_pretrained(vit.vit_tiny(), str(other))
    with pytest.raises(ValueError, match="shape"):  # a ViT-S checkpoint into a ViT-Ti
        vit.load_pretrained(vit.vit_tiny(), vit.vit_small().state_dict())
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        vit.load_pretrained(vit.vit_tiny(), str(tmp_path / "nowhere.pth"))


def test_vit_equals_timm_when_installed():
    timm = pytest.importorskip("timm")
    ours = vit.vit_small().eval()
    theirs = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 224, 224)
    assert torch.allclose(_outputs(ours, x), _outputs(theirs, x), atol=1e-5)


# ============================================================================= the toy world (issue 4)

@pytest.fixture(scope="session")
def toy_generation(tmp_path_factory):
    """A tiny toy world under <root>/toy, as `--data-root root` and `--dataset toy` find it, and the
    caller's next torch random numbers after generating it and after reseeding instead."""
    import toyfaces
    root = tmp_path_factory.mktemp("data")
    torch.manual_seed(123)
    toyfaces.write_world(str(root / "toy"), images=120, seed=0, workers=1, recognizer_steps=40)
    after = torch.rand(4)
    torch.manual_seed(123)
    return str(root), after, torch.rand(4)


@pytest.fixture(scope="session")
def toy_root(toy_generation):
    return toy_generation[0]


def test_generating_the_toy_world_leaves_the_callers_rng_as_it_was(toy_generation):
    # pretrain.py seeds, then finds or generates the world: a seeded run must not depend on which
    _, after, reseeded = toy_generation
    assert torch.equal(after, reseeded)


def _ensure_world_worker(rank, root, local_ranks):
    import toyfaces
    os.environ["LOCAL_RANK"] = str(local_ranks[rank])

    def slow_write(out, images, seed):  # stands in for the minutes of generating the world
        with open(os.path.join(root, "writers"), "a") as f:
            f.write(f"{rank}\n")
        time.sleep(3)
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "DONE"), "w").close()
    toyfaces.write_world = slow_write
    toyfaces.ensure_world(root)
    assert os.path.exists(os.path.join(root, "toy", "DONE"))  # nobody returns before the world is there


def test_processes_of_one_job_generate_the_toy_world_once_per_node(tmp_path):
    # torchrun's processes all call ensure_world on first use: one per node writes, the others wait for it
    torch.multiprocessing.spawn(_ensure_world_worker, args=(str(tmp_path / "one"), [0, 1]), nprocs=2)
    assert len((tmp_path / "one" / "writers").read_text().split()) == 1
    # two nodes sharing the filesystem: both LOCAL_RANK 0 write, one copy is renamed into place
    torch.multiprocessing.spawn(_ensure_world_worker, args=(str(tmp_path / "two"), [0, 0]), nprocs=2)
    assert len((tmp_path / "two" / "writers").read_text().split()) == 2
    assert sorted(os.listdir(tmp_path / "two")) == ["toy", "writers"]  # no temporary folder left


def test_toy_world_reads_back_through_the_real_readers(toy_root):
    import data
    from finetune_align import read_300w
    from finetune_attr import read_celeba
    from finetune_expr import read_rafdb
    import toyfaces
    world = os.path.join(toy_root, "toy")
    ms1m = data.pretrain_dataset(os.path.join(world, "ms1m"))
    assert isinstance(ms1m, data.RecordIO) and len(ms1m) == 120
    assert ms1m[0].size == (112, 112) and int(ms1m.labels(119)[0]) == 11  # 10 images per identity
    with open(os.path.join(world, "ms1m", "property")) as f:
        assert f.read() == "12,112,112"
    celeba = read_celeba(os.path.join(world, "celeba"))
    assert celeba["attributes"] == toyfaces.ATTRIBUTES
    assert (len(celeba["train"]), len(celeba["val"]), len(celeba["test"])) == (96, 12, 12)
    raf = read_rafdb(os.path.join(world, "rafdb"))
    assert len(raf["train"]) == 72 and len(raf["test"]) == 18 and os.path.isfile(raf["test"][0][0])
    w300 = read_300w(os.path.join(world, "300w"))
    flags = [int(t[1][1][0]) for t in w300["test"]]
    assert len(w300["train"]) > 0 and 0 in flags and 1 in flags
    img = Image.open(w300["train"][0][0])
    pts = w300["train"][0][1][0]
    assert pts.shape == (68, 2) and (pts > 0).all() and (pts < img.size[0]).all()


def test_toy_world_is_deterministic(tmp_path):
    import toyfaces
    for d in ("a", "b"):
        toyfaces.write_celeba(str(tmp_path / d), 12, seed=3, workers=1)
        toyfaces.write_recordio(str(tmp_path / d / "ms1m"), [3, 2], seed=3, workers=1)
    for name in ("list_attr_celeba.txt", "img_align_celeba/000007.jpg", "ms1m/train.rec", "ms1m/train.idx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_toy_landmarks_sit_on_the_drawn_face():
    import toyfaces
    checked = 0
    for i in range(60):
        s = toyfaces.make_image(0, "300w" if i % 2 else "ibug", i, i)
        lm, (x0, y0, x1, y1) = s["landmarks"], s["box"]
        assert (lm[:, 0] >= x0 - 1).all() and (lm[:, 0] <= x1 + 1).all()
        assert (lm[:, 1] >= y0 - 1).all() and (lm[:, 1] <= y1 + 1).all()
        # iBUG order under any in-plane rotation: the jaw runs from image-left to image-right through the chin
        # and the eyes in the face frame (eye axis = the face's x axis)
        axis = (lm[45] - lm[36]) / np.linalg.norm(lm[45] - lm[36])
        assert (lm[16] - lm[0]) @ axis > 0 and (lm[42] - lm[39]) @ axis > 0 and (lm[26] - lm[17]) @ axis > 0
        down = np.array([-axis[1], axis[0]])
        assert (lm[8] - lm[27]) @ down > 0 and (lm[57] - lm[51]) @ down > 0
        gray = np.asarray(s["image"]).astype(float).mean(-1)
        if s["attributes"][toyfaces.ATTRIBUTES.index("Blurry")]:
            continue
        for eye in (lm[36:42], lm[42:48]):  # the pupil is drawn dark at the centre of the eye points
            if np.linalg.norm(eye[1] - eye[5]) < 2.5:  # a squint: the lids cover most of the pupil
                continue
            cx, cy = np.round(eye.mean(0)).astype(int)
            assert gray[cy - 1:cy + 2, cx - 1:cx + 2].min() < 60, i
        checked += 1
    assert checked > 30


def test_toy_expressions_and_attributes_all_occur():
    import toyfaces
    samples = [toyfaces.make_image(1, "celeba", i, i // 3) for i in range(400)]
    assert {s["expression"] for s in samples} == set(range(7))
    attrs = np.array([s["attributes"] for s in samples])
    assert attrs.shape[1] == len(toyfaces.ATTRIBUTES) >= 20
    assert (attrs.mean(0) > 0.02).all() and (attrs.mean(0) < 0.98).all()  # none constant


def test_toy_expressions_are_not_one_pixel_apart():
    import toyfaces
    imgs = {}
    for i in range(300):
        s = toyfaces.make_image(2, "rafdb", i, i)
        imgs.setdefault(s["expression"], []).append(np.asarray(s["image"], np.float32).reshape(-1))
    # no single pixel separates any class from all others: within-class spread beats between-class gaps
    means = np.stack([np.mean(imgs[c], 0) for c in range(7)])
    stds = np.stack([np.std(imgs[c], 0) for c in range(7)])
    assert (np.abs(means[:, None] - means[None]).max(-1) < 3 * stds.max(0).max()).all()


def test_toy_expressions_are_visible_at_64px():
    import itertools
    import toyfaces
    # at the weakest intensity (0.6), every pair of expressions moves some landmark by >= 0.1 face
    # half-widths: about 2 px in a 64 px RAF-DB-framed image (the miniature's fine-tuning size)
    for ident in range(20):
        t = toyfaces.identity_traits(0, ident)
        points = {e: toyfaces.landmarks_canonical(t, toyfaces.expression_look(e, 0.6, 0.5))
                  for e in toyfaces.EXPRESSIONS}
        gaps = [np.abs(points[a] - points[b]).max() for a, b in itertools.combinations(points, 2)]
        assert min(gaps) >= 0.1, (ident, min(gaps))


def test_toy_recognizer_runs_with_dynamic_batch(toy_root):
    import onnxruntime as ort
    from retrieval import ArcFace
    path = os.path.join(toy_root, "toy", "arcface.onnx")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    assert shape[1:] == [3, 112, 112] and not isinstance(shape[0], int)
    imgs = torch.randint(0, 256, (5, 3, 112, 112), dtype=torch.uint8)
    emb = ArcFace(path).embed(imgs)
    one = ArcFace(path).embed(imgs[2:3])
    assert emb.shape == (5, 64) and torch.allclose(emb[2], one[0], atol=1e-5)


# ============================================================================= crops.py / retrieval.py (issue 3)

def test_multicrop_shapes_ranges_and_determinism():
    from crops import MultiCrop
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (150, 120, 3), np.uint8))
    mc = MultiCrop(64, 32, n_global=2, n_local=3, n_candidates=5)
    torch.manual_seed(1)
    v = mc(img)
    assert v["global_views"].shape == (2, 3, 64, 64) and v["local_views"].shape == (5, 3, 32, 32)
    assert v["raw"].shape == (7, 3, 112, 112)
    assert all(x.dtype == torch.uint8 for x in v.values())  # views are normalised on the device (normalize)
    torch.manual_seed(1)
    v2 = mc(img)
    assert all(torch.equal(v[k], v2[k]) for k in v)
    gc, lc = mc.sample(img)
    assert [c.size for c in gc] == [(64, 64)] * 2 and len(lc) == 5
    assert set(MultiCrop(64, 32, recognizer_size=None)(img)) == {"global_views", "local_views"}  # no recogniser
    with pytest.raises(ValueError):
        MultiCrop(n_local=8, n_candidates=4)


def test_normalize_equals_torchvision_per_view_and_dino_recipe():
    """The batch normalisation on the device = torchvision's ToDtype(scale) + Normalize on each view, bit for
    bit (so moving it out of the workers changed no number), and = (x / 255 - mean) / std in float64."""
    from torchvision.transforms import v2
    from crops import IMAGENET_MEAN, IMAGENET_STD, normalize
    views = torch.randint(0, 256, (3, 2, 3, 8, 8), dtype=torch.uint8)  # (B, M, 3, H, W)
    per_view = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = torch.stack([torch.stack([per_view(v) for v in image]) for image in views])
    out = normalize(views)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    mean, std = (torch.tensor(c, dtype=torch.float64)[:, None, None] for c in (IMAGENET_MEAN, IMAGENET_STD))
    assert torch.allclose(out.double(), (views.double() / 255 - mean) / std, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "tiny", "CMYK"])
def test_multicrop_odd_images(mode):
    from crops import MultiCrop
    rs = np.random.RandomState(0)
    img = {"L": Image.fromarray(rs.randint(0, 255, (50, 60), np.uint8)),
           "RGBA": Image.fromarray(rs.randint(0, 255, (50, 60, 4), np.uint8), "RGBA"),
           "P": Image.fromarray(rs.randint(0, 255, (50, 60, 3), np.uint8)).convert("P"),
           "I;16": Image.fromarray(rs.randint(0, 65535, (50, 60)).astype(np.uint16)),
           "tiny": Image.new("RGB", (3, 2), (200, 10, 10)),
           "CMYK": Image.new("CMYK", (40, 40))}[mode]
    v = MultiCrop(32, 16, n_local=2)(img)
    assert v["global_views"].shape == (2, 3, 32, 32) and v["local_views"].shape == (2, 3, 16, 16)
    if mode == "I;16":  # 16-bit is scaled to 8 bits, not clipped to white
        assert v["raw"].float().mean() < 200


def test_to_rgb_scales_16_bit():
    from data import to_rgb
    img = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert to_rgb(img).getpixel((0, 0)) == (127, 127, 127)


def _onnx_model(path, batch="N", mean_only=True, weight=None, input_shape=None):
    """A tiny ONNX recogniser: per-channel mean of the input (then an optional matrix)."""
    import onnx
    from onnx import TensorProto, helper
    shape = input_shape or [batch, 3, 112, 112]
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, shape)
    nodes = [helper.make_node("ReduceMean", ["input.1", "axes"], ["mean"], keepdims=0)]
    axes = list(range(2, len(shape)))
    inits = [helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)]
    out_name = "mean"
    if weight is not None:
        inits.append(helper.make_tensor("W", TensorProto.FLOAT, list(weight.shape), weight.flatten().tolist()))
        nodes.append(helper.make_node("MatMul", ["mean", "W"], ["emb"]))
        out_name = "emb"
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [batch, 3 if weight is None else weight.shape[1]])
    graph = helper.make_graph(nodes, "g", [inp], [out], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_arcface_preprocessing_rgb_and_normalisation(tmp_path):
    from retrieval import ArcFace
    face = ArcFace(_onnx_model(str(tmp_path / "mean.onnx")))
    img = torch.zeros(1, 3, 112, 112, dtype=torch.uint8)
    img[:, 0], img[:, 1], img[:, 2] = 255, 0, 51  # R, G, B
    raw = face.run(face.preprocess(img))
    assert torch.allclose(raw, torch.tensor([[1.0, -1.0, (51 - 127.5) / 127.5]]), atol=1e-5)
    pil = Image.new("RGB", (112, 112), (255, 0, 51))
    assert torch.allclose(face.run(face.preprocess([pil])), raw, atol=1e-5)
    raw_input = ArcFace(face.path, normalize=False)  # for graphs that normalise inside
    assert torch.allclose(raw_input.run(raw_input.preprocess(img)), torch.tensor([[255.0, 0.0, 51.0]]), atol=1e-3)


def test_arcface_fixed_and_dynamic_batch_agree(tmp_path):
    from retrieval import ArcFace
    W = np.random.RandomState(0).randn(3, 8).astype(np.float32)
    dyn = ArcFace(_onnx_model(str(tmp_path / "dyn.onnx"), weight=W))
    fixed = ArcFace(_onnx_model(str(tmp_path / "fixed.onnx"), batch=1, weight=W))
    imgs = torch.randint(0, 256, (5, 3, 80, 96), dtype=torch.uint8)  # any size: resized to 112
    e1, e2 = dyn.embed(imgs), fixed.embed(imgs)
    assert e1.shape == (5, 8) and torch.allclose(e1, e2, atol=1e-5)
    assert torch.allclose(e1.norm(dim=1), torch.ones(5), atol=1e-5)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in imgs]
    assert torch.allclose(dyn.embed(pil), e1, atol=1e-5)
    assert fixed.fixed_batch == 1 and dyn.fixed_batch is None


def test_arcface_runs_on_this_processs_gpu(monkeypatch):
    # under torchrun each process embeds on its own GPU (its CUDA tensors are there), not on onnxruntime's GPU 0
    from retrieval import onnx_providers
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert onnx_providers(both) == ["CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert onnx_providers(both) == [("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]
    with pytest.raises(ValueError, match="no CUDA provider.*onnxruntime-gpu"):  # never a silent CPU fallback
        onnx_providers(["CPUExecutionProvider"])


def test_fixed_batch_graph_is_fed_chunks_of_its_batch(tmp_path, monkeypatch):
    """The chunking that the CPU and the GPU (IO binding) paths share: full chunks, the last one padded."""
    from retrieval import ArcFace
    W = np.random.RandomState(0).randn(3, 8).astype(np.float32)
    fixed = ArcFace(_onnx_model(str(tmp_path / "fixed.onnx"), batch=2, weight=W))
    dyn = ArcFace(_onnx_model(str(tmp_path / "dyn.onnx"), weight=W))
    imgs = torch.randint(0, 256, (5, 3, 112, 112), dtype=torch.uint8)
    real, sizes = ArcFace._run_one, []

    def recording(self, x):
        sizes.append(len(x))
        return real(self, x)
    monkeypatch.setattr(ArcFace, "_run_one", recording)
    assert torch.allclose(fixed.embed(imgs), dyn.embed(imgs), atol=1e-5)
    assert sizes == [2, 2, 2, 5]  # the fixed graph's three chunks, then the dynamic graph's one call


def test_arcface_bad_models(tmp_path):
    from retrieval import ArcFace
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        ArcFace(str(tmp_path / "missing.onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    with pytest.raises(ValueError, match="junk.onnx"):
        ArcFace(str(junk)).embed(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))
    flat = _onnx_model(str(tmp_path / "flat.onnx"), input_shape=["N", 3, 112])
    with pytest.raises(ValueError, match="flat.onnx.*expected \\(B, 3, H, W\\)"):
        ArcFace(flat).embed(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))


def test_arcface_pickles_without_session(tmp_path):
    import pickle
    from retrieval import ArcFace
    face = ArcFace(_onnx_model(str(tmp_path / "m.onnx")))
    face.embed(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))
    clone = pickle.loads(pickle.dumps(face))
    assert clone._session is None and clone.embed(torch.zeros(2, 3, 112, 112, dtype=torch.uint8)).shape == (2, 3)


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_select_rule_cases():
    from retrieval import select
    g = _unit([1, 0], [1, 0.2])
    # candidates: similar, similar, opposite (cos ~ -1: rejected), orthogonal (cos ~ 0: passes at -0.5)
    local = _unit([1, 0.1], [0.9, 0.3], [-1, 0], [0, 1])
    idx, st = select(g, local, 3, -0.5, torch.Generator().manual_seed(0))
    assert sorted(idx.tolist()) == [0, 1, 3] and st == dict(candidates=4, rejected=1, reused=0, fallbacks=0)
    idx, st = select(g, local, 5, -0.5, torch.Generator().manual_seed(0))  # 3 pass for 5 slots: 2 reused
    assert len(idx) == 5 and set(idx.tolist()) <= {0, 1, 3} and set(idx.tolist()) == {0, 1, 3}
    assert st["reused"] == 2 and st["rejected"] == 1
    idx, st = select(g, local, 2, 0.5, torch.Generator().manual_seed(0))  # only the two similar pass
    assert sorted(idx.tolist()) == [0, 1] and st["rejected"] == 2
    bad = _unit([-1, 0], [-1, -0.5], [-0.8, -1])  # none passes: the N most similar are kept
    idx, st = select(g, bad, 2, -0.5)
    assert idx.tolist() == [2, 1] and st["fallbacks"] == 1 and st["rejected"] == 3


def test_mean_similarity_over_globals():
    from retrieval import similarity
    g = _unit([1, 0], [0, 1])
    assert torch.allclose(similarity(g, _unit([1, 0])), torch.tensor([0.5]))


# ============================================================================= loss.py (issue 5)

def _eq_1_to_4(zt, zs, P, tau_t, tau_s):
    """Eq. 1-4 with explicit loops in float64 numpy."""
    zt, zs, P = (np.asarray(a, np.float64) for a in (zt, zs, P))
    norm = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
    softmax = lambda a: np.exp(a - a.max()) / np.exp(a - a.max()).sum()
    P = norm(P)
    B, M, N = zt.shape[0], zt.shape[1], zs.shape[1]
    total, preds = 0.0, []
    for i in range(B):
        h = 0.0
        for m in range(M):
            sg = softmax(P @ norm(zt[i, m]) / tau_t)
            for n in range(N):
                sl = softmax(P @ norm(zs[i, n]) / tau_s)
                h += -(sg * np.log(sl)).sum()
        total += h / (M * N)
        preds += [softmax(P @ norm(zs[i, n]) / tau_s) for n in range(N)]
    mean = np.mean(preds, 0)
    return total / B - (-(mean * np.log(mean)).sum())


def test_prototype_loss_matches_equations():
    from loss import PrototypeLoss
    torch.manual_seed(0)
    crit = PrototypeLoss(n_prototypes=7, dim=5, tau_teacher=0.3, tau_student=0.5)
    zt, zs = torch.randn(3, 2, 5), torch.randn(3, 4, 5)
    loss, stats = crit(zt, zs)
    expected = _eq_1_to_4(zt, zs, crit.prototypes.detach(), 0.3, 0.5)
    assert abs(loss.item() - expected) < 1e-5 and abs(stats["loss"] - expected) < 1e-5
    assert 0 < stats["mean_entropy"] <= math.log(7) + 1e-6 and 1 <= stats["prototypes_used"] <= 7
    bound = 1 / math.sqrt(5)
    assert crit.prototypes.abs().max() <= bound


def test_prototype_loss_stays_fp32_under_bf16_autocast():
    from loss import PrototypeLoss
    torch.manual_seed(0)
    crit = PrototypeLoss(n_prototypes=64, dim=16, tau_teacher=0.025, tau_student=0.1)
    zt, zs = torch.randn(4, 2, 16), torch.randn(4, 3, 16)
    expected = _eq_1_to_4(zt, zs, crit.prototypes.detach(), 0.025, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = crit(zt, zs)
        bf16_cosines = F.normalize(zs, dim=-1) @ F.normalize(crit.prototypes, dim=-1).T
    assert bf16_cosines.dtype == torch.bfloat16  # what autocast does to a matmul of fp32 tensors
    assert loss.dtype == torch.float32 and abs(loss.item() - expected) < 1e-5


def test_bf16_flag_sets_the_networks_precision_in_a_training_step():
    import pretrain
    args = pretrain.get_args(["--arch", "vit_tiny", "--n-prototypes", "16", "--out-dim", "8"])
    model, teacher = pretrain.build_models(args)
    opt = torch.optim.AdamW(pretrain.param_groups(model, 0.04))
    g, l = torch.randn(2, 2, 3, 32, 32), torch.randn(2, 3, 3, 16, 16)
    seen = []
    for net in (teacher, model.student):
        net.backbone.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    for bf16 in (True, False):
        seen.clear()
        stats = pretrain.training_step(model, teacher, opt, g, l, lr=1e-4, momentum=0.996, clip_grad=3.0, bf16=bf16)
        assert seen == [torch.bfloat16 if bf16 else torch.float32] * 2 and math.isfinite(stats["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay fp32


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU flags from Linux's /proc/cpuinfo")
def test_native_bf16_matches_the_cpu_flags_and_emulated_bf16_warns(capsys, monkeypatch):
    import pretrain
    cpu = torch.device("cpu")
    flags = set(open("/proc/cpuinfo").read().split())
    assert pretrain.native_bf16(cpu) == bool(flags & {"avx512_bf16", "amx_bf16"})
    for native in (True, False):
        monkeypatch.setattr(pretrain, "native_bf16", lambda device: native)
        assert [pretrain.use_bf16(flag, cpu) for flag in (True, False, None)] == [True, False, False]
        assert ("emulated" in capsys.readouterr().err) == (not native)  # only an explicit --bf16 warns


def test_sinkhorn_equipartitions_targets():
    from loss import PrototypeLoss, sinkhorn
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(64, 8) * 3, -1)
    q = sinkhorn(p, iterations=50)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)  # still one distribution per sample
    assert torch.allclose(q.sum(0), torch.full((8,), 8.0), atol=1e-3)  # each prototype gets n / K
    assert (sinkhorn(p).sum(0) - 8).abs().max() < (p.sum(0) - 8).abs().max()
    crit = PrototypeLoss(8, 5, sinkhorn=True)
    loss, stats = crit(torch.randn(4, 2, 5), torch.randn(4, 3, 5))
    assert math.isfinite(loss.item())


def test_gradients_reach_student_projector_prototypes_not_teacher():
    import pretrain
    args = pretrain.get_args(["--arch", "vit_tiny", "--n-prototypes", "16", "--out-dim", "8", "--drop-path", "0"])
    model, teacher = pretrain.build_models(args)
    g, l = torch.randn(2, 2, 3, 32, 32), torch.randn(2, 3, 3, 16, 16)
    with torch.no_grad():
        zt = teacher(g.flatten(0, 1)).view(2, 2, -1)
    loss, _ = model(l, zt)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.student.head.mlp[0].weight.grad.abs().sum() > 0
    assert model.criterion.prototypes.grad.abs().sum() > 0


def test_projector_batch_norm_separates_near_identical_features():
    from loss import ProjectionHead
    torch.manual_seed(0)
    x = torch.randn(1, 32) + 1e-2 * torch.randn(16, 32)  # 16 nearly equal features, as a fresh ViT gives
    off_diagonal = ~torch.eye(16, dtype=torch.bool)
    cosines = lambda z: (F.normalize(z, dim=-1) @ F.normalize(z, dim=-1).T)[off_diagonal]
    plain, bn = ProjectionHead(32, 8, hidden_dim=64), ProjectionHead(32, 8, batch_norm=True, hidden_dim=64)
    assert cosines(plain(x)).min() > 0.99
    assert cosines(bn(x)).abs().mean() < 0.5  # standardised over the batch: the images come apart
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in bn.modules()) == 2
    # without the option, the layout (and the keys of existing checkpoints) is the paper's 3 linear layers
    assert list(plain.state_dict()) == [f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    # the documented signature: ProjectionHead(in_dim, out_dim, hidden_dim), the option after it
    positional = ProjectionHead(32, 8, 64)
    assert [m.out_features for m in positional.mlp if isinstance(m, torch.nn.Linear)] == [64, 64, 8]
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in positional.modules())


def test_ema_and_schedules():
    from loss import cosine_schedule, ema_update, momentum_schedule
    t, s = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = t.weight.detach().clone()
    ema_update(t, s, 0.9)
    assert torch.allclose(t.weight, 0.9 * before + 0.1 * s.weight)
    # §3.3: 2e-4 rising over 2 epochs to 1e-3, then cosine to 1e-6 over the other 18 (10 steps per epoch)
    lr = lambda step: cosine_schedule(step, 200, 1e-3, 1e-6, 20, 2e-4)
    assert lr(0) == pytest.approx(2e-4) and lr(10) == pytest.approx(6e-4) and lr(20) == pytest.approx(1e-3)
    assert lr(110) == pytest.approx((1e-3 + 1e-6) / 2) and lr(200) == pytest.approx(1e-6)
    assert momentum_schedule(0, 100) == pytest.approx(0.996) and momentum_schedule(100, 100) == pytest.approx(1.0)
    assert momentum_schedule(50, 100) == pytest.approx(0.998)


# ============================================================================= data.py (issue 5)

def _write_rec(folder, records):
    """An independent dmlc RecordIO writer: records = {key: payload}."""
    magic = struct.pack("<I", 0xCED7230A)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "train.rec"), "wb") as rec, open(os.path.join(folder, "train.idx"), "w") as idx:
        for key in sorted(records, reverse=True):  # keys in any order in the index
            idx.write(f"{key}\t{rec.tell()}\n")
            payload = records[key]
            pieces = payload.split(magic) if len(payload) % 4 == 0 else [payload]
            for k, piece in enumerate(pieces):
                flag = 0 if len(pieces) == 1 else 1 if k == 0 else 3 if k == len(pieces) - 1 else 2
                rec.write(magic + struct.pack("<I", flag << 29 | len(piece)) + piece + b"\0" * (-len(piece) % 4))


def _png(color, size=(8, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_recordio_round_trip(tmp_path):
    from data import RecordIO
    magic = struct.pack("<I", 0xCED7230A)
    img = _png((10, 200, 30))
    img += b"\0" * (-len(img) % 4)  # PNG readers ignore trailing bytes
    header = struct.pack("<IfQQ", 2, 0, 0, 0) + np.array([3, 5], np.float32).tobytes()
    rec1 = struct.pack("<IfQQ", 0, 7.0, 0, 0) + img + magic + b"tail" + magic + b"more"  # magic inside: split
    rec2 = struct.pack("<IfQQ", 3, 0, 0, 0) + np.array([1.5, 2.5, 3.5], np.float32).tobytes() + _png((0, 0, 255))
    ident = struct.pack("<IfQQ", 2, 0, 0, 0) + np.array([1, 3], np.float32).tobytes()
    _write_rec(str(tmp_path / "ms1m"), {0: header, 1: rec1, 2: rec2, 3: ident, 4: ident})
    ds = RecordIO(str(tmp_path / "ms1m"))
    assert len(ds) == 2  # keys 1, 2: images; 3, 4: identity records
    assert ds[0].getpixel((0, 0)) == (10, 200, 30) and ds[1].getpixel((3, 3)) == (0, 0, 255)
    assert ds.labels(0).tolist() == [7.0] and ds.labels(1).tolist() == [1.5, 2.5, 3.5]
    from data import read_recordio_record, unpack_payload
    with open(tmp_path / "ms1m" / "train.rec", "rb") as f:
        offsets = {int(k): int(v) for k, v in (l.split() for l in open(tmp_path / "ms1m" / "train.idx"))}
        assert read_recordio_record(f, offsets[1]) == rec1
        assert unpack_payload(read_recordio_record(f, offsets[1]))[1].endswith(magic + b"more")
    _write_rec(str(tmp_path / "flat"), {5: rec2, 9: rec2})  # no header record: every key is an image
    assert len(RecordIO(str(tmp_path / "flat" / "train.rec"))) == 2


def test_corrupt_images_are_skipped(tmp_path):
    import data
    import pretrain
    folder = tmp_path / "imgs" / "sub"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 40), (1, 2, 3)).save(folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "c.txt").write_text("not an image")
    ds = data.ImageFolder(str(tmp_path / "imgs"))
    assert len(ds) == 2 and ds[0] is not None and ds[1] is None
    from crops import MultiCrop
    views = pretrain.Views(ds, MultiCrop(32, 16, n_local=2), seed=0)
    batch = pretrain.collate([views[0], views[1]])
    assert batch["skipped"] == [str(folder / "b.jpg")] and batch["global_views"].shape[0] == 1


def test_missing_dataset_is_one_line_error(tmp_path):
    code, out, err = run_script("pretrain.py", "--data", "ms1m", "--data-root", str(tmp_path))
    assert code != 0 and err.strip().count("\n") == 0 and "ms1m" in err and "train.rec" in err


def test_broken_arcface_is_one_line_error(tmp_path, toy_root):
    broken = tmp_path / "arc.onnx"
    broken.write_bytes(b"nope" * 100)
    code, out, err = run_script("pretrain.py", "--data", os.path.join(toy_root, "toy", "ms1m"), "--arcface",
                                str(broken), "--out", str(tmp_path / "run"), "--arch", "vit_tiny")
    assert code != 0 and "arc.onnx" in last_line(err) and "Traceback" not in err


# ============================================================================= pretrain.py (issue 5)

def _tiny_pretrain_argv(data, out, *extra):
    """A pretraining command line small enough for a test (later flags override earlier ones)."""
    return ["--data", data, "--out", out, "--arch", "vit_tiny", "--epochs", "2", "--batch-size", "4",
            "--global-size", "32", "--local-size", "16", "--n-local", "2", "--n-prototypes", "32", "--out-dim", "16",
            "--workers", "0", "--log-every", "1", "--warmup-epochs", "1", *extra]


def _tiny_pretrain_args(data, out, *extra):
    import pretrain
    return pretrain.get_args(_tiny_pretrain_argv(data, out, *extra))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("faces")
    rs = np.random.RandomState(0)
    for i in range(12):
        Image.fromarray(rs.randint(0, 255, (48, 40, 3), np.uint8)).save(d / f"{i:02d}.png")
    return str(d)


def test_pretrain_resume_gives_the_same_weights(tmp_path, image_folder, monkeypatch):
    import shutil
    import pretrain
    shutil.copytree(image_folder, tmp_path / "faces")
    (tmp_path / "faces" / "zz.jpg").write_bytes(b"\xff\xd8\xff garbage")  # image 12 of 13: skipped, counted
    image_folder = str(tmp_path / "faces")
    pretrain.main(_tiny_pretrain_args(image_folder, str(tmp_path / "full")))
    real_save, calls = pretrain.save_atomic, []

    def crash_after_first_checkpoint(obj, path):
        real_save(obj, path)
        calls.append(path)
        if path.endswith("teacher_backbone.pth"):
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(pretrain, "save_atomic", crash_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(_tiny_pretrain_args(image_folder, str(tmp_path / "cut"), "--save-every", "2"))
    assert torch.load(str(tmp_path / "cut" / "checkpoint.pth"), weights_only=True)["step"] == 2
    monkeypatch.setattr(pretrain, "save_atomic", real_save)
    pretrain.main(_tiny_pretrain_args(image_folder, str(tmp_path / "cut"), "--save-every", "2"))
    a = torch.load(str(tmp_path / "full" / "checkpoint.pth"), weights_only=True)
    b = torch.load(str(tmp_path / "cut" / "checkpoint.pth"), weights_only=True)
    assert a["step"] == b["step"] == 6
    for part in ("student", "teacher"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    # the exported teacher loads into a plain ViT
    m = vit.vit_tiny()
    assert vit.load_pretrained(m, str(tmp_path / "full" / "teacher_backbone.pth")) == ([], [])
    assert vit.load_pretrained(vit.vit_tiny(), str(tmp_path / "full" / "checkpoint.pth")) == ([], [])
    log = [json.loads(l) for l in open(tmp_path / "full" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) and r["mean_entropy"] <= math.log(32) + 1e-6 for r in log)
    # the corrupt image, drawn in at least one of the two epochs, counted once across the resume and listed
    drawn = []
    for epoch in (0, 1):
        sampler = torch.utils.data.DistributedSampler(range(13), num_replicas=1, rank=0, seed=0, drop_last=True)
        sampler.set_epoch(epoch)
        drawn.append(12 in list(sampler)[:12])
    resumed = [json.loads(l) for l in open(tmp_path / "cut" / "log.jsonl")]
    assert any(drawn) and log[-1]["skipped"] == resumed[-1]["skipped"] == 1
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # the rewound steps are not logged twice
    for run in ("full", "cut"):
        assert (tmp_path / run / "skipped.txt").read_text() == str(tmp_path / "faces" / "zz.jpg") + "\n"


def test_pretrain_on_a_random_subset(tmp_path, image_folder):
    """--n-images (ProS-1M-real): that many distinct images, drawn by the seed, and a run over them alone."""
    import data
    import pretrain
    images = data.ImageFolder(image_folder)
    a, b, c = (pretrain.random_subset(images, 8, s) for s in (0, 0, 1))
    assert len(a) == 8 and len(set(a.indices)) == 8 and a.indices == sorted(a.indices)
    assert a.indices == b.indices and a.indices != c.indices
    assert np.array_equal(np.asarray(a[3]), np.asarray(images[a.indices[3]]))
    with pytest.raises(ValueError, match="expected 1 to 12"):
        pretrain.random_subset(images, 13, 0)
    pretrain.main(_tiny_pretrain_args(image_folder, str(tmp_path / "r"), "--n-images", "8", "--epochs", "1"))
    log = [json.loads(l) for l in open(tmp_path / "r" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]  # 8 images in batches of 4


def test_pretrain_batch_with_no_readable_image_is_one_line_error(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    argv = _tiny_pretrain_argv(str(tmp_path), str(tmp_path / "run"), "--workers", "1")
    code, _, err = run_script("pretrain.py", *argv)
    assert code != 0 and "Traceback" not in err and str(tmp_path) in last_line(err) and "unreadable" in last_line(err)


def test_pretrain_weights_do_not_depend_on_workers(tmp_path, image_folder):
    """Loading in the training process (--workers 0) must not reseed the RNG that drop-path draws from."""
    import pretrain
    runs = {}
    for w in ("0", "1"):
        pretrain.main(_tiny_pretrain_args(image_folder, str(tmp_path / w), "--workers", w, "--epochs", "1"))
        runs[w] = torch.load(str(tmp_path / w / "checkpoint.pth"), weights_only=True)["student"]
    assert runs["0"].keys() == runs["1"].keys()
    for k in runs["0"]:
        assert torch.equal(runs["0"][k], runs["1"][k]), k


def test_pretrain_with_retrieval_logs_reject_rate(tmp_path, toy_root):
    import pretrain
    args = _tiny_pretrain_args(os.path.join(toy_root, "toy", "ms1m"), str(tmp_path / "r"), "--arcface",
                               os.path.join(toy_root, "toy", "arcface.onnx"), "--n-candidates", "4",
                               "--face-threshold", "1.5", "--epochs", "1")
    pretrain.main(args)  # no cosine reaches 1.5: every candidate is rejected, every image falls back
    log = [json.loads(l) for l in open(tmp_path / "r" / "log.jsonl")]
    assert len(log) == 30 and all(r["reject_rate"] == 1.0 for r in log)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_torchrun_process(rank, world, port):
    """The environment torchrun gives process `rank` of `world` on this machine."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def _ddp_worker(rank, world, port, tmp, batch):
    _as_torchrun_process(rank, world, port)
    stats = _one_step(world, rank, batch)
    if rank == 0:
        torch.save(stats, os.path.join(tmp, "ddp.pt"))
    torch.distributed.destroy_process_group()


def _one_step(world, rank, batch):
    import pretrain
    r, w, device = pretrain.setup_distributed()
    torch.manual_seed(0)
    args = pretrain.get_args(["--arch", "vit_tiny", "--n-prototypes", "32", "--out-dim", "16", "--drop-path", "0"])
    model, teacher = pretrain.build_models(args)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if w > 1 else model
    # SGD: the same gradients give the same weights; Adam's first step would amplify float noise in tiny gradients
    opt = torch.optim.SGD(pretrain.param_groups(model, 0.04), lr=0.1, momentum=0.9)
    g, l = batch
    per = len(g) // world
    stats = [pretrain.training_step(ddp, teacher, opt, g[rank * per:(rank + 1) * per], l[rank * per:(rank + 1) * per],
                                    lr=0.1, momentum=0.99, clip_grad=3.0, bf16=False) for _ in range(2)]
    keys = ["loss", "cross_entropy", "mean_entropy"]
    means = [dict(zip(keys, pretrain.all_mean([s[k] for k in keys]))) for s in stats]
    return dict(stats=means, student=model.state_dict(), teacher=teacher.state_dict())


def test_two_process_gloo_equals_one_process(tmp_path):
    torch.manual_seed(1)
    batch = (torch.randn(4, 2, 3, 32, 32), torch.randn(4, 3, 3, 16, 16))
    single = _one_step(1, 0, batch)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), batch), nprocs=2)
    ddp = torch.load(str(tmp_path / "ddp.pt"), weights_only=True)
    for a, b in zip(single["stats"], ddp["stats"]):
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5), k
    for part in ("student", "teacher"):
        for k, v in single[part].items():
            assert torch.allclose(v, ddp[part][k], atol=2e-5), (part, k)


# ============================================================================= fine-tuning (issues 6-8)

def test_few_shot_sizes_match_the_paper():
    from finetune import few_shot_indices
    sizes = {f: len(few_shot_indices(162_770, f, 0)) for f in (0.002, 0.005, 0.01, 0.02)}
    assert sizes == {0.002: 325, 0.005: 813, 0.01: 1627, 0.02: 3255}  # the paper prints 843 for 0.5%
    assert len(few_shot_indices(6_263, 0.05, 0)) == 313 and len(few_shot_indices(12_271, 0.01, 0)) == 122
    a, b = few_shot_indices(1000, 0.1, 0), few_shot_indices(1000, 0.1, 1)
    assert a == few_shot_indices(1000, 0.1, 0) and a != b and len(set(a)) == 100
    with pytest.raises(ValueError):
        few_shot_indices(100, 0.001, 0)


def test_layer_decay_groups_for_vit_small():
    from finetune import param_groups_layer_decay
    from finetune_attr import AttributeModel
    model = AttributeModel(vit.vit_small(), 40)
    groups = param_groups_layer_decay(model, 0.05, 0.65)
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["backbone.blocks.0.attn.qkv.weight"])] == (pytest.approx(0.65 ** 12), 0.05)
    assert scale_of[id(named["backbone.blocks.11.mlp.fc1.weight"])] == (pytest.approx(0.65), 0.05)
    assert scale_of[id(named["head.weight"])] == (1.0, 0.05)
    assert scale_of[id(named["backbone.pos_embed"])] == (pytest.approx(0.65 ** 13), 0.0)
    assert scale_of[id(named["backbone.cls_token"])][1] == 0.0
    no_decay = {n for n, p in named.items() if scale_of[id(p)][1] == 0.0}
    assert no_decay == {n for n in named if n.endswith((".bias", "pos_embed", "cls_token")) or "norm" in n}
    assert sum(len(g["params"]) for g in groups) == len(named)


CELEBA_ATTR = """3
5_o_Clock_Shadow Arched_Eyebrows Smiling
000001.jpg -1  1  1
000002.jpg  1 -1 -1
000003.jpg -1 -1  1
"""


def _celeba(tmp_path, attr=CELEBA_ATTR, parts="000001.jpg 0\n000002.jpg 1\n000003.jpg 2\n"):
    d = tmp_path / "celeba"
    (d / "img_align_celeba").mkdir(parents=True)
    (d / "list_attr_celeba.txt").write_text(attr)
    (d / "list_eval_partition.txt").write_text(parts)
    return str(d)


def test_celeba_parser(tmp_path):
    from finetune_attr import read_celeba
    data = read_celeba(_celeba(tmp_path))
    assert data["attributes"] == ["5_o_Clock_Shadow", "Arched_Eyebrows", "Smiling"]
    assert [os.path.basename(p) for p, _ in data["train"]] == ["000001.jpg"]
    assert data["train"][0][1].tolist() == [0, 1, 1] and data["val"][0][1].tolist() == [1, 0, 0]
    assert data["test"][0][0].endswith(os.path.join("img_align_celeba", "000003.jpg"))


def test_celeba_bad_inputs(tmp_path):
    from finetune_attr import read_celeba
    with pytest.raises(FileNotFoundError, match="toy"):
        read_celeba(str(tmp_path / "nothing"))
    bad = CELEBA_ATTR.replace("000002.jpg  1 -1 -1", "000002.jpg  1 -1")
    with pytest.raises(ValueError, match=r"list_attr_celeba.txt:4"):
        read_celeba(_celeba(tmp_path / "a", bad))
    with pytest.raises(ValueError, match=r"list_eval_partition.txt:2"):
        read_celeba(_celeba(tmp_path / "b", parts="000001.jpg 0\n000002.jpg 7\n"))
    code, out, err = run_script("finetune_attr.py", "--frac", "0.002", "--data-root", str(tmp_path / "none"))
    assert code != 0 and "--dataset toy" in last_line(err) and "Traceback" not in err
    import argparse
    from finetune_attr import read_attributes
    with pytest.raises(FileNotFoundError, match="lfw_att_40.mat"):  # LFWA's own files named, not CelebA's
        read_attributes(argparse.Namespace(dataset="lfwa", data=str(tmp_path / "none" / "lfwa")))


def _toy_finetune(script, toy_root, out, *extra):
    code, stdout, err = run_script(script, "--dataset", "toy", "--data-root", toy_root, "--arch", "vit_tiny",
                                   "--img-size", "32", "--epochs", "2", "--batch-size", "16", "--workers", "0",
                                   "--out", out, *extra)
    assert code == 0, err
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_attr_toy_run_and_head_only(tmp_path, toy_root):
    init = str(tmp_path / "init.pth")
    torch.save(vit.vit_tiny().state_dict(), init)
    res = _toy_finetune("finetune_attr.py", toy_root, str(tmp_path / "a"), "--init", init, "--head-only",
                        "--runs", "2", "--frac", "0.5")
    assert res["n_train"] == 48 and res["n_train_total"] == 96 and len(res["runs"]) == 2
    assert res["args"]["bf16"] == torch.cuda.is_available()  # the default: bf16 autocast on CUDA only
    acc = res["runs"][0]["final"]["test"]["mean_accuracy"]
    assert 0 <= acc <= 100 and len(res["runs"][0]["final"]["test"]["per_attribute"]) == 22
    assert res["mean"]["test/mean_accuracy"] == pytest.approx(
        np.mean([r["final"]["test"]["mean_accuracy"] for r in res["runs"]]))
    trained = torch.load(str(tmp_path / "a" / "run0" / "checkpoint.pth"), weights_only=True)["model"]
    start = torch.load(init, weights_only=True)
    assert all(torch.equal(trained[f"backbone.{k}"], v) for k, v in start.items())  # frozen backbone
    assert not torch.equal(trained["head.weight"], torch.zeros_like(trained["head.weight"]))


def test_finetune_resume_gives_the_same_run(tmp_path, toy_root, monkeypatch):
    """A run killed after a mid-epoch checkpoint resumes from it and ends as the uninterrupted run does,
    with a loader process: each sample's flip is seeded by its index, drop-path by the restored RNG."""
    import finetune
    from finetune_attr import Attributes
    argv = lambda out: ["--dataset", "toy", "--data-root", toy_root, "--arch", "vit_tiny", "--img-size", "32",
                        "--epochs", "3", "--batch-size", "16", "--workers", "1", "--frac", "0.5", "--out", out,
                        "--save-every-min", "1e-9", "--log-every", "1"]
    full = finetune.main(Attributes(), argv(str(tmp_path / "full")))
    real_save, saved = finetune.save_atomic, []

    def save_then_crash_mid_epoch_2(obj, path):
        real_save(obj, path)
        saved.append((obj["epoch"], obj["batch"]))
        if saved[-1] == (1, 2):
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(finetune, "save_atomic", save_then_crash_mid_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(Attributes(), argv(str(tmp_path / "cut")))
    assert saved == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]  # 3 batches of 16 an epoch
    cut = finetune.main(Attributes(), argv(str(tmp_path / "cut")))
    assert saved[5:] == [(2, 0), (2, 1), (2, 2), (3, 0)]
    assert cut["runs"][0]["final"] == full["runs"][0]["final"]
    a, b = (torch.load(str(tmp_path / d / "run0" / "checkpoint.pth"), weights_only=True) for d in ("full", "cut"))
    assert a["epoch"] == b["epoch"] == 3
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


RAF_LABELS = "train_00001.jpg 5\ntrain_00002.jpg 1\ntest_0001.jpg 7\n"


def test_rafdb_parser_and_bad_label(tmp_path):
    from finetune_expr import read_rafdb
    (tmp_path / "EmoLabel").mkdir()
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text(RAF_LABELS)
    data = read_rafdb(str(tmp_path))
    assert [l for _, l in data["train"]] == [4, 0] and [l for _, l in data["test"]] == [6]
    assert data["train"][0][0].endswith(os.path.join("Image", "aligned", "train_00001_aligned.jpg"))
    (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text(RAF_LABELS + "test_0002.jpg 8\n")
    with pytest.raises(ValueError, match="list_patition_label.txt:4"):
        read_rafdb(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="list_patition_label"):
        read_rafdb(str(tmp_path / "nowhere"))


AFFECT_HEADER = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"
AFFECT_ROWS = ('1/a.jpg,10,20,30,40,"1;2;3",3,0.1,0.2\n1/b.jpg,0,0,50,50,"1;2",9,0,0\n'
               '2/c.jpg,5,5,20,20,"",7,0,0\n2/d.jpg,0,0,8,8,"",10,0,0\n')


@pytest.mark.parametrize("header", [True, False])
def test_affectnet_csv(tmp_path, header):
    from finetune_expr import read_affectnet_csv
    p = tmp_path / "training.csv"
    p.write_text((AFFECT_HEADER if header else "") + AFFECT_ROWS)
    items = read_affectnet_csv(str(p), "/imgs")
    assert [(os.path.basename(a), l, b) for a, l, b in items] == [("a.jpg", 3, (10, 20, 40, 60)),
                                                                  ("c.jpg", 7, (5, 5, 25, 25))]


def test_face_box_is_applied_to_photos_only(tmp_path):
    from finetune import LabelledImages
    Image.new("RGB", (100, 80)).save(tmp_path / "photo.jpg")
    Image.new("RGB", (30, 40)).save(tmp_path / "crop.jpg")
    ds = LabelledImages([(str(tmp_path / "photo.jpg"), 0, (10, 20, 40, 60)),
                         (str(tmp_path / "crop.jpg"), 0, (10, 20, 40, 60)), (str(tmp_path / "gone.jpg"), 0)],
                        lambda img, t: (img.size, t))
    assert ds[0][0] == (30, 40) and ds[1][0] == (30, 40) and ds[2] is None


def test_balanced_sampler_draws_classes_evenly():
    from finetune import epoch_indices
    from finetune_expr import class_balanced_weights
    labels = [0] * 1000 + [1] * 100 + [2] * 10
    w = class_balanced_weights(labels, 3)
    order = epoch_indices(len(labels), 0, 0, 0, 1, w) + epoch_indices(len(labels), 1, 0, 0, 1, w)
    order += sum((epoch_indices(len(labels), e, 0, 0, 1, w) for e in range(2, 27)), [])
    freq = np.bincount(np.array(labels)[order], minlength=3) / len(order)
    # 29,970 draws: each class's share has std 0.0027; 0.02 is a 7-sigma tolerance
    assert np.abs(freq - 1 / 3).max() < 0.02
    ranks = [epoch_indices(8, 0, 0, r, 2) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(8))


def test_classification_metrics_on_a_hand_made_confusion():
    from finetune_expr import classification_metrics
    target = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 0, 1, 1, 0, 1])
    m = classification_metrics(pred, target, 3, ["a", "b", "c"])
    assert m["confusion"] == [[3, 1, 0], [1, 1, 0], [0, 1, 0]]
    assert m["accuracy"] == pytest.approx(400 / 7)
    assert m["per_class"] == {"a": 75.0, "b": 50.0, "c": 0.0}
    assert m["mean_class_accuracy"] == pytest.approx(125 / 3)


def test_expr_toy_run(tmp_path, toy_root):
    res = _toy_finetune("finetune_expr.py", toy_root, str(tmp_path / "e"), "--balanced")
    test = res["runs"][0]["final"]["test"]
    assert res["args"]["balanced"] and res["n_train"] == 72
    assert 0 <= test["accuracy"] <= 100 and len(test["confusion"]) == 7 and sum(map(sum, test["confusion"])) == 18


def test_read_pts(tmp_path):
    from finetune_align import read_pts
    pts = np.arange(136, dtype=float).reshape(68, 2) + 1
    body = "\n".join(f"{x} {y}" for x, y in pts)
    (tmp_path / "a.pts").write_text(f"version: 1\nn_points:  68\n{{\n{body}\n}}\n")
    assert np.allclose(read_pts(str(tmp_path / "a.pts")), pts - 1)
    (tmp_path / "b.pts").write_text("version: 1\nn_points:  67\n{\n" + "\n".join(body.split("\n")[:67]) + "\n}\n")
    with pytest.raises(ValueError, match="b.pts: 67 points"):
        read_pts(str(tmp_path / "b.pts"))


def test_read_wflw(tmp_path):
    from finetune_align import read_wflw
    coords = " ".join(str(float(i)) for i in range(196))
    good = f"{coords} 1 2 30 40 1 0 0 1 0 1 51--Dresses/51_x.jpg\n"
    (tmp_path / "list.txt").write_text(good + good)
    items = read_wflw(str(tmp_path / "list.txt"))
    assert len(items) == 2 and items[0]["landmarks"].shape == (98, 2) and items[0]["landmarks"][1].tolist() == [2, 3]
    assert items[0]["box"].tolist() == [1, 2, 30, 40] and items[0]["flags"].tolist() == [1, 0, 0, 1, 0, 1]
    assert items[0]["image"] == "51--Dresses/51_x.jpg"
    (tmp_path / "bad.txt").write_text(good + good.replace(" 1 0 0 1 0 1 ", " 1 0 0 1 0 "))
    with pytest.raises(ValueError, match="bad.txt:2: expected 207 tokens"):
        read_wflw(str(tmp_path / "bad.txt"))


def test_flip_permutations_are_involutions():
    from finetune_align import FLIP_68, FLIP_98
    for perm in (FLIP_68, FLIP_98):
        assert sorted(perm) == list(range(len(perm))) and [perm[p] for p in perm] == list(range(len(perm)))
    assert FLIP_68[36] == 45 and FLIP_68[8] == 8 and FLIP_98[60] == 72 and FLIP_98[54] == 54


def test_crop_round_trip_and_image_alignment():
    from finetune_align import apply_affine, crop_matrix, invert_affine, warp
    pts = np.array([[30.0, 40.0], [70.5, 42.25], [50.0, 80.0]])
    for angle, flip in ((0, False), (17, False), (-30, True)):
        A = crop_matrix((50, 55), 90, 64, angle, flip)
        assert np.allclose(apply_affine(invert_affine(A), apply_affine(A, pts)), pts, atol=1e-9)
    img = np.zeros((100, 120, 3), np.uint8)
    img[40, 30] = 255  # a dot at pixel (x=30, y=40)
    A = crop_matrix((50, 50), 50, 100, 0)  # 2x zoom
    crop = np.asarray(warp(Image.fromarray(img), A, 100))[..., 0].astype(float)
    ys, xs = np.nonzero(crop)
    centroid = np.array([(xs * crop[ys, xs]).sum(), (ys * crop[ys, xs]).sum()]) / crop[ys, xs].sum()
    assert np.allclose(centroid, apply_affine(A, np.array([[30.0, 40.0]]))[0], atol=0.05)


def test_heatmap_round_trip_below_a_tenth_of_a_pixel():
    from finetune_align import decode_heatmaps, gaussian_heatmaps
    torch.manual_seed(0)
    pts = torch.rand(2, 68, 2) * 108 + 10  # where landmarks fall; at the border the Gaussian itself is cut off
    for sigma in (1.0, 1.5, 2.0):
        back = decode_heatmaps(gaussian_heatmaps(pts, 128, sigma), sigma)
        assert (back - pts).norm(dim=-1).max() < 0.1


def test_nme_on_a_hand_computed_example():
    from finetune_align import nme, nme_summary
    gt = torch.zeros(1, 68, 2)
    gt[0, 36], gt[0, 45] = torch.tensor([0.0, 0.0]), torch.tensor([100.0, 0.0])  # inter-ocular 100
    pred = gt.clone()
    pred[0, 0] += torch.tensor([3.0, 4.0])  # one point off by 5 px
    assert nme(pred, gt, (36, 45)).item() == pytest.approx(5 / 68 / 100)
    s = nme_summary(torch.tensor([0.02, 0.05, 0.2]))
    assert s["nme"] == pytest.approx(9.0) and s["failure_rate"] == pytest.approx(100 / 3)
    # AUC at 0.1: CED is 0 until .02, 1/3 until .05, 2/3 after: (1/3 * .03 + 2/3 * .05) / .1
    assert s["auc"] == pytest.approx((0.03 / 3 + 0.05 * 2 / 3) / 0.1, abs=2e-3)


def test_alignment_head_shapes():
    from finetune_align import AlignmentModel
    model = AlignmentModel(vit.vit_tiny(), 68, heatmap_size=128, channels=32).eval()
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 68, 128, 128)
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 68, 128, 128)


def test_align_toy_run(tmp_path, toy_root):
    res = _toy_finetune("finetune_align.py", toy_root, str(tmp_path / "l"), "--heatmap-size", "16", "--bf16",
                        "--channels", "24")
    test = res["runs"][0]["final"]["test"]
    head = torch.load(str(tmp_path / "l" / "run0" / "checkpoint.pth"), weights_only=True)["model"]["predict.weight"]
    assert head.shape == (68, 24, 1, 1)  # --channels is the UperNet's width
    assert {"nme", "nme_common", "nme_challenging", "failure_rate", "auc"} <= set(test)
    assert test["nme"] > 0 and 0 <= test["auc"] <= 1 and res["args"]["bf16"] is True


@pytest.mark.parametrize("task", ["attr_cls", "attr_mean", "expr", "align"])
def test_finetuning_trains_exactly_the_parameters_that_reach_the_output(task):
    # DDP waits for a gradient of every trainable parameter: what the output never sees (the final norm when
    # it is off the path, blocks after the last one read) must be frozen, and everything else must learn
    from finetune_align import AlignmentModel
    from finetune_attr import AttributeModel
    from finetune_expr import ExpressionModel
    build = {"attr_cls": lambda b: AttributeModel(b, 3), "attr_mean": lambda b: AttributeModel(b, 3, "mean"),
             "expr": lambda b: ExpressionModel(b, 7),
             "align": lambda b: AlignmentModel(b, 5, heatmap_size=8, blocks=(2, 3, 4, 6), channels=8)}
    model = build[task](vit.vit_tiny())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.grad is not None}
    assert ("backbone.norm.weight" in trainable) == (task in ("attr_cls", "expr"))
    assert ("backbone.blocks.11.mlp.fc2.weight" in trainable) == (task != "align")
    assert "backbone.blocks.5.mlp.fc2.weight" in trainable and "backbone.cls_token" in trainable


def _finetune_ddp_worker(rank, world, port, script, argv, tmp):
    _as_torchrun_process(rank, world, port)
    torch.set_num_threads(1)  # two processes on the CI's two cores
    import finetune
    from finetune_align import Alignment
    from finetune_attr import Attributes
    res = finetune.main({"attr": Attributes, "align": Alignment}[script](), argv)
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(dict(runs=res["runs"], mean=res["mean"]), f)


@pytest.mark.parametrize("script", ["attr", "align"])
def test_two_process_finetuning_runs_and_every_process_returns_the_result(script, tmp_path, toy_root):
    out = str(tmp_path / "out")
    argv = ["--dataset", "toy", "--data-root", toy_root, "--arch", "vit_tiny", "--img-size", "32", "--epochs", "1",
            "--batch-size", "16", "--workers", "0", "--frac", "0.5", "--runs", "2", "--out", out]
    if script == "align":
        argv += ["--heatmap-size", "8", "--channels", "8"]
    torch.multiprocessing.spawn(_finetune_ddp_worker, args=(2, _free_port(), script, argv, str(tmp_path)), nprocs=2)
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # rank 1 gets rank 0's evaluation
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["mean"] == ranks[0]["mean"]
    for run in range(2):
        with open(os.path.join(out, f"run{run}", "result.json")) as f:
            assert json.load(f) == ranks[0]["runs"][run]
    assert [r["seed"] for r in ranks[0]["runs"]] == [0, 1] and ranks[0]["runs"][0]["skipped"] == []


def test_missing_pts_image_is_skipped_and_bad_pts_is_an_error(tmp_path):
    from finetune_align import read_300w
    for d in ("afw", "helen/trainset", "helen/testset", "lfpw/trainset", "lfpw/testset", "ibug"):
        (tmp_path / d).mkdir(parents=True)
    body = "\n".join("10 20" for _ in range(68))
    (tmp_path / "afw" / "x.pts").write_text(f"version: 1\nn_points: 68\n{{\n{body}\n}}\n")  # no image
    Image.new("RGB", (30, 30)).save(tmp_path / "afw" / "y.jpg")
    (tmp_path / "afw" / "y.pts").write_text(f"version: 1\nn_points: 68\n{{\n{body}\n}}\n")
    data = read_300w(str(tmp_path))
    assert len(data["train"]) == 1 and data["train"][0][0].endswith("y.jpg")
    Image.new("RGB", (30, 30)).save(tmp_path / "ibug" / "z.jpg")
    (tmp_path / "ibug" / "z.pts").write_text("version: 1\nn_points: 68\n{\n1 2\n}\n")
    with pytest.raises(ValueError, match="z.pts"):
        read_300w(str(tmp_path))


# ============================================================================= scripts as users run them

def test_vit_script_prints_count_and_speed():
    code, out, err = run_script("vit.py", "--arch", "vit_tiny", "--batch-size", "2", "--img-size", "64")
    assert code == 0 and "5.5" in out and "images/s" in out


def test_every_script_has_help(capsys):
    for script in ("vit.py", "crops.py", "retrieval.py", "data.py", "pretrain.py", "finetune_attr.py",
                   "finetune_expr.py", "finetune_align.py", "toyfaces.py", "bench.py", "figures.py"):
        code, out, err = run_script(script, "--help")
        assert code == 0 and "usage" in out, script
        assert "(default: None)" not in out, script  # a None default is explained in the option's help
        if script not in ("data.py", "figures.py"):  # data.py's one option defaults to None; figures: below
            assert "(default: " in out, script  # every other default is shown
    import figures
    for figure in ("fig3", "fig5", "fig6", "curves", "table"):
        with pytest.raises(SystemExit) as e:
            figures.main([figure, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and "(default: 4)" in out and "(default: None)" not in out, figure


def test_defaults_are_the_papers_settings():
    """§3.3 (pretraining) and §4.1 (fine-tuning), typed from the paper's text."""
    import argparse
    import finetune_align
    import finetune_attr
    import finetune_expr
    import pretrain
    a = pretrain.get_args([])
    assert (a.arch, a.epochs, a.batch_size, a.lr, a.warmup_lr, a.min_lr, a.warmup_epochs, a.weight_decay) == \
        ("vit_small", 20, 64, 1e-3, 2e-4, 1e-6, 2, 0.04)
    assert (a.n_prototypes, a.out_dim, a.tau_teacher, a.tau_student, a.global_size, a.local_size,
            a.face_threshold) == (1024, 256, 0.025, 0.1, 224, 96, -0.5)
    paper = {finetune_attr.Attributes: dict(lr=5e-4, weight_decay=0.05, layer_decay=0.65, epochs=100),
             finetune_expr.Expressions: dict(lr=5e-4, weight_decay=0.5, layer_decay=0.65, epochs=None),
             finetune_align.Alignment: dict(lr=0.01, weight_decay=1e-5, heatmap_size=128)}
    for task, settings in paper.items():
        p = argparse.ArgumentParser()
        task().add_args(p)
        args = p.parse_args([])
        assert {k: getattr(args, k) for k in settings} == settings, task.__name__


# ============================================================================= figures.py and the k-NN probe (issue 9)

def test_knn_vote_on_hand_made_points():
    from pretrain import knn_vote
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    votes = knn_vote(bank, labels, F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1), k=2, chunk=1)
    assert votes.argmax(1).tolist() == [0, 1] and torch.allclose(votes.sum(1), torch.ones(2))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, toy_root):
    """A 1-epoch pretraining on the tiny toy world, with the k-NN probe logged and MSN's projector BN
    (so that fig5 rebuilds a head with BatchNorm from the checkpoint)."""
    import pretrain
    out = str(tmp_path_factory.mktemp("run"))
    pretrain.main(_tiny_pretrain_args(os.path.join(toy_root, "toy", "ms1m"), out, "--epochs", "1",
                                      "--batch-size", "30", "--knn-every", "1", "--data-root", toy_root,
                                      "--projector-bn"))
    return out


def test_knn_features_of_unreadable_images_is_an_error(tmp_path):
    from pretrain import features
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match="bad.jpg"):
        features(vit.vit_tiny(), [(str(bad), 0)], 32, torch.device("cpu"))


def test_knn_probe_is_logged(tiny_run):
    log = [json.loads(l) for l in open(os.path.join(tiny_run, "log.jsonl"))]
    probe = [r for r in log if "knn_attr" in r]
    assert len(probe) == 1 and 0 <= probe[0]["knn_attr"] <= 100 and 0 <= probe[0]["knn_expr"] <= 100


@pytest.mark.parametrize("figure", ["fig3", "fig5", "fig6", "curves"])
def test_figures_write_pngs(figure, tiny_run, toy_root, tmp_path):
    import figures
    out = str(tmp_path / f"{figure}.png")
    extra = {"fig3": ["--arcface", os.path.join(toy_root, "toy", "arcface.onnx"), "--n", "2"],
             "fig5": ["--checkpoint", os.path.join(tiny_run, "checkpoint.pth"), "--n-images", "40", "--canvas", "200"],
             "fig6": ["--checkpoint", os.path.join(tiny_run, "teacher_backbone.pth"), "--arch", "vit_tiny",
                      "--size", "32", "--n", "2", "--finetuned", os.path.join(tiny_run, "checkpoint.pth"),
                      os.path.join(tiny_run, "teacher_backbone.pth")],
             "curves": ["--log", os.path.join(tiny_run, "log.jsonl")]}[figure]
    if figure == "curves":
        pytest.importorskip("matplotlib")
    figures.main([figure, "--out", out, "--data-root", toy_root, *extra])
    img = Image.open(out)
    assert img.size[0] > 50 and img.size[1] > 50 and np.asarray(img.convert("L")).std() > 1
    if figure == "fig6":  # a row per image (2): the image, then 3 models x 3 heads (ViT-Ti), a blank column
        assert img.size == (4 + 12 * 36, 4 + 2 * 36)  # between two models; 32 px tiles + 4 px padding
        sheet = np.asarray(img.convert("RGB"))
        for spacer in (4, 8):  # the blank columns are white from top to bottom; the heads' are not
            assert (sheet[:, 4 + spacer * 36:][:, :32] == 255).all()
            assert (sheet[4:36, 4 + (spacer - 1) * 36:][:, :32] != 255).any()


def test_figures_bad_input_is_one_line_error(tiny_run, tmp_path):
    empty, backbone = tmp_path / "empty.jsonl", os.path.join(tiny_run, "teacher_backbone.pth")
    empty.write_text("\n")
    (tmp_path / "attr-random-0.1").mkdir()
    (tmp_path / "attr-random-0.1" / "results.json").write_text("{")
    for args, names in ((["fig5", "--checkpoint", backbone], backbone), (["curves", "--log", str(empty)], str(empty)),
                        (["table", "--dir", str(tmp_path)], "results.json")):
        code, out, err = run_script("figures.py", *args, "--out", str(tmp_path / "x.png"))
        assert code != 0 and "Traceback" not in err and names in last_line(err), (args, err)


def test_curves_skip_a_line_cut_short(tiny_run, tmp_path, capsys):
    """A run killed mid-write leaves a partial line in log.jsonl; the curves skip it and say so."""
    pytest.importorskip("matplotlib")
    import figures
    lines = open(os.path.join(tiny_run, "log.jsonl")).read().splitlines()
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join([lines[0], lines[1][:20] + lines[2], *lines[3:]]) + "\n")
    out = str(tmp_path / "curves.png")
    figures.main(["curves", "--log", str(log), "--out", out])
    assert os.path.getsize(out) > 0 and "skipped 1 unreadable line" in capsys.readouterr().out


def test_resume_with_other_settings_is_one_line_error(tmp_path, image_folder):
    import pretrain
    out = str(tmp_path / "run")
    pretrain.main(_tiny_pretrain_args(image_folder, out, "--epochs", "1"))
    code, _, err = run_script("pretrain.py", *_tiny_pretrain_argv(image_folder, out, "--arch", "vit_small"))
    assert code != 0 and "Traceback" not in err and "checkpoint.pth" in last_line(err) and "--out" in last_line(err)


@pytest.mark.parametrize("split", ["train", "test"])
def test_finetune_unreadable_split_is_one_line_error(tmp_path, split):
    """A corrupt image is skipped and counted; a split with none readable is a clear error naming the data."""
    import toyfaces
    from finetune_attr import read_celeba
    d = str(tmp_path / "celeba")
    toyfaces.write_celeba(d, 12, seed=3, workers=1)
    for path, _ in read_celeba(d)[split]:
        open(path, "wb").write(b"\xff\xd8\xff garbage")
    code, out, err = run_script("finetune_attr.py", "--dataset", "celeba", "--data", d, "--arch", "vit_tiny",
                                "--img-size", "32", "--epochs", "1", "--workers", "0", "--out", str(tmp_path / "r"))
    expected = {"train": "of a training batch were unreadable", "test": "test images was readable"}[split]
    assert code != 0 and "Traceback" not in err and d in last_line(err) and expected in last_line(err), err


# ============================================================================= runs that know what they are

def test_bad_numbers_are_one_line_errors_naming_the_option(capsys, monkeypatch):
    import finetune
    import pretrain
    from finetune_attr import Attributes
    cases = [(pretrain.get_args, ["--batch-size", "0"], "--batch-size", ">= 1"),
             (pretrain.get_args, ["--n-local", "0"], "--n-local", ">= 1"),
             (pretrain.get_args, ["--epochs", "0"], "--epochs", ">= 1"),
             (pretrain.get_args, ["--global-size", "60"], "--global-size", "multiple of 16"),
             (pretrain.get_args, ["--arcface", "a.onnx", "--n-candidates", "4"], "--n-candidates", "--n-local"),
             (lambda argv: finetune.main(Attributes(), argv), ["--batch-size", "0"], "--batch-size", ">= 1"),
             (lambda argv: finetune.main(Attributes(), argv), ["--frac", "1.5"], "--frac", "(0, 1]"),
             (lambda argv: finetune.main(Attributes(), argv), ["--init", "nope.pth"], "--init", "no such file")]
    for parse, argv, option, expected in cases:
        with pytest.raises(SystemExit) as e:
            parse(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and option in err and expected in err, (argv, err)
    monkeypatch.setenv("RANK", "1")  # under torchrun, the other processes exit quietly
    with pytest.raises(SystemExit):
        pretrain.get_args(["--batch-size", "0"])
    assert capsys.readouterr().err == ""


def test_resume_with_another_batch_size_or_dataset_names_them(tmp_path, image_folder):
    import shutil
    import pretrain
    out = str(tmp_path / "run")
    pretrain.main(_tiny_pretrain_args(image_folder, out, "--epochs", "1"))
    with pytest.raises(ValueError, match=r"batch_size 2 \(there: 4\).*another --out, or delete"):
        pretrain.main(_tiny_pretrain_args(image_folder, out, "--epochs", "1", "--batch-size", "2"))
    shutil.copytree(image_folder, tmp_path / "other")
    (tmp_path / "other" / "extra.png").write_bytes(open(os.path.join(image_folder, "00.png"), "rb").read())
    with pytest.raises(ValueError, match="data .*dataset_images 13 \\(there: 12\\)"):
        pretrain.main(_tiny_pretrain_args(str(tmp_path / "other"), out, "--epochs", "1"))


def test_a_finished_pretraining_is_said_and_not_retrained(tmp_path, image_folder, capsys):
    import pretrain
    out = str(tmp_path / "run")
    pretrain.main(_tiny_pretrain_args(image_folder, out, "--epochs", "1"))
    before = open(os.path.join(out, "log.jsonl")).read()
    capsys.readouterr()
    pretrain.main(_tiny_pretrain_args(image_folder, out, "--epochs", "1"))
    assert "complete (3 steps): nothing to train" in capsys.readouterr().out
    assert open(os.path.join(out, "log.jsonl")).read() == before


def test_finetuning_results_are_reused_only_under_the_same_settings(tmp_path, toy_root, capsys):
    import finetune
    from finetune_attr import Attributes
    init = str(tmp_path / "init.pth")
    torch.save(vit.vit_tiny().state_dict(), init)
    out = str(tmp_path / "attr")
    argv = ["--dataset", "toy", "--data-root", toy_root, "--arch", "vit_tiny", "--img-size", "32",
            "--epochs", "1", "--batch-size", "16", "--workers", "0", "--frac", "0.5", "--out", out]
    first = finetune.main(Attributes(), argv + ["--init", init])
    capsys.readouterr()
    again = finetune.main(Attributes(), argv + ["--init", init])
    assert "reused, not retrained" in capsys.readouterr().out and again["runs"] == first["runs"]
    for other, named in ((["--init", "random"], "init_sha256"), (["--init", init, "--frac", "0.25"], "frac 0.25")):
        with pytest.raises(ValueError, match=f"result.json was made with other settings: .*{named}"):
            finetune.main(Attributes(), argv + other)
    torch.save(vit.vit_tiny().state_dict(), init)  # another checkpoint at the same path
    with pytest.raises(ValueError, match="init_sha256"):
        finetune.main(Attributes(), argv + ["--init", init])


def test_default_finetuning_folder_names_init_and_subset():
    import argparse
    import finetune
    from finetune_attr import Attributes
    name = lambda init, frac: finetune.default_out(Attributes(), argparse.Namespace(dataset="celeba", init=init,
                                                                                    frac=frac))
    assert name("random", 0.002) == os.path.join("runs", "celeba", "attr-random-0.002")
    assert name("runs/pretrain/teacher_backbone.pth", 1.0) == \
        os.path.join("runs", "celeba", "attr-pretrain_teacher_backbone-1")
    assert len({name("random", 0.1), name("random", 0.05), name("x/dino-s16.pth", 0.1)}) == 3
    assert all(n.split(os.sep)[-1].count("-") == 2 for n in (name("x/dino-s16.pth", 0.1),))  # figures table


def test_learning_rate_follows_the_real_global_batch():
    import argparse
    from finetune import batch_sizes
    args = argparse.Namespace(batch_size=256)
    assert batch_sizes(args, 122, 1) == (122, 1)  # RAF-DB 1%: one batch of 122, lr * 122 / 256
    assert batch_sizes(args, 1000, 2) == (128, 3)
    with pytest.raises(ValueError, match="no image per process"):
        batch_sizes(argparse.Namespace(batch_size=2), 100, 4)


def _rec_of_pngs(folder, n):
    """A RecordIO pack without header of n tiny PNGs, keys 1..n (written in descending key order)."""
    payload = lambda k: struct.pack("<IfQQ", 0, float(k), 0, 0) + _png((k % 256, 0, 0))
    _write_rec(str(folder), {k: payload(k) for k in range(1, n + 1)})


def test_truncated_recordio_is_a_clear_error_on_open(tmp_path):
    from data import RecordIO
    _rec_of_pngs(tmp_path / "cut", 130)
    rec = tmp_path / "cut" / "train.rec"
    full = rec.read_bytes()
    rec.write_bytes(full[:int(len(full) * 0.6)])  # an interrupted copy
    with pytest.raises(ValueError, match="start past the end of the file.*incomplete copy"):
        RecordIO(str(tmp_path / "cut"))
    rec.write_bytes(full[:-30])  # the last record cut short
    with pytest.raises(ValueError, match="runs past the end of the file"):
        RecordIO(str(tmp_path / "cut"))
    code, out, err = run_script("data.py", str(tmp_path / "cut"))
    assert code == 1 and err.count("\n") == 1 and "train.rec" in err


def test_corrupt_recordio_record_is_skipped_counted_and_listed(tmp_path):
    import data
    import pretrain
    _rec_of_pngs(tmp_path / "ms1m", 130)
    rec = tmp_path / "ms1m" / "train.rec"
    offsets = {int(k): int(v) for k, v in (l.split() for l in open(tmp_path / "ms1m" / "train.idx"))}
    raw = bytearray(rec.read_bytes())
    raw[offsets[129]:offsets[129] + 4] = b"\0\0\0\0"  # the 2nd record in the file: outside the sample checked
    rec.write_bytes(bytes(raw))
    ds = data.RecordIO(str(tmp_path / "ms1m"))
    assert ds[ds.keys.index(129)] is None and ds[ds.keys.index(128)] is not None
    code, out, err = run_script("data.py", str(tmp_path / "ms1m"), "--check-all")
    assert code == 1 and "bad magic" in err and "key 129" in err
    out_dir = tmp_path / "run"
    pretrain.main(_tiny_pretrain_args(str(tmp_path / "ms1m"), str(out_dir), "--epochs", "1", "--workers", "1",
                                      "--log-every", "32"))
    assert json.loads(open(out_dir / "log.jsonl").readlines()[-1])["skipped"] == 1
    assert (out_dir / "skipped.txt").read_text() == f"{rec}:129\n"


def _wait_for(predicate, proc, what, timeout=120):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()}"
        assert time.time() - start < timeout, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _interrupt(script, argv, ready):
    """Start a script, send SIGTERM once ready() holds; returns (exit code, stderr)."""
    import signal
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(ready, proc, "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
def test_sigterm_during_pretraining_saves_and_resumes_to_the_same_weights(tmp_path, image_folder):
    import pretrain
    argv = lambda out: _tiny_pretrain_argv(image_folder, out, "--epochs", "8", "--workers", "1")
    pretrain.main(pretrain.get_args(argv(str(tmp_path / "full"))))
    cut = tmp_path / "cut"
    code, err = _interrupt("pretrain.py", argv(str(cut)), lambda: len(_log_steps(cut)) >= 2)
    step = torch.load(str(cut / "checkpoint.pth"), weights_only=True)["step"]
    assert code == 128 + 15 and f"SIGTERM at step {step}: checkpoint" in err and "resume" in err, err
    assert 2 <= step < 24 and _log_steps(cut) == list(range(1, step + 1))
    pretrain.main(pretrain.get_args(argv(str(cut))))
    assert _log_steps(cut) == list(range(1, 25))
    a, b = (torch.load(str(tmp_path / d / "teacher_backbone.pth"), weights_only=True) for d in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_in_one_process_stops_after_the_current_step(tmp_path, image_folder, monkeypatch):
    """Without torchrun no process has to agree: the step in flight is the last, whatever --log-every."""
    import signal
    import pretrain
    real_step = pretrain.training_step

    def step_then_signal(*args, **kwargs):
        stats = real_step(*args, **kwargs)
        if len(calls) == 1:  # during the second step of three an epoch: no logging or epoch end
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(1)
        return stats
    calls = []
    monkeypatch.setattr(pretrain, "training_step", step_then_signal)
    with pytest.raises(SystemExit) as e:
        pretrain.main(_tiny_pretrain_args(image_folder, str(tmp_path / "run"), "--log-every", "100"))
    assert e.value.code == 128 + signal.SIGTERM and len(calls) == 2
    assert torch.load(str(tmp_path / "run" / "checkpoint.pth"), weights_only=True)["step"] == 2


def _log_steps(out):
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(l)["step"] for l in open(path) if l.endswith("\n")]


@pytest.mark.slow
def test_sigterm_during_finetuning_saves_and_resumes_to_the_same_weights(tmp_path, toy_root):
    import finetune
    from finetune_attr import Attributes
    argv = lambda out: ["--dataset", "toy", "--data-root", toy_root, "--arch", "vit_tiny", "--img-size", "32",
                        "--epochs", "40", "--batch-size", "16", "--workers", "1", "--frac", "0.5", "--out", out,
                        "--save-every-min", "0.05"]
    full = finetune.main(Attributes(), argv(str(tmp_path / "full")))
    cut = tmp_path / "cut"
    code, err = _interrupt("finetune_attr.py", argv(str(cut)), lambda: (cut / "run0" / "checkpoint.pth").exists())
    ckpt = torch.load(str(cut / "run0" / "checkpoint.pth"), weights_only=True)
    assert code == 128 + 15 and "SIGTERM at step" in err and ckpt["epoch"] < 40, err
    resumed = finetune.main(Attributes(), argv(str(cut)))
    assert resumed["runs"][0]["final"] == full["runs"][0]["final"]
    a, b = (torch.load(str(tmp_path / d / "run0" / "checkpoint.pth"), weights_only=True) for d in ("full", "cut"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_kill_9_at_five_moments_then_resume_gives_the_uninterrupted_teacher(tmp_path, toy_root):
    argv = ["--data", os.path.join(toy_root, "toy", "ms1m"), "--arch", "vit_tiny", "--n-images", "48",
            "--batch-size", "4", "--epochs", "1", "--global-size", "32", "--local-size", "16", "--n-local", "2",
            "--n-prototypes", "32", "--out-dim", "16", "--workers", "0"]
    code, out, err = run_script(os.path.join("scripts", "kill_resume.py"), "--kills", "5", "--dir",
                                str(tmp_path), "--", *argv)
    assert code == 0, out + err
    assert out.count("last checkpoint at step") == 5 and "identical to the uninterrupted run's, bit for bit" in out
    assert "strictly increasing" in out


def test_dino_and_mae_full_checkpoints_load_as_init(tmp_path):
    import argparse
    ref = vit.vit_tiny()
    state = ref.state_dict()
    args = argparse.Namespace(arch="vit_small", lr=np.float64(5e-4), mean=np.array([0.5, 0.5]), n=np.int64(3))
    dino = dict(student={f"module.backbone.{k}": v for k, v in state.items()},
                teacher={f"backbone.{k}": v for k, v in state.items()}, epoch=100, args=args)
    mae = dict(model=dict(state, **{"head.weight": torch.zeros(7, 192)}), epoch=99, args=args)
    for name, ckpt in (("dino", dino), ("mae", mae)):
        torch.save(ckpt, tmp_path / f"{name}.pth")
        m = vit.vit_tiny()
        vit.load_pretrained(m, str(tmp_path / f"{name}.pth"))
        assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items()), name
    import fractions
    torch.save(dict(model=state, extra=fractions.Fraction(1, 3)), tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="holds a fractions.Fraction"):
        vit.load_pretrained(vit.vit_tiny(), str(tmp_path / "odd.pth"))


def _node_local_worker(rank, world, port, data, tmp):
    """A pretraining process whose --out exists on its own node only: rank 1 gets an empty folder."""
    _as_torchrun_process(rank, world, port)
    torch.set_num_threads(1)
    import pretrain
    out = os.path.join(tmp, "rank0" if rank == 0 else "rank1_node")
    pretrain.main(pretrain.get_args(_tiny_pretrain_argv(data, out, "--epochs", "1")))


@pytest.mark.slow
def test_resume_where_only_rank_0_sees_the_checkpoint(tmp_path, image_folder):
    """Rank 0 reads the checkpoint and every process resumes from it: a finished run trains nothing on
    any process (rank 1 alone would train from scratch and wait forever in the first collective)."""
    for attempt in ("first", "again"):
        port = _free_port()
        torch.multiprocessing.spawn(_node_local_worker, args=(2, port, image_folder, str(tmp_path)), nprocs=2)
        if attempt == "first":
            log = open(tmp_path / "rank0" / "log.jsonl").read()
    assert open(tmp_path / "rank0" / "log.jsonl").read() == log  # nothing retrained, nothing logged twice
    assert not (tmp_path / "rank1_node" / "checkpoint.pth").exists()  # only rank 0 writes


def _mixed_backend_worker(rank, world, port, data, tmp):
    """A pretraining process in a process group made as setup_distributed makes it on GPUs: one backend
    per device type ('cpu:gloo,cuda:nccl'); gloo stands in for NCCL on a machine without CUDA."""
    _as_torchrun_process(rank, world, port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("cpu:gloo,cuda:gloo")
    import pretrain
    pretrain.main(pretrain.get_args(_tiny_pretrain_argv(data, os.path.join(tmp, "run"), "--epochs", "1",
                                                        "--sinkhorn", "--projector-bn")))


@pytest.mark.slow
def test_every_collective_of_a_step_runs_in_a_per_device_backend_group(tmp_path, image_folder):
    """DDP's gradient all-reduce, the mean prediction's and Sinkhorn's all-reduces, the logging mean,
    the gather of skipped names (a corrupt image) and rank 0's checkpoint broadcast, all in a group
    whose CPU tensors need their own backend (an NCCL-only group has none: the run would stop at its
    first logging step)."""
    import shutil
    shutil.copytree(image_folder, tmp_path / "faces")
    (tmp_path / "faces" / "zz.jpg").write_bytes(b"\xff\xd8\xff garbage")
    torch.multiprocessing.spawn(_mixed_backend_worker, args=(2, _free_port(), str(tmp_path / "faces"),
                                                             str(tmp_path)), nprocs=2)
    log = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == [1] and log[0]["skipped"] == 1  # 13 images, a global batch of 8
    assert (tmp_path / "run" / "skipped.txt").read_text().strip().endswith("zz.jpg")


# ============================================================================= CUDA (scripts/gpu_check.sh)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
def test_gpu_nccl_one_process_pretraining(tmp_path, image_folder, monkeypatch):
    import pretrain
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # as torchrun --nproc_per_node 1: NCCL for CUDA tensors, gloo for CPU ones
    pretrain.main(_tiny_pretrain_args(image_folder, str(tmp_path / "run"), "--epochs", "1",
                                      "--projector-bn", "--sinkhorn"))
    log = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)


@pytest.mark.gpu
@gpu
def test_gpu_bf16_step_keeps_the_loss_in_fp32():
    import pretrain
    torch.manual_seed(0)
    args = pretrain.get_args(["--arch", "vit_tiny", "--n-prototypes", "32", "--out-dim", "16"])
    model, teacher = pretrain.build_models(args)
    device = torch.device("cuda")
    model.to(device)
    teacher.to(device)
    opt = torch.optim.AdamW(pretrain.param_groups(model, 0.04), fused=True)
    g, l = torch.randn(4, 2, 3, 64, 64, device=device), torch.randn(4, 3, 3, 32, 32, device=device)
    stats = pretrain.training_step(model, teacher, opt, g, l, lr=1e-4, momentum=0.99, clip_grad=3.0, bf16=True)
    assert stats["loss"].dtype == torch.float32 and math.isfinite(stats["loss"].item())
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.gpu
@gpu
def test_gpu_io_binding_equals_the_cpu_path(tmp_path):
    from retrieval import ArcFace
    W = np.random.RandomState(0).randn(3, 8).astype(np.float32)
    imgs = torch.randint(0, 256, (5, 3, 112, 112), dtype=torch.uint8)
    for batch in ("N", 2):  # a dynamic and a fixed-batch graph
        path = _onnx_model(str(tmp_path / f"m{batch}.onnx"), batch=batch, weight=W)
        cpu = ArcFace(path, providers=["CPUExecutionProvider"]).embed(imgs)
        face = ArcFace(path)
        assert "CUDAExecutionProvider" in face.session.get_providers()
        out = face.embed(imgs.cuda())
        assert out.is_cuda and torch.allclose(out.cpu(), cpu, atol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_pinned_loader(image_folder):
    import data
    import pretrain
    from crops import MultiCrop
    args = _tiny_pretrain_args(image_folder, "unused", "--workers", "1")
    views = pretrain.Views(data.ImageFolder(image_folder), MultiCrop(32, 16, n_local=2), 0)
    batch = next(iter(pretrain.epoch_loader(views, args, 0, pin=True)))
    assert batch["global_views"].is_pinned() and batch["local_views"].is_pinned()


@pytest.mark.gpu
@gpu
def test_gpu_checkpoint_restores_the_cuda_rng(tmp_path, image_folder):
    import pretrain
    out = tmp_path / "run"
    pretrain.main(_tiny_pretrain_args(image_folder, str(out), "--epochs", "1"))
    ckpt = torch.load(str(out / "checkpoint.pth"), weights_only=True)
    torch.cuda.manual_seed(123)
    pretrain.restore_rng(ckpt, torch.device("cuda"))
    assert torch.equal(torch.cuda.get_rng_state(), ckpt["cuda_rng"])


def test_collapse_is_said_for_a_collapsed_run_and_not_for_a_healthy_one(tmp_path, capsys):
    """Twelve identical gray images: under the paper's literal loss the teacher sends the 24 global
    views of a batch to 4 or 5 prototypes; with MSN's Sinkhorn and projector BatchNorm to 13-15."""
    import pretrain
    for i in range(12):
        Image.new("RGB", (48, 40), (128, 128, 128)).save(tmp_path / f"{i:02d}.png")
    runs = {}
    for name, extra in (("literal", []), ("msn", ["--sinkhorn", "--projector-bn"])):
        pretrain.main(_tiny_pretrain_args(str(tmp_path), str(tmp_path / name), "--epochs", "4",
                                          "--batch-size", "12", *extra))
        rows = [json.loads(l) for l in open(tmp_path / name / "log.jsonl")]
        runs[name] = rows, capsys.readouterr().out
    rows, out = runs["literal"]
    assert rows[-1]["state"] == "collapsed" and rows[-1]["prototype_share"] < 0.25 and "COLLAPSED" in out
    assert f"teacher predictions on {rows[-1]['prototypes_used']:.0f} prototypes a batch" in out
    rows, out = runs["msn"]
    assert all(r["state"] == "healthy" for r in rows) and "COLLAPSED" not in out and "at the end:" in out


@pytest.mark.slow
def test_loss_and_finetune_files_run_alone():
    code, out, err = run_script("loss.py")
    healthy, collapsed = (l for l in out.splitlines() if "distinct prototypes" in l)
    distinct = lambda line: int(line.split("argmax: ")[1].split()[0])
    assert code == 0 and distinct(healthy) > 10 and distinct(collapsed) == 1, out + err
    code, out, err = run_script("finetune.py")
    scales = {l.split()[0]: float(l.split("lr scale ")[1].split()[0]) for l in out.splitlines()[1:]}
    assert code == 0 and scales["backbone.patch_embed"] == pytest.approx(0.65 ** 13, abs=1e-5)
    assert scales["backbone.blocks.11"] == pytest.approx(0.65) and scales["head.weight"] == 1.0


# ============================================================================= classroom.py

def _replace_function(path, name, reference):
    """Put the function `name` of the file `reference` in place of the one in `path`."""
    import ast
    import classroom
    text = open(path).read()
    tree = ast.parse(text)
    node = classroom.function_node(tree, name)
    ref_text = open(reference).read()
    ref_node = classroom.function_node(ast.parse(ref_text), name)
    lines, ref_lines = text.splitlines(keepends=True), ref_text.splitlines(keepends=True)
    lines[node.lineno - 1:node.end_lineno] = ref_lines[ref_node.lineno - 1:ref_node.end_lineno]
    open(path, "w").write("".join(lines))


@pytest.fixture(scope="module")
def student_copy(tmp_path_factory):
    import classroom
    d = str(tmp_path_factory.mktemp("class") / "copy")
    classroom.make(d, list(classroom.BY_NAME))
    return d


@pytest.mark.slow
def test_classroom_untouched_copy_grades_zero_and_holds_no_reference_body(student_copy, capsys):
    import ast
    import classroom
    rows = classroom.grade(student_copy)
    assert [r[0] for r in rows] == list(classroom.BY_NAME) and not any(r[1] for r in rows)
    assert all(r[2].startswith("NotImplementedError") for r in rows), rows
    assert f"0/{len(rows)} exercises pass" in capsys.readouterr().out
    copied = "\n".join(ast.unparse(ast.parse(open(os.path.join(root, f)).read()))
                       for root, _, files in os.walk(student_copy) for f in files if f.endswith(".py"))
    assert not os.path.exists(os.path.join(student_copy, "test_all.py"))
    for name, ex in classroom.BY_NAME.items():
        node = classroom.function_node(ast.parse(open(os.path.join(HERE, ex.file)).read()),
                                       name.split(".", 1)[1])
        for stmt in node.body[1:]:  # the docstring stays
            code = ast.unparse(stmt)
            assert len(code) < 25 or code not in copied, (name, code)


@pytest.mark.slow
def test_classroom_reference_bodies_pass_and_planted_bugs_fail_their_exercise_only(student_copy, tmp_path):
    import shutil
    import classroom
    done = str(tmp_path / "done")
    shutil.copytree(student_copy, done)
    for name, ex in classroom.BY_NAME.items():
        _replace_function(os.path.join(done, ex.file), name.split(".", 1)[1], os.path.join(HERE, ex.file))
    rows = classroom.grade(done)
    assert all(r[1] for r in rows), [r for r in rows if not r[1]]
    bugs = {  # exercise: (file, then pairs of correct code and its planted bug)
        "loss.PrototypeLoss.distillation": ("loss.py", "return cross_entropy - mean_entropy",
                                            "return cross_entropy + mean_entropy"),
        "loss.ema_update": ("loss.py", "_(list(t), momentum)\n", "_(list(t), 1 - momentum)\n",
                            "alpha=1 - momentum)", "alpha=momentum)"),
        "retrieval.select": ("retrieval.py", "sim >= threshold", "sim < threshold"),
        "finetune.param_groups_layer_decay": ("finetune.py", "layer_decay ** (n_layers + 1 - layer)",
                                              "layer_decay ** (n_layers - layer)"),
    }
    for name, (file, *edits) in bugs.items():
        path = os.path.join(done, file)
        text = open(path).read()
        for right, wrong in zip(edits[::2], edits[1::2]):
            assert text.count(right) == 1, (name, right)
            text = text.replace(right, wrong)
        open(path, "w").write(text)
    with open(os.path.join(done, "vit.py"), "a") as f:
        f.write("\ndef broken(:\n")  # a syntax error: vit.py's exercises fail, no other
    rows = {name: (passed, message) for name, passed, message in classroom.grade(done)}
    vit_names = {n for n, ex in classroom.BY_NAME.items() if ex.file == "vit.py"}
    assert {n for n, (passed, _) in rows.items() if not passed} == set(bugs) | vit_names
    assert all(rows[n][1].startswith("SyntaxError") for n in vit_names)
    assert "wrong sign" in rows["loss.PrototypeLoss.distillation"][1]
    assert "swapped" in rows["loss.ema_update"][1]
    assert "reversed" in rows["retrieval.select"][1]
    assert "off by one" in rows["finetune.param_groups_layer_decay"][1]
