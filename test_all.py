"""The test suite: every piece of ProS checked on CPU with tiny configs, one class per concern.

    python -m pytest -q test_all.py                  # all
    python -m pytest -q test_all.py::TestLoss        # loss.py's tests
    python -m pytest -q test_all.py -m "not slow"    # without runs, processes and the toy world

Values are computed independently (explicit loops, hand-made examples), not copied from the code.
Project files are imported inside the tests, so a broken file fails its own tests only.
"""
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image


HERE = os.path.dirname(os.path.abspath(__file__))


def run_script(*args, cwd=None, env=None):
    """Run one of the scripts as a user would; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, args[0]), *args[1:]],
                       capture_output=True, text=True,
                       cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)
    return p.returncode, p.stdout, p.stderr


def last_line(text):
    return text.strip().splitlines()[-1]


def _project_imports():
    """{file stem: the project's modules it imports, anywhere in the file}, read with ast."""
    import ast
    import glob
    stems = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py"))}
    graph = {}
    for stem in stems:
        tree = ast.parse(open(os.path.join(HERE, stem + ".py")).read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        graph[stem] = (names & stems) - {stem}
    return graph


def _find_cycle(graph):
    """One import cycle as a list of stems, or None (depth-first search)."""
    state, path = {}, []

    def visit(n):
        state[n] = "open"
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return path[path.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = "done"
        path.pop()
        return None
    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def _outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


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
    # nobody returns before the world is there
    assert os.path.exists(os.path.join(root, "toy", "DONE"))


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
        inits.append(helper.make_tensor("W", TensorProto.FLOAT, list(weight.shape),
                                        weight.flatten().tolist()))
        nodes.append(helper.make_node("MatMul", ["mean", "W"], ["emb"]))
        out_name = "emb"
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT,
                                        [batch, 3 if weight is None else weight.shape[1]])
    graph = helper.make_graph(nodes, "g", [inp], [out], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def _png(color, size=(8, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _tiny_pretrain_argv(data, out, *extra):
    """A pretraining command line small enough for a test (later flags override earlier ones)."""
    return ["--data", data, "--out", out, "--arch", "vit_tiny", "--epochs", "2", "--batch-size",
            "4", "--global-size", "32", "--local-size", "16", "--n-local", "2", "--n-prototypes",
            "32", "--out-dim", "16", "--workers", "0", "--log-every", "1", "--warmup-epochs", "1",
            *extra]


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


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_torchrun_process(rank, world, port):
    """The environment torchrun gives process `rank` of `world` on this machine."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def _read_everywhere_worker(rank, world, port, tmp):
    """Each process's outcome of run.read_everywhere in three cases: both see their own file; only
    rank 0 sees one; rank 0's is unreadable."""
    _as_torchrun_process(rank, world, port)
    import run
    run.setup_distributed()

    def own():
        return {"read by": rank}

    def rank_zero_only():
        if rank:
            raise FileNotFoundError("not on this disk")
        return {"read by": 0}

    def rank_zero_broken():
        if rank == 0:
            raise ValueError("checkpoint.pth: not a readable PyTorch checkpoint")
        return {"read by": rank}
    out = []
    for read in (own, rank_zero_only, rank_zero_broken):
        try:
            out.append(run.read_everywhere(read, rank, world))
        except ValueError as e:
            out.append(str(e))
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    torch.distributed.destroy_process_group()


def _step_syncs(device):
    """run.HostSyncs's count of the second of two training steps on `device` (the first creates
    AdamW's state), from a collated batch to the EMA, with a stand-in recogniser on the device."""
    import pretrain
    import run
    from crops import MultiCrop, collate
    args = pretrain.get_args(["--arch", "vit_tiny", "--patch-size", "8", "--global-size", "32",
                              "--local-size", "16", "--n-prototypes", "16", "--out-dim", "16",
                              "--n-local", "4", "--n-candidates", "6", "--arcface", "x"])

    class StandIn:  # the recogniser's output, already on the device
        def embed(self, crops):
            return F.normalize(torch.randn(len(crops), 8, device=crops.device), dim=-1)
    rs = np.random.RandomState(0)
    mc = MultiCrop(32, 16, 2, 4, 6)
    batch = run.to_device(collate([mc(Image.fromarray(rs.randint(0, 256, (h, w, 3), np.uint8)))
                                   for h, w in ((40, 40), (50, 30), (30, 60))]), device)
    model, teacher = pretrain.build_models(args, device)
    optimizer = torch.optim.AdamW(pretrain.param_groups(model), fused=True)
    at = dict(lr=1e-3, weight_decay=0.04, momentum=0.99)
    for _ in range(2):
        with run.HostSyncs() as syncs:
            g, l, counts = pretrain.make_views(batch, mc, StandIn(), args)
            pretrain.training_step(model, teacher, optimizer, g, l, at=at, clip_grad=3.0,
                                   bf16=False)
    return syncs.ops


def _ddp_worker(rank, world, port, tmp, batch):
    _as_torchrun_process(rank, world, port)
    stats = _one_step(world, rank, batch)
    if rank == 0:
        torch.save(stats, os.path.join(tmp, "ddp.pt"))
    torch.distributed.destroy_process_group()


def _pretrain_process(rank, world, port, argv):
    _as_torchrun_process(rank, world, port)
    import pretrain
    pretrain.main(pretrain.get_args(argv))


def _signalled_process(rank, world, port, argv):
    """A pretraining process; rank 1 gets SIGTERM during its second step. Writes its exit code."""
    import signal
    _as_torchrun_process(rank, world, port)
    import pretrain
    real_step, calls = pretrain.training_step, []

    def step_then_signal(*args, **kwargs):
        stats = real_step(*args, **kwargs)
        if rank == 1 and len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        calls.append(1)
        return stats
    pretrain.training_step = step_then_signal
    try:
        pretrain.main(pretrain.get_args(argv))
    except SystemExit as e:
        with open(os.path.join(pretrain.get_args(argv).out, f"exit{rank}"), "w") as f:
            f.write(f"{e.code} {len(calls)}")


def _one_step(world, rank, batch):
    import pretrain
    import run
    r, w, device = run.setup_distributed()
    torch.manual_seed(0)
    # the projector's BatchNorm normalises over the global batch (loss.GlobalBatchNorm)
    args = pretrain.get_args(["--arch", "vit_tiny", "--n-prototypes", "32", "--out-dim", "16"])
    model, teacher = pretrain.build_models(args)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if w > 1 else model
    # SGD: the same gradients give the same weights; Adam's first step would amplify float noise in
    # tiny gradients
    opt = torch.optim.SGD(pretrain.param_groups(model), lr=0.1, momentum=0.9)
    g, l = batch
    per = len(g) // world
    stats = [pretrain.training_step(ddp, teacher, opt, g[rank * per:(rank + 1) * per],
                                    l[rank * per:(rank + 1) * per],
                                    at=dict(lr=0.1, weight_decay=0.04, momentum=0.99),
                                    clip_grad=3.0, bf16=False) for _ in range(2)]
    # prototypes_used: the global batch's count, the same on every process
    keys = ["loss", "cross_entropy", "mean_entropy", "prototypes_used"]
    means = [dict(zip(keys, run.all_mean([s[k] for k in keys]))) for s in stats]
    return dict(stats=means, student=model.state_dict(), teacher=teacher.state_dict())


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


def _toy_finetune(script, toy_root, out, *extra):
    code, stdout, err = run_script(script, "--dataset", "toy", "--data-root", toy_root, "--arch",
                                   "vit_tiny", "--img-size", "32", "--epochs", "2", "--batch-size",
                                   "16", "--workers", "0", "--runs", "1", "--out", out, *extra)
    assert code == 0, err
    with open(os.path.join(out, "results.json")) as f:
        return dict(json.load(f), stdout=stdout)


RAF_LABELS = "train_00001.jpg 5\ntrain_00002.jpg 1\ntest_0001.jpg 7\n"


AFFECT_HEADER = ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
                 "expression,valence,arousal\n")
AFFECT_ROWS = ('1/a.jpg,10,20,30,40,"1;2;3",3,0.1,0.2\n1/b.jpg,0,0,50,50,"1;2",9,0,0\n'
               '2/c.jpg,5,5,20,20,"",7,0,0\n2/d.jpg,0,0,8,8,"",10,0,0\n')


def _finetune_ddp_worker(rank, world, port, script, argv, tmp):
    _as_torchrun_process(rank, world, port)
    torch.set_num_threads(1)  # two processes on the CI's two cores
    import finetune_align
    import finetune_attr
    res = {"attr": finetune_attr.main, "align": finetune_align.main}[script](argv)
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(dict(runs=res["runs"], mean=res["mean"]), f)


def _task_defaults(script, *argv):
    import argparse
    p = argparse.ArgumentParser()
    script.add_args(p)
    return p.parse_args(list(argv))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, toy_root):
    """A 1-epoch pretraining on the tiny toy world, with MSN's projector BN (the default: fig5
    rebuilds a head with BatchNorm from the checkpoint)."""
    import pretrain
    out = str(tmp_path_factory.mktemp("run"))
    pretrain.main(_tiny_pretrain_args(os.path.join(toy_root, "toy", "ms1m"), out, "--epochs", "1",
                                      "--batch-size", "30", "--data-root", toy_root))
    return out


def _rec_of_pngs(folder, n):
    """A RecordIO pack without header of n tiny PNGs, keys 1..n (written in descending key
    order)."""

    def payload(k):
        return struct.pack("<IfQQ", 0, float(k), 0, 0) + _png((k % 256, 0, 0))
    _write_rec(str(folder), {k: payload(k) for k in range(1, n + 1)})


def _wait_for(predicate, proc, what, timeout=120):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read()}"
        assert time.time() - start < timeout, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _interrupt(script, argv, ready):
    """Start a script, send SIGTERM once ready() holds; returns (exit code, stderr)."""
    import signal
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), *argv],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(ready, proc, "the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _log_steps(out):
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(l)["step"] for l in open(path) if l.endswith("\n")]


def _node_local_worker(rank, world, port, data, tmp):
    """A pretraining process whose --out exists on its own node only: rank 1 gets an empty
    folder."""
    _as_torchrun_process(rank, world, port)
    torch.set_num_threads(1)
    import pretrain
    out = os.path.join(tmp, "rank0" if rank == 0 else "rank1_node")
    pretrain.main(pretrain.get_args(_tiny_pretrain_argv(data, out, "--epochs", "1")))


def _mixed_backend_worker(rank, world, port, data, tmp):
    """A pretraining process in a process group made as setup_distributed makes it on GPUs: one
    backend per device type ('cpu:gloo,cuda:nccl'); gloo stands in for NCCL on a machine without
    CUDA."""
    _as_torchrun_process(rank, world, port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group("cpu:gloo,cuda:gloo")
    import pretrain
    pretrain.main(pretrain.get_args(_tiny_pretrain_argv(data, os.path.join(tmp, "run"), "--epochs",
                                                        "1", "--sinkhorn", "--projector-bn")))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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
    """(the student copy, the teacher's answers folder)"""
    import classroom
    root = tmp_path_factory.mktemp("class")
    d, key = str(root / "copy"), str(root / "key")
    classroom.make(d, key, list(classroom.BY_NAME))
    return d, key


# ============================================================================= tests by concern

class TestLayering:
    """Imports point one way, from the scripts down to the pieces; no cycles."""

    def test_the_cycle_finder_finds_a_planted_cycle(self):
        assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
        assert _find_cycle({"a": {"b"}, "b": set()}) is None

    def test_imports_point_one_way(self):
        graph = _project_imports()
        assert _find_cycle(graph) is None
        # the run machinery (command line, processes, checkpoint files) is under everything else
        assert graph["loss"] == set() and graph["run"] == set()
        assert graph["vit"] <= {"run"} and graph["data"] <= {"run"}
        fine_tuning = {"finetune", "finetune_attr", "finetune_expr", "finetune_align"}
        assert not graph["pretrain"] & fine_tuning
        # no fine-tuning script and no probe imports pretraining; the probe never a trainer
        assert not graph["probe"] & (fine_tuning | {"pretrain"})
        assert all("pretrain" not in graph[script] for script in fine_tuning)
        for piece in ("vit", "loss", "run", "data", "crops", "retrieval", "toyfaces"):
            assert not graph[piece] & (fine_tuning | {"pretrain", "figures", "bench"}), piece


class TestRun:
    """run.py: the machinery every training script shares (processes, bf16, errors, syncs)."""

    def test_run_alone_says_what_this_machine_gives_a_run(self):
        code, out, err = run_script("run.py")
        assert code == 0 and out.startswith("process 0 of 1: device ")
        assert "all-reduce works" in out

    @pytest.mark.slow
    def test_each_process_reads_its_own_checkpoint_and_rank_zero_broadcasts_the_rest(self,
                                                                                     tmp_path):
        torch.multiprocessing.spawn(_read_everywhere_worker, args=(2, _free_port(), str(tmp_path)),
                                    nprocs=2)
        outcomes = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
        assert [o[0] for o in outcomes] == [{"read by": 0}, {"read by": 1}]  # no broadcast
        assert [o[1] for o in outcomes] == [{"read by": 0}, {"read by": 0}]  # rank 0's, sent
        assert [o[2] for o in outcomes] == ["checkpoint.pth: not a readable PyTorch checkpoint"] * 2

    def test_only_an_explicit_bf16_on_emulating_hardware_warns(self, capsys, monkeypatch):
        import run
        cpu = torch.device("cpu")
        for native in (True, False):
            monkeypatch.setattr(run, "native_bf16", lambda device: native)
            assert [run.use_bf16(flag, cpu)
                    for flag in (True, False, None)] == [True, False, False]
            # only an explicit --bf16 warns
            assert ("emulated" in capsys.readouterr().err) == (not native)
        # unset: bf16 on a GPU that computes it (Ampere on), fp32 on a V100 or T4 that emulates it
        monkeypatch.undo()
        for capability, default in (((7, 0), False), ((7, 5), False), ((8, 0), True),
                                    ((9, 0), True)):
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capability)
            assert run.use_bf16(None, torch.device("cuda", 0)) is default, capability

    def test_srun_without_torchrun_is_refused(self, monkeypatch):
        """srun python pretrain.py: N copies, each a whole run into one folder, unless refused."""
        import run
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.setenv("SLURM_NTASKS", "4")
        monkeypatch.setenv("SLURM_PROCID", "2")
        with pytest.raises(ValueError, match="SLURM_NTASKS=4 but no RANK.*torchrun"):
            run.setup_distributed()
        monkeypatch.setenv("SLURM_NTASKS", "1")
        assert run.setup_distributed()[:2] == (0, 1)

    def test_under_torchrun_the_one_line_error_is_each_processs_error_file(self, tmp_path,
                                                                              monkeypatch):
        """torchrun reports a failed process by its error file (TORCHELASTIC_ERROR_FILE, in
        torch's format): the one-line error, not a pointer to torch's documentation."""
        import run
        from torch.distributed.elastic.multiprocessing.errors import ProcessFailure
        path = str(tmp_path / "error.json")
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", path)
        monkeypatch.setenv("RANK", "1")

        def fails():
            raise FileNotFoundError("data/ms1m: no such folder")
        with pytest.raises(SystemExit) as stop:
            run.run_cli(fails)
        assert stop.value.code == 1  # rank 1 prints nothing
        failure = ProcessFailure(local_rank=1, pid=0, exitcode=1, error_file=path)
        assert failure.message == "error: data/ms1m: no such folder"


class TestViT:
    """vit.py: shapes, attention, position embeddings, checkpoint layouts (§3.2)."""

    @pytest.mark.parametrize("arch,D", [("vit_tiny", 192), ("vit_small", 384)])
    def test_vit_parameter_count(self, arch, D):
        import vit
        L, P, T = 12, 16, 197
        block = 2 * D + (D * 3 * D + 3 * D) + (D * D
                                               + D) + 2 * D + (D * 4 * D + 4 * D) + (4 * D * D + D)
        expected = (3 * P * P * D + D) + D + T * D + L * block + 2 * D
        model = vit.ARCHS[arch]()
        assert sum(p.numel() for p in model.parameters()) == expected and model.embed_dim == D
        if arch == "vit_small":
            assert expected == 21_665_664  # timm's vit_small_patch16_224 without its classifier

    @pytest.mark.parametrize("size,tokens", [(224, 196), (112, 49), (96, 36)])
    def test_vit_output_shapes(self, size, tokens):
        import vit
        m = vit.vit_tiny().eval()
        x = torch.randn(2, 3, size, size)
        assert m(x).shape == (2, 192)
        assert [t.shape for t in m.get_intermediate_layers(x, (4, 12))] == [(2, tokens, 192)] * 2
        assert m.get_last_selfattention(x).shape == (2, 3, tokens + 1, tokens + 1)

    def test_vit_rejects_sizes_not_multiple_of_patch(self):
        import vit
        with pytest.raises(ValueError, match="multiple of the patch size"):
            vit.vit_tiny()(torch.randn(1, 3, 100, 100))

    def test_pos_embed_interpolation_is_identity_at_224(self):
        import vit
        m = vit.vit_tiny()
        assert vit.resample_pos_embed(m.pos_embed, (14, 14)) is m.pos_embed
        out = vit.resample_pos_embed(m.pos_embed, (6, 6))
        assert out.shape == (1, 37, 192) and torch.equal(out[:, 0], m.pos_embed[:, 0])

    def test_attention_equals_explicit_softmax(self):
        import vit
        torch.manual_seed(0)
        attn = vit.Attention(24, 3).eval()
        x = torch.randn(2, 5, 24)
        q, k, v = attn.qkv(x).reshape(2, 5, 3, 3, 8).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 24))
        assert torch.allclose(attn(x), expected, atol=1e-5)
        assert torch.allclose(attn(x, return_attention=True), weights, atol=1e-6)

    def test_attention_maps_sum_to_one(self):
        import vit
        a = vit.vit_tiny().eval().get_last_selfattention(torch.randn(2, 3, 96, 96))
        assert torch.allclose(a.sum(-1), torch.ones(2, 3, 37), atol=1e-5) and (a >= 0).all()

    def test_intermediate_layers_are_one_based(self):
        import vit
        m = vit.vit_tiny().eval()
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            t = m.tokens(x)
            outs = []
            for blk in m.blocks:
                t = blk(t)
                outs.append(t[:, 1:])
            first, fourth, last = m.get_intermediate_layers(x, (1, 4, 12))
        assert torch.allclose(first, outs[0]) and torch.allclose(fourth, outs[3])
        assert torch.allclose(last, outs[11])
        with pytest.raises(ValueError):
            m.get_intermediate_layers(x, (0,))

    def test_drop_path_inactive_in_eval(self):
        import vit
        m = vit.vit_tiny(drop_path_rate=0.5)
        x = torch.randn(2, 3, 32, 32)
        m.eval()
        assert torch.equal(m(x), m(x))
        m.train()
        torch.manual_seed(0)
        a = m(x)
        assert not torch.allclose(a, m(x))

    @pytest.mark.parametrize("layout", ["dino", "dino_bare", "timm", "msn", "ours"])
    def test_load_pretrained_layouts_round_trip(self, layout, tmp_path):
        import vit
        src = vit.vit_tiny()
        sd = src.state_dict()
        head = {"head.weight": torch.randn(10, 192), "head.bias": torch.randn(10)}
        ckpt = {"dino": {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()},
                                     "head.mlp.0.weight": torch.ones(3)}, "student": {}},
                "dino_bare": dict(sd), "timm": {"model": {**sd, **head}},
                "msn": {"target_encoder": {f"module.{k}": v for k, v in sd.items()}},
                "ours": {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()},
                                     "head.mlp.0.weight": torch.ones(3)},
                         "student": {"criterion.prototypes": torch.ones(4, 4)}, "step": 3}}[layout]
        path = str(tmp_path / "ckpt.pth")
        torch.save(ckpt, path)
        dst = vit.vit_tiny()
        missing, unexpected = vit.load_pretrained(dst, path)
        assert missing == [] and unexpected == []
        x = torch.randn(2, 3, 64, 64)
        assert torch.equal(_outputs(src, x), _outputs(dst, x))

    def test_load_pretrained_interpolates_other_grid(self):
        import vit
        src = vit.vit_tiny(img_size=112)  # a 7x7 grid
        dst = vit.vit_tiny()
        vit.load_pretrained(dst, src.state_dict())
        assert torch.allclose(dst.pos_embed, vit.resample_pos_embed(src.pos_embed, (14, 14)))

    def test_load_pretrained_adopts_the_checkpoints_patch_size(self):
        import vit
        src = vit.vit_tiny(patch_size=8)
        dst = vit.vit_tiny()  # patch 16, as every script builds it
        assert vit.load_pretrained(dst, src.state_dict()) == ([], [])
        x = torch.randn(2, 3, 64, 64)
        assert dst.patch_size == 8 and torch.equal(_outputs(src, x), _outputs(dst, x))

    def test_load_pretrained_bad_files(self, tmp_path):
        import vit
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

    def test_vit_equals_timm_when_installed(self):
        import vit
        timm = pytest.importorskip("timm")
        ours = vit.vit_small().eval()
        theirs = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(2, 3, 224, 224)
        assert torch.allclose(_outputs(ours, x), _outputs(theirs, x), atol=1e-5)

    @pytest.mark.slow
    def test_vit_script_prints_count_and_speed(self):
        code, out, err = run_script("vit.py", "--arch", "vit_tiny", "--batch-size", "2",
                                    "--img-size", "64")
        # patch embedding, cls token, 197 positions, 12 blocks of 12 D^2 + 13 D, final norm; D = 192
        D = 192
        count = 3 * 16 * 16 * D + D + D + 197 * D + 12 * (12 * D * D + 13 * D) + 2 * D
        shown = re.search(r"([\d.]+)M parameters", out)
        assert code == 0 and shown and float(shown.group(1)) == round(count / 1e6, 2), out + err
        assert re.search(r"\(([\d.]+) images/s\)", out), out

    def test_dino_and_mae_full_checkpoints_load_as_init(self, tmp_path):
        import vit
        import argparse
        ref = vit.vit_tiny()
        state = ref.state_dict()
        args = argparse.Namespace(arch="vit_small", lr=np.float64(5e-4), mean=np.array([0.5, 0.5]),
                                  n=np.int64(3))
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


