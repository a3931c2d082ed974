"""What every training script needs and the paper does not: the command line, the processes, and a
run's folder. The scripts (pretrain.py, finetune.py) keep the method; this module keeps the rest.

    python run.py                                # this machine: device, native bf16, threads
    torchrun --nproc_per_node 2 run.py           # the same per process, and the all-reduce works

- the command line: `ArgumentParser` (every default in --help, one-line errors), argparse types
  (`at_least`, `above`, `fraction`, `probability`, `patch_multiple`) and `run_cli` (bad input is
  one line on stderr and a non-zero exit, not a traceback);
- the processes: `setup_distributed` under torchrun (NCCL on CUDA, gloo on CPU), `use_bf16`,
  `distributed` (DDP), `all_mean`, `gather_names`, and `training`: Ctrl-C and SIGTERM turned into
  a stop that every process agrees on after each step, the process group left on every exit;
- files: `read_checkpoint` (weights only, with the types published checkpoints hold),
  `save_atomic`, `write_lines`, `read_json`;
- a run's folder (`Run`): checkpoint.pth resumed, or refused when made with other settings, and
  saved atomically (every --save-every-min minutes, and on a stop); the RNG states; log.jsonl
  rewound to the checkpoint on a resume; skipped.txt, the unreadable items; the progress bar; the
  logging step's one all-reduce.
"""
import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
import time
from collections import namedtuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm


# ----------------------------------------------------------------------------- command line

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows every default (a None default: its help says
    it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def is_rank_zero():
    """Whether this process prints: the only one, or rank 0 under torchrun."""
    return os.environ.get("RANK", "0") == "0"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with every default in --help, and a bad option's error on one line (under torchrun,
    printed by rank 0 alone)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        if is_rank_zero():
            print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def at_least(low, kind=int):
    """argparse type: a number >= low; anything else is the parser's one-line error naming the
    option."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < low:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what} >= {low}, got {text!r}")
        return value
    return parse


def above(low):
    """argparse type: a float > low."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not value > low:
            raise argparse.ArgumentTypeError(f"expected a number > {low}, got {text!r}")
        return value
    return parse


