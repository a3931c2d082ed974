"""Pretraining image sources (paper §3.3: ProS reads raw, unlabelled face images).

    python data.py ms1m --data-root /datasets     # what is there, how many images, one decoded

- `ImageFolder(path)`: every image under a folder, recursively.
- `RecordIO(path)`: MS1M as insightface packs it (`train.rec` + `train.idx`, docs/formats.md),
  read in pure Python with random access through the index; no mxnet.
- `pretrain_dataset(name_or_path, root)`: `toy` (the toy world, written by toyfaces.py), a name
  such as `ms1m` under the data root, or a path; the format is detected from the files.
- `read_celeba(path)`, `read_celeba_identities(path)`, `read_rafdb(path)`: the label files of
  CelebA and RAF-DB, which fine-tuning and the probe (probe.py) read.

Every dataset yields RGB PIL images, or None for an image that cannot be decoded: the training loop
skips and counts those, so one corrupt file never stops a run.
"""
import argparse
import io
import json
import os
import signal
import struct
import sys
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Subset
from tqdm import tqdm

# RAF-DB's basic expressions, in the order of its labels 1..7 (what toyfaces.py draws, too)
RAFDB_EXPRESSIONS = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
RECORDIO_MAGIC = 0xCED7230A


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
    line on stderr and exit status 1, not a traceback; under torchrun rank 0 alone prints it."""
    try:
        main()
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}" if is_rank_zero() else 1)


def ignore_stop_signals(_worker_id=None):
    """A DataLoader worker's init: Ctrl-C and a cluster's SIGTERM reach every process of the job;
    the training process handles them (it saves at its next logging step), its workers carry on
    until it exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def data_root(arg=None):
    """--data-root, else $PROS_DATA, else ./data."""
    return arg or os.environ.get("PROS_DATA") or "data"


def to_rgb(img):
    """Any PIL image -> RGB: 16-bit and float images are scaled to 8 bits, transparency composited
    on gray."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        bg = Image.new("RGB", img.size, (128, 128, 128))
        bg.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return bg
    return img.convert("RGB")


def decode(data):
    """Encoded image bytes -> RGB PIL, or None when they are not a readable image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return to_rgb(img)
    # truncated, wrong format, decompression bomb...: skipped and counted by the caller
    except Exception:
        return None


def load_image(path):
    """Image file -> RGB PIL, or None when unreadable."""
    try:
        with open(path, "rb") as f:
            return decode(f.read())
    except OSError:
        return None


# ----------------------------------------------------------------------------- sources

class ImageFolder:
    """All images under `path`, recursively, in sorted order."""

    def __init__(self, path):
        self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
                            if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self.files:
            raise FileNotFoundError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return load_image(self.files[i])

    def name(self, i):
        """How a skipped image is listed: its path."""
        return self.files[i]


def read_recordio_record(f, offset, source="train.rec"):
    """The payload of the record at `offset`, its chunks joined (dmlc RecordIO framing)."""
    f.seek(offset)
    parts = []
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{source}: truncated record at byte {offset}")
        magic, lrec = struct.unpack("<II", head)
        if magic != RECORDIO_MAGIC:
            raise ValueError(f"{source}: bad magic 0x{magic:08x} at byte {f.tell() - 8} (expected "
                             f"0xced7230a)")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        parts.append(f.read(length))
        if len(parts[-1]) < length:
            raise ValueError(f"{source}: record at byte {offset} runs past the end of the file")
        f.seek((-length) % 4, 1)  # chunks are padded to 4 bytes
        if cflag in (0, 3):  # whole record, or last chunk
            # a record was split where its payload held the magic word: put it back between chunks
            return struct.pack("<I", RECORDIO_MAGIC).join(parts)


def unpack_payload(payload):
    """insightface IRHeader '<IfQQ' -> (labels as float32 array, image bytes)."""
    flag, label, _, _ = struct.unpack("<IfQQ", payload[:24])
    if flag == 0:
        return np.array([label], np.float32), payload[24:]
    return np.frombuffer(payload[24:24 + 4 * flag], np.float32).copy(), payload[24 + 4 * flag:]