class TestCrops:
    """crops.py: multi-crop views and their normalisation (§3, Fig. 2)."""

    def test_multicrop_shapes_ranges_and_determinism(self):
        from crops import MultiCrop, collate
        img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (150, 120, 3), np.uint8))
        mc = MultiCrop(64, 32, n_global=2, n_local=3, n_candidates=5)
        torch.manual_seed(1)
        v = mc(img)
        # a worker ships the decoded image, the boxes and per-view parameters, nothing cut
        assert v["image"].shape == (3, 150, 120) and v["image"].dtype == torch.uint8
        assert v["global_boxes"].shape == (2, 4) and v["local_boxes"].shape == (5, 4)
        top, left, h, w = v["local_boxes"].unbind(1)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= 150).all()
        assert (left + w <= 120).all() and (h * w <= 0.4 * 150 * 120 + 1).all()
        assert v["global_params"]["factors"].shape == (2, 4)
        assert v["local_params"]["order"].shape == (5, 4)
        torch.manual_seed(1)
        w = mc(img)
        for k in ("image", "global_boxes", "local_boxes"):
            assert torch.equal(v[k], w[k])
        for k in ("global_params", "local_params"):
            assert all(torch.equal(v[k][p], w[k][p]) for p in v[k])
        g, l = mc.crops(collate([v]))
        assert g.shape == (1, 2, 3, 64, 64) and l.shape == (1, 5, 3, 32, 32)
        assert g.dtype == l.dtype == torch.uint8
        gc, lc = mc.sample(img)
        assert [c.size for c in gc] == [(64, 64)] * 2 and len(lc) == 5
        with pytest.raises(ValueError):
            MultiCrop(n_local=8, n_candidates=4)

    def test_resized_crops_differ_from_torchvision_by_the_interpolation_alone(self, toy_root):
        """On the toy faces (112 x 112) and 218 x 178 ones, as DINO's RandomResizedCrop cuts them:
        an enlarged crop = torchvision's bilinear resized_crop within 1 level of 255 away from its
        rim (where roi_align reads past the box, as PIL does, and torchvision repeats the box's
        edge); a shrunk one within a mean of 3 levels (an area average of bilinear samples
        against torchvision's antialiasing triangle)."""
        from torchvision.transforms.v2 import functional as TF
        from crops import MultiCrop, resized_crops
        folder = os.path.join(toy_root, "toy", "celeba", "img_align_celeba")
        faces = [Image.open(os.path.join(folder, f)).convert("RGB")
                 for f in sorted(os.listdir(folder))[:4]]
        mc = MultiCrop()
        torch.manual_seed(0)
        enlarged, shrunk = [], []
        for im in faces + [f.resize((178, 218), Image.BICUBIC) for f in faces]:
            x = TF.pil_to_tensor(im)
            for size, scale in ((224, mc.global_scale), (96, mc.local_scale), (32, (0.3, 1.0))):
                boxes = mc.boxes(im, 4, scale)
                crops = resized_crops(x[None], boxes[None], size)[0]
                assert crops.shape == (4, 3, size, size) and crops.dtype == torch.uint8
                for (top, left, h, w), crop in zip(boxes.tolist(), crops):
                    ref = TF.resized_crop(x, top, left, h, w, [size, size], antialias=True,
                                          interpolation=TF.InterpolationMode.BILINEAR)
                    diff = (crop.float() - ref.float()).abs()
                    if max(h, w) <= size:
                        rim = size * 2 // min(h, w)
                        enlarged.append(diff[:, rim:-rim, rim:-rim].max())
                    elif min(h, w) > size:
                        shrunk.append(diff.mean())
        assert len(enlarged) > 20 and max(enlarged) <= 1
        assert len(shrunk) > 10 and max(shrunk) < 3

    def test_resized_crops_average_the_area_and_ignore_the_padding(self):
        """A checkerboard of 1-pixel squares shrunk 4x is flat gray (each output pixel averages
        the 16 it covers); boxes of images padded into one batch cut the same crops as each image
        alone, the border included (to float rounding)."""
        from torchvision.transforms.v2 import functional as TF
        from crops import MultiCrop, collate, resized_crops
        board = ((torch.arange(64)[:, None] + torch.arange(64)[None]) % 2 * 255).to(torch.uint8)
        crop = resized_crops(board.expand(1, 3, 64, 64), torch.tensor([[[0, 0, 64, 64]]]), 16)
        assert (crop.float() - 127.5).abs().max() <= 0.5
        rs = np.random.RandomState(0)
        images = [Image.fromarray(rs.randint(0, 256, (hw[0], hw[1], 3), np.uint8))
                  for hw in ((150, 120), (40, 90), (218, 178), (7, 5))]
        torch.manual_seed(0)
        mc = MultiCrop(local_scale=(0.05, 1.0))
        batch = collate([dict(image=TF.pil_to_tensor(im), boxes=mc.boxes(im, 6, mc.local_scale))
                         for im in images])
        assert batch["image"].shape == (4, 3, 218, 178)
        for size in (96, 32):
            crops = resized_crops(batch["image"], batch["boxes"], size)
            assert crops.shape == (4, 6, 3, size, size)
            for im, boxes, cut in zip(images, batch["boxes"], crops):
                alone = resized_crops(TF.pil_to_tensor(im)[None], boxes[None], size)[0]
                diff = (cut.int() - alone.int()).abs()  # float rounding flips a few halves
                assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3

    @staticmethod
    def _views_and_params(n=12, seed=0):
        from crops import MultiCrop
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (n, 3, 20, 24), dtype=torch.uint8, generator=g)
        torch.manual_seed(seed)
        # blur and solarize on every other view, so both branches are exercised
        params = MultiCrop().draw(n, [1.0, 0.0], [0.0, 1.0])
        return x, params

    def test_each_batched_operation_equals_torchvision_per_image(self):
        """Each batched operation with per-view parameters = torchvision's functional on that view
        alone with its parameters: to float rounding on float views, and within 1.5 levels of
        torchvision on uint8 views (which truncates after each operation and, in contrast and
        saturation, floors the luma it blends with: up to 1 + 0.4 levels)."""
        import math
        from torchvision.transforms.v2 import functional as TF
        import crops
        u8, p = self._views_and_params()
        x = u8.float() / 255
        n = len(x)
        f = p["factors"]
        per_view = {
            "brightness": (crops.brightness, lambda v, i: TF.adjust_brightness(v, f[i, 0].item())),
            "contrast": (crops.contrast, lambda v, i: TF.adjust_contrast(v, f[i, 1].item())),
            "saturation": (crops.saturation, lambda v, i: TF.adjust_saturation(v, f[i, 2].item())),
            "hue": (crops.hue, lambda v, i: TF.adjust_hue(v, f[i, 3].item())),
        }
        for name, (batched, single) in per_view.items():
            out = batched(x.clone(), f[:, list(per_view).index(name)])
            ref = torch.stack([single(x[i], i) for i in range(n)])
            assert torch.allclose(out, ref, atol=1e-5), name
            ref8 = torch.stack([single(u8[i], i) for i in range(n)]).float()
            assert (out * 255 - ref8).abs().max() <= 1.5, name
        masks = {"flip": (crops.flip, TF.horizontal_flip),
                 "grayscale": (crops.grayscale,
                               lambda v: TF.rgb_to_grayscale(v, num_output_channels=3)),
                 "solarize": (crops.solarize, lambda v: TF.solarize(v, 128))}
        on = torch.arange(n) % 3 == 0
        for name, (batched, single) in masks.items():
            out = batched(x.clone(), on)
            ref8 = torch.stack([single(u8[i]) if on[i] else u8[i] for i in range(n)]).float()
            assert (out * 255 - ref8).abs().max() <= 1.0 + 1e-3, name
            if name != "solarize":  # solarize's threshold is a uint8 level
                ref = torch.stack([single(x[i]) if on[i] else x[i] for i in range(n)])
                assert torch.allclose(out, ref, atol=1e-6), name
        sigma = p["sigma"]
        size = 2 * math.ceil(3 * crops.MAX_SIGMA) + 1
        out = crops.gaussian_blur(x.clone(), sigma)
        ref = torch.stack([TF.gaussian_blur(x[i], [size, size], [sigma[i].item()] * 2)
                           if sigma[i] > 0 else x[i] for i in range(n)])
        assert torch.allclose(out, ref, atol=1e-5) and not torch.equal(out, x)

    def test_augment_equals_the_per_image_chain(self):
        """The whole recipe on a batch = torchvision's functionals chained per view in DINO's order
        (flip, jitter in the view's order, grayscale, blur, solarize)."""
        import math
        from torchvision.transforms.v2 import functional as TF
        import crops
        u8, p = self._views_and_params(n=16, seed=3)
        jitter = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        size = 2 * math.ceil(3 * crops.MAX_SIGMA) + 1
        expected = []
        for i, v in enumerate(u8.float() / 255):
            if p["flip"][i]:
                v = TF.horizontal_flip(v)
            if p["jitter"][i]:
                for j in p["order"][i].tolist():
                    v = jitter[j](v, p["factors"][i, j].item())
            if p["gray"][i]:
                v = TF.rgb_to_grayscale(v, num_output_channels=3)
            if p["sigma"][i] > 0:
                v = TF.gaussian_blur(v, [size, size], [p["sigma"][i].item()] * 2)
            if p["solarize"][i]:
                v = torch.where(v * 255 >= 127.5, 1 - v, v)
            expected.append(v)
        assert torch.allclose(crops.augment(u8, p), torch.stack(expected), atol=1e-5)

    def test_drawn_parameters_follow_dino(self):
        """Frequencies within a binomial 99% interval over thousands of draws: flip 0.5, jitter
        0.8, grayscale 0.2, blur 1.0 / 0.1 / 0.5 (first global, second global, local), solarize
        0.2 on the second global only; factors in ColorJitter's ranges, orders permutations,
        sigma in [0.1, 2]."""
        from crops import MultiCrop
        mc = MultiCrop(n_global=2)
        torch.manual_seed(0)
        n = 4000
        g = mc.draw(2 * n, mc.global_blur_p, mc.global_solarize_p)
        loc = mc.draw(n, mc.local_blur_p, mc.local_solarize_p)

        def rate_ok(mask, p):
            half = 2.576 * math.sqrt(p * (1 - p) / len(mask)) + 1e-9
            return abs(mask.float().mean().item() - p) <= half
        first, second = (lambda k: g[k][0::2]), (lambda k: g[k][1::2])
        for k, p in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2)):
            assert rate_ok(loc[k], p) and rate_ok(g[k], p), k
        assert rate_ok(first("sigma") > 0, 1.0) and rate_ok(second("sigma") > 0, 0.1)
        assert rate_ok(loc["sigma"] > 0, 0.5)
        assert rate_ok(second("solarize"), 0.2)
        assert not first("solarize").any() and not loc["solarize"].any()
        lo, hi = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
        f = torch.cat([g["factors"], loc["factors"]])
        assert ((f >= lo) & (f <= hi)).all() and (f.std(0) > 0.5 * (hi - lo) / 4).all()
        orders = torch.cat([g["order"], loc["order"]])
        assert torch.equal(orders.sort(1).values, torch.arange(4).expand_as(orders))
        assert all(rate_ok(orders[:, 0] == j, 0.25) for j in range(4))
        s = torch.cat([g["sigma"], loc["sigma"]])
        assert ((s == 0) | ((s >= 0.1) & (s <= 2.0))).all()

    def test_normalize_equals_torchvision_per_view_and_dino_recipe(self):
        """The batch normalisation on the device = torchvision's ToDtype(scale) + Normalize on each
        view, bit for bit (the numbers the workers would give), and = (x / 255 -
        mean) / std in float64."""
        from torchvision.transforms import v2
        from crops import IMAGENET_MEAN, IMAGENET_STD, normalize
        views = torch.randint(0, 256, (3, 2, 3, 8, 8), dtype=torch.uint8)  # (B, M, 3, H, W)
        per_view = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                               v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        expected = torch.stack([torch.stack([per_view(v) for v in image]) for image in views])
        out = normalize(views)
        assert out.dtype == torch.float32 and torch.equal(out, expected)
        mean, std = (torch.tensor(c, dtype=torch.float64)[:, None, None]
                     for c in (IMAGENET_MEAN, IMAGENET_STD))
        assert torch.allclose(out.double(), (views.double() / 255 - mean) / std, atol=1e-6)

    def test_a_large_photo_travels_at_twice_the_global_crop(self):
        """A 1000 x 800 photo leaves the worker with its shorter side at 2 x 64, its boxes inside;
        a face dataset's 112 px image travels as it is."""
        from crops import MultiCrop
        mc = MultiCrop(64, 32)
        big = Image.fromarray(np.random.RandomState(0).randint(0, 255, (1000, 800, 3), np.uint8))
        v = mc(big)
        assert v["image"].shape == (3, 160, 128)
        for k in ("global_boxes", "local_boxes"):
            top, left, h, w = v[k].unbind(1)
            assert (top + h <= 160).all() and (left + w <= 128).all()
        face = Image.fromarray(np.full((112, 112, 3), 90, np.uint8))
        assert torch.equal(mc(face)["image"], torch.full((3, 112, 112), 90, dtype=torch.uint8))

    @pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "tiny", "CMYK"])
    def test_multicrop_odd_images(self, mode):
        from crops import MultiCrop, collate
        rs = np.random.RandomState(0)
        img = {"L": Image.fromarray(rs.randint(0, 255, (50, 60), np.uint8)),
               "RGBA": Image.fromarray(rs.randint(0, 255, (50, 60, 4), np.uint8), "RGBA"),
               "P": Image.fromarray(rs.randint(0, 255, (50, 60, 3), np.uint8)).convert("P"),
               "I;16": Image.fromarray(rs.randint(0, 65535, (50, 60)).astype(np.uint16)),
               "tiny": Image.new("RGB", (3, 2), (200, 10, 10)),
               "CMYK": Image.new("CMYK", (40, 40))}[mode]
        mc = MultiCrop(32, 16, n_local=2)
        g, l = mc.crops(collate([mc(img)]))
        assert g.shape == (1, 2, 3, 32, 32) and l.shape == (1, 2, 3, 16, 16)
        if mode == "I;16":  # 16-bit is scaled to 8 bits, not clipped to white
            assert g.float().mean() < 200

    def test_to_rgb_scales_16_bit(self):
        from data import to_rgb
        img = Image.fromarray(np.full((4, 4), 32768, np.uint16))
        assert to_rgb(img).getpixel((0, 0)) == (127, 127, 127)