def fraction(text):
    """argparse type: a float in (0, 1]."""
    value = above(0.0)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def probability(text):
    """argparse type: a float in [0, 1]."""
    value = at_least(0.0, float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return value


def patch_multiple(text):
    """argparse type: an image side that the ViT's 16 px patches tile (§3.2: 224 -> 14 x 14, 96 ->
    6 x 6)."""
    value = at_least(16)(text)
    if value % 16:
        raise argparse.ArgumentTypeError(f"expected a multiple of 16 (the patch size), got "
                                         f"{text!r}")
    return value


def run_cli(main):
    """A script's entry point: bad input (a missing file, a wrong format, a diverging run) is one
    line on stderr and exit status 1, not a traceback; under torchrun rank 0 alone prints it, and
    every process leaves it in its error file, which torchrun's failure report shows (in place of
    a pointer to its documentation on tracebacks)."""
    try:
        main()
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if error_file:
            with open(error_file, "w") as f:
                json.dump(dict(message=f"error: {e}", timestamp=int(time.time())), f)
        raise SystemExit(f"error: {e}" if is_rank_zero() else 1)


def add_run_args(p, workers):
    """The flags of the machinery every training script has; returns their group, for the
    script's own (--out among them)."""
    g = p.add_argument_group("data and run")
    g.add_argument("--data-root", default=None,
                   help="where dataset names resolve (default: $PROS_DATA, else ./data)")
    g.add_argument("--workers", type=at_least(0), default=workers,
                   help="DataLoader processes per training process")
    g.add_argument("--log-every", type=at_least(1), default=10, help="steps between logged "
                   "lines and the checks (the loop reads the device only then)")
    g.add_argument("--save-every-min", type=at_least(0.0, float), default=10.0,
                   help="also checkpoint when the last one is this many minutes old (0: never)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast of the networks (default: on a GPU of compute capability "
                   "8.0 or later, else off; python bench.py --bf16 measures a CPU's)")
    return g


# add_run_args's flags and --out: where a run writes, how it loads and logs, not what it computes
RUN_FLAGS = ("out", "data_root", "workers", "log_every", "save_every_min")


def settings(args, not_settings, **more):
    """What a checkpoint or result must match to be resumed or reused: every flag but RUN_FLAGS
    and the script's `not_settings`, and `more`."""
    skip = set(RUN_FLAGS) | set(not_settings)
    return dict({k: v for k, v in vars(args).items() if k not in skip}, **more)


def check_settings(saved, current, path, option="--out"):
    """Refuse a checkpoint, result or export made with other settings: one line naming them and
    the ways out (`option`: the flag that names the folder)."""
    way_out = f"choose another {option}, or delete {os.path.dirname(path) or '.'} to start over"
    if saved is None:
        raise ValueError(f"{path} does not record the settings it was made with; {way_out}")
    differ = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if differ:
        said = ", ".join(f"{k} {current.get(k)!r} (there: {saved.get(k)!r})" for k in differ)
        raise ValueError(f"{path} was made with other settings: {said}; {way_out}")


# ----------------------------------------------------------------------------- processes

# this process's rank, the number of processes, this process's device
Process = namedtuple("Process", "rank world device")


def setup_distributed():
    """Process(rank, world size, device). Under torchrun: NCCL on CUDA, gloo on CPU; else one
    process."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        tasks = int(os.environ.get("SLURM_NTASKS", 1))
        if tasks > 1 and "SLURM_PROCID" in os.environ:  # srun started copies of this script
            raise ValueError(f"SLURM_NTASKS={tasks} but no RANK: the {tasks} tasks would train "
                             f"{tasks} separate runs into one --out. Launch one torchrun per node "
                             f"(srun --ntasks-per-node 1 torchrun ...), or export RANK, "
                             f"WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT per task")
        return Process(0, 1, torch.device("cuda" if cuda else "cpu"))
    # a scheduler that binds one GPU per task (SLURM) shows each process a single device
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) % max(1, torch.cuda.device_count())
    if cuda:
        torch.cuda.set_device(local_rank)
    # gloo for CPU tensors (logging, object gathers, the stop flag), NCCL for CUDA ones
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    return Process(dist.get_rank(), dist.get_world_size(), device)


def native_bf16(device):
    """Whether `device` computes in bf16 natively: a CUDA GPU of compute capability 8.0 or later
    (Ampere on; a V100 or T4 emulates it), or a CPU with AVX512-BF16 or AMX. Elsewhere autocast
    emulates bf16, many times slower than fp32 (python bench.py --bf16 measures it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def use_bf16(flag, device):
    """--bf16 / --no-bf16 as given (with a warning where bf16 is emulated); unset: bf16 autocast on
    a GPU that computes it natively, fp32 elsewhere."""
    if flag and not native_bf16(device):
        print(f"warning: --bf16 on a {device.type} without native bf16 is emulated and far slower "
              f"than fp32 (--no-bf16)", file=sys.stderr)
    if flag is None:
        return device.type == "cuda" and native_bf16(device)
    return flag


def distributed(model, world, device):
    """The model DDP-wrapped where several processes train it (gradients all-reduced in the
    backward pass), else itself."""
    if world == 1:
        return model
    return DistributedDataParallel(model, device_ids=None if device.index is None
                                   else [device.index])


def all_mean(values):
    """Average numbers and 0-d tensors over processes in one all-reduce, on the tensors' device (for
    logging and the collective checks); returns floats. A logging step's one host sync."""
    device = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
    t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def gather_names(names, world):
    """Every process's list of skipped items, joined (a collective: every process calls it)."""
    if world == 1:
        return list(names)
    lists = [None] * world
    dist.all_gather_object(lists, list(names))
    return [n for names_of_one in lists for n in names_of_one]


class StopRequest:
    """Ctrl-C (SIGINT) and a cluster's preemption (SIGTERM) set `signum`; the training loop
    finishes its step, saves and exits. A second Ctrl-C stops at once. On exit the previous
    handlers come back."""

    def __enter__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum == signal.SIGINT == signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def training():
    """A training script's main runs inside: Ctrl-C and SIGTERM handled from the start (yields the
    StopRequest); the process group left on every exit, an error's and a stop's too."""
    try:
        with StopRequest() as stop:
            yield stop
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def stop_agreed(stop, world):
    """Whether any process was asked to stop (Ctrl-C, SIGTERM): each step, one all-reduce of a
    flag in host memory (gloo: no device sync), so that every process stops after the same step,
    well within a cluster's grace period before SIGKILL."""
    if world == 1:
        return bool(stop.signum)
    flag = torch.tensor([float(stop.signum > 0)])
    dist.all_reduce(flag)
    return flag.item() > 0


class HostSyncs(TorchDispatchMode):
    """Counts, inside its `with` block, the operations after which the host waits for the device: a
    value read (.item(), bool(), a Python number from a tensor) and a result whose size depends on
    the data (nonzero, boolean indexing, masked_select, unique). On a CPU they cost nothing, and
    counting them there shows what a GPU would wait for. `ops`: {operation: count}."""
    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
               "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive"}
    INDEXING = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}

    def __enter__(self):
        self.ops = {}
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        by_mask = name in self.INDEXING and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in args[1])
        if name in self.SYNCING or by_mask:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def count(self):
        return sum(self.ops.values())


def ignore_stop_signals(_worker_id=None):
    """A DataLoader worker's init: Ctrl-C and a cluster's SIGTERM reach every process of the job;
    the training process handles them (it saves after its step), its workers carry on until it
    exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def to_device(batch, device):
    """The batch's tensors, nested dicts too, on `device` (from pinned memory: asynchronously)."""
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True)
            for k, v in batch.items()}


