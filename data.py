"""Pretraining image sources (paper §3.3: ProS reads raw, unlabelled face images).

    python data.py ms1m --data-root /datasets     # what is there, how many images, one decoded

- `ImageFolder(path)`: every image under a folder, recursively.
- `RecordIO(path)`: MS1M as insightface packs it (`train.rec` + `train.idx`, ../shared/FORMATS.md), read in
  pure Python with random access through the index; no mxnet.
- `pretrain_dataset(name_or_path, root)`: `toy` (the built-in toy world, generated on first use), a name
  such as `ms1m` under the data root, or a path; the format is detected from the files.

Every dataset yields RGB PIL images, or None for an image that cannot be decoded: the training loop
skips and counts those, so one corrupt file never stops a run.
"""
import argparse
import io
import os
import struct

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
RECORDIO_MAGIC = 0xCED7230A


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows every default (a None default: its help says it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def run_cli(main):
    """A script's entry point: bad input (a missing file, a wrong format, a diverging run) is one line on
    stderr and exit status 1, not a traceback."""
    try:
        main()
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}")


def data_root(arg=None):
    """--data-root, else $PROS_DATA, else ./data."""
    return arg or os.environ.get("PROS_DATA") or "data"


def to_rgb(img):
    """Any PIL image -> RGB: 16-bit and float images are scaled to 8 bits, transparency composited on gray."""
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
    except Exception:  # truncated, wrong format, decompression bomb...: skipped and counted by the caller
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
            raise ValueError(f"{source}: bad magic 0x{magic:08x} at byte {f.tell() - 8} (expected 0xced7230a)")
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        parts.append(f.read(length))
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
    """

    def __init__(self, path):
        self.rec = os.path.join(path, "train.rec") if os.path.isdir(path) else path
        idx = os.path.splitext(self.rec)[0] + ".idx"
        for p in (self.rec, idx):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: not found (RecordIO needs train.rec and train.idx)")
        self.offsets = {}
        with open(idx) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        key, off = line.split()
                        self.offsets[int(key)] = int(off)
                    except ValueError:
                        raise ValueError(f"{idx}:{n}: expected 'KEY<TAB>OFFSET', got {line.strip()!r}") from None
        self._file, self._pid = None, None
        header = unpack_payload(self._read(0))[0] if 0 in self.offsets else []
        if len(header) >= 2:  # insightface pack: key 0 holds (first identity key, end key)
            self.keys = [k for k in range(1, int(header[0])) if k in self.offsets]
        else:  # no header record: every key is an image
            self.keys = sorted(self.offsets)
        self._close()

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
        return decode(unpack_payload(self._read(self.keys[i]))[1])


# ----------------------------------------------------------------------------- by name

LAYOUTS = "a folder with train.rec + train.idx (insightface RecordIO, e.g. MS1M) or a folder of images"


def pretrain_dataset(name_or_path, root=None):
    """`toy`, a dataset name under the data root (e.g. `ms1m` -> <root>/ms1m), or a path."""
    root = data_root(root)
    if name_or_path == "toy":
        import toyfaces  # writer code lives there; the toy world is then read like real data
        path = os.path.join(toyfaces.ensure_world(root), "ms1m")
    elif os.path.exists(name_or_path):
        path = name_or_path
    else:
        path = os.path.join(root, name_or_path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {name_or_path!r}: {path} does not exist (expected {LAYOUTS}; "
                                f"set --data-root or $PROS_DATA, or use --data toy)")
    if path.endswith(".rec") or os.path.isfile(os.path.join(path, "train.rec")):
        return RecordIO(path)
    if os.path.isdir(path):
        return ImageFolder(path)
    raise ValueError(f"dataset {name_or_path!r}: {path} is not {LAYOUTS}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("data", help="toy, a name under the data root (ms1m), or a path")
    p.add_argument("--data-root", default=None, help="default: $PROS_DATA, else ./data")
    a = p.parse_args()
    ds = pretrain_dataset(a.data, a.data_root)
    img = ds[0]
    print(f"{type(ds).__name__}: {len(ds)} images; the first is {img.size if img else 'unreadable'}")


if __name__ == "__main__":
    run_cli(main)