class TestRetrieval:
    """retrieval.py: the ONNX recogniser and the face-aware selection (§3, Fig. 3)."""

    def test_arcface_preprocessing_rgb_and_normalisation(self, tmp_path):
        from retrieval import ArcFace
        face = ArcFace(_onnx_model(str(tmp_path / "mean.onnx")))
        img = torch.zeros(1, 3, 112, 112, dtype=torch.uint8)
        img[:, 0], img[:, 1], img[:, 2] = 255, 0, 51  # R, G, B
        raw = face.run(face.preprocess(img))
        assert torch.allclose(raw, torch.tensor([[1.0, -1.0, (51 - 127.5) / 127.5]]), atol=1e-5)
        pil = Image.new("RGB", (112, 112), (255, 0, 51))
        assert torch.allclose(face.run(face.preprocess([pil])), raw, atol=1e-5)
        raw_input = ArcFace(face.path, normalize=False)  # for graphs that normalise inside
        assert torch.allclose(raw_input.run(raw_input.preprocess(img)),
                              torch.tensor([[255.0, 0.0, 51.0]]), atol=1e-3)

    def test_arcface_fixed_and_dynamic_batch_agree(self, tmp_path):
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

    def test_arcface_runs_on_this_processs_gpu(self, monkeypatch):
        # under torchrun each process embeds on its own GPU (its CUDA tensors are there), not on
        # onnxruntime's GPU 0
        from retrieval import onnx_providers
        both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert onnx_providers(both) == ["CPUExecutionProvider"]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
        (name, options), cpu = onnx_providers(both, max_batch=64)
        assert (name, options["device_id"], cpu) == ("CUDAExecutionProvider", 2,
                                                     "CPUExecutionProvider")
        # the recogniser's arena is bounded by what its chunks need
        assert options["gpu_mem_limit"] == (512 + 16 * 64) * 2 ** 20
        # never a silent CPU fallback
        with pytest.raises(ValueError, match="no CUDA provider.*onnxruntime-gpu.*arcface-device"):
            onnx_providers(["CPUExecutionProvider"])

    def test_a_cuda_provider_that_does_not_load_is_an_error(self, toy_root):
        """Asked for, listed, not loaded (here: a CPU build): what the session runs on is checked,
        not what onnxruntime lists."""
        from retrieval import ArcFace
        face = ArcFace(os.path.join(toy_root, "toy", "arcface.onnx"),
                       providers=[("CUDAExecutionProvider", {"device_id": 0}),
                                  "CPUExecutionProvider"])
        with pytest.raises(ValueError, match="could not load it.*--arcface-device cpu"):
            face.session

    def test_fixed_batch_graph_is_fed_chunks_of_its_batch(self, tmp_path, monkeypatch):
        """The chunking that the CPU and the GPU (IO binding) paths share: full chunks, the last
        one padded for a fixed-batch graph, and at most max_batch crops a call."""
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
        # the fixed graph's three chunks, then the dynamic graph's one call
        assert sizes == [2, 2, 2, 5]
        # at most max_batch crops a call (--arcface-batch): 2 + 2 + 1, unpadded
        capped = ArcFace(_onnx_model(str(tmp_path / "dyn.onnx"), weight=W), max_batch=2)
        assert torch.allclose(capped.embed(imgs), dyn.embed(imgs), atol=1e-5)
        assert sizes[-4:] == [2, 2, 1, 5]  # then the uncapped graph's one call

    def test_arcface_bad_models(self, tmp_path):
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

    def test_arcface_pickles_without_session(self, tmp_path):
        import pickle
        from retrieval import ArcFace
        face = ArcFace(_onnx_model(str(tmp_path / "m.onnx")))
        face.embed(torch.zeros(1, 3, 112, 112, dtype=torch.uint8))
        clone = pickle.loads(pickle.dumps(face))
        assert clone._session is None
        assert clone.embed(torch.zeros(2, 3, 112, 112, dtype=torch.uint8)).shape == (2, 3)

    def test_select_rule_cases(self):
        """Passing candidates fill the slots in the order of their priority; too few: slot j takes
        the passing one floor(draw_j * passing) again; none: the N most similar; one pass over a
        batch equals the rule image by image."""
        from retrieval import select, selection_counts
        # candidates: similar, similar, opposite (rejected at -0.5), orthogonal (passes)
        sim = torch.tensor([0.9, 0.8, -1.0, 0.0])
        priority = torch.tensor([0.7, 0.2, 0.0, 0.5])  # candidate 2 first, were it passing
        assert select(sim, 3, -0.5, priority, torch.rand(3)).tolist() == [1, 3, 0]
        # 3 pass for 5 slots: slots 3, 4 take the passing ones 0 and 2 of [1, 3, 0] again
        draw = torch.tensor([0.9, 0.9, 0.9, 0.1, 0.7])
        assert select(sim, 5, -0.5, priority, draw).tolist() == [1, 3, 0, 1, 0]
        assert select(sim, 2, 0.5, priority, draw[:2]).tolist() == [1, 0]  # only the similar pass
        bad = torch.tensor([-0.9, -0.6, -0.7])  # none passes: the N most similar are kept
        assert select(bad, 2, -0.5, torch.rand(3), torch.rand(2)).tolist() == [1, 2]
        sims = torch.stack([sim, torch.tensor([-0.6, -0.9, -0.7, -0.8])])
        batch = select(sims, 4, -0.5, torch.stack([priority] * 2), torch.stack([draw[:4]] * 2))
        assert batch.tolist() == [[1, 3, 0, 1], [0, 2, 3, 1]]
        counts = selection_counts(sims, 4, -0.5)
        assert counts.tolist() == [8, 1 + 4, 1, 1]  # candidates, rejected, reused, fallbacks

    def test_a_candidate_kept_again_is_another_view(self):
        """3 of 12 candidates pass for 8 slots: every slot holds one of the 3 crops, and no two of
        the 8 augmented views are the same image (the reuses take fresh, jittered parameters)."""
        from crops import MultiCrop, batch_views, collate, take
        from retrieval import select
        mc = MultiCrop(32, 16, n_local=8, n_candidates=12)
        torch.manual_seed(0)
        rs = np.random.RandomState(0)
        batch = collate([mc(Image.fromarray(rs.randint(0, 256, (60, 50, 3), np.uint8)))
                         for _ in range(2)])
        for p in ("jitter", "gray"):  # the worst case: no random colour op on the candidates
            batch["local_params"][p][:] = False
        batch["local_params"]["sigma"][:] = 0.0
        sim = torch.tensor([1.0] * 3 + [-1.0] * 9).expand(2, 12)
        keep = select(sim, 8, -0.5, batch["priority"], batch["reuse"])
        assert (keep < 3).all() and all(len(set(row.tolist())) == 3 for row in keep)
        crops, params = take(mc.crops(batch)[1], batch["local_params"], keep,
                             batch["spare_params"])
        assert torch.equal(crops, mc.crops(batch)[1][torch.arange(2)[:, None], keep])
        views = batch_views(crops, params).flatten(2)  # (B, N, 3 * 16 * 16)
        for row in views:
            assert torch.cdist(row, row).add(torch.eye(8) * 1e9).min() > 0
        first = torch.tensor([[len(set(r[:j + 1].tolist())) > len(set(r[:j].tolist()))
                               for j in range(8)] for r in keep])
        assert torch.equal(params["jitter"], ~first)  # the first use keeps its own parameters

    def test_mean_similarity_over_globals(self):
        from retrieval import similarity
        g = _unit([1, 0], [0, 1])
        assert torch.allclose(similarity(g, _unit([1, 0])), torch.tensor([0.5]))

    @pytest.mark.slow
    def test_broken_arcface_is_one_line_error(self, tmp_path, toy_root):
        broken = tmp_path / "arc.onnx"
        broken.write_bytes(b"nope" * 100)
        code, out, err = run_script("pretrain.py", "--data", os.path.join(toy_root, "toy", "ms1m"),
                                    "--arcface", str(broken), "--out", str(tmp_path / "run"),
                                    "--arch", "vit_tiny")
        assert code != 0 and "arc.onnx" in last_line(err) and "Traceback" not in err


def _eq_1_to_4(zt, zs, P, tau_t, tau_s):
    """Eq. 1-4 with explicit loops in float64 numpy."""
    zt, zs, P = (np.asarray(a, np.float64) for a in (zt, zs, P))

    def norm(a):
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    def softmax(a):
        return np.exp(a - a.max()) / np.exp(a - a.max()).sum()
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


class TestLoss:
    """loss.py: Eq. 1-4, Sinkhorn, the projector, EMA and schedules."""

    def test_prototype_loss_matches_equations(self):
        from loss import PrototypeLoss
        torch.manual_seed(0)
        crit = PrototypeLoss(n_prototypes=7, dim=5, tau_teacher=0.3, tau_student=0.5)
        zt, zs = torch.randn(3, 2, 5), torch.randn(3, 4, 5)
        loss, stats = crit(zt, zs)
        expected = _eq_1_to_4(zt, zs, crit.prototypes.detach(), 0.3, 0.5)
        assert abs(loss.item() - expected) < 1e-5 and abs(stats["loss"] - expected) < 1e-5
        assert 0 < stats["mean_entropy"] <= math.log(7) + 1e-6
        assert 1 <= stats["prototypes_used"] <= 7
        bound = 1 / math.sqrt(5)
        assert crit.prototypes.abs().max() <= bound

    def test_prototype_loss_stays_fp32_under_bf16_autocast(self):
        from loss import PrototypeLoss
        torch.manual_seed(0)
        crit = PrototypeLoss(n_prototypes=64, dim=16, tau_teacher=0.025, tau_student=0.1)
        zt, zs = torch.randn(4, 2, 16), torch.randn(4, 3, 16)
        expected = _eq_1_to_4(zt, zs, crit.prototypes.detach(), 0.025, 0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = crit(zt, zs)
            bf16_cosines = F.normalize(zs, dim=-1) @ F.normalize(crit.prototypes, dim=-1).T
        # what autocast does to a matmul of fp32 tensors
        assert bf16_cosines.dtype == torch.bfloat16
        assert loss.dtype == torch.float32 and abs(loss.item() - expected) < 1e-5

    def test_sinkhorn_equipartitions_targets(self):
        from loss import PrototypeLoss, sinkhorn
        torch.manual_seed(0)
        p = torch.softmax(torch.randn(64, 8) * 3, -1)
        q = sinkhorn(p, iterations=50)
        # still one distribution per sample
        assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-5)
        # each prototype gets n / K
        assert torch.allclose(q.sum(0), torch.full((8,), 8.0), atol=1e-3)
        assert (sinkhorn(p).sum(0) - 8).abs().max() < (p.sum(0) - 8).abs().max()
        crit = PrototypeLoss(8, 5, sinkhorn=True)
        loss, stats = crit(torch.randn(4, 2, 5), torch.randn(4, 3, 5))
        assert math.isfinite(loss.item())

    def test_gradients_reach_student_projector_prototypes_not_teacher(self):
        import pretrain
        args = pretrain.get_args(["--arch", "vit_tiny", "--n-prototypes", "16", "--out-dim", "8",
                                  "--drop-path", "0"])
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

    def test_projector_batch_norm_separates_near_identical_features(self):
        from loss import ProjectionHead
        torch.manual_seed(0)
        # 16 nearly equal features, as a fresh ViT gives
        x = torch.randn(1, 32) + 1e-2 * torch.randn(16, 32)
        off_diagonal = ~torch.eye(16, dtype=torch.bool)

        def cosines(z):
            return (F.normalize(z, dim=-1) @ F.normalize(z, dim=-1).T)[off_diagonal]
        plain, bn = ProjectionHead(32, 8, hidden_dim=64), ProjectionHead(32, 8, batch_norm=True,
                                                                         hidden_dim=64)
        assert cosines(plain(x)).min() > 0.99
        # standardised over the batch: the images come apart
        assert cosines(bn(x)).abs().mean() < 0.5
        assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in bn.modules()) == 2
        # without the option, the layout (and the keys of existing checkpoints) is the paper's 3
        # linear layers
        assert list(plain.state_dict()) == [f"mlp.{i}.{p}" for i in (0, 2, 4)
                                            for p in ("weight", "bias")]
        # the documented signature: ProjectionHead(in_dim, out_dim, hidden_dim), the option after it
        positional = ProjectionHead(32, 8, 64)
        assert [m.out_features for m in positional.mlp
                if isinstance(m, torch.nn.Linear)] == [64, 64, 8]
        assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in positional.modules())

    def test_ema_and_schedules(self):
        from loss import cosine_schedule, ema_update, momentum_schedule, weight_decay_schedule
        t, s = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        before = t.weight.detach().clone()
        ema_update(t, s, 0.9)
        assert torch.allclose(t.weight, 0.9 * before + 0.1 * s.weight)
        # §3.3: 2e-4 rising over 2 epochs to 1e-3, then cosine to 1e-6 over the other 18 (10 steps
        # per epoch)

        def lr(step):
            return cosine_schedule(step, 200, 1e-3, 1e-6, 20, 2e-4)
        assert lr(0) == pytest.approx(2e-4)
        assert lr(10) == pytest.approx(6e-4)
        assert lr(20) == pytest.approx(1e-3)
        assert lr(110) == pytest.approx((1e-3 + 1e-6) / 2) and lr(200) == pytest.approx(1e-6)
        # MSN's msn_train.py: momentum linear from 0.996 by 0.004 / (1.25 x 100) a step
        assert momentum_schedule(0, 100) == pytest.approx(0.996)
        assert momentum_schedule(50, 100) == pytest.approx(0.9976)
        assert momentum_schedule(100, 100) == pytest.approx(0.9992)
        # weight decay 0.04 -> 0.4 by cosine over 125 steps: at step 100, 0.4 - 0.18 * (1 + cos(0.8
        # pi))
        assert weight_decay_schedule(0, 100) == pytest.approx(0.04)
        assert weight_decay_schedule(100, 100) == pytest.approx(0.365623, abs=1e-6)
        assert weight_decay_schedule(125, 100) == pytest.approx(0.4)
        # --schedules dino (main_dino.py): both cosine over the run itself
        import pretrain
        # 10 epochs of 10 steps at a global batch of 256
        sizes = ["--epochs", "10", "--batch-size", "256"]
        steps_per_epoch, total, at = pretrain.schedules(
            pretrain.get_args(["--schedules", "dino", *sizes]), 2560, 1)
        assert (steps_per_epoch, total) == (10, 100)
        assert at(0)["momentum"] == pytest.approx(0.996)
        assert at(0)["weight_decay"] == pytest.approx(0.04)
        assert at(50)["momentum"] == pytest.approx(0.998)
        assert at(50)["weight_decay"] == pytest.approx(0.22)
        assert at(100)["momentum"] == pytest.approx(1.0)
        assert at(100)["weight_decay"] == pytest.approx(0.4)
        msn = pretrain.schedules(pretrain.get_args(sizes), 2560, 1)[2]
        assert msn(100)["momentum"] == pytest.approx(0.9992)
        assert msn(100)["weight_decay"] == pytest.approx(0.365623, abs=1e-6)


def _write_rec(folder, records):
    """An independent dmlc RecordIO writer: records = {key: payload}."""
    magic = struct.pack("<I", 0xCED7230A)
    os.makedirs(folder, exist_ok=True)
    rec_path, idx_path = os.path.join(folder, "train.rec"), os.path.join(folder, "train.idx")
    with open(rec_path, "wb") as rec, open(idx_path, "w") as idx:
        for key in sorted(records, reverse=True):  # keys in any order in the index
            idx.write(f"{key}\t{rec.tell()}\n")
            payload = records[key]
            pieces = payload.split(magic) if len(payload) % 4 == 0 else [payload]
            for k, piece in enumerate(pieces):
                flag = 0 if len(pieces) == 1 else 1 if k == 0 else 3 if k == len(pieces) - 1 else 2
                rec.write(magic + struct.pack("<I", flag << 29 | len(piece)) + piece
                          + b"\0" * (-len(piece) % 4))


class TestData:
    """data.py: RecordIO and image folders, unreadable items."""

    def test_recordio_round_trip(self, tmp_path):
        from data import RecordIO
        magic = struct.pack("<I", 0xCED7230A)
        img = _png((10, 200, 30))
        img += b"\0" * (-len(img) % 4)  # PNG readers ignore trailing bytes
        header = struct.pack("<IfQQ", 2, 0, 0, 0) + np.array([3, 5], np.float32).tobytes()
        # magic inside: split
        rec1 = struct.pack("<IfQQ", 0, 7.0, 0, 0) + img + magic + b"tail" + magic + b"more"
        rec2 = struct.pack("<IfQQ", 3, 0, 0,
                           0) + np.array([1.5, 2.5, 3.5], np.float32).tobytes() + _png((0, 0, 255))
        ident = struct.pack("<IfQQ", 2, 0, 0, 0) + np.array([1, 3], np.float32).tobytes()
        _write_rec(str(tmp_path / "ms1m"), {0: header, 1: rec1, 2: rec2, 3: ident, 4: ident})
        ds = RecordIO(str(tmp_path / "ms1m"))
        assert len(ds) == 2  # keys 1, 2: images; 3, 4: identity records
        assert ds[0].getpixel((0, 0)) == (10, 200, 30) and ds[1].getpixel((3, 3)) == (0, 0, 255)
        assert ds.labels(0).tolist() == [7.0] and ds.labels(1).tolist() == [1.5, 2.5, 3.5]
        from data import read_recordio_record, unpack_payload
        with open(tmp_path / "ms1m" / "train.rec", "rb") as f:
            offsets = {int(k): int(v) for k, v in (l.split()
                                                   for l in open(tmp_path / "ms1m" / "train.idx"))}
            assert read_recordio_record(f, offsets[1]) == rec1
            assert unpack_payload(read_recordio_record(f, offsets[1]))[1].endswith(magic + b"more")
        # no header record: every key is an image
        _write_rec(str(tmp_path / "flat"), {5: rec2, 9: rec2})
        assert len(RecordIO(str(tmp_path / "flat" / "train.rec"))) == 2

    def test_corrupt_images_are_skipped(self, tmp_path):
        import data
        folder = tmp_path / "imgs" / "sub"
        folder.mkdir(parents=True)
        Image.new("RGB", (40, 40), (1, 2, 3)).save(folder / "a.jpg")
        (folder / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
        (folder / "c.txt").write_text("not an image")
        ds = data.ImageFolder(str(tmp_path / "imgs"))
        assert len(ds) == 2 and ds[0] is not None and ds[1] is None
        from crops import MultiCrop, collate
        views = data.Views(ds, MultiCrop(32, 16, n_local=2), seed=0)
        batch, names = data.collate([views[0], views[1]], stack=collate)
        assert names == [str(folder / "b.jpg")] and batch["image"].shape[0] == 1

    @pytest.mark.slow
    def test_missing_dataset_is_one_line_error(self, tmp_path):
        code, out, err = run_script("pretrain.py", "--data", "ms1m", "--data-root", str(tmp_path))
        assert code != 0 and err.strip().count("\n") == 0 and "ms1m" in err and "train.rec" in err

    @pytest.mark.slow
    def test_truncated_recordio_is_a_clear_error_on_open(self, tmp_path):
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

    @pytest.mark.slow
    def test_corrupt_recordio_record_is_skipped_counted_and_listed(self, tmp_path):
        import data
        import pretrain
        _rec_of_pngs(tmp_path / "ms1m", 130)
        rec = tmp_path / "ms1m" / "train.rec"
        offsets = {int(k): int(v) for k, v in (l.split()
                                               for l in open(tmp_path / "ms1m" / "train.idx"))}
        raw = bytearray(rec.read_bytes())
        # the 2nd record in the file: outside the sample checked
        raw[offsets[129]:offsets[129] + 4] = b"\0\0\0\0"
        rec.write_bytes(bytes(raw))
        ds = data.RecordIO(str(tmp_path / "ms1m"))
        assert ds[ds.keys.index(129)] is None and ds[ds.keys.index(128)] is not None
        code, out, err = run_script("data.py", str(tmp_path / "ms1m"), "--check-all")
        assert code == 1 and "bad magic" in err and "key 129" in err
        out_dir = tmp_path / "run"
        pretrain.main(_tiny_pretrain_args(str(tmp_path / "ms1m"), str(out_dir), "--epochs", "1",
                                          "--workers", "1",
                                          "--log-every", "32"))
        assert json.loads(open(out_dir / "log.jsonl").readlines()[-1])["skipped"] == 1
        assert (out_dir / "skipped.txt").read_text() == f"{rec}:129\n"


def _noise_pack(folder, n, broken=()):
    """A RecordIO pack of n random 16 x 16 images, keys 1..n; the keys in `broken` hold bytes that
    are no image."""
    rng = np.random.default_rng(0)
    records = {}
    for key in range(1, n + 1):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).save(buf, "PNG")
        body = b"not an image" if key in broken else buf.getvalue()
        records[key] = struct.pack("<IfQQ", 0, float(key), 0, 0) + body
    _write_rec(folder, records)


