"""Classroom exercises: the paper's pieces, blanked in a student copy of this repository, and a
grader.

    python classroom.py list                                  # the exercises, the paper's section
    python classroom.py make DIR --answers KEY [--only NAME ...]  # DIR: the copy to hand out
    python classroom.py grade DIR --answers KEY [--only NAME ...] # each exercise, one process each

`make` records each exercise's expected outputs from this repository's code on fixed inputs into
the teacher's folder KEY, then copies the repository without its tests, CI and maintainer README
into DIR, writes DIR/README.md (the exercises, what each blank must return, how it is graded) and
replaces each chosen function's body (found on the syntax tree) by `raise NotImplementedError`, its
docstring, which states the function's contract, kept. DIR holds no answer: hand it out as it is.
The grader holds no reference code: it compares a student's outputs with the recorded ones and
checks properties that any correct answer has, with a hint for the usual slips. Each exercise is
graded in a process of its own, from a pristine blanked copy with only that function taken from
the student's file: a crash or a hang costs that exercise, a syntax error the exercises of its
file; each exercise grades in about two seconds.
"""

import argparse
import ast
import os
import shutil
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SUPPORT = os.path.join(".classroom", "support")  # the blanked copy the grader imports from
EXPECTED = "expected.pt"  # in the teacher's --answers folder
NOT_COPIED = {".git", ".classroom", "runs", "data", "__pycache__", ".pytest_cache", "test_all.py",
              "scripts", "docs", ".ci", "README.md", "pytest.ini", ".benchmarks"}


# ----------------------------------------------------------------------------- the exercises


class Exercise:
    """One function of the codebase: where it is, what the paper calls it, the task in one line.

    inputs() builds fixed inputs (seeded); run(fn, inputs) calls the function (given as found in its
    module: a function, or a method through its class); check(out, expected) returns None when the
    answer is right, else what differed."""

    def __init__(self, name, paper, task):
        self.name, self.paper, self.task = name, paper, task
        self.file = name.split(".")[0] + ".py"

    def inputs(self):
        return None

    def record(self, out):
        """What make stores of the reference's output."""
        return out


def close(a, b, what, tol=1e-5):
    """None if tensors a and b agree within tol, else a sentence saying by how much they differ."""
    import torch

    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.shape != b.shape:
        return f"{what}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    return None if err <= tol else f"{what}: up to {err:.4g} from the expected values"


class Attention(Exercise):
    def inputs(self):
        import torch

        torch.manual_seed(0)
        from vit import Attention as Module

        return dict(module=Module(32, 4), x=torch.randn(2, 7, 32))

    def run(self, fn, inp):
        return dict(
            out=fn(inp["module"], inp["x"]), attn=fn(inp["module"], inp["x"], return_attention=True)
        )

    def check(self, out, exp):
        a = out["attn"]
        if a.shape == exp["attn"].shape and not a.sum(-1).sub(1).abs().max() < 1e-4:
            return "attention rows do not sum to 1: softmax over the keys (last dim)?"
        problem = close(out["attn"], exp["attn"], "the attention maps")
        if problem:
            return (problem + "; qkv's last dim holds q, then k, then v, each split into heads "
                    "(the docstring's layout)?")
        return close(out["out"], exp["out"], "the output")


class PosEmbed(Exercise):
    def inputs(self):
        import torch

        torch.manual_seed(0)
        return dict(pos=torch.randn(1, 1 + 14 * 14, 8))

    def run(self, fn, inp):
        return dict(to6=fn(inp["pos"], (6, 6)), same=fn(inp["pos"], (14, 14)))

    def check(self, out, exp):
        if (
            out["same"].shape == exp["same"].shape
            and close(out["same"], exp["same"], "") is not None
        ):
            return "not the identity when the grid already matches"
        if (
            out["to6"].shape == exp["to6"].shape
            and close(out["to6"][:, 0], exp["to6"][:, 0], "") is not None
        ):
            return "the cls token's position embedding must be kept as it is"
        return close(out["to6"], exp["to6"], "the 6 x 6 resampling", tol=1e-4)


