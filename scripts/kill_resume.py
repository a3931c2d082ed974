"""Fault injection: kill -9 a pretraining at random moments, resume it each time, and compare its
final teacher with an uninterrupted run's, tensor by tensor and bit for bit.

    python scripts/kill_resume.py --kills 5 -- --data toy --arch vit_tiny --n-images 64 \
        --batch-size 8 --epochs 2 --global-size 32 --local-size 16 --n-local 2 --workers 1

Everything after `--` goes to pretrain.py (with --out, --log-every 1 and --save-every set here). A
kill lands once the run has logged a randomly drawn step it had not reached yet, plus a random delay
under 0.2 s, so it can fall anywhere in a step, a checkpoint write or a loader's start. Exit status
0 when the teachers are identical and log.jsonl's steps strictly increase, else 1.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pretrain(argv, out):
    """Start pretrain.py on `argv` writing to `out`; its output goes to out/console.txt."""
    os.makedirs(out, exist_ok=True)
    console = open(os.path.join(out, "console.txt"), "a")
    cmd = [
        sys.executable,
        os.path.join(HERE, "pretrain.py"),
        *argv,
        "--out",
        out,
        "--log-every",
        "1",
    ]
    return subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT)


def logged_steps(out):
    """The training steps in out/log.jsonl (a row cut short by a kill is left out)."""
    steps = []
    path = os.path.join(out, "log.jsonl")
    if os.path.exists(path):
        for line in open(path):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "loss" in row:
                steps.append(row["step"])
    return steps


def kill_at(proc, out, target, rng):
    """SIGKILL `proc` once out/log.jsonl reaches step `target` (+ up to 0.2 s); False if it ended
    first."""
    while proc.poll() is None:
        if max(logged_steps(out), default=0) >= target:
            time.sleep(rng.uniform(0, 0.2))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.02)
    return False


def same_tensors(a, b):
    """Names of the tensors that differ between two state dicts (or are missing from one)."""
    return sorted(
        k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(a[k], b[k])
    )


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--kills", type=int, default=5, help="how many times to kill -9 the run")
    p.add_argument("--seed", type=int, default=0, help="draws the moments of the kills")
    p.add_argument(
        "--save-every", type=int, default=2, help="the run checkpoints every this many steps"
    )
    p.add_argument(
        "--dir", default=None, help="where the two runs go (default: a temporary folder)"
    )
    p.add_argument(
        "pretrain_args", nargs=argparse.REMAINDER, help="-- then pretrain.py's arguments"
    )
    a = p.parse_args()
    argv = [x for x in a.pretrain_args if x != "--"] + ["--save-every", str(a.save_every)]
    root = a.dir or tempfile.mkdtemp(prefix="kill_resume-")
    full, cut = os.path.join(root, "full"), os.path.join(root, "cut")
    rng = random.Random(a.seed)

    if pretrain(argv, full).wait() != 0:
        sys.exit(f"the uninterrupted run failed: see {full}/console.txt")
    total = max(logged_steps(full))
    print(f"uninterrupted run: {total} steps")
    for k in range(1, a.kills + 1):
        done = max(logged_steps(cut), default=0)
        if done >= total - 1:
            print(f"kill {k}: skipped, the run is at step {done} of {total}")
            continue
        span = max(1, (total - 1 - done) // (a.kills + 1 - k))  # leave room for the kills to come
        target = done + rng.randint(1, span)
        proc = pretrain(argv, cut)
        if not kill_at(proc, cut, target, rng):
            sys.exit(
                f"kill {k}: the run ended (status {proc.returncode}) before step {target}: see "
                f"{cut}/console.txt"
            )
        ckpt = os.path.join(cut, "checkpoint.pth")
        saved = torch.load(ckpt, weights_only=True)["step"] if os.path.exists(ckpt) else 0
        print(f"kill {k}: at logged step {max(logged_steps(cut))}, last checkpoint at step {saved}")
    if pretrain(argv, cut).wait() != 0:
        sys.exit(f"the resumed run failed: see {cut}/console.txt")

    steps = logged_steps(cut)
    increasing = all(b > a for a, b in zip(steps, steps[1:])) and steps[-1] == total
    a_teacher, b_teacher = (
        torch.load(os.path.join(d, "teacher_backbone.pth"), weights_only=True) for d in (full, cut)
    )
    differ = same_tensors(a_teacher, b_teacher)
    print(
        f"log.jsonl after the resumes: {len(steps)} rows, steps "
        + ("strictly increasing" if increasing else "NOT strictly increasing")
    )
    print(
        f"final teacher: {len(a_teacher)} tensors, "
        + (
            "identical to the uninterrupted run's, bit for bit"
            if not differ
            else f"{len(differ)} differ: " + ", ".join(differ[:5])
        )
    )
    sys.exit(0 if increasing and not differ else 1)


if __name__ == "__main__":
    main()