# ----------------------------------------------------------------------------- files

def write_lines(path, lines):
    """A text file of one item per line, written atomically."""
    with open(path + ".tmp", "w") as f:
        f.writelines(f"{line}\n" for line in lines)
    os.replace(path + ".tmp", path)


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written
    checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_json(path):
    """A result file, or None where there is none."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno}); delete it to "
                             f"rerun") from None


def safe_globals():
    """The non-tensor types that published checkpoints hold besides tensors and plain Python values:
    `args` as an argparse.Namespace (DINO, MAE and the scripts built on them), numpy scalars and
    arrays."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    dtypes = {type(np.dtype(t))
              for t in (np.bool_, np.int32, np.int64, np.float16, np.float32, np.float64)}
    return [argparse.Namespace, np.ndarray, np.dtype, core.multiarray._reconstruct,
            core.multiarray.scalar, *dtypes]


def read_checkpoint(path):
    """torch.load to the CPU with weights_only (no arbitrary code runs), allowing safe_globals(); a
    missing or unreadable file is a one-line error naming it, and one needing another type names
    it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors of many kinds: report them all the same way
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        if unsafe:
            raise ValueError(f"checkpoint {path}: holds a {unsafe.group(1)}, which is not loaded "
                             "(only tensors, plain values, argparse.Namespace and numpy "
                             "are)") from None
        raise ValueError(f"checkpoint {path}: not a readable PyTorch checkpoint "
                         f"({type(e).__name__})") from None


def read_if_there(path):
    """A checkpoint, or None where there is none."""
    return read_checkpoint(path) if os.path.exists(path) else None


def read_everywhere(read, rank, world):
    """read() on every process, each from its own disk; where one cannot see what rank 0 read (no
    shared filesystem), rank 0 broadcasts it. Rank 0's file decides: an error there is raised on
    every process, and a process that sees a file rank 0 does not ignores it."""
    try:
        mine = (read(), None)
    except (FileNotFoundError, ValueError) as e:
        mine = (None, e)
    if world == 1:
        outcomes = [mine]
    else:
        outcomes = [None] * world
        dist.all_gather_object(outcomes, (mine[0] is not None, mine[1]))
    found, error = outcomes[0]
    if error is not None:
        raise error
    if not found:
        return None
    if world > 1 and not all(seen for seen, _ in outcomes):
        box = [mine[0]]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return mine[0]


def rng_state(device):
    """The RNG states a resumed run restores: the CPU's and, on a GPU, the GPU's (drop-path draws
    there)."""
    state = dict(rng=torch.get_rng_state())
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(ckpt, device):
    torch.set_rng_state(ckpt["rng"])
    if device.type == "cuda" and "cuda_rng" in ckpt:
        torch.cuda.set_rng_state(ckpt["cuda_rng"], device)


def load_resume(ckpt, path, current, **parts):
    """Load checkpoint `ckpt` (read from `path`) into each named module or optimizer, to resume. One
    made with other settings is a one-line error naming them, not a page of size mismatches."""
    check_settings(ckpt.get("settings"), current, path)
    for key, part in parts.items():
        try:
            part.load_state_dict(ckpt[key])
        except (KeyError, RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: cannot resume its '{key}' ({type(e).__name__}): a run with "
                             f"other settings? Delete it or choose another --out") from None


def rewind_log(path, step):
    """A resumed run's log.jsonl keeps its rows up to the checkpoint's step, so that no step appears
    twice; a row cut short by the interruption goes too."""
    if not os.path.exists(path):
        return
    rows = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    rows.append(line.rstrip("\n"))
            except (ValueError, KeyError, TypeError):
                continue
    write_lines(path, rows)


def training_rows(path):
    """(the training rows of a log.jsonl, the number of its lines that do not parse): probe rows
    carry no loss; a line cut short when a run was killed mid-write is counted, not read."""
    rows, unreadable = [], 0
    with open(path) as f:
        for line in filter(str.strip, f):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1
                continue
            if "loss" in row:
                rows.append(row)
    return rows, unreadable


def last_row(path):
    """The last training row of a log.jsonl, or None."""
    rows = training_rows(path)[0] if os.path.exists(path) else []
    return rows[-1] if rows else None


# ----------------------------------------------------------------------------- a run

class Run:
    """The machinery around one training loop, on each process: the run's folder (checkpoint.pth,
    log.jsonl, skipped.txt; written by rank 0), the progress bar, and what happens after a step:
    the stop agreed, the unreadable items collected, the logging step's all-reduce."""

    def __init__(self, folder, current, proc, stop):
        self.folder, self.settings, self.stop = folder, current, stop
        self.rank, self.world, self.device = proc
        os.makedirs(folder, exist_ok=True)
        self.ckpt_path = os.path.join(folder, "checkpoint.pth")
        self.log_path = os.path.join(folder, "log.jsonl")
        self.skipped, self.pending = set(), []  # all unreadable items; those since the last sync
        self.saved_at, self.stopping, self.bar = time.time(), False, None

    def resume(self, **parts):
        """Load the folder's checkpoint into each named module or optimizer (refused if made with
        other settings), restore the RNG states and the skipped list, and cut log.jsonl back to its
        step; returns the checkpoint ({} where there is none) for the loop's counters."""
        ckpt = read_everywhere(lambda: read_if_there(self.ckpt_path), self.rank, self.world) or {}
        if self.rank == 0:
            rewind_log(self.log_path, ckpt.get("step", 0))
        if ckpt:
            load_resume(ckpt, self.ckpt_path, self.settings, **parts)
            restore_rng(ckpt, self.device)
            self.skipped = set(ckpt["skipped"])
        return ckpt

    def save(self, parts, **counters):
        """checkpoint.pth (rank 0, atomically): each part's state dict, the loop's counters, the
        settings, the RNG states and the skipped list; skipped.txt beside it."""
        self.saved_at = time.time()
        if self.rank != 0:
            return
        state = {k: part.state_dict() for k, part in parts.items()}
        save_atomic(dict(state, **counters, skipped=sorted(self.skipped), settings=self.settings,
                         **rng_state(self.device)), self.ckpt_path)
        if self.skipped:
            write_lines(os.path.join(self.folder, "skipped.txt"), sorted(self.skipped))

    def export(self, module, name):
        """`module`'s state dict alone (rank 0, atomically), for what loads it later."""
        if self.rank == 0:
            save_atomic(module.state_dict(), os.path.join(self.folder, name))

    def save_due(self, minutes):
        """Whether the last checkpoint is `minutes` old (--save-every-min; 0: never)."""
        return bool(minutes) and time.time() - self.saved_at >= 60 * minutes

    def progress(self, total, done, desc):
        self.bar = tqdm(total=total, initial=done, disable=self.rank != 0, desc=desc,
                        dynamic_ncols=True)
        self.tick = (time.time(), done)

    def rate(self, step):
        """Steps a second since the last call (or the progress bar's start)."""
        (then, then_step), now = self.tick, time.time()
        self.tick = (now, step)
        return (step - then_step) / max(now - then, 1e-9)

    def step_done(self, names, log_due):
        """After a step: its unreadable items kept for the next sync; returns whether this step
        syncs, the same on every process: `log_due`, or any process asked to stop."""
        self.bar.update(1)
        self.pending += names
        self.stopping = stop_agreed(self.stop, self.world)
        return log_due or self.stopping

    def sync(self, values, where):
        """A logging step's one all-reduce: {name: number or 0-d tensor, 'loss' among them} ->
        {name: the mean over processes}; the unreadable items gathered. A non-finite loss is an
        error (`where`: the step, for its message)."""
        *means, n_skipped = all_mean(list(values.values()) + [len(self.pending)])
        if n_skipped:  # the same on every process: all join the gather
            self.skipped.update(gather_names(self.pending, self.world))
        self.pending = []
        means = dict(zip(values, means))
        if not math.isfinite(means["loss"]):
            raise FloatingPointError(f"non-finite loss at {where}; the last good checkpoint is "
                                     f"{self.ckpt_path}")
        return means

    def log(self, row):
        """One line of log.jsonl (rank 0)."""
        if self.rank == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def exit_if_stopping(self, step):
        """After a stop's checkpoint: say where it is and how to resume; exit 128 + the signal's
        number."""
        if not self.stopping:
            return
        self.bar.close()
        signum = self.stop.signum or signal.SIGTERM  # another process's signal
        if self.rank == 0:
            print(f"\n{signal.Signals(signum).name} at step {step}: checkpoint {self.ckpt_path}; "
                  f"run the same command again to resume", file=sys.stderr)
        raise SystemExit(128 + signum)


def main():
    """What this machine gives a training run, one line a process: torchrun --nproc_per_node N
    run.py checks a node's process group and its all-reduce before a long job."""
    ArgumentParser(description=__doc__).parse_args()
    rank, world, device = setup_distributed()
    ranks = all_mean([float(rank)])[0] * world  # 0 + 1 + ... + world - 1 where all-reduce works
    bf16 = "native" if native_bf16(device) else "emulated (slower than fp32)"
    print(f"process {rank} of {world}: device {device}, bf16 {bf16}, {torch.get_num_threads()} "
          f"threads of {os.cpu_count()} CPUs; all-reduce "
          + ("works" if round(ranks) == world * (world - 1) // 2 else f"FAILED ({ranks})"),
          flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    run_cli(main)