class MultiCropSample(Exercise):
    def inputs(self):
        from PIL import Image
        import numpy as np
        from crops import MultiCrop

        img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (120, 100, 3), np.uint8))
        return dict(mc=MultiCrop(64, 32, n_global=2, n_local=4, n_candidates=6), img=img)

    def run(self, fn, inp):
        import torch

        torch.manual_seed(0)
        g, l = fn(inp["mc"], inp["img"])
        return dict(
            globals=[c.size for c in g],
            locals=[c.size for c in l],
            modes=sorted({c.mode for c in g + l}),
        )

    def check(self, out, exp):
        if out["globals"] != exp["globals"]:
            return (f"global crops: sizes {out['globals']}, expected {exp['globals']} "
                    "(M crops of global_size)")
        if out["locals"] != exp["locals"]:
            return (f"local crops: sizes {out['locals']}, expected {exp['locals']} "
                    "(C candidates of local_size)")
        return None if out["modes"] == ["RGB"] else f"crop modes {out['modes']}, expected RGB"


class Select(Exercise):
    CASES = {  # name: (similarities of 6 candidates to the globals, N)
        "all pass": ([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], 4),
        "two fail": ([0.9, -0.9, 0.7, -0.8, 0.5, 0.4], 4),
        "too few pass": ([0.9, -0.9, -0.7, -0.8, -0.6, 0.4], 4),
        "none passes": ([-0.6, -0.9, -0.7, -0.8, -0.55, -0.95], 3),
    }

    def inputs(self):
        import torch

        g = torch.Generator().manual_seed(0)
        return {name: (torch.tensor(sims), n, torch.rand(6, generator=g),
                       torch.rand(n, generator=g)) for name, (sims, n) in self.CASES.items()}

    def run(self, fn, inp):
        return {name: [int(i) for i in fn(sim, n, -0.5, priority, draw)]
                for name, (sim, n, priority, draw) in inp.items()}

    def check(self, out, exp):
        for name, (sims, n) in self.CASES.items():
            got, want = out[name], exp[name]
            passing = {i for i, s in enumerate(sims) if s >= -0.5}
            if len(got) != n:
                return f"{name}: {len(got)} views kept, expected N = {n}"
            if passing and not set(got) <= passing:
                kept = sorted(set(got) - passing)
                return (f"{name}: kept candidates {kept} whose similarity is below theta: the "
                        "comparison reversed?")
            if len(passing) >= n and len(set(got)) != n:
                return f"{name}: a candidate kept twice while enough pass"
            if not passing and sorted(got) != sorted(want):
                return f"{name}: kept {got}, expected the {n} most similar {want}"
            most_similar = sorted(range(len(sims)), key=lambda i: -sims[i])[:n]
            if passing and got != want and got == most_similar:
                return (f"{name}: kept the {n} most similar {got}, the rule for when none passes, "
                        f"while {len(passing)} pass: the comparison with theta reversed?")
            if got != want:
                return (f"{name}: kept {got}, expected {want} (passing candidates in the order "
                        "of their priority, then slot j takes number floor(draw_j * passing) "
                        "of them again)")
        return None


class Distillation(Exercise):
    def inputs(self):
        import torch

        torch.manual_seed(0)
        from loss import PrototypeLoss

        module = PrototypeLoss(n_prototypes=16, dim=8)
        z_t, z_s = torch.randn(3, 2, 8), torch.randn(3, 4, 8, requires_grad=True)
        s_g = module.predictions(z_t, module.tau_teacher).detach()
        return dict(module=module, s_g=s_g, z_s=z_s)

    def run(self, fn, inp):
        import torch

        inp["module"].zero_grad()
        z_s = inp["z_s"].detach().requires_grad_(True)
        loss, ce, me = fn(inp["module"], inp["s_g"], z_s)
        loss.backward()
        grad = inp["module"].prototypes.grad
        return dict(
            loss=loss.detach(),
            ce=torch.as_tensor(ce).detach(),
            me=torch.as_tensor(me).detach(),
            grad_z=z_s.grad,
            grad_p=grad if grad is not None else torch.zeros(0),
        )

    def check(self, out, exp):
        if out["me"].numel() == 1 and out["me"] < exp["me"] - 1e-4:
            return (f"mean entropy {out['me'].item():.4f}, expected {exp['me'].item():.4f}: "
                    "below it, as the mean of the per-view entropies is; Eq. 4 takes the entropy "
                    "of the mean prediction over all B x N local views")
        if close(out["loss"], exp["ce"] + exp["me"], "") is None:
            return (
                f"loss differs from the expected {exp['loss'].item():.4f} by "
                f"{(out['loss'] - exp['loss']).abs().item():.4f}; the mean-entropy term has the "
                "wrong sign?"
            )
        return (
            close(out["ce"], exp["ce"], "the cross-entropy (Eq. 2-3)")
            or close(out["me"], exp["me"], "the mean entropy (Eq. 4)")
            or close(out["loss"], exp["loss"], "the loss (Eq. 2)")
            or close(out["grad_z"], exp["grad_z"], "the gradient to the student's features", 1e-4)
            or close(out["grad_p"], exp["grad_p"], "the gradient to the prototypes", 1e-4)
        )