class TestExport:
    """data.py --export: the pack out to StyleGAN2's dataset_tool.py (§3.4)."""

    def test_export_writes_each_records_image_resized_and_lists_the_unreadable(self, tmp_path):
        from data import RecordIO, export, export_path
        _noise_pack(str(tmp_path / "ms1m"), 12, broken={5})
        pack = RecordIO(str(tmp_path / "ms1m"))
        out = str(tmp_path / "out")
        written, kept, skipped = export(pack, out, {"source": "test"}, size=32, workers=0)
        assert (written, kept) == (11, 0) and skipped == [pack.rec + ":5"]
        assert (tmp_path / "out" / "skipped.txt").read_text() == pack.rec + ":5\n"
        for i in range(12):
            path = export_path(out, i)
            if i == 4:  # key 5
                assert not os.path.exists(path)
                continue
            expected = np.asarray(pack[i].resize((32, 32), Image.BICUBIC))
            assert np.array_equal(np.asarray(Image.open(path)), expected), i

    @pytest.mark.slow
    def test_n_images_exports_what_pretraining_draws(self, tmp_path):
        from data import RecordIO, export_path, random_subset
        _noise_pack(str(tmp_path / "ms1m"), 30)
        pack = RecordIO(str(tmp_path / "ms1m"))
        drawn = random_subset(pack, 7, seed=3)  # what pretrain.py --n-images 7 --seed 3 trains on
        code, out, err = run_script("data.py", str(tmp_path / "ms1m"), "--export",
                                    str(tmp_path / "out"), "--n-images", "7", "--seed", "3",
                                    "--size", "16", "--workers", "0")
        assert code == 0 and "7 PNGs written" in out, err
        for i in range(7):
            got = np.asarray(Image.open(export_path(str(tmp_path / "out"), i)))
            assert np.array_equal(got, np.asarray(drawn[i])), i  # 16 px: no resampling
        assert len(set(drawn.indices)) == 7 and drawn.indices != list(range(7))

    def test_an_interrupted_export_resumes_without_rewriting_and_refuses_other_settings(
            self, tmp_path):
        from data import RecordIO, export, export_path
        _noise_pack(str(tmp_path / "ms1m"), 10)
        pack = RecordIO(str(tmp_path / "ms1m"))
        out = str(tmp_path / "out")
        export(pack, out, {"source": "test"}, size=16, workers=0)
        paths = [export_path(out, i) for i in range(10)]
        for p in paths:
            os.utime(p, (1, 1))  # a mark a rewrite would erase
        for p in paths[6:]:  # as if killed after 6 images
            os.remove(p)
        written, kept, skipped = export(pack, out, {"source": "test"}, size=16, workers=0)
        assert (written, kept, skipped) == (4, 6, [])
        assert [os.stat(p).st_mtime == 1 for p in paths] == [True] * 6 + [False] * 4
        with pytest.raises(ValueError, match="size 32 \\(there: 16\\)"):
            export(pack, out, {"source": "test"}, size=32, workers=0)

    def test_an_image_folder_opens_no_file_to_start(self, tmp_path):
        from data import ImageFolder
        for d in range(3):
            os.makedirs(tmp_path / f"{d:03d}")
            for i in range(5):
                (tmp_path / f"{d:03d}" / f"{i}.png").write_bytes(b"")  # not images at all
        ds = ImageFolder(str(tmp_path))
        assert len(ds) == 15 and ds[0] is None  # unreadable only when read


class TestToyWorld:
    """toyfaces.py: the toy world, its formats and its recogniser."""

    @pytest.mark.slow
    def test_generating_the_toy_world_leaves_the_callers_rng_as_it_was(self, toy_generation):
        # pretrain.py seeds, then finds or generates the world: a seeded run must not depend on
        # which
        _, after, reseeded = toy_generation
        assert torch.equal(after, reseeded)

    @pytest.mark.slow
    def test_processes_of_one_job_generate_the_toy_world_once_per_node(self, tmp_path):
        # torchrun's processes all call ensure_world on first use: one per node writes, the others
        # wait for it
        torch.multiprocessing.spawn(_ensure_world_worker, args=(str(tmp_path / "one"), [0, 1]),
                                    nprocs=2)
        assert len((tmp_path / "one" / "writers").read_text().split()) == 1
        # two nodes sharing the filesystem: both LOCAL_RANK 0 write, one copy is renamed into place
        torch.multiprocessing.spawn(_ensure_world_worker, args=(str(tmp_path / "two"), [0, 0]),
                                    nprocs=2)
        assert len((tmp_path / "two" / "writers").read_text().split()) == 2
        # no temporary folder left
        assert sorted(os.listdir(tmp_path / "two")) == ["toy", "writers"]

    @pytest.mark.slow
    def test_toy_world_reads_back_through_the_real_readers(self, toy_root):
        import data
        from finetune_align import read_300w
        from data import read_celeba
        from data import read_rafdb
        import toyfaces
        world = os.path.join(toy_root, "toy")
        ms1m = data.pretrain_dataset(os.path.join(world, "ms1m"))
        assert isinstance(ms1m, data.RecordIO) and len(ms1m) == 120
        # 10 images per identity
        assert ms1m[0].size == (112, 112) and int(ms1m.labels(119)[0]) == 11
        with open(os.path.join(world, "ms1m", "property")) as f:
            assert f.read() == "12,112,112"
        celeba = read_celeba(os.path.join(world, "celeba"))
        assert celeba["attributes"] == toyfaces.ATTRIBUTES
        assert (len(celeba["train"]), len(celeba["val"]), len(celeba["test"])) == (96, 12, 12)
        raf = read_rafdb(os.path.join(world, "rafdb"))
        assert len(raf["train"]) == 72
        assert len(raf["test"]) == 18
        assert os.path.isfile(raf["test"][0][0])
        w300 = read_300w(os.path.join(world, "300w"))
        flags = [int(t[1][1][0]) for t in w300["test"]]
        assert len(w300["train"]) > 0 and 0 in flags and 1 in flags
        img = Image.open(w300["train"][0][0])
        pts = w300["train"][0][1][0]
        assert pts.shape == (68, 2) and (pts > 0).all() and (pts < img.size[0]).all()

    def test_toy_world_is_deterministic(self, tmp_path):
        import toyfaces
        for d in ("a", "b"):
            toyfaces.write_celeba(str(tmp_path / d), 12, seed=3, workers=1)
            toyfaces.write_recordio(str(tmp_path / d / "ms1m"), [3, 2], seed=3, workers=1)
        for name in ("list_attr_celeba.txt", "img_align_celeba/000007.jpg", "ms1m/train.rec",
                     "ms1m/train.idx"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    def test_toy_landmarks_sit_on_the_drawn_face(self):
        import toyfaces
        checked = 0
        for i in range(60):
            s = toyfaces.make_image(0, "300w" if i % 2 else "ibug", i, i)
            lm, (x0, y0, x1, y1) = s["landmarks"], s["box"]
            assert (lm[:, 0] >= x0 - 1).all() and (lm[:, 0] <= x1 + 1).all()
            assert (lm[:, 1] >= y0 - 1).all() and (lm[:, 1] <= y1 + 1).all()
            # iBUG order under any in-plane rotation: the jaw runs from image-left to image-right
            # through the chin
            # and the eyes in the face frame (eye axis = the face's x axis)
            axis = (lm[45] - lm[36]) / np.linalg.norm(lm[45] - lm[36])
            assert (lm[16] - lm[0]) @ axis > 0
            assert (lm[42] - lm[39]) @ axis > 0
            assert (lm[26] - lm[17]) @ axis > 0
            down = np.array([-axis[1], axis[0]])
            assert (lm[8] - lm[27]) @ down > 0 and (lm[57] - lm[51]) @ down > 0
            gray = np.asarray(s["image"]).astype(float).mean(-1)
            if s["attributes"][toyfaces.ATTRIBUTES.index("Blurry")]:
                continue
            # the pupil is drawn dark at the centre of the eye points
            for eye in (lm[36:42], lm[42:48]):
                # a squint: the lids cover most of the pupil
                if np.linalg.norm(eye[1] - eye[5]) < 2.5:
                    continue
                cx, cy = np.round(eye.mean(0)).astype(int)
                assert gray[cy - 1:cy + 2, cx - 1:cx + 2].min() < 60, i
            checked += 1
        assert checked > 30

    def test_toy_expressions_and_attributes_all_occur(self):
        import toyfaces
        samples = [toyfaces.make_image(1, "celeba", i, i // 3) for i in range(400)]
        assert {s["expression"] for s in samples} == set(range(7))
        attrs = np.array([s["attributes"] for s in samples])
        assert attrs.shape[1] == len(toyfaces.ATTRIBUTES) >= 20
        assert (attrs.mean(0) > 0.02).all() and (attrs.mean(0) < 0.98).all()  # none constant

    def test_toy_expressions_are_not_one_pixel_apart(self):
        """No pixel tells an expression from the others: for every pair of classes each pixel's
        values overlap, and the best one-pixel threshold classifier of one class against the rest
        stays far from perfect (balanced accuracy; 0.5 is chance)."""
        import itertools
        import toyfaces
        imgs = {}
        for i in range(300):
            s = toyfaces.make_image(2, "rafdb", i, i)
            imgs.setdefault(s["expression"],
                            []).append(np.asarray(s["image"], np.float32).reshape(-1))
        stacks = {c: np.stack(v) for c, v in imgs.items()}
        assert len(stacks) == 7
        for a, b in itertools.combinations(stacks, 2):
            low = np.maximum(stacks[a].min(0), stacks[b].min(0))
            high = np.minimum(stacks[a].max(0), stacks[b].max(0))
            assert (low <= high).all(), (a, b)
        for c, pos in stacks.items():
            neg = np.concatenate([v for k, v in stacks.items() if k != c])
            middle = (pos.mean(0) + neg.mean(0)) / 2
            balanced = ((pos > middle).mean(0) + (neg <= middle).mean(0)) / 2
            assert np.maximum(balanced, 1 - balanced).max() < 0.85, c

    def test_toy_expressions_are_visible_at_64px(self):
        import itertools
        import toyfaces
        # at the weakest intensity (0.6), every pair of expressions moves some landmark by >= 0.1
        # face
        # half-widths: about 2 px in a 64 px RAF-DB-framed image (the miniature's fine-tuning size)
        for ident in range(20):
            t = toyfaces.identity_traits(0, ident)
            points = {e: toyfaces.landmarks_canonical(t, toyfaces.expression_look(e, 0.6, 0.5))
                      for e in toyfaces.EXPRESSIONS}
            gaps = [np.abs(points[a] - points[b]).max() for a,
                    b in itertools.combinations(points, 2)]
            assert min(gaps) >= 0.1, (ident, min(gaps))

    @pytest.mark.slow
    def test_toy_recognizer_runs_with_dynamic_batch(self, toy_root):
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


class TestPretrain:
    """pretrain.py: steps, resume, interruption, processes, collapse (§3.3)."""

    def test_bf16_flag_sets_the_networks_precision_in_a_training_step(self):
        import pretrain
        args = pretrain.get_args(["--arch", "vit_tiny", "--n-prototypes", "16", "--out-dim", "8"])
        model, teacher = pretrain.build_models(args)
        opt = torch.optim.AdamW(pretrain.param_groups(model))
        g, l = torch.randn(2, 2, 3, 32, 32), torch.randn(2, 3, 3, 16, 16)
        seen = []
        for net in (teacher, model.student):
            net.backbone.blocks[0].attn.qkv.register_forward_hook(lambda m, i,
                                                                  out: seen.append(out.dtype))
        for bf16 in (True, False):
            seen.clear()
            stats = pretrain.training_step(model, teacher, opt, g, l,
                                           at=dict(lr=1e-4, weight_decay=0.04, momentum=0.996),
                                           clip_grad=3.0, bf16=bf16)
            assert seen == [torch.bfloat16
                            if bf16 else torch.float32] * 2 and math.isfinite(stats["loss"])
        # autocast: the weights stay fp32
        assert all(p.dtype == torch.float32 for p in model.parameters())

    @pytest.mark.slow
    def test_pretrain_resume_gives_the_same_weights(self, tmp_path, image_folder, monkeypatch):
        import run
        import vit
        import shutil
        import pretrain
        shutil.copytree(image_folder, tmp_path / "faces")
        # image 12 of 13: skipped, counted
        (tmp_path / "faces" / "zz.jpg").write_bytes(b"\xff\xd8\xff garbage")
        image_folder = str(tmp_path / "faces")
        pretrain.main(_tiny_pretrain_args(image_folder, str(tmp_path / "full")))
        real_save, calls = run.save_atomic, []

        def crash_after_first_checkpoint(obj, path):
            real_save(obj, path)
            calls.append(path)
            if path.endswith("teacher_backbone.pth"):
                raise KeyboardInterrupt("killed")
        monkeypatch.setattr(run, "save_atomic", crash_after_first_checkpoint)
        with pytest.raises(KeyboardInterrupt):
            pretrain.main(_tiny_pretrain_args(image_folder, str(tmp_path / "cut"), "--save-every",
                                              "2"))
        assert torch.load(str(tmp_path / "cut" / "checkpoint.pth"), weights_only=True)["step"] == 2
        monkeypatch.setattr(run, "save_atomic", real_save)
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
        assert vit.load_pretrained(vit.vit_tiny(),
                                   str(tmp_path / "full" / "checkpoint.pth")) == ([], [])
        log = [json.loads(l) for l in open(tmp_path / "full" / "log.jsonl")]
        assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
        assert all(math.isfinite(r["loss"]) and r["mean_entropy"] <= math.log(32) + 1e-6
                   for r in log)
        # the corrupt image, drawn in at least one of the two epochs, counted once across the resume
        # and listed
        drawn = []
        for epoch in (0, 1):
            sampler = torch.utils.data.DistributedSampler(range(13), num_replicas=1, rank=0,
                                                          seed=0, drop_last=True)
            sampler.set_epoch(epoch)
            drawn.append(12 in list(sampler)[:12])
        resumed = [json.loads(l) for l in open(tmp_path / "cut" / "log.jsonl")]
        assert any(drawn) and log[-1]["skipped"] == resumed[-1]["skipped"] == 1
        # the rewound steps are not logged twice
        assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
        for folder in ("full", "cut"):
            listed = (tmp_path / folder / "skipped.txt").read_text()
            assert listed == str(tmp_path / "faces" / "zz.jpg") + "\n"

    @pytest.mark.slow
    def test_pretrain_on_a_random_subset(self, tmp_path, image_folder):
        """--n-images (ProS-1M-real): that many distinct images, drawn by the seed, and a run over
        them alone."""
        import data
        import pretrain
        images = data.ImageFolder(image_folder)
        a, b, c = (data.random_subset(images, 8, s) for s in (0, 0, 1))
        assert len(a) == 8 and len(set(a.indices)) == 8 and a.indices == sorted(a.indices)
        assert a.indices == b.indices and a.indices != c.indices
        assert np.array_equal(np.asarray(a[3]), np.asarray(images[a.indices[3]]))
        with pytest.raises(ValueError, match="expected 1 to 12"):
            data.random_subset(images, 13, 0)
        pretrain.main(_tiny_pretrain_args(image_folder, str(tmp_path / "r"), "--n-images", "8",
                                          "--epochs", "1"))
        log = [json.loads(l) for l in open(tmp_path / "r" / "log.jsonl")]
        assert [r["step"] for r in log] == [1, 2]  # 8 images in batches of 4

    @pytest.mark.slow
    def test_pretrain_batch_with_no_readable_image_is_one_line_error(self, tmp_path):
        for i in range(4):
            (tmp_path / f"{i}.jpg").write_bytes(b"\xff\xd8\xff garbage")
        argv = _tiny_pretrain_argv(str(tmp_path), str(tmp_path / "run"), "--workers", "1")
        code, _, err = run_script("pretrain.py", *argv)
        assert code != 0
        assert "Traceback" not in err
        assert str(tmp_path) in last_line(err)
        assert "unreadable" in last_line(err)

    @pytest.mark.slow
    def test_pretrain_weights_do_not_depend_on_workers(self, tmp_path, image_folder):
        """Loading in the training process (--workers 0) must not reseed the RNG that drop-path
        draws from."""
        import pretrain
        runs = {}
        for w in ("0", "1"):
            pretrain.main(_tiny_pretrain_args(image_folder, str(tmp_path / w), "--workers", w,
                                              "--epochs", "1"))
            runs[w] = torch.load(str(tmp_path / w / "checkpoint.pth"), weights_only=True)["student"]
        assert runs["0"].keys() == runs["1"].keys()
        for k in runs["0"]:
            assert torch.equal(runs["0"][k], runs["1"][k]), k

    @pytest.mark.slow
    def test_pretrain_with_retrieval_logs_reject_rate(self, tmp_path, toy_root):
        import pretrain
        args = _tiny_pretrain_args(os.path.join(toy_root, "toy", "ms1m"), str(tmp_path / "r"),
                                   "--arcface", os.path.join(toy_root, "toy", "arcface.onnx"),
                                   "--n-candidates", "4", "--face-threshold", "1.5", "--epochs",
                                   "1")
        # no cosine reaches 1.5: every candidate is rejected, every image falls back
        pretrain.main(args)
        log = [json.loads(l) for l in open(tmp_path / "r" / "log.jsonl")]
        assert len(log) == 30 and all(r["reject_rate"] == 1.0 for r in log)
        assert all(r["all_rejected"] == args.batch_size * args.log_every for r in log)

    def test_a_step_that_does_not_log_never_waits_for_the_device(self):
        """Crop, retrieve (the rule; a stand-in recogniser), augment, Eq. 1-4, fused AdamW, EMA:
        no value read and no size that depends on the data, counted on a CPU (run.HostSyncs),
        where a planted .item() and boolean indexing are counted."""
        import run
        assert _step_syncs(torch.device("cpu")) == {}
        x = torch.rand(4)
        with run.HostSyncs() as planted:
            x[x > 0].sum().item()
        assert planted.ops == {"aten::index": 1, "aten::_local_scalar_dense": 1}

    @pytest.mark.gpu
    @gpu
    def test_gpu_step_never_waits_for_the_device(self):
        assert _step_syncs(torch.device("cuda")) == {}

    @pytest.mark.slow
    def test_two_process_gloo_equals_one_process(self, tmp_path):
        torch.manual_seed(1)
        batch = (torch.randn(4, 2, 3, 32, 32), torch.randn(4, 3, 3, 16, 16))
        single = _one_step(1, 0, batch)
        torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), batch),
                                    nprocs=2)
        ddp = torch.load(str(tmp_path / "ddp.pt"), weights_only=True)
        for a, b in zip(single["stats"], ddp["stats"]):
            for k in a:
                assert a[k] == pytest.approx(b[k], abs=1e-5), k
        for part in ("student", "teacher"):
            for k, v in single[part].items():
                assert torch.allclose(v, ddp[part][k], atol=2e-5), (part, k)

    @pytest.mark.slow
    def test_two_processes_train_as_one_with_the_retrieval(self, tmp_path, toy_root):
        """2 gloo processes of 4 images = 1 of 8, step by step, with --arcface and the
        projector's BatchNorm: the retrieval's random numbers belong to the images (drawn in their
        workers), its counts are summed over the processes."""
        toy = os.path.join(toy_root, "toy")
        argv = ["--arcface", os.path.join(toy, "arcface.onnx"), "--n-candidates", "4",
                "--n-images", "24", "--epochs", "1"]
        one = str(tmp_path / "one")
        import pretrain
        pretrain.main(_tiny_pretrain_args(os.path.join(toy, "ms1m"), one, "--batch-size", "8",
                                          *argv))
        two = str(tmp_path / "two")
        torch.multiprocessing.spawn(_pretrain_process, nprocs=2, args=(
            2, _free_port(), _tiny_pretrain_argv(os.path.join(toy, "ms1m"), two, "--batch-size",
                                                 "4", *argv)))
        rows = [[json.loads(l) for l in open(os.path.join(d, "log.jsonl")) if '"loss"' in l]
                for d in (one, two)]
        assert len(rows[0]) == len(rows[1]) == 3
        for a, b in zip(*rows):
            # AdamW's first steps amplify float noise in tiny gradients: 1e-5 grows to 1e-4
            for k in ("loss", "cross_entropy", "mean_entropy", "reject_rate"):
                assert a[k] == pytest.approx(b[k], abs=1e-5 if a["step"] == 1 else 1e-4), (
                    a["step"], k)
            assert a["all_rejected"] == b["all_rejected"]

    @pytest.mark.slow
    def test_resume_with_other_settings_is_one_line_error(self, tmp_path, image_folder):
        import pretrain
        out = str(tmp_path / "run")
        pretrain.main(_tiny_pretrain_args(image_folder, out, "--epochs", "1"))
        code, _, err = run_script("pretrain.py",
                                  *_tiny_pretrain_argv(image_folder, out, "--arch", "vit_small"))
        assert code != 0
        assert "Traceback" not in err
        assert "checkpoint.pth" in last_line(err)
        assert "--out" in last_line(err)

    @pytest.mark.slow
    def test_resume_with_another_batch_size_or_dataset_names_them(self, tmp_path, image_folder):
        import shutil
        import pretrain
        out = str(tmp_path / "run")
        pretrain.main(_tiny_pretrain_args(image_folder, out, "--epochs", "1"))
        with pytest.raises(ValueError,
                           match=r"batch_size 2 \(there: 4\).*another --out, or delete"):
            pretrain.main(_tiny_pretrain_args(image_folder, out, "--epochs", "1", "--batch-size",
                                              "2"))
        shutil.copytree(image_folder, tmp_path / "other")
        (tmp_path / "other" / "extra.png").write_bytes(open(os.path.join(image_folder, "00.png"),
                                                            "rb").read())
        with pytest.raises(ValueError, match="data .*dataset_images 13 \\(there: 12\\)"):
            pretrain.main(_tiny_pretrain_args(str(tmp_path / "other"), out, "--epochs", "1"))

    @pytest.mark.slow
    def test_a_finished_pretraining_is_said_and_not_retrained(self, tmp_path, image_folder, capsys):
        import pretrain
        out = str(tmp_path / "run")
        pretrain.main(_tiny_pretrain_args(image_folder, out, "--epochs", "1"))
        before = open(os.path.join(out, "log.jsonl")).read()
        capsys.readouterr()
        pretrain.main(_tiny_pretrain_args(image_folder, out, "--epochs", "1"))
        assert "complete (3 steps): nothing to train" in capsys.readouterr().out
        assert open(os.path.join(out, "log.jsonl")).read() == before

    @pytest.mark.slow
    def test_sigterm_during_pretraining_saves_and_resumes_to_the_same_weights(self, tmp_path,
                                                                              image_folder):
        import pretrain

        def argv(out):
            return _tiny_pretrain_argv(image_folder, out, "--epochs", "8", "--workers", "1")
        pretrain.main(pretrain.get_args(argv(str(tmp_path / "full"))))
        cut = tmp_path / "cut"
        code, err = _interrupt("pretrain.py", argv(str(cut)), lambda: len(_log_steps(cut)) >= 2)
        step = torch.load(str(cut / "checkpoint.pth"), weights_only=True)["step"]
        assert code == 128 + 15
        assert f"SIGTERM at step {step}: checkpoint" in err
        assert "resume" in err, err
        assert 2 <= step < 24 and _log_steps(cut) == list(range(1, step + 1))
        pretrain.main(pretrain.get_args(argv(str(cut))))
        assert _log_steps(cut) == list(range(1, 25))
        a, b = (torch.load(str(tmp_path / d / "teacher_backbone.pth"), weights_only=True)
                for d in ("full", "cut"))
        assert all(torch.equal(a[k], b[k]) for k in a)

    @pytest.mark.slow
    def test_sigterm_in_one_process_stops_after_the_current_step(self, tmp_path, image_folder,
                                                                 monkeypatch):
        """Without torchrun no process has to agree: the step in flight is the last, whatever
        --log-every."""
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
            pretrain.main(_tiny_pretrain_args(image_folder, str(tmp_path / "run"), "--log-every",
                                              "100"))
        assert e.value.code == 128 + signal.SIGTERM and len(calls) == 2
        assert torch.load(str(tmp_path / "run" / "checkpoint.pth"), weights_only=True)["step"] == 2

    @pytest.mark.slow
    def test_sigterm_in_one_of_two_processes_stops_both_after_the_step(self, tmp_path,
                                                                      image_folder):
        """One process signalled, both stop after the same step (they agree each step), far
        from a logging step, with the checkpoint of that step."""
        import signal
        out = str(tmp_path / "run")
        torch.multiprocessing.spawn(_signalled_process, nprocs=2, args=(
            2, _free_port(), _tiny_pretrain_argv(image_folder, out, "--log-every", "100",
                                                 "--batch-size", "2")))
        for rank in (0, 1):
            assert open(os.path.join(out, f"exit{rank}")).read() == f"{128 + signal.SIGTERM} 2"
        assert torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["step"] == 2

    @pytest.mark.slow
    def test_kill_9_at_five_moments_then_resume_gives_the_uninterrupted_teacher(self, tmp_path,
                                                                                toy_root):
        argv = ["--data", os.path.join(toy_root, "toy", "ms1m"), "--arch", "vit_tiny",
                "--n-images", "48",
                "--batch-size", "4", "--epochs", "1", "--global-size", "32", "--local-size", "16",
                "--n-local", "2",
                "--n-prototypes", "32", "--out-dim", "16", "--workers", "0"]
        code, out, err = run_script(os.path.join("scripts", "kill_resume.py"), "--kills", "5",
                                    "--dir", str(tmp_path), "--", *argv)
        assert code == 0, out + err
        assert out.count("last checkpoint at "
                         "step") == 5 and "identical to the uninterrupted run's, bit for bit" in out
        assert "strictly increasing" in out

    @pytest.mark.slow
    def test_resume_where_only_rank_0_sees_the_checkpoint(self, tmp_path, image_folder):
        """Rank 0 reads the checkpoint and every process resumes from it: a finished run trains
        nothing on any process (rank 1 alone would train from scratch and wait forever in the first
        collective)."""
        for attempt in ("first", "again"):
            port = _free_port()
            torch.multiprocessing.spawn(_node_local_worker,
                                        args=(2, port, image_folder, str(tmp_path)), nprocs=2)
            if attempt == "first":
                log = open(tmp_path / "rank0" / "log.jsonl").read()
        # nothing retrained, nothing logged twice
        assert open(tmp_path / "rank0" / "log.jsonl").read() == log
        assert not (tmp_path / "rank1_node" / "checkpoint.pth").exists()  # only rank 0 writes

    @pytest.mark.slow
    def test_every_collective_of_a_step_runs_in_a_per_device_backend_group(self, tmp_path,
                                                                           image_folder):
        """DDP's gradient all-reduce, the mean prediction's and Sinkhorn's all-reduces, the logging
        mean, the gather of skipped names (a corrupt image) and rank 0's checkpoint broadcast, all
        in a group whose CPU tensors need their own backend (an NCCL-only group has none: the run
        would stop at its first logging step)."""
        import shutil
        shutil.copytree(image_folder, tmp_path / "faces")
        (tmp_path / "faces" / "zz.jpg").write_bytes(b"\xff\xd8\xff garbage")
        torch.multiprocessing.spawn(_mixed_backend_worker,
                                    args=(2, _free_port(), str(tmp_path / "faces"), str(tmp_path)),
                                    nprocs=2)
        log = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
        # 13 images, a global batch of 8
        assert [r["step"] for r in log] == [1] and log[0]["skipped"] == 1
        assert (tmp_path / "run" / "skipped.txt").read_text().strip().endswith("zz.jpg")

    @pytest.mark.slow
    def test_collapse_is_said_for_a_collapsed_run_and_not_for_a_healthy_one(self, tmp_path, capsys):
        """Twelve identical gray images: under the paper's literal loss the teacher sends the 24
        global views of a batch to 4 or 5 prototypes; with MSN's Sinkhorn and projector BatchNorm
        to 13-15."""
        import pretrain
        for i in range(12):
            Image.new("RGB", (48, 40), (128, 128, 128)).save(tmp_path / f"{i:02d}.png")
        runs = {}
        for name, extra in (("literal", ["--no-sinkhorn", "--no-projector-bn"]), ("msn", [])):
            pretrain.main(_tiny_pretrain_args(str(tmp_path), str(tmp_path / name), "--epochs", "4",
                                              "--batch-size", "12", *extra))
            rows = [json.loads(l) for l in open(tmp_path / name / "log.jsonl")]
            runs[name] = rows, capsys.readouterr().out
        rows, out = runs["literal"]
        assert rows[-1]["state"] == "collapsed"
        assert rows[-1]["prototype_share"] < 0.25
        assert "COLLAPSED" in out
        assert f"teacher predictions on {rows[-1]['prototypes_used']:.0f} prototypes a batch" in out
        rows, out = runs["msn"]
        assert all(r["state"] == "healthy" for r in rows)
        assert "COLLAPSED" not in out and "at the end:" in out
        assert "verdict: not judged: no probe sets" in out  # spread prototypes are no evidence

    @pytest.mark.slow
    def test_an_untrained_teacher_is_judged_not_learned(self, toy_root, tmp_path, capsys):
        """lr 1e-12: the teacher stays its random init, and the probe says so, every epoch and at
        the end, beside the random-init and pixel references."""
        import pretrain
        world = os.path.join(toy_root, "toy")
        pretrain.main(_tiny_pretrain_args(
            os.path.join(world, "ms1m"), str(tmp_path), "--batch-size", "30", "--lr", "1e-12",
            "--warmup-lr", "0", "--min-lr", "0", "--probe-every", "1", "--probe-images", "40",
            "--probe-attr", os.path.join(world, "celeba"), "--probe-expr",
            os.path.join(world, "rafdb")))
        out = capsys.readouterr().out
        probes = [json.loads(l) for l in open(tmp_path / "log.jsonl") if "probe_gain" in l]
        assert [r["step"] for r in probes] == [4, 8]  # 120 images, batch 30, 2 epochs
        assert all(abs(r["probe_gain"]) < 0.01 and r["weight_change"] < 1e-6 for r in probes)
        assert {"attr_linear_auc", "expr_linear_mca", "verify_auc"} <= set(probes[-1])
        assert "probe, teacher / random init / raw pixels: attributes, linear, mean AUC" in out
        assert "verdict: NOT LEARNED: the teacher is within noise of its random init" in out