class RecordIO:
    """MS1M in insightface RecordIO: `path` is the folder with train.rec/train.idx or the .rec file.

    Images are keys 1 .. first_identity_key-1 when key 0 is the header record, else every key.
    The file is opened lazily, once per process, so the dataset can go to DataLoader workers.
    Opening checks the index against the file (an interrupted copy of a 100 GB pack fails here, not
    hours into a run); a record that still fails to read gives None, skipped and counted like a
    corrupt image.
    """

    def __init__(self, path):
        self.rec = os.path.join(path, "train.rec") if os.path.isdir(path) else path
        self.idx = os.path.splitext(self.rec)[0] + ".idx"
        for p in (self.rec, self.idx):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: not found (RecordIO needs train.rec and train.idx)")
        self.offsets = read_index(self.idx)
        self._file, self._pid = None, None
        self.check(sample=64)
        header = unpack_payload(self._read(0))[0] if 0 in self.offsets else []
        if len(header) >= 2:  # insightface pack: key 0 holds (first identity key, end key)
            self.keys = [k for k in range(1, int(header[0])) if k in self.offsets]
        else:  # no header record: every key is an image
            self.keys = sorted(self.offsets)
        self._close()

    def check(self, sample=None):
        """Raise ValueError when train.idx and train.rec disagree: an offset past the end of the
        file, or a record (the last 16 by offset and `sample` spread over the rest; all when None)
        whose magic word or length is wrong. Returns the number of records read."""
        size = os.path.getsize(self.rec)
        past = sorted(k for k, offset in self.offsets.items() if offset + 8 > size)
        if past:
            raise ValueError(f"{self.rec}: {len(past)} of the {len(self.offsets)} records of "
                             f"{self.idx} start past the end of the file ({size} bytes; first key "
                             f"{past[0]}): an incomplete copy?")
        keys = sorted(self.offsets, key=self.offsets.get)
        if sample is not None:
            keys = sorted(set(keys[-16:] + keys[::max(1, len(keys) // sample)]))
        for key in keys:
            try:
                self._read(key)
            except ValueError as e:
                raise ValueError(f"{e} (key {key} of {self.idx}): the pack is damaged or the "
                                 f"index is not "
                                 "its own") from None
        return len(keys)

    def _read(self, key):
        if self._file is None or self._pid != os.getpid():  # one handle per worker process
            self._file, self._pid = open(self.rec, "rb"), os.getpid()
        return read_recordio_record(self._file, self.offsets[key], self.rec)

    def _close(self):
        if self._file is not None:
            self._file.close()
        self._file = None

    def __getstate__(self):  # never send an open file to a worker
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def __len__(self):
        return len(self.keys)

    def labels(self, i):
        return unpack_payload(self._read(self.keys[i]))[0]

    def __getitem__(self, i):
        try:
            return decode(unpack_payload(self._read(self.keys[i]))[1])
        except (ValueError, struct.error):  # a damaged record: skipped and counted by the caller
            return None

    def name(self, i):
        """How a skipped record is listed: the pack and the record's key."""
        return f"{self.rec}:{self.keys[i]}"


def read_index(idx):
    """train.idx -> {key: byte offset in train.rec}."""
    offsets = {}
    with open(idx) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    key, off = line.split()
                    offsets[int(key)] = int(off)
                except ValueError:
                    raise ValueError(f"{idx}:{n}: expected 'KEY<TAB>OFFSET', got "
                                     f"{line.strip()!r}") from None
    return offsets


def item_name(dataset, i):
    """The file or record behind item i of a dataset (through Subsets), for the list of skipped
    items."""
    while isinstance(dataset, Subset):
        dataset, i = dataset.dataset, dataset.indices[i]
    return dataset.name(i)


# ----------------------------------------------------------------------------- labelled sets

SPLITS = {"0": "train", "1": "val", "2": "test"}


def _open(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing ({what})")
    return open(path)


def read_celeba(path):
    """A CelebA-layout folder -> dict(attributes=[names], train/val/test=[(image path, 0/1 array)]).

    list_attr_celeba.txt (or list_attr.txt): line 1 the image count, line 2 the attribute names,
    then `000001.jpg -1  1 ...` (values -1/1, or 0/1, separated by one or more spaces; -1 -> 0).
    list_eval_partition.txt: `000001.jpg 0` with 0 train, 1 val, 2 test. Images in
    img_align_celeba/.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such folder (expected img_align_celeba/, "
                                f"list_attr_celeba.txt, "
                                "list_eval_partition.txt; or try --dataset toy)")
    names = ("list_attr_celeba.txt", "list_attr.txt")
    attr_file = next((os.path.join(path, f) for f in names
                      if os.path.isfile(os.path.join(path, f))), os.path.join(path, names[0]))
    with _open(attr_file, "attribute labels") as f:
        lines = f.read().splitlines()
    try:
        count = int(lines[0].strip())
    except (ValueError, IndexError):
        raise ValueError(f"{attr_file}:1: expected the number of images") from None
    names = lines[1].split() if len(lines) > 1 else []
    labels = {}
    for n, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != len(names) + 1 or any(t not in ("-1", "0", "1") for t in tokens[1:]):
            raise ValueError(f"{attr_file}:{n}: expected an image name and {len(names)} values "
                             f"-1/1, got {len(tokens) - 1} tokens")
        labels[tokens[0]] = np.array([t == "1" for t in tokens[1:]], np.float32)
    if len(labels) != count:
        raise ValueError(f"{attr_file}: line 1 says {count} images, the file lists {len(labels)}")
    images = os.path.join(path, "img_align_celeba")
    images = images if os.path.isdir(images) else path
    out = dict(attributes=names, train=[], val=[], test=[])
    part_file = os.path.join(path, "list_eval_partition.txt")
    with _open(part_file, "train/val/test partition") as f:
        for n, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 2 or tokens[1] not in SPLITS or tokens[0] not in labels:
                raise ValueError(f"{part_file}:{n}: expected '<image listed in "
                                 f"{os.path.basename(attr_file)}> 0|1|2', got {line.strip()!r}")
            out[SPLITS[tokens[1]]].append((os.path.join(images, tokens[0]), labels[tokens[0]]))
    return out


def read_celeba_identities(path):
    """CelebA's identity_CelebA.txt (`000001.jpg 2880`) -> {image name: identity}, or None where
    the folder has no such file (verification needs it)."""
    id_file = os.path.join(path, "identity_CelebA.txt")
    if not os.path.isfile(id_file):
        return None
    out = {}
    with open(id_file) as f:
        for n, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 2 or not tokens[1].isdigit():
                raise ValueError(f"{id_file}:{n}: expected '<name>.jpg <identity>', got "
                                 f"{line.strip()!r}")
            out[tokens[0]] = int(tokens[1])
    return out


def read_rafdb(path):
    """RAF-DB basic folder -> dict(train=[(image, label 0..6)], test=[...]), split by the name
    prefix."""
    # the dataset's own spelling
    label_file = os.path.join(path, "EmoLabel", "list_patition_label.txt")
    if not os.path.isfile(label_file):
        raise FileNotFoundError(f"{label_file}: missing (expected RAF-DB basic: "
                                f"EmoLabel/list_patition_label.txt "
                                "and Image/aligned/; or try --dataset toy)")
    out = dict(train=[], test=[])
    with open(label_file) as f:
        for n, line in enumerate(f, start=1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != 2 or tokens[1] not in {str(i) for i in range(1, 8)}:
                raise ValueError(f"{label_file}:{n}: expected '<name>.jpg <label 1..7>', got "
                                 f"{line.strip()!r}")
            split = tokens[0].split("_")[0]
            if split not in out:
                raise ValueError(f"{label_file}:{n}: image name must start with train_ or test_, "
                                 f"got {tokens[0]}")
            stem = os.path.splitext(tokens[0])[0]
            out[split].append((os.path.join(path, "Image", "aligned", stem + "_aligned.jpg"),
                               int(tokens[1]) - 1))
    return out


# ----------------------------------------------------------------------------- by name

LAYOUTS = ("a folder with train.rec + train.idx (insightface RecordIO, e.g. MS1M) or a folder of "
           "images")


def pretrain_dataset(name_or_path, root=None):
    """`toy`, a dataset name under the data root (e.g. `ms1m` -> <root>/ms1m), or a path."""
    root = data_root(root)
    # the toy world's MS1M, written by toyfaces.py (pretrain.py on first use)
    if name_or_path == "toy":
        path = os.path.join(root, "toy", "ms1m")
    elif os.path.exists(name_or_path):
        path = name_or_path
    else:
        path = os.path.join(root, name_or_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {name_or_path!r}: {path} does not exist (expected "
                                f"{LAYOUTS}; set --data-root or $PROS_DATA; python toyfaces.py "
                                f"writes the toy world)")
    if path.endswith(".rec") or os.path.isfile(os.path.join(path, "train.rec")):
        return RecordIO(path)
    if os.path.isdir(path):
        return ImageFolder(path)
    raise ValueError(f"dataset {name_or_path!r}: {path} is not {LAYOUTS}")


def random_subset(images, n, seed):
    """n of the dataset's images drawn at random by `seed` (ProS-1M-real: 1M of MS1M), in file
    order."""
    if not 0 < n <= len(images):
        raise ValueError(f"--n-images {n}: expected 1 to {len(images)}, the number of images in "
                         f"the dataset")
    picks = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return Subset(images, picks.sort().values.tolist())


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


def write_lines(path, lines):
    """A text file of one item per line, written atomically."""
    with open(path + ".tmp", "w") as f:
        f.writelines(f"{line}\n" for line in lines)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- export

def export_path(out, i):
    """Where image i of an export goes: a thousand PNGs a folder (out/000123/000123456.png)."""
    return os.path.join(out, f"{i // 1000:06d}", f"{i:09d}.png")


class ExportItems(torch.utils.data.Dataset):
    """Item i: image i written as a size x size PNG (bicubic) to export_path(out, i), through a
    temporary name; returns "kept" (it was there), "written", or the name of an unreadable image."""

    def __init__(self, images, out, size):
        self.images, self.out, self.size = images, out, size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        path = export_path(self.out, i)
        if os.path.exists(path):
            return "kept"
        img = self.images[i]
        if img is None:
            return item_name(self.images, i)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        resized = img.resize((self.size, self.size), Image.BICUBIC)
        resized.save(path + ".tmp", format="PNG", compress_level=1)  # dataset_tool re-encodes
        os.replace(path + ".tmp", path)
        return "written"


def export(images, out, settings, size=256, workers=4):
    """Write every image as a size x size PNG under `out`, the input StyleGAN2's dataset_tool.py
    reads (§3.4: MS1M resized to 256 x 256 for the "paper256" config), in `workers` processes. A
    file already there is kept, so an interrupted export resumes. `settings` (what was exported,
    how) go to out/export.json: resuming under others is refused. Unreadable images are skipped
    and listed in out/skipped.txt. Returns (written, kept, skipped names)."""
    os.makedirs(out, exist_ok=True)
    record = os.path.join(out, "export.json")
    settings = dict(settings, size=size, images=len(images))
    if os.path.exists(record):
        with open(record) as f:
            check_settings(json.load(f), settings, record, option="--export")
    write_lines(record, [json.dumps(settings)])
    loader = torch.utils.data.DataLoader(ExportItems(images, out, size), batch_size=64,
                                         num_workers=workers, collate_fn=list,
                                         worker_init_fn=ignore_stop_signals)
    done = []
    with tqdm(total=len(images), desc="export", dynamic_ncols=True) as bar:
        for results in loader:
            done += results
            bar.update(len(results))
    skipped = [r for r in done if r not in ("kept", "written")]
    if skipped:
        write_lines(os.path.join(out, "skipped.txt"), skipped)
    return done.count("written"), done.count("kept"), skipped


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("data", help="toy, a name under the data root (ms1m), or a path")
    p.add_argument("--data-root", default=None, help="default: $PROS_DATA, else ./data")
    p.add_argument("--check-all", action="store_true", help="RecordIO: read every record's "
                   "framing, not a sample (a full pass over the file)")
    p.add_argument("--export", default=None, metavar="DIR", help="write the images as PNGs "
                   "for StyleGAN2's dataset_tool.py (§3.4); run again to resume")
    p.add_argument("--size", type=at_least(16), default=256, help="export side (§3.4: 256)")
    p.add_argument("--n-images", type=at_least(1), default=None, help="export this many, drawn "
                   "by --seed as pretrain.py --n-images draws them (ProS-1M-real: 1000000)")
    p.add_argument("--seed", type=int, default=0, help="as pretrain.py's --seed")
    p.add_argument("--workers", type=at_least(0), default=4, help="export processes")
    a = p.parse_args()
    ds = pretrain_dataset(a.data, a.data_root)
    if isinstance(ds, RecordIO) and a.check_all:
        print(f"{ds.rec}: all {ds.check()} records read back")
    if a.export:
        images = random_subset(ds, a.n_images, a.seed) if a.n_images else ds
        start = time.time()
        source = os.path.abspath(ds.rec if isinstance(ds, RecordIO) else a.data)
        settings = dict(source=source, n_images=a.n_images, seed=a.seed if a.n_images else None)
        written, kept, skipped = export(images, a.export, settings, a.size, a.workers)
        rate = written / max(time.time() - start, 1e-9)
        print(f"{a.export}: {written} PNGs written ({rate:.0f} images/s), {kept} already there"
              + (f", {len(skipped)} unreadable skipped (listed in skipped.txt)" if skipped else ""))
        return
    img = ds[0]
    print(f"{type(ds).__name__}: {len(ds)} images; the first is "
          f"{img.size if img else 'unreadable'}")


if __name__ == "__main__":
    run_cli(main)