class Ema(Exercise):
    def inputs(self):
        import torch

        torch.manual_seed(0)
        return dict(teacher=torch.nn.Linear(4, 3), student=torch.nn.Linear(4, 3))

    def run(self, fn, inp):
        import copy

        teacher, student = copy.deepcopy(inp["teacher"]), copy.deepcopy(inp["student"])
        fn(teacher, student, 0.9)
        return dict(
            teacher=teacher.state_dict(),
            student=student.state_dict(),
            before=(inp["teacher"].state_dict(), inp["student"].state_dict()),
        )

    def record(self, out):
        return dict(teacher=out["teacher"], student=out["student"])

    def check(self, out, exp):
        t0, s0 = out["before"]
        if any(close(out["student"][k], s0[k], "") is not None for k in s0):
            return "the student changed: only the teacher moves (the arguments swapped?)"
        wrong = [
            k for k in exp["teacher"] if close(out["teacher"][k], exp["teacher"][k], "") is not None
        ]
        if not wrong:
            return None
        if all(close(out["teacher"][k], 0.1 * t0[k] + 0.9 * s0[k], "") is None for k in t0):
            return ("the teacher moved 90% of the way to the student: momentum and 1 - momentum "
                    "swapped?")
        return f"the teacher's {wrong[0]} differs from the expected EMA"


class Cosine(Exercise):
    STEPS = [0, 5, 10, 11, 50, 99, 100, 120]

    def run(self, fn, inp):
        return [fn(s, 100, 1e-3, 1e-6, 10, 2e-4) for s in self.STEPS]

    def check(self, out, exp):
        for step, a, b in zip(self.STEPS, out, exp):
            if abs(a - b) > 1e-9:
                return f"at step {step} of 100 (warmup 10): {a:.6g}, expected {b:.6g}"
        return None


class LayerDecay(Exercise):
    def inputs(self):
        import torch
        import vit

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = vit.vit_tiny()
                self.head = torch.nn.Linear(192, 3)

        return dict(model=Model())

    def run(self, fn, inp):
        groups = fn(inp["model"], 0.05, 0.65)
        names = {id(p): n for n, p in inp["model"].named_parameters()}
        return {
            names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]
        }

    def check(self, out, exp):
        missing = sorted(set(exp) - set(out))
        if missing:
            return f"{len(missing)} parameters in no group, e.g. {missing[0]}"
        for name, (scale, decay) in exp.items():
            got_scale, got_decay = out[name]
            if abs(got_scale - scale) > 1e-9:
                hint = (" (the exponent off by one?)"
                        if any(abs(got_scale - scale * 0.65**e) < 1e-9 for e in (-1, 1)) else "")
                return f"{name}: lr scale {got_scale:.4g}, expected {scale:.4g}{hint}"
            if got_decay != decay:
                return (
                    f"{name}: weight decay {got_decay}, expected {decay} (none on biases, norms, "
                    "pos_embed, cls_token)"
                )
        return None


class SoftArgmax(Exercise):
    def inputs(self):
        import torch
        from finetune_align import gaussian_heatmaps

        torch.manual_seed(0)
        points = torch.tensor(
            [[[10.3, 20.7], [31.6, 12.2], [50.4, 40.0], [47.25, 47.75]]]
        )  # inside
        background = 0.01 * torch.rand(1, 4, 64, 64)  # the whole map counts, not the peak alone
        return dict(heat=gaussian_heatmaps(points, 64, 5.0) + background)

    def run(self, fn, inp):
        return fn(inp["heat"])

    def check(self, out, exp):
        return close(out, exp, "decoded positions (heat-map pixels, x then y)", tol=1e-4)