class TestFinetune:
    """finetune.py: the recipe every task shares (§4.1)."""

    def test_few_shot_sizes_match_the_paper(self):
        from finetune import few_shot_indices
        sizes = {f: len(few_shot_indices(162_770, f, 0)) for f in (0.002, 0.005, 0.01, 0.02)}
        # the paper prints 843 for 0.5%
        assert sizes == {0.002: 325, 0.005: 813, 0.01: 1627, 0.02: 3255}
        assert len(few_shot_indices(6_263, 0.05,
                                    0)) == 313 and len(few_shot_indices(12_271, 0.01, 0)) == 122
        a, b = few_shot_indices(1000, 0.1, 0), few_shot_indices(1000, 0.1, 1)
        assert a == few_shot_indices(1000, 0.1, 0) and a != b and len(set(a)) == 100
        with pytest.raises(ValueError):
            few_shot_indices(100, 0.001, 0)

    def test_n_train_keeps_exactly_that_many(self):
        from finetune import few_shot_indices
        assert [len(few_shot_indices(162_770, 1.0, 0, n)) for n in (3255, 1627, 843, 325)] == \
            [3255, 1627, 843, 325]  # the authors' CelebA loop
        with pytest.raises(ValueError, match="--n-train 11 of 10"):
            few_shot_indices(10, 1.0, 0, 11)

    def test_rand_augment_is_timms_rand_m9_mstd05_inc1(self):
        """timm's 15 'increasing' ops; two drawn, each applied half of the time (both skipped a
        quarter of the time); the ops' arguments at a level, as timm computes them."""
        import finetune
        assert list(finetune.RAND_OPS) == [
            "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
            "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
            "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
            "TranslateYRel"]
        img = Image.fromarray(np.random.RandomState(0).randint(60, 180, (32, 40, 3), np.uint8))
        torch.manual_seed(0)
        outs = [finetune.rand_augment(img) for _ in range(600)]
        assert all(o.size == img.size and o.mode == "RGB" for o in outs)
        unchanged = sum(np.array_equal(np.asarray(o), np.asarray(img)) for o in outs)
        assert 0.19 < unchanged / 600 < 0.31
        torch.manual_seed(0)
        assert np.array_equal(np.asarray(finetune.rand_augment(img)), np.asarray(outs[0]))
        x = np.asarray(img).astype(int)
        add = np.asarray(finetune.RAND_OPS["SolarizeAdd"](img, 0.9)).astype(int)
        assert np.array_equal(add, np.where(x < 128, np.minimum(x + 99, 255), x))  # 110 x 0.9
        sol = np.asarray(finetune.RAND_OPS["SolarizeIncreasing"](img, 0.5)).astype(int)
        assert np.array_equal(sol, np.where(x >= 128, 255 - x, x))  # threshold 256 - 128
        post = np.asarray(finetune.RAND_OPS["PosterizeIncreasing"](img, 0.9)).astype(int)
        assert np.array_equal(post, x & 0b10000000)  # 4 - int(3.6): 1 bit kept
        black = np.asarray(finetune.RAND_OPS["PosterizeIncreasing"](img, 1.0))
        assert not black.any()  # m = 10 (the clip): no bit kept
        torch.manual_seed(0)
        sign = 1 if torch.rand(()) <= 0.5 else -1
        torch.manual_seed(0)
        moved = np.asarray(finetune.RAND_OPS["TranslateXRel"](img, 1.0))
        shift = round(0.45 * 40)  # 18 px: the output's column c reads the input's c + shift
        kept = moved[:, :40 - shift] if sign > 0 else moved[:, shift:]
        assert np.array_equal(kept, np.asarray(img)[:, shift:] if sign > 0
                              else np.asarray(img)[:, :40 - shift])

    def test_random_erasing_box_and_fill_follow_timm(self):
        """p=0 keeps the image; p=1 erases one box of 2%..33% of the image whose pixels, read back
        in the normalised space, are N(0, 1) as timm's mode 'pixel' draws them."""
        from crops import normalize
        from finetune import random_erasing
        img = torch.zeros(3, 64, 64, dtype=torch.uint8)
        assert torch.equal(random_erasing(img, 0.0), img)
        torch.manual_seed(0)
        areas, values = [], []
        for _ in range(200):
            erased = random_erasing(img, 1.0)
            box = (erased != 0).any(0)
            areas.append(box.float().mean().item())
            values.append(normalize(erased[None])[0][:, box].flatten())
        assert 0.015 < min(areas) and max(areas) < 0.35
        v = torch.cat(values)
        assert abs(v.mean().item()) < 0.05 and abs(v.std().item() - 1) < 0.05

    def test_eval_transform_is_resize_256_then_centre_crop_224(self):
        from PIL import Image
        from torchvision.transforms import v2
        from finetune import eval_transform
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8))
        out, _ = eval_transform(224)(img, None)
        resized = v2.functional.resize(v2.functional.pil_to_tensor(img), 256,
                                       interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        assert resized.shape[-2:] == (256, 341)
        assert torch.equal(out, resized[:, 16:240, 58:282])

    def test_layer_decay_groups_for_vit_small(self):
        import vit
        from finetune import param_groups_layer_decay
        from finetune_attr import AttributeModel
        model = AttributeModel(vit.vit_small(), 40)
        groups = param_groups_layer_decay(model, 0.05, 0.65)
        scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
        named = dict(model.named_parameters())
        qkv = named["backbone.blocks.0.attn.qkv.weight"]
        assert scale_of[id(qkv)] == (pytest.approx(0.65 ** 12), 0.05)
        assert scale_of[id(named["backbone.blocks.11.mlp.fc1.weight"])] == (pytest.approx(0.65),
                                                                            0.05)
        assert scale_of[id(named["head.weight"])] == (1.0, 0.05)
        assert scale_of[id(named["backbone.pos_embed"])] == (pytest.approx(0.65 ** 13), 0.0)
        assert scale_of[id(named["backbone.cls_token"])][1] == 0.0
        no_decay = {n for n, p in named.items() if scale_of[id(p)][1] == 0.0}
        assert no_decay == {n for n in named if n.endswith((".bias", "pos_embed", "cls_token"))
                            or "norm" in n}
        assert sum(len(g["params"]) for g in groups) == len(named)

    @pytest.mark.slow
    def test_finetune_resume_gives_the_same_run(self, tmp_path, toy_root, monkeypatch):
        """A run killed after a mid-epoch checkpoint resumes from it and ends as the uninterrupted
        run does, with a loader process: each sample's flip is seeded by its index, drop-path by
        the restored RNG."""
        import run
        from finetune_attr import main as attributes

        def argv(out):
            return ["--dataset", "toy", "--data-root", toy_root, "--arch", "vit_tiny",
                    "--img-size", "32", "--epochs", "3", "--batch-size", "16", "--workers", "1",
                    "--frac", "0.5", "--out", out, "--save-every-min", "1e-9", "--log-every", "1",
                    "--runs", "1"]
        full = attributes(argv(str(tmp_path / "full")))
        real_save, saved = run.save_atomic, []

        def save_then_crash_mid_epoch_2(obj, path):
            real_save(obj, path)
            saved.append((obj["epoch"], obj["batch"]))
            if saved[-1] == (1, 2):
                raise KeyboardInterrupt("killed")
        monkeypatch.setattr(run, "save_atomic", save_then_crash_mid_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            attributes(argv(str(tmp_path / "cut")))
        assert saved == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]  # 3 batches of 16 an epoch
        cut = attributes(argv(str(tmp_path / "cut")))
        assert saved[5:] == [(2, 0), (2, 1), (2, 2), (3, 0)]
        assert cut["runs"][0]["final"] == full["runs"][0]["final"]
        a, b = (torch.load(str(tmp_path / d / "run0" / "checkpoint.pth"), weights_only=True)
                for d in ("full", "cut"))
        assert a["epoch"] == b["epoch"] == 3
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    @pytest.mark.parametrize("task", ["attr_cls", "attr_mean", "expr", "align"])
    def test_finetuning_trains_exactly_the_parameters_that_reach_the_output(self, task):
        # DDP waits for a gradient of every trainable parameter: what the output never sees (the
        # final norm when
        # it is off the path, blocks after the last one read) must be frozen, and everything else
        # must learn
        import vit
        from finetune_align import AlignmentModel
        from finetune_attr import AttributeModel
        from finetune_expr import ExpressionModel
        build = {"attr_cls": lambda b: AttributeModel(b, 3),
                 "attr_mean": lambda b: AttributeModel(b, 3, "mean"),
                 "expr": lambda b: ExpressionModel(b, 7),
                 "align": lambda b: AlignmentModel(b, 5, heatmap_size=8, blocks=(2, 3, 4, 6),
                                                   channels=8)}
        model = build[task](vit.vit_tiny())
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in model.named_parameters() if p.grad is not None}
        assert ("backbone.norm.weight" in trainable) == (task in ("attr_cls", "expr"))
        assert ("backbone.blocks.11.mlp.fc2.weight" in trainable) == (task != "align")
        assert "backbone.blocks.5.mlp.fc2.weight" in trainable and "backbone.cls_token" in trainable

    @pytest.mark.slow
    @pytest.mark.parametrize("script", ["attr", "align"])
    def test_two_process_finetuning_runs_and_every_process_returns_the_result(self, script,
                                                                              tmp_path, toy_root):
        out = str(tmp_path / "out")
        argv = ["--dataset", "toy", "--data-root", toy_root, "--arch", "vit_tiny", "--img-size",
                "32", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--frac", "0.5",
                "--runs", "2", "--out", out]
        if script == "align":
            argv += ["--heatmap-size", "8", "--channels", "8"]
        torch.multiprocessing.spawn(_finetune_ddp_worker,
                                    args=(2, _free_port(), script, argv, str(tmp_path)), nprocs=2)
        ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
        assert ranks[0] == ranks[1]  # rank 1 gets rank 0's evaluation
        with open(os.path.join(out, "results.json")) as f:
            assert json.load(f)["mean"] == ranks[0]["mean"]
        for run in range(2):
            with open(os.path.join(out, f"run{run}", "result.json")) as f:
                assert json.load(f) == ranks[0]["runs"][run]
        assert [r["seed"]
                for r in ranks[0]["runs"]] == [0, 1] and ranks[0]["runs"][0]["skipped"] == []

    @pytest.mark.slow
    @pytest.mark.parametrize("split", ["train", "test"])
    def test_finetune_unreadable_split_is_one_line_error(self, tmp_path, split):
        """A corrupt image is skipped and counted; a split with none readable is a clear error
        naming the data."""
        import toyfaces
        from data import read_celeba
        d = str(tmp_path / "celeba")
        toyfaces.write_celeba(d, 12, seed=3, workers=1)
        for path, _ in read_celeba(d)[split]:
            open(path, "wb").write(b"\xff\xd8\xff garbage")
        code, out, err = run_script("finetune_attr.py", "--dataset", "celeba", "--data", d,
                                    "--arch", "vit_tiny", "--img-size", "32", "--epochs", "1",
                                    "--workers", "0", "--runs", "1", "--out", str(tmp_path / "r"))
        expected = {"train": "of a training batch were unreadable", "test": "test images was "
                    "readable"}[split]
        assert code != 0
        assert "Traceback" not in err
        assert d in last_line(err)
        assert expected in last_line(err), err

    @pytest.mark.slow
    def test_finetuning_results_are_reused_only_under_the_same_settings(self, tmp_path, toy_root,
                                                                        capsys):
        import vit
        from finetune_attr import main as attributes
        init = str(tmp_path / "init.pth")
        torch.save(vit.vit_tiny().state_dict(), init)
        out = str(tmp_path / "attr")
        argv = ["--dataset", "toy", "--data-root", toy_root, "--arch", "vit_tiny", "--img-size",
                "32", "--epochs", "1", "--batch-size", "16", "--workers", "0", "--frac", "0.5",
                "--out", out, "--runs", "1"]
        first = attributes(argv + ["--init", init])
        capsys.readouterr()
        again = attributes(argv + ["--init", init])
        assert "reused, not retrained" in capsys.readouterr().out and again["runs"] == first["runs"]
        for other, named in ((["--init", "random"], "init_sha256"),
                             (["--init", init, "--frac", "0.25"], "frac 0.25")):
            with pytest.raises(ValueError,
                               match=f"result.json was made with other settings: .*{named}"):
                attributes(argv + other)
        torch.save(vit.vit_tiny().state_dict(), init)  # another checkpoint at the same path
        with pytest.raises(ValueError, match="init_sha256"):
            attributes(argv + ["--init", init])

    def test_default_finetuning_folder_names_init_and_subset(self):
        import argparse
        import finetune

        def name(init, frac, n_train=None):
            args = argparse.Namespace(dataset="celeba", init=init, frac=frac, n_train=n_train)
            return finetune.default_out("attr", args)
        assert name("random", 0.002) == os.path.join("runs", "celeba", "attr-random-0.002")
        assert name("runs/pretrain/teacher_backbone.pth", 1.0) == \
            os.path.join("runs", "celeba", "attr-pretrain_teacher_backbone-1")
        assert len({name("random", 0.1), name("random", 0.05), name("x/dino-s16.pth", 0.1)}) == 3
        assert name("random", 1.0, 843) == os.path.join("runs", "celeba", "attr-random-n843")
        # figures table
        assert all(n.split(os.sep)[-1].count("-") == 2 for n in (name("x/dino-s16.pth", 0.1),))

    def test_a_subset_smaller_than_the_batch_is_one_batch(self):
        import argparse
        from finetune import batch_sizes
        args = argparse.Namespace(batch_size=256)
        assert batch_sizes(args, 122, 1) == (122, 1)  # RAF-DB 1%: one batch of 122
        assert batch_sizes(args, 1000, 2) == (128, 3)
        with pytest.raises(ValueError, match="no image per process"):
            batch_sizes(argparse.Namespace(batch_size=2), 100, 4)

    @pytest.mark.slow
    def test_learning_rate_scales_by_the_nominal_batch(self, tmp_path, toy_root, monkeypatch):
        """MAE's scripts scale the lr by batch size x processes whatever the data: a subset of 7
        images trains in one batch of 7 at the lr of --batch-size 256."""
        import finetune
        import finetune_expr
        cosine, peaks = finetune.cosine_schedule, set()
        monkeypatch.setattr(finetune, "cosine_schedule", lambda step, total, peak, *rest: peaks.add(
            peak) or cosine(step, total, peak, *rest))
        finetune_expr.main(["--dataset", "toy", "--data-root", toy_root, "--arch", "vit_tiny",
                            "--img-size", "32", "--epochs", "1", "--batch-size", "256", "--frac",
                            "0.1", "--workers", "0", "--runs", "1", "--out", str(tmp_path)])
        result = json.load(open(tmp_path / "results.json"))
        assert peaks == {5e-4 * 256 / 256} and result["n_train"] == 7

    @pytest.mark.slow
    def test_sigterm_during_finetuning_saves_and_resumes_to_the_same_weights(self, tmp_path,
                                                                             toy_root):
        from finetune_attr import main as attributes

        def argv(out):
            return ["--dataset", "toy", "--data-root", toy_root, "--arch", "vit_tiny",
                    "--img-size", "32", "--epochs", "40", "--batch-size", "16", "--workers", "1",
                    "--frac", "0.5", "--out", out, "--save-every-min", "0.05", "--runs", "1"]
        full = attributes(argv(str(tmp_path / "full")))
        cut = tmp_path / "cut"
        code, err = _interrupt("finetune_attr.py", argv(str(cut)),
                               lambda: (cut / "run0" / "checkpoint.pth").exists())
        ckpt = torch.load(str(cut / "run0" / "checkpoint.pth"), weights_only=True)
        assert code == 128 + 15 and "SIGTERM at step" in err and ckpt["epoch"] < 40, err
        resumed = attributes(argv(str(cut)))
        assert resumed["runs"][0]["final"] == full["runs"][0]["final"]
        a, b = (torch.load(str(tmp_path / d / "run0" / "checkpoint.pth"), weights_only=True)
                for d in ("full", "cut"))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