class Nme(Exercise):
    def inputs(self):
        import torch

        torch.manual_seed(0)
        gt = torch.rand(3, 68, 2) * 100
        return dict(pred=gt + torch.randn(3, 68, 2), gt=gt, eyes=(36, 45))

    def run(self, fn, inp):
        return fn(inp["pred"], inp["gt"], inp["eyes"])

    def check(self, out, exp):
        return close(out, exp, "per-image NME")


class MeanClassAccuracy(Exercise):
    def inputs(self):
        import torch

        target = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
        pred = torch.tensor([0, 0, 0, 1, 1, 0, 2, 2, 1, 3])
        return dict(pred=pred, target=target)

    def run(self, fn, inp):
        return fn(inp["pred"], inp["target"], 5, ["a", "b", "c", "d", "e"])

    def check(self, out, exp):
        for key in ("accuracy", "mean_class_accuracy"):
            if abs(out[key] - exp[key]) > 1e-6:
                return (f"{key} {out[key]:.2f}, expected {exp[key]:.2f} (in %; a class with no "
                        "test image does not count)")
        return (None if out["confusion"] == exp["confusion"]
                else "the confusion matrix (rows: true class)")


EXERCISES = [
    Attention(
        "vit.Attention.forward",
        "§3.2",
        "multi-head self-attention; with return_attention, the softmax(QK^T / sqrt(d)) maps",
    ),
    PosEmbed(
        "vit.resample_pos_embed",
        "§3.2",
        "resample the position embedding to another patch grid (96 px local crops: 6 x 6)",
    ),
    MultiCropSample(
        "crops.MultiCrop.sample", "§3, Fig. 2", "cut M global and C local candidate crops"
    ),
    Select(
        "retrieval.select",
        "§3, theta",
        "keep N of C candidates: displace those below theta, reuse "
        "when too few pass, fall back to the most similar",
    ),
    Distillation(
        "loss.PrototypeLoss.distillation",
        "Eq. 1-4",
        "the student's predictions, the "
        "cross-entropy to the teacher's and the mean-entropy regulariser",
    ),
    Ema("loss.ema_update", "§3", "the teacher's exponential moving average of the student"),
    Cosine("loss.cosine_schedule", "§3.3", "linear warmup, then cosine decay"),
    LayerDecay(
        "finetune.param_groups_layer_decay",
        "§4.1",
        "layer-wise lr decay and no weight decay on biases, norms, pos_embed, cls_token",
    ),
    SoftArgmax(
        "finetune_align.soft_argmax",
        "§4.1",
        "landmark positions from heat-maps: each map's centre of mass (FaRL's heatmap2points)",
    ),
    Nme("finetune_align.nme", "§4.1", "normalised mean error by the inter-ocular distance"),
    MeanClassAccuracy(
        "finetune_expr.classification_metrics",
        "§4.1",
        "accuracy, mean class accuracy and the confusion matrix",
    ),
]
BY_NAME = {e.name: e for e in EXERCISES}


# ----------------------------------------------------------------------------- finding functions


def resolve(module, name):
    """'Class.method' or 'function' in a module -> (owner, attribute name)."""
    parts = name.split(".")
    owner = module
    for p in parts[:-1]:
        owner = getattr(owner, p)
    return owner, parts[-1]


def function_node(tree, name):
    """The def node of 'function' or 'Class.method' in a module's syntax tree."""
    body, node = tree.body, None
    for part in name.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            raise KeyError(name)
        body = node.body
    return node


# ----------------------------------------------------------------------------- make


def blank(source, names):
    """The source with each named function's body replaced by its docstring and a raise."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    nodes = sorted((function_node(tree, n) for n in names), key=lambda n: -n.lineno)
    for node, name in ((n, n.name) for n in nodes):
        first = node.body[0]
        has_doc = (
            isinstance(first, ast.Expr)
            and isinstance(getattr(first, "value", None), ast.Constant)
            and isinstance(first.value.value, str)
        )
        start = (
            first.end_lineno if has_doc else first.lineno - 1
        )  # 0-based index of the first line to drop
        indent = " " * first.col_offset
        task = f"exercise: write {name} (python classroom.py list)"
        raise_line = f'{indent}raise NotImplementedError("{task}")\n'
        lines[start : node.end_lineno] = [raise_line]
    return "".join(lines)


def record_expected(names):
    """Each exercise's inputs and the reference's outputs, from this repository's code."""
    import importlib
    import torch

    sys.path.insert(0, HERE)
    expected = {}
    for name in names:
        ex = BY_NAME[name]
        owner, attr = resolve(
            importlib.import_module(name.split(".")[0]), ".".join(name.split(".")[1:])
        )
        torch.manual_seed(0)
        expected[name] = ex.record(ex.run(getattr(owner, attr), ex.inputs()))
    return expected