class TestAttr:
    """finetune_attr.py: CelebA / LFWA attributes (Tables 1-2)."""

    def test_celeba_parser(self, tmp_path):
        from data import read_celeba
        data = read_celeba(_celeba(tmp_path))
        assert data["attributes"] == ["5_o_Clock_Shadow", "Arched_Eyebrows", "Smiling"]
        assert [os.path.basename(p) for p, _ in data["train"]] == ["000001.jpg"]
        assert data["train"][0][1].tolist() == [0, 1, 1] and data["val"][0][1].tolist() == [1, 0, 0]
        assert data["test"][0][0].endswith(os.path.join("img_align_celeba", "000003.jpg"))

    @pytest.mark.slow
    def test_celeba_bad_inputs(self, tmp_path):
        from data import read_celeba
        with pytest.raises(FileNotFoundError, match="toy"):
            read_celeba(str(tmp_path / "nothing"))
        bad = CELEBA_ATTR.replace("000002.jpg  1 -1 -1", "000002.jpg  1 -1")
        with pytest.raises(ValueError, match=r"list_attr_celeba.txt:4"):
            read_celeba(_celeba(tmp_path / "a", bad))
        with pytest.raises(ValueError, match=r"list_eval_partition.txt:2"):
            read_celeba(_celeba(tmp_path / "b", parts="000001.jpg 0\n000002.jpg 7\n"))
        code, out, err = run_script("finetune_attr.py", "--frac", "0.002", "--data-root",
                                    str(tmp_path / "none"))
        assert code != 0 and "--dataset toy" in last_line(err) and "Traceback" not in err
        import argparse
        from finetune_attr import read_attributes
        # LFWA's own files named, not CelebA's
        with pytest.raises(FileNotFoundError, match="lfw_att_40.mat"):
            read_attributes(argparse.Namespace(dataset="lfwa",
                                               data=str(tmp_path / "none" / "lfwa")))

    @pytest.mark.slow
    def test_attr_toy_run_and_head_only(self, tmp_path, toy_root):
        import vit
        init = str(tmp_path / "init.pth")
        torch.save(vit.vit_tiny().state_dict(), init)
        res = _toy_finetune("finetune_attr.py", toy_root, str(tmp_path / "a"), "--init", init,
                            "--head-only", "--runs", "2", "--frac", "0.5")
        assert res["n_train"] == 48 and res["n_train_total"] == 96 and len(res["runs"]) == 2
        # the default: bf16 autocast on CUDA only
        assert res["args"]["bf16"] == torch.cuda.is_available()
        acc = res["runs"][0]["final"]["test"]["mean_accuracy"]
        assert 0 <= acc <= 100 and len(res["runs"][0]["final"]["test"]["per_attribute"]) == 22
        assert res["mean"]["test/mean_accuracy"] == pytest.approx(
            np.mean([r["final"]["test"]["mean_accuracy"] for r in res["runs"]]))
        trained = torch.load(str(tmp_path / "a" / "run0" / "checkpoint.pth"),
                             weights_only=True)["model"]
        start = torch.load(init, weights_only=True)
        # frozen backbone
        assert all(torch.equal(trained[f"backbone.{k}"], v) for k, v in start.items())
        from finetune_attr import AttributeModel
        torch.manual_seed(0)  # run 0's seed: the head as it was initialised, then trained away from
        backbone = vit.vit_tiny()
        vit.load_pretrained(backbone, init)
        head = AttributeModel(backbone, 22).head.weight
        assert head.shape == trained["head.weight"].shape
        assert (head - trained["head.weight"]).abs().max() > 1e-6  # trained: it moved


    def test_majority_baseline_is_each_attributes_more_frequent_value(self):
        from finetune_attr import attribute_metrics
        targets = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
        logits = torch.tensor([[1.0, -1.0], [1.0, -1.0], [-1.0, -1.0], [-1.0, 1.0]])
        m = attribute_metrics(logits, targets, ["a", "b"])
        assert m["majority_accuracy"] == pytest.approx(75.0)
        assert m["mean_accuracy"] == pytest.approx(100 * (3 / 4 + 2 / 4) / 2)