def copy_tree(dst):
    """This repository's files, without its tests, tools and outputs (nor `dst`, if inside)."""

    def ignore(folder, names):
        return [n for n in names if n in NOT_COPIED or n.endswith(".pyc")
                or os.path.abspath(os.path.join(folder, n)) == os.path.abspath(dst)]

    shutil.copytree(HERE, dst, ignore=ignore, dirs_exist_ok=True)


def make(dst, answers, names):
    """The student copy in dst, the expected outputs in the teacher's folder `answers`."""
    import torch

    for folder, what in ((dst, "the copy"), (answers, "--answers")):
        if os.path.exists(folder) and os.listdir(folder):
            raise SystemExit(f"error: {folder} ({what}) exists and is not empty: choose a new "
                             f"folder")
    if os.path.abspath(answers).startswith(os.path.abspath(dst) + os.sep):
        raise SystemExit(f"error: --answers {answers} is inside the copy {dst}: the answers stay "
                         f"with the teacher")
    expected = record_expected(names)
    copy_tree(dst)
    by_file = {}
    for name in names:
        by_file.setdefault(BY_NAME[name].file, []).append(".".join(name.split(".")[1:]))
    for file, functions in by_file.items():
        path = os.path.join(dst, file)
        with open(path) as f:
            text = blank(f.read(), functions)
        with open(path, "w") as f:
            f.write(text)
    copy_tree(os.path.join(dst, SUPPORT))
    for file in by_file:
        shutil.copy(os.path.join(dst, file), os.path.join(dst, SUPPORT, file))
    with open(os.path.join(dst, "README.md"), "w") as f:
        f.write(student_readme(names))
    os.makedirs(answers, exist_ok=True)
    torch.save(dict(names=names, expected=expected), os.path.join(answers, EXPECTED))
    print(f"{dst}: {len(names)} exercises blanked, README.md says what each must do; the answers "
          f"are in {answers}; grade with: python classroom.py grade {dst} --answers {answers}")


def student_readme(names):
    """The student copy's README: the exercises, where each is, how it is graded."""
    rows = "\n".join(f"| `{BY_NAME[n].name}` | `{BY_NAME[n].file}` | {BY_NAME[n].paper} | "
                      f"{BY_NAME[n].task} |" for n in names)
    return f"""# ProS, the exercises

This is the ProS reference implementation ("ProS: Facial Omni-Representation Learning via
Prototype-based Self-Distillation") with {len(names)} of its functions left for you to write. Each
blank keeps its docstring: it says what the function takes and returns, with shapes and layouts,
and any implementation that keeps that contract passes. Until you write it, a blank raises
`NotImplementedError` naming itself.

| function | file | paper | what it does |
|---|---|---|---|
{rows}

Set up with `pip install -r requirements.txt`; `python FILE.py --help` says what each file does,
and the files run on a built-in world of toy faces once your functions work (`python toyfaces.py`
draws it). Your teacher grades the copy with `python classroom.py grade DIR --answers KEY`, one
process per exercise, each about two seconds; `--only NAME` grades one. A failed exercise says
what differed, often with a hint.
"""


# ----------------------------------------------------------------------------- grade


def student_function(folder, exercise, module):
    """The student's version of the exercise's function, compiled from their file into the pristine
    module's namespace (so every other name resolves to the blanked copy's)."""
    path = os.path.join(folder, exercise.file)
    with open(path) as f:
        source = f.read()
    tree = ast.parse(source, path)  # a SyntaxError fails this file's exercises only
    node = function_node(tree, ".".join(exercise.name.split(".")[1:]))
    first = min([d.lineno for d in node.decorator_list] + [node.lineno])  # @torch.no_grad() too
    code = textwrap.dedent("".join(source.splitlines(keepends=True)[first - 1 : node.end_lineno]))
    namespace = dict(vars(module))
    exec(compile(code, path, "exec"), namespace)
    return namespace[node.name]


def check_one(folder, answers, name):
    """Grade one exercise in this process; returns (passed, message)."""
    import importlib
    import torch

    sys.path.insert(0, os.path.join(folder, SUPPORT))
    ex = BY_NAME[name]
    expected = torch.load(os.path.join(answers, EXPECTED), weights_only=True)["expected"][name]
    module = importlib.import_module(ex.file[:-3])
    fn = student_function(folder, ex, module)
    owner, attr = resolve(module, ".".join(name.split(".")[1:]))
    setattr(owner, attr, fn)
    torch.manual_seed(0)
    problem = ex.check(ex.run(getattr(owner, attr), ex.inputs()), expected)
    return problem is None, problem or "ok"


def child(folder, answers, name, conn):
    """A grading process: one exercise, its verdict (or the error it raised) sent back."""
    import torch

    torch.set_num_threads(1)  # a forked process cannot use the parent's OpenMP threads: run inline
    try:
        conn.send(check_one(folder, answers, name))
    except (
        BaseException
    ) as e:  # the student's code may raise anything: it is that exercise's verdict
        conn.send((False, f"{type(e).__name__}: {e}".splitlines()[0][:200]))


def grade(folder, answers, only=None, timeout=60):
    """Each exercise (or those in `only`) in its own process (forked: torch is imported once); a
    table, the count."""
    import multiprocessing
    import torch

    names = torch.load(os.path.join(answers, EXPECTED), weights_only=True)["names"]
    missing = sorted(set(only or ()) - set(names))
    if missing:
        raise SystemExit(f"error: --only {missing[0]}: not an exercise of this copy "
                         f"({', '.join(names)})")
    names = [n for n in names if not only or n in only]
    ctx = multiprocessing.get_context("fork")
    rows, start = [], time.time()
    for name in names:
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child, args=(folder, answers, name, send))
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            verdict = (False, f"no answer in {timeout} s (an endless loop?)")
        elif receive.poll():
            verdict = receive.recv()
        else:
            verdict = (False, f"the grading process died (exit code {proc.exitcode})")
        rows.append((name, *verdict))
    width = max(len(n) for n in names)
    for name, passed, message in rows:
        print(f"{name:<{width}}  {'pass' if passed else 'FAIL'}  {message}")
    n_pass = sum(p for _, p, _ in rows)
    print(f"{n_pass}/{len(rows)} exercises pass ({time.time() - start:.1f} s)")
    return rows


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the exercises")
    m = sub.add_parser("make", help="a student copy with the exercises blanked")
    m.add_argument("dir", help="the student copy, to hand out")
    m.add_argument("--answers", required=True,
                   help="the teacher's folder for the expected outputs, outside the copy")
    m.add_argument("--only", nargs="+", choices=list(BY_NAME), default=None,
                   help="these exercises (default: all)")
    g = sub.add_parser("grade", help="grade a student copy")
    g.add_argument("dir", nargs="?", default=".", help="the copy (default: here)")
    g.add_argument("--answers", required=True, help="the folder `make --answers` wrote")
    g.add_argument("--only", nargs="+", default=None, help="grade these exercises alone")
    a = p.parse_args()
    if a.command == "list":
        width = max(len(e.name) for e in EXERCISES)
        for e in EXERCISES:
            print(f"{e.name:<{width}}  {e.paper:<11} {e.task}")
    elif a.command == "make":
        make(a.dir, a.answers, a.only or list(BY_NAME))
    elif a.command == "grade":
        if not os.path.exists(os.path.join(a.answers, EXPECTED)):
            raise SystemExit(f"error: --answers {a.answers}: no {EXPECTED} ('python classroom.py "
                             f"make DIR --answers KEY' writes it)")
        if not os.path.isdir(os.path.join(a.dir, SUPPORT)):
            raise SystemExit(f"error: {a.dir}: not a copy made by 'python classroom.py make'")
        rows = grade(a.dir, a.answers, a.only)
        sys.exit(0 if all(passed for _, passed, _ in rows) else 1)


if __name__ == "__main__":
    main()