class TestExpr:
    """finetune_expr.py: RAF-DB / AffectNet-8 expressions (Tables 1, 3)."""

    def test_mixing_gives_soft_labels_and_label_smoothing_applies_to_them(self):
        import torch.nn.functional as F
        from finetune_expr import mixing
        assert mixing(0.0, 0.0, 7) is None
        torch.manual_seed(0)
        # no pair alike
        images, labels = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 5, 6, 1])
        mixed, soft = mixing(0.8, 1.0, 7)(images, labels)
        assert mixed.shape == images.shape and soft.shape == (8, 7)
        assert torch.allclose(soft.sum(1), torch.ones(8)) and (soft.max(1).values < 1).all()
        logits = torch.randn(8, 7)
        smoothed = soft * 0.9 + 0.1 / 7  # timm smooths the one-hot targets, then mixes: the same
        expected = -(smoothed * logits.log_softmax(1)).sum(1).mean()
        assert F.cross_entropy(logits, soft, label_smoothing=0.1) == pytest.approx(expected.item())

    def test_rafdb_parser_and_bad_label(self, tmp_path):
        from data import read_rafdb
        (tmp_path / "EmoLabel").mkdir()
        (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text(RAF_LABELS)
        data = read_rafdb(str(tmp_path))
        assert [l for _, l in data["train"]] == [4, 0] and [l for _, l in data["test"]] == [6]
        assert data["train"][0][0].endswith(os.path.join("Image", "aligned",
                                                         "train_00001_aligned.jpg"))
        (tmp_path / "EmoLabel" / "list_patition_label.txt").write_text(RAF_LABELS
                                                                       + "test_0002.jpg 8\n")
        with pytest.raises(ValueError, match="list_patition_label.txt:4"):
            read_rafdb(str(tmp_path))
        with pytest.raises(FileNotFoundError, match="list_patition_label"):
            read_rafdb(str(tmp_path / "nowhere"))

    @pytest.mark.parametrize("header", [True, False])
    def test_affectnet_csv(self, tmp_path, header):
        from finetune_expr import read_affectnet_csv
        p = tmp_path / "training.csv"
        p.write_text((AFFECT_HEADER if header else "") + AFFECT_ROWS)
        items = read_affectnet_csv(str(p), "/imgs")
        assert [(os.path.basename(a), l, b) for a, l,
                b in items] == [("a.jpg", 3, (10, 20, 40, 60)), ("c.jpg", 7, (5, 5, 25, 25))]

    def test_face_box_is_applied_to_photos_only(self, tmp_path):
        from finetune import LabelledImages
        Image.new("RGB", (100, 80)).save(tmp_path / "photo.jpg")
        Image.new("RGB", (30, 40)).save(tmp_path / "crop.jpg")
        ds = LabelledImages([(str(tmp_path / "photo.jpg"), 0, (10, 20, 40, 60)),
                             (str(tmp_path / "crop.jpg"), 0, (10, 20, 40, 60)),
                             (str(tmp_path / "gone.jpg"), 0)],
                            lambda img, t: (img.size, t))
        assert ds[0][0] == (30, 40) and ds[1][0] == (30, 40) and ds[2] is None

    def test_balanced_sampler_draws_classes_evenly(self):
        from finetune import epoch_indices
        from finetune_expr import class_balanced_weights
        labels = [0] * 1000 + [1] * 100 + [2] * 10
        w = class_balanced_weights(labels, 3)
        order = epoch_indices(len(labels), 0, 0, 0, 1,
                              w) + epoch_indices(len(labels), 1, 0, 0, 1, w)
        order += sum((epoch_indices(len(labels), e, 0, 0, 1, w) for e in range(2, 27)), [])
        freq = np.bincount(np.array(labels)[order], minlength=3) / len(order)
        # 29,970 draws: each class's share has std 0.0027; 0.02 is a 7-sigma tolerance
        assert np.abs(freq - 1 / 3).max() < 0.02
        ranks = [epoch_indices(8, 0, 0, r, 2) for r in (0, 1)]
        assert sorted(ranks[0] + ranks[1]) == list(range(8))

    def test_classification_metrics_on_a_hand_made_confusion(self):
        from finetune_expr import classification_metrics
        target = torch.tensor([0, 0, 0, 0, 1, 1, 2])
        pred = torch.tensor([0, 0, 0, 1, 1, 0, 1])
        m = classification_metrics(pred, target, 3, ["a", "b", "c"])
        assert m["confusion"] == [[3, 1, 0], [1, 1, 0], [0, 1, 0]]
        assert m["accuracy"] == pytest.approx(400 / 7)
        assert m["per_class"] == {"a": 75.0, "b": 50.0, "c": 0.0}
        assert m["mean_class_accuracy"] == pytest.approx(125 / 3)
        assert m["majority_accuracy"] == pytest.approx(400 / 7)  # class a, 4 of the 7

    @pytest.mark.slow
    def test_expr_toy_run(self, tmp_path, toy_root):
        res = _toy_finetune("finetune_expr.py", toy_root, str(tmp_path / "e"), "--balanced",
                            "--eval-every", "1")
        test = res["runs"][0]["final"]["test"]
        assert res["args"]["balanced"] and res["n_train"] == 72
        assert len(test["confusion"]) == 7 and sum(map(sum, test["confusion"])) == 18
        assert test["accuracy"] == pytest.approx(
            100 * sum(test["confusion"][i][i] for i in range(7)) / 18)
        # the headline is overall accuracy; the best of the evaluated epochs is reported apart
        history = res["runs"][0]["history"]
        assert [h["epoch"] for h in history] == [1, 2]
        best = max(h["test"]["accuracy"] for h in history)
        assert res["best_mean"]["test/accuracy"] == best
        assert res["mean"]["test/accuracy"] == history[-1]["test"]["accuracy"]
        lines = res["stdout"].splitlines()
        assert lines[-2].startswith("last epoch, 1 run: test/accuracy") and "(" not in lines[-2]
        assert "'Max accuracy'" in lines[-1] and f"test/accuracy {best:.4f}" in lines[-1]


class TestAlign:
    """finetune_align.py: 300W / WFLW landmarks (Tables 1, 4)."""

    def test_heatmap_targets_are_farls_awing_kernel_and_soft_argmax_finds_their_centre(self):
        """FaRL's target: exp(-8 r^2 / R^2) (sigma R / 4) within the radius R, 0 beyond; the
        soft-argmax (centre of mass over the whole map) returns the analytic centre."""
        from finetune_align import gaussian_heatmaps, soft_argmax
        heat = gaussian_heatmaps(torch.tensor([[[20.0, 30.0]]]), 64, 5.0)[0, 0]
        assert heat[30, 20] == 1.0 and heat[30, 24] == pytest.approx(math.exp(-8 * 16 / 25))
        assert heat[33, 24] == pytest.approx(math.exp(-8 * 25 / 25)) and heat[33, 25] == 0
        assert (heat > 0).sum() == sum(dx * dx + dy * dy <= 25 for dx in range(-5, 6)
                                       for dy in range(-5, 6))
        torch.manual_seed(0)
        points = torch.rand(2, 68, 2) * 100 + 14  # inside: the kernel is not cut by the border
        for radius in (3.0, 5.0, 8.0):  # below 3 (sigma 0.75) the pixel grid biases the mean
            found = soft_argmax(gaussian_heatmaps(points, 128, radius))
            assert (found - points).norm(dim=-1).max() < 1e-3
        flat = torch.zeros(1, 1, 8, 6)
        flat[0, 0, 1, 2], flat[0, 0, 5, 4] = 1.0, 3.0  # mass 1 at (x 2, y 1), 3 at (x 4, y 5)
        assert soft_argmax(flat).tolist() == [[[3.5, 4.0]]]

    def test_farl_augmenters_keep_the_crop_and_black_out_a_box(self):
        from finetune_align import farl_augment
        torch.manual_seed(0)
        crop = torch.tensor([200, 120, 60], dtype=torch.uint8)[:, None, None].expand(3, 224, 224)
        outs = [farl_augment(crop) for _ in range(200)]
        assert all(o.shape == crop.shape and o.dtype == torch.uint8 for o in outs)
        # RandomOcclusion always: a black box of 10-40% of the side high (half of it at a border),
        # still black where no noise is blended in after it (NoiseFusion, half of the time)
        def black_box(o):
            box = (o == 0).all(0)
            rows, cols = box.any(1), box.any(0)
            return torch.equal(box, rows[:, None] & cols[None, :]) and \
                0.05 * 224 - 1 <= rows.sum() <= 0.4 * 224 + 1
        assert sum(map(black_box, outs)) > 0.35 * len(outs)
        gray = [bool((o[0] == o[1]).all() and (o[1] == o[2]).all()) for o in outs]
        assert 5 < sum(gray) < 40  # RandomGray's 10%
        torch.manual_seed(0)
        assert torch.equal(farl_augment(crop), outs[0])

    def test_read_pts(self, tmp_path):
        from finetune_align import read_pts
        pts = np.arange(136, dtype=float).reshape(68, 2) + 1
        body = "\n".join(f"{x} {y}" for x, y in pts)
        (tmp_path / "a.pts").write_text(f"version: 1\nn_points:  68\n{{\n{body}\n}}\n")
        assert np.allclose(read_pts(str(tmp_path / "a.pts")), pts - 1)
        (tmp_path / "b.pts").write_text("version: 1\nn_points:  67\n{\n"
                                        + "\n".join(body.split("\n")[:67]) + "\n}\n")
        with pytest.raises(ValueError, match="b.pts: 67 points"):
            read_pts(str(tmp_path / "b.pts"))

    def test_read_wflw(self, tmp_path):
        from finetune_align import read_wflw
        coords = " ".join(str(float(i)) for i in range(196))
        good = f"{coords} 1 2 30 40 1 0 0 1 0 1 51--Dresses/51_x.jpg\n"
        (tmp_path / "list.txt").write_text(good + good)
        items = read_wflw(str(tmp_path / "list.txt"))
        assert len(items) == 2
        assert items[0]["landmarks"].shape == (98, 2)
        assert items[0]["landmarks"][1].tolist() == [2, 3]
        assert items[0]["box"].tolist() == [1, 2, 30,
                                            40] and items[0]["flags"].tolist() == [1, 0, 0, 1, 0, 1]
        assert items[0]["image"] == "51--Dresses/51_x.jpg"
        (tmp_path / "bad.txt").write_text(good + good.replace(" 1 0 0 1 0 1 ", " 1 0 0 1 0 "))
        with pytest.raises(ValueError, match="bad.txt:2: expected 207 tokens"):
            read_wflw(str(tmp_path / "bad.txt"))

    def test_crop_round_trip_and_image_alignment(self):
        from finetune_align import apply_affine, crop_matrix, invert_affine, warp
        pts = np.array([[30.0, 40.0], [70.5, 42.25], [50.0, 80.0]])
        for angle in (0, 17, -30):
            A = crop_matrix((50, 55), 90, 64, angle)
            assert np.allclose(apply_affine(invert_affine(A), apply_affine(A, pts)), pts, atol=1e-9)
        img = np.zeros((100, 120, 3), np.uint8)
        img[40, 30] = 255  # a dot at pixel (x=30, y=40)
        A = crop_matrix((50, 50), 50, 100, 0)  # 2x zoom
        crop = np.asarray(warp(Image.fromarray(img), A, 100))[..., 0].astype(float)
        ys, xs = np.nonzero(crop)
        centroid = np.array([(xs * crop[ys, xs]).sum(),
                             (ys * crop[ys, xs]).sum()]) / crop[ys, xs].sum()
        assert np.allclose(centroid, apply_affine(A, np.array([[30.0, 40.0]]))[0], atol=0.05)

    def test_mean_shape_baseline_is_zero_for_one_shape_in_every_crop(self):
        from finetune_align import mean_shape_nme
        g = torch.Generator().manual_seed(0)
        shape = torch.rand(68, 2, generator=g, dtype=torch.float64) * 64
        back = torch.zeros(5, 2, 3, dtype=torch.float64)
        for b in range(5):  # crop -> image: a rotation, a scale and a shift per image
            a = 0.3 * b
            back[b, :, :2] = (1 + b) * torch.tensor([[math.cos(a), -math.sin(a)],
                                                     [math.sin(a), math.cos(a)]])
            back[b, :, 2] = torch.tensor([10.0 * b, -5.0 * b])
        gt = torch.einsum("bij,pj->bpi", back[:, :, :2], shape) + back[:, None, :, 2]
        assert mean_shape_nme(gt, back, (36, 45)) == pytest.approx(0.0, abs=1e-9)
        moved = gt.clone()
        moved[0, 30] += 5.0  # one point of one image off the shared shape: the baseline errs
        assert mean_shape_nme(moved, back, (36, 45)) > 0.01

    def test_nme_on_a_hand_computed_example(self):
        from finetune_align import nme, nme_summary
        gt = torch.zeros(1, 68, 2)
        # inter-ocular 100
        gt[0, 36], gt[0, 45] = torch.tensor([0.0, 0.0]), torch.tensor([100.0, 0.0])
        pred = gt.clone()
        pred[0, 0] += torch.tensor([3.0, 4.0])  # one point off by 5 px
        assert nme(pred, gt, (36, 45)).item() == pytest.approx(5 / 68 / 100)
        s = nme_summary(torch.tensor([0.02, 0.05, 0.2]))
        assert s["nme"] == pytest.approx(9.0) and s["failure_rate"] == pytest.approx(100 / 3)
        # AUC at 0.1: CED is 0 until .02, 1/3 until .05, 2/3 after: (1/3 * .03 + 2/3 * .05) / .1
        assert s["auc"] == pytest.approx((0.03 / 3 + 0.05 * 2 / 3) / 0.1, abs=2e-3)

    def test_alignment_head_shapes(self):
        import vit
        from finetune_align import AlignmentModel
        model = AlignmentModel(vit.vit_tiny(), 68, heatmap_size=128, channels=32).eval()
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 68, 128, 128)
        # mmseg's UPerHead as FaRL builds it: dropout 0.1 on whole channels before the last conv
        assert isinstance(model.dropout, torch.nn.Dropout2d) and model.dropout.p == 0.1
        assert model(torch.randn(2, 3, 112, 112)).shape == (2, 68, 128, 128)

    @pytest.mark.slow
    def test_align_toy_run(self, tmp_path, toy_root):
        res = _toy_finetune("finetune_align.py", toy_root, str(tmp_path / "l"), "--heatmap-size",
                            "16", "--bf16", "--channels", "24")
        test = res["runs"][0]["final"]["test"]
        head = torch.load(str(tmp_path / "l" / "run0" / "checkpoint.pth"),
                          weights_only=True)["model"]["predict.weight"]
        assert head.shape == (68, 24, 1, 1)  # --channels is the UperNet's width
        assert {"nme", "nme_common", "nme_challenging", "failure_rate", "auc"} <= set(test)
        assert test["nme"] > 0 and 0 <= test["auc"] <= 1 and res["args"]["bf16"] is True

    def test_missing_pts_image_is_skipped_and_bad_pts_is_an_error(self, tmp_path):
        from finetune_align import read_300w
        for d in ("afw", "helen/trainset", "helen/testset", "lfpw/trainset", "lfpw/testset",
                  "ibug"):
            (tmp_path / d).mkdir(parents=True)
        body = "\n".join("10 20" for _ in range(68))
        # no image
        (tmp_path / "afw" / "x.pts").write_text(f"version: 1\nn_points: 68\n{{\n{body}\n}}\n")
        Image.new("RGB", (30, 30)).save(tmp_path / "afw" / "y.jpg")
        (tmp_path / "afw" / "y.pts").write_text(f"version: 1\nn_points: 68\n{{\n{body}\n}}\n")
        data = read_300w(str(tmp_path))
        assert len(data["train"]) == 1 and data["train"][0][0].endswith("y.jpg")
        Image.new("RGB", (30, 30)).save(tmp_path / "ibug" / "z.jpg")
        (tmp_path / "ibug" / "z.pts").write_text("version: 1\nn_points: 68\n{\n1 2\n}\n")
        with pytest.raises(ValueError, match="z.pts"):
            read_300w(str(tmp_path))

    def test_alignment_lrs_are_absolute_and_step_down_at_80_percent(self, toy_root):
        """FaRL: head 0.01 and backbone 1e-4 whatever the batch, x0.1 from epoch 200 of 250."""
        import finetune
        import finetune_align
        import vit
        args = _task_defaults(finetune_align, "--dataset", "toy", "--data-root", toy_root,
                              "--batch-size", "16")
        task = finetune_align.task(args)
        lr_at = task.schedule(250)
        assert [lr_at(s) for s in (0, 199, 200, 249)] == pytest.approx([0.01, 0.01, 0.001, 0.001])
        model = task.model(vit.vit_tiny())
        groups = finetune.param_groups_layer_decay(model, 0.0, args.layer_decay, task.backbone_lr)
        backbone = {id(p) for p in model.backbone.parameters()}
        lrs = {id(p): g["lr_scale"] * lr_at(0) for g in groups for p in g["params"]}
        assert all(v == pytest.approx(1e-4) for i, v in lrs.items() if i in backbone)
        head = [v for i, v in lrs.items() if i not in backbone]
        assert head and all(v == pytest.approx(0.01) for v in head)


class TestProbe:
    """probe.py: frozen-feature probes, their references and the verdict on learning."""

    def test_roc_auc_counts_ordered_pairs_with_ties_half(self):
        from probe import roc_auc
        scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4, 0.2])
        positive = torch.tensor([False, True, False, True, False, True])
        pairs = [(1.0 if p > n else 0.5 if p == n else 0.0)
                 for p in scores[positive].tolist() for n in scores[~positive].tolist()]
        assert roc_auc(scores, positive) == pytest.approx(sum(pairs) / len(pairs))
        assert roc_auc(torch.arange(6.0), torch.arange(6) >= 3) == 1.0

    def test_knn_vote_on_hand_made_points(self):
        from probe import knn_vote
        bank = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
        labels = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
        votes = knn_vote(bank, labels, F.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]),
                                                   dim=1), k=2, chunk=1)
        assert votes.argmax(1).tolist() == [0, 1] and torch.allclose(votes.sum(1), torch.ones(2))

    @staticmethod
    def _sets(signal, n=600, dim=32):
        """Probe sets whose features are the labels times `signal` plus unit noise: 4 attributes,
        5 expressions, dim / 2 identities to verify; the 'images' are the features themselves."""
        g = torch.Generator().manual_seed(0)

        def noisy(code):
            code = F.pad(code, (0, dim - code.shape[1]))
            return signal * code + torch.randn(code.shape, generator=g)

        def split(m):
            attrs = (torch.rand(m, 4, generator=g) < 0.4).float()
            expr = torch.randint(0, 5, (m,), generator=g)
            return noisy(torch.cat([attrs * 2 - 1, F.one_hot(expr, 5).float()], 1)), attrs, expr
        x, a, e = split(n)
        xt, at, et = split(n // 2)
        ident = torch.arange(n // 2) % (dim // 2)
        return {"attr": (x, a, xt, at), "expr": (x, e, xt, et),
                "verify": (noisy(F.one_hot(ident, dim // 2).float()), ident)}

    def test_probes_on_constructed_features(self):
        from probe import run_probes
        clear = run_probes(lambda x: x, self._sets(signal=8.0))
        noise = run_probes(lambda x: x, self._sets(signal=0.0))
        for k in ("attr_linear_acc", "attr_linear_auc", "attr_knn_acc", "expr_linear_mca",
                  "expr_linear_acc", "expr_knn_mca"):
            assert clear[k] > 97, (k, clear[k])
        assert clear["verify_auc"] > 97 and clear["verify_rank1"] > 90
        # chance: AUC 50, 5 balanced classes 20, the majority of a 40% attribute 60
        assert abs(noise["attr_linear_auc"] - 50) < 6 and abs(noise["verify_auc"] - 50) < 3
        assert abs(noise["expr_linear_mca"] - 20) < 6 and noise["attr_linear_acc"] < 66

    def test_the_l2_strength_is_chosen_on_held_out_data(self, monkeypatch):
        import probe
        chosen = []
        fit = probe.fit_logistic
        monkeypatch.setattr(probe, "fit_logistic", lambda x, y, l2, multi: chosen.append(
            (len(x), l2)) or fit(x, y, l2, multi))
        x, y, xt, yt = self._sets(signal=1.0, n=100)["expr"]
        probe.linear_probe(x, xt, y, yt, multi_label=False)
        assert [n for n, _ in chosen] == [80] * len(probe.L2_GRID) + [100]
        assert [l2 for _, l2 in chosen[:-1]] == list(probe.L2_GRID)

    def test_random_backbone_is_the_pretraining_teachers_init(self):
        import pretrain
        from probe import distance_from, random_backbone
        for patch in ("16", "8"):
            args = _tiny_pretrain_args("toy", "unused", "--seed", "3", "--patch-size", patch)
            torch.manual_seed(3)
            _, teacher = pretrain.build_models(args)
            init = random_backbone("vit_tiny", 3, patch_size=int(patch))
            assert distance_from(teacher.backbone, init) == 0.0
        assert distance_from(random_backbone("vit_tiny", 4, patch_size=8), init) > 0.5

    def test_pixel_reference_is_the_16px_area_average(self):
        from probe import pixel_features
        img = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
        expected = img.float().div(255).view(2, 3, 16, 4, 16, 4).mean((3, 5)).flatten(1)
        assert torch.allclose(pixel_features(img), expected, atol=1e-6)

    def test_unreadable_images_are_skipped_and_counted(self, tmp_path, capsys):
        from probe import load_images
        bad, good = tmp_path / "bad.jpg", tmp_path / "good.png"
        bad.write_bytes(b"\xff\xd8\xff garbage")
        good.write_bytes(_png((10, 20, 30), (40, 40)))
        x, y = load_images([(str(bad), 0), (str(good), 1)], 32, "test set")
        assert x.shape == (1, 3, 32, 32) and y.tolist() == [1]
        assert "1 unreadable images of test set skipped" in capsys.readouterr().out
        with pytest.raises(ValueError, match="bad.jpg"):
            load_images([(str(bad), 0)], 32, "test set")

    def test_verdict_fires_on_an_untrained_teacher_not_on_a_trained_one(self):
        from probe import Judge, verdict
        g = torch.Generator().manual_seed(0)

        def images(x):  # 48 informative numbers and 48 of loud nuisance, as (n, 3, 4, 8) 'images'
            return torch.cat([x, 10 * torch.randn(len(x), 48, generator=g)], 1).view(-1, 3, 4, 8)
        sets = {k: tuple(images(v) if v.ndim == 2 and v.shape[1] == 48 else v for v in s)
                for k, s in self._sets(signal=1.5, dim=48).items()}

        class Linear(torch.nn.Module):  # a 'backbone': (n, 3, 4, 8) -> (n, 48)
            def __init__(self, weight):
                super().__init__()
                self.weight = torch.nn.Parameter(weight)

            def forward(self, x):
                return x.flatten(1) @ self.weight
        untrained = Linear(torch.randn(96, 48, generator=g))
        judge = Judge(sets, untrained, torch.device("cpu"))
        assert verdict(judge(untrained))[0] == "not learned"
        trained = Linear(torch.cat([torch.eye(48), torch.zeros(48, 48)]))  # reads the signal
        scores = judge(trained)
        state, words = verdict(scores)
        assert state == "learned" and scores["probe_gain"] > 10, scores
        assert f"{100 * scores['weight_change']:.1f}% from init" in words

    @pytest.mark.slow
    def test_probe_of_a_checkpoint(self, tiny_run, toy_root, tmp_path):
        """A column per checkpoint (named by its folder, else its path) beside the references, a
        gain line each, and the same table in markdown."""
        teacher = os.path.join(tiny_run, "teacher_backbone.pth")
        full = os.path.join(tiny_run, "checkpoint.pth")
        md = str(tmp_path / "probe.md")
        code, out, err = run_script("probe.py", "--checkpoint", teacher, full, "--arch",
                                    "vit_tiny", "--size", "32", "--images", "40", "--data-root",
                                    toy_root, "--out", md)
        assert code == 0, err
        folder = os.path.basename(tiny_run)
        printed = out.strip().splitlines()
        # (loading checkpoint.pth first says which keys it dropped: the projector's)
        header, *lines, gain_teacher, gain_full = printed[[l.split()[0] for l in printed]
                                                          .index(folder):]
        assert header.split() == [folder, full, "random,", "seed", "0", "raw", "pixels"], out
        rows = {name: values for name, *values in (re.split(r"\s{2,}", l) for l in lines)}
        assert set(rows) >= {"attributes, linear, mean AUC", "verification, ROC AUC",
                             "expressions, linear, mean class accuracy"}, out
        assert all(len(v) == 4 and 0 <= float(x) <= 100 for v in rows.values() for x in v), out
        # the checkpoint's teacher is its teacher_backbone.pth: the same numbers
        assert all(v[0] == v[1] for v in rows.values()), out
        assert re.search(r"^" + folder + r": gain over random init .*: [+-][\d.]+ points",
                         gain_teacher), out
        assert gain_full.startswith(full + ": gain over random init"), out
        table = open(md).read().splitlines()
        assert table[0] == f"| probe | {folder} | {full} | random, seed 0 | raw pixels |"
        assert len(table) == 2 + len(rows) and table[2].startswith("| " + lines[0].split("  ")[0])


class TestFigures:
    """figures.py: Fig. 3, 5, 6, the curves and the table."""

    @pytest.mark.slow
    @pytest.mark.parametrize("figure", ["fig3", "fig5", "fig6", "curves"])
    def test_figures_write_pngs(self, figure, tiny_run, toy_root, tmp_path):
        import figures
        out = str(tmp_path / f"{figure}.png")
        extra = {"fig3": ["--arcface", os.path.join(toy_root, "toy", "arcface.onnx"), "--n", "2"],
                 "fig5": ["--checkpoint", os.path.join(tiny_run, "checkpoint.pth"), "--n-images",
                          "40", "--canvas", "200"],
                 "fig6": ["--checkpoint", os.path.join(tiny_run, "teacher_backbone.pth"), "--arch",
                          "vit_tiny", "--size", "32", "--n", "2", "--finetuned",
                          os.path.join(tiny_run, "checkpoint.pth"),
                          os.path.join(tiny_run, "teacher_backbone.pth")],
                 "curves": ["--log", os.path.join(tiny_run, "log.jsonl")]}[figure]
        if figure == "curves":
            pytest.importorskip("matplotlib")
        figures.main([figure, "--out", out, "--data-root", toy_root, *extra])
        img = Image.open(out)
        assert img.size[0] > 50 and img.size[1] > 50 and np.asarray(img.convert("L")).std() > 1
        # a row per image (2): the image, then 3 models x 3 heads (ViT-Ti), a blank column
        if figure == "fig6":
            # between two models; 112 px tiles + 4 px padding, right of the rows' labels (7 px a
            # character of "image 2"), above a legend of 4 lines (what, then a line a model)
            left = 8 + 7 * len("image 2")
            assert img.size == (left + 4 + 12 * 116, 4 + 2 * 116 + 16 * 4 + 8)
            sheet = np.asarray(img.convert("RGB"))[:4 + 2 * 116]
            # the blank columns are white from top to bottom; the heads' are not
            for spacer in (4, 8):
                x = left + 4 + spacer * 116
                assert (sheet[:, x:x + 112] == 255).all()
                assert (sheet[4:116, x - 116:x - 4] != 255).any()

    def test_table_means_stds_runs_and_baselines(self, tmp_path):
        """One row per task and fraction, one column per init, the baseline last, from
        results.json files written by hand."""
        import argparse
        import figures

        def write(name, metric, values, baseline_key, baseline, n_train):
            runs = [{metric: v, baseline_key: baseline} for v in values]
            mean = {metric: float(np.mean(values)), baseline_key: baseline}
            std = {metric: float(np.std(values)), baseline_key: 0.0}
            (tmp_path / name).mkdir()
            (tmp_path / name / "results.json").write_text(json.dumps(
                dict(runs=runs, mean=mean, std=std, n_train=n_train)))
        acc, maj = "test/mean_accuracy", "test/majority_accuracy"
        write("attr-random-0.1", acc, [70.0, 74.0], maj, 75.64, 320)
        write("attr-pros-0.1", acc, [80.0], maj, 75.64, 320)
        write("align-pros-0.2", "test/nme", [9.0, 11.0], "test/nme_mean_shape", 15.83, 332)
        out = str(tmp_path / "t.md")
        figures.table(argparse.Namespace(dir=str(tmp_path), out=out,
                                         inits=["random", "pros", "pros_noretrieval"]))
        lines = open(out).read().splitlines()
        assert lines[0] == "| task | labels | train images | random | pros | baseline |"
        assert lines[2] == ("| attributes, mean accuracy % | 10% | 320 | 72.00 (2.00, 2 runs) | "
                            "80.00 (1 run) | 75.64 |")
        assert lines[3] == ("| landmarks, NME % (lower is better) | 20% | 332 |  | "
                            "10.00 (1.00, 2 runs) | 15.83 |")
        # expressions: overall accuracy, the headline, then mean class accuracy, each its baseline
        expr = {"test/accuracy": 20.0, "test/majority_accuracy": 16.0,
                "test/mean_class_accuracy": 18.0, "test/chance_mean_class_accuracy": 14.29}
        (tmp_path / "expr-pros-0.5").mkdir()
        (tmp_path / "expr-pros-0.5" / "results.json").write_text(json.dumps(dict(
            runs=[expr], mean=expr, std=dict.fromkeys(expr, 0.0), n_train=1200)))
        figures.table(argparse.Namespace(dir=str(tmp_path), out=out, inits=["random", "pros"]))
        lines = open(out).read().splitlines()
        assert lines[3] == "| expressions, accuracy % | 50% | 1200 |  | 20.00 (1 run) | 16.00 |"
        assert lines[4] == ("| expressions, mean class accuracy % | 50% | 1200 |  | 18.00 (1 run) "
                            "| 14.29 |")

    @pytest.mark.slow
    def test_figures_bad_input_is_one_line_error(self, tiny_run, tmp_path):
        empty, backbone = tmp_path / "empty.jsonl", os.path.join(tiny_run, "teacher_backbone.pth")
        empty.write_text("\n")
        (tmp_path / "attr-random-0.1").mkdir()
        (tmp_path / "attr-random-0.1" / "results.json").write_text("{")
        for args, names in ((["fig5", "--checkpoint", backbone], backbone),
                            (["curves", "--log", str(empty)], str(empty)),
                            (["table", "--dir", str(tmp_path)], "results.json")):
            code, out, err = run_script("figures.py", *args, "--out", str(tmp_path / "x.png"))
            assert code != 0 and "Traceback" not in err and names in last_line(err), (args, err)

    @pytest.mark.slow
    def test_curves_skip_a_line_cut_short(self, tiny_run, tmp_path, capsys):
        """A run killed mid-write leaves a partial line in log.jsonl; the curves skip it and say
        so."""
        pytest.importorskip("matplotlib")
        import figures
        lines = open(os.path.join(tiny_run, "log.jsonl")).read().splitlines()
        log = tmp_path / "log.jsonl"
        log.write_text("\n".join([lines[0], lines[1][:20] + lines[2], *lines[3:]]) + "\n")
        out = str(tmp_path / "curves.png")
        figures.main(["curves", "--log", str(log), "--out", out])
        assert os.path.getsize(out) > 0 and "skipped 1 unreadable line" in capsys.readouterr().out


class TestDefaults:
    """Every default against the paper and its sources."""

    def test_defaults_are_the_papers_then_the_sources_settings(self):
        """Typed from §3.3/§4.1/§4.3, then MSN's msn_vits16.yaml and msn_train.py, the authors'
        run_celeba.sh and run_rafdb.sh (with MAE's main_finetune.py), FaRL's 300W config."""
        import finetune
        import finetune_align
        import finetune_attr
        import finetune_expr
        import pretrain
        a = pretrain.get_args([])
        paper = dict(arch="vit_small", epochs=20, batch_size=64, lr=1e-3, warmup_lr=2e-4,
                     min_lr=1e-6, warmup_epochs=2, weight_decay=0.04, n_prototypes=1024,
                     out_dim=256, tau_teacher=0.025, tau_student=0.1, global_size=224,
                     local_size=96, face_threshold=-0.5)
        msn = dict(sinkhorn=True, projector_bn=True, final_weight_decay=0.4, drop_path=0.0,
                   clip_grad=3.0, momentum_teacher=0.996)
        assert {k: getattr(a, k) for k in {**paper, **msn}} == {**paper, **msn}
        literal = pretrain.get_args(["--no-sinkhorn", "--no-projector-bn"])
        assert (literal.sinkhorn, literal.projector_bn) == (False, False)

        common = dict(runs=5, drop_path=0.1, img_size=224, min_lr=0.0)  # §4.3, authors' scripts
        augment = dict(min_crop=0.08, randaug=True, erasing=0.25)  # timm's, as they ran it
        attr = _task_defaults(finetune_attr)
        expected = dict(common, **augment, lr=5e-4, weight_decay=0.05, layer_decay=0.65,
                        epochs=100, batch_size=256, warmup_epochs=1)
        assert {k: getattr(attr, k) for k in expected} == expected
        expr = _task_defaults(finetune_expr)
        expected = dict(common, **augment, lr=5e-4, weight_decay=0.5, layer_decay=0.65,
                        batch_size=256, label_smoothing=0.1)
        assert {k: getattr(expr, k) for k in expected} == expected
        recipes = dict(rafdb=dict(epochs=100, warmup_epochs=1, mixup=0.8, cutmix=1.0,
                                  balanced=False),
                       affectnet=dict(epochs=10, warmup_epochs=0, mixup=0.1, cutmix=0.1,
                                      balanced=True))
        for dataset, recipe in recipes.items():
            args = _task_defaults(finetune_expr, "--dataset", dataset)
            finetune.set_dataset_defaults(args, finetune_expr.RECIPES)
            assert {k: getattr(args, k) for k in recipe} == recipe, dataset
        align = _task_defaults(finetune_align)
        expected = dict(common, lr=0.01, backbone_lr=1e-4, weight_decay=1e-5, layer_decay=1.0,
                        epochs=250, warmup_epochs=0, ema_decay=0.999, coord_weight=1.0,
                        heatmap_size=128, heatmap_radius=5.0, channels=768, drop_path=0.0)
        assert {k: getattr(align, k) for k in expected} == expected


class TestScripts:
    """The scripts as users run them: help, errors, each file alone."""

    @pytest.mark.slow
    def test_every_script_has_help(self, capsys):
        for script in ("run.py", "vit.py", "crops.py", "retrieval.py", "data.py", "pretrain.py",
                       "finetune_attr.py", "finetune_expr.py", "finetune_align.py", "toyfaces.py",
                       "bench.py", "figures.py", "probe.py"):
            code, out, err = run_script(script, "--help")
            assert code == 0 and "usage" in out, script
            # a None default is explained in the option's help
            assert "(default: None)" not in out, script
            # run.py has no option, data.py's one defaults to None; figures: below
            if script not in ("run.py", "data.py", "figures.py"):
                assert "(default: " in out, script  # every other default is shown
        import figures
        for figure in ("fig3", "fig5", "fig6", "curves", "table"):
            with pytest.raises(SystemExit) as e:
                figures.main([figure, "--help"])
            out = capsys.readouterr().out
            assert e.value.code == 0
            assert "(default: 4)" in out
            assert "(default: None)" not in out, figure

    @pytest.mark.slow
    def test_bad_numbers_are_one_line_errors_naming_the_option(self, capsys, monkeypatch):
        import pretrain
        from finetune_attr import main as attributes
        cases = [(pretrain.get_args, ["--batch-size", "0"], "--batch-size", ">= 1"),
                 (pretrain.get_args, ["--n-local", "0"], "--n-local", ">= 1"),
                 (pretrain.get_args, ["--epochs", "0"], "--epochs", ">= 1"),
                 (pretrain.get_args, ["--global-size", "60"], "--global-size", "multiple of 16"),
                 (pretrain.get_args, ["--arcface", "a.onnx", "--n-candidates", "4"],
                  "--n-candidates", "--n-local"),
                 (lambda argv: attributes(argv), ["--batch-size", "0"],
                  "--batch-size", ">= 1"),
                 (lambda argv: attributes(argv), ["--frac", "1.5"], "--frac",
                  "(0, 1]"),
                 (lambda argv: attributes(argv), ["--init", "nope.pth"], "--init",
                  "no such file")]
        for parse, argv, option, expected in cases:
            with pytest.raises(SystemExit) as e:
                parse(argv)
            err = capsys.readouterr().err
            assert e.value.code == 2
            assert err.count("\n") == 1
            assert option in err
            assert expected in err, (argv, err)
        monkeypatch.setenv("RANK", "1")  # under torchrun, the other processes exit quietly
        with pytest.raises(SystemExit):
            pretrain.get_args(["--batch-size", "0"])
        assert capsys.readouterr().err == ""

    @pytest.mark.slow
    def test_crops_and_retrieval_run_alone_on_the_toy_world(self, toy_root, tmp_path):
        for script, made in (("crops.py", "views.png"), ("retrieval.py", "figure3.png")):
            code, out, err = run_script(script, cwd=str(tmp_path), env=dict(PROS_DATA=toy_root))
            assert code == 0 and os.path.isfile(tmp_path / made), err
            code, out, err = run_script(script, cwd=str(tmp_path),
                                        env=dict(PROS_DATA=str(tmp_path / "none")))
            assert code == 1 and err.strip().endswith("python toyfaces.py"), err
            assert len(err.strip().splitlines()) == 1, err

    @pytest.mark.slow
    def test_loss_and_finetune_files_run_alone(self):
        code, out, err = run_script("loss.py")
        healthy, collapsed = (l for l in out.splitlines() if "argmax reaches" in l)

        def distinct(line):
            return int(line.split("argmax reaches ")[1].split()[0])
        assert code == 0 and distinct(healthy) > 10 and distinct(collapsed) == 1, out + err
        assert out.splitlines()[-1].startswith("What tells them apart is not the loss")
        code, out, err = run_script("finetune.py")
        scales = {l.split()[0]: float(l.split("lr scale ")[1].split()[0])
                  for l in out.splitlines()[1:]}
        assert code == 0 and scales["backbone.patch_embed"] == pytest.approx(0.65 ** 13, abs=1e-5)
        assert scales["backbone.blocks.11"] == pytest.approx(0.65) and scales["head.weight"] == 1.0


class TestGPU:
    """CUDA only (scripts/gpu_check.sh); skipped without a GPU."""

    @pytest.mark.gpu
    @gpu
    def test_gpu_nccl_one_process_pretraining(self, tmp_path, image_folder, monkeypatch):
        import pretrain
        env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                   WORLD_SIZE="1", LOCAL_RANK="0")
        for k, v in env.items():
            # as torchrun --nproc_per_node 1: NCCL for CUDA tensors, gloo for CPU ones
            monkeypatch.setenv(k, v)
        pretrain.main(_tiny_pretrain_args(image_folder, str(tmp_path / "run"), "--epochs", "1",
                                          "--projector-bn", "--sinkhorn"))
        log = [json.loads(l) for l in open(tmp_path / "run" / "log.jsonl")]
        assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)

    @pytest.mark.gpu
    @gpu
    def test_gpu_bf16_step_keeps_the_loss_in_fp32(self):
        import pretrain
        torch.manual_seed(0)
        args = pretrain.get_args(["--arch", "vit_tiny", "--n-prototypes", "32", "--out-dim", "16"])
        model, teacher = pretrain.build_models(args)
        device = torch.device("cuda")
        model.to(device)
        teacher.to(device)
        opt = torch.optim.AdamW(pretrain.param_groups(model), fused=True)
        g, l = torch.randn(4, 2, 3, 64, 64,
                           device=device), torch.randn(4, 3, 3, 32, 32, device=device)
        stats = pretrain.training_step(model, teacher, opt, g, l,
                                       at=dict(lr=1e-4, weight_decay=0.04, momentum=0.99),
                                       clip_grad=3.0, bf16=True)
        assert stats["loss"].dtype == torch.float32 and math.isfinite(stats["loss"].item())
        assert all(p.dtype == torch.float32 for p in model.parameters())

    @pytest.mark.gpu
    @gpu
    def test_gpu_io_binding_equals_the_cpu_path(self, tmp_path):
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
    def test_gpu_pinned_loader(self, image_folder):
        import run
        import data
        import pretrain
        from crops import MultiCrop
        args = _tiny_pretrain_args(image_folder, "unused", "--workers", "1")
        views = data.Views(data.ImageFolder(image_folder), MultiCrop(32, 16, n_local=2), 0)
        proc = run.Process(0, 1, torch.device("cuda"))
        batch, _ = next(iter(pretrain.epoch_loader(views, args, 0, 0, proc)))
        assert batch["image"].is_pinned() and batch["local_boxes"].is_pinned()
        assert batch["local_params"]["factors"].is_pinned()

    @pytest.mark.gpu
    @gpu
    def test_gpu_crops_and_views_equal_the_cpu_path(self):
        """The crops and the augmented views on the GPU = on the CPU, to float rounding (a crop
        level flips where a sum sits at a half)."""
        import run
        from crops import MultiCrop, batch_views, collate
        rs = np.random.RandomState(0)
        mc = MultiCrop(64, 32, n_local=4, n_candidates=6)
        torch.manual_seed(0)
        batch = collate([mc(Image.fromarray(rs.randint(0, 256, (h, w, 3), np.uint8)))
                         for h, w in ((112, 112), (218, 178), (60, 90))])
        on_gpu = run.to_device(batch, torch.device("cuda"))
        cpu, cuda = mc.crops(batch), mc.crops(on_gpu)
        assert cuda[0].is_cuda
        assert all((a.int() - b.cpu().int()).abs().max() <= 1 for a, b in zip(cpu, cuda))
        views = batch_views(cpu[1].cuda(), on_gpu["local_params"]).cpu()
        assert torch.allclose(views, batch_views(cpu[1], batch["local_params"]), atol=1e-4)

    @pytest.mark.gpu
    @gpu
    def test_gpu_checkpoint_restores_the_cuda_rng(self, tmp_path, image_folder):
        import run
        import pretrain
        out = tmp_path / "run"
        pretrain.main(_tiny_pretrain_args(image_folder, str(out), "--epochs", "1"))
        ckpt = torch.load(str(out / "checkpoint.pth"), weights_only=True)
        torch.cuda.manual_seed(123)
        run.restore_rng(ckpt, torch.device("cuda"))
        assert torch.equal(torch.cuda.get_rng_state(), ckpt["cuda_rng"])


class TestClassroom:
    """classroom.py: make a student copy, grade it."""

    @pytest.mark.slow
    def test_classroom_untouched_copy_grades_zero_and_holds_no_reference_body(self, student_copy,
                                                                              capsys):
        """The copy stands alone: its own README, none of the maintainer's tests, CI or answers;
        every blank fails until written; --only grades one."""
        import ast
        import classroom
        student_copy, key = student_copy
        rows = classroom.grade(student_copy, key)
        assert [r[0] for r in rows] == list(classroom.BY_NAME) and not any(r[1] for r in rows)
        assert all(r[2].startswith("NotImplementedError") for r in rows), rows
        assert f"0/{len(rows)} exercises pass" in capsys.readouterr().out
        assert [r[0] for r in classroom.grade(student_copy, key, ["loss.ema_update"])] == [
            "loss.ema_update"]
        copied = "\n".join(ast.unparse(ast.parse(open(os.path.join(root, f)).read()))
                           for root, _, files in os.walk(student_copy) for f in files
                           if f.endswith(".py"))
        files = {f for _, _, fs in os.walk(student_copy) for f in fs}
        assert not files & {"test_all.py", "run", "pytest.ini", "expected.pt"}, files
        readme = open(os.path.join(student_copy, "README.md")).read()
        assert "test_all" not in readme and all(f"`{n}`" in readme for n in classroom.BY_NAME)
        for name, ex in classroom.BY_NAME.items():
            node = classroom.function_node(ast.parse(open(os.path.join(HERE, ex.file)).read()),
                                           name.split(".", 1)[1])
            for stmt in node.body[1:]:  # the docstring stays
                code = ast.unparse(stmt)
                assert len(code) < 25 or code not in copied, (name, code)

    @pytest.mark.slow
    def test_classroom_reference_bodies_pass_and_planted_bugs_fail_their_exercise_only(
            self, student_copy, tmp_path):
        import shutil
        import classroom
        student_copy, key = student_copy
        done = str(tmp_path / "done")
        shutil.copytree(student_copy, done)
        for name, ex in classroom.BY_NAME.items():
            _replace_function(os.path.join(done, ex.file), name.split(".", 1)[1],
                              os.path.join(HERE, ex.file))
        rows = classroom.grade(done, key)
        assert all(r[1] for r in rows), [r for r in rows if not r[1]]
        bugs = {  # exercise: (file, then pairs of correct code and its planted bug)
            "loss.PrototypeLoss.distillation": ("loss.py", "return cross_entropy - mean_entropy",
                                                "return cross_entropy + mean_entropy"),
            "loss.ema_update": ("loss.py", "_(list(t), momentum)\n", "_(list(t), 1 - momentum)\n",
                                "alpha=1 - momentum)", "alpha=momentum)"),
            "retrieval.select": ("retrieval.py", "sim >= threshold", "sim < threshold"),
            "finetune.param_groups_layer_decay": ("finetune.py",
                                                  "layer_decay ** (n_layers + 1 - layer)",
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
        rows = {name: (passed, message) for name, passed, message in classroom.grade(done, key)}
        vit_names = {n for n, ex in classroom.BY_NAME.items() if ex.file == "vit.py"}
        assert {n for n, (passed, _) in rows.items() if not passed} == set(bugs) | vit_names
        assert all(rows[n][1].startswith("SyntaxError") for n in vit_names)
        assert "wrong sign" in rows["loss.PrototypeLoss.distillation"][1]
        assert "swapped" in rows["loss.ema_update"][1]
        assert "reversed" in rows["retrieval.select"][1]
        assert "off by one" in rows["finetune.param_groups_layer_decay"][1]
