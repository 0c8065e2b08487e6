#!/usr/bin/env python3
"""scikit-learn's figures beside `dlpipe bench --learning`: the same images, dlpipe's own features.

    .venv/bin/python tools/stream_references.py data/fashion-mnist [--train-per-class 300] [--test-per-class 100]

Takes the images `dlpipe bench --learning DIR` streams (the first N of each class of DIR/train,
sorted by class and path, in the bench's SplitMix64(7) shuffle) and scores on the same held-out
ones, with features from `dlpipe featurize` (the feature cache): scikit-learn's SGDClassifier
(log-loss) for one pass in the stream's order, and LogisticRegression (lbfgs, C=0.1) fitted in
batch, both on standardised features. Prints a Markdown table of held-out accuracy, log-loss and
expected calibration error (15 bins, as `dlpipe evaluate`).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parent.parent
MASK = (1 << 64) - 1


class SplitMix64:
    """The generator of src/learn/rng.rs, so the order is the bench's."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        zone = MASK - MASK % n
        while True:
            v = self.next_u64()
            if v < zone:
                return v % n


def take_per_class(folder: Path, per_class: int) -> list[tuple[str, str]]:
    """(uri, label) of the first `per_class` images of each class, sorted by (label, uri)."""
    examples = sorted(
        (c.name, str(p.resolve()))
        for c in folder.iterdir()
        if c.is_dir()
        for p in c.iterdir()
        if p.suffix.lower() in (".png", ".jpg", ".jpeg")
    )
    taken: dict[str, int] = {}
    out = []
    for label, uri in examples:
        taken[label] = taken.get(label, 0) + 1
        if taken[label] <= per_class:
            out.append((uri, label))
    return out


def shuffled(items: list, seed: int) -> list:
    items, rng = list(items), SplitMix64(seed)
    for i in range(len(items) - 1, 0, -1):
        j = rng.below(i + 1)
        items[i], items[j] = items[j], items[i]
    return items


def features(examples: list[tuple[str, str]], tmp: Path, name: str) -> tuple[np.ndarray, list[str]]:
    data, out = tmp / f"{name}.csv", tmp / f"{name}.npy"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "label"])
        writer.writerows(examples)
    dlpipe = os.environ.get("DLPIPE", str(ROOT / "target/release/dlpipe"))
    subprocess.run([dlpipe, "featurize", "--data", str(data), "-o", str(out)], check=True, cwd=ROOT)
    rows = [json.loads(line) for line in (tmp / f"{name}.rows.jsonl").open()]
    return np.load(out).astype(np.float64), [r["label"] for r in rows]


def ece(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    confidence, correct = p.max(1), p.argmax(1) == y
    total = 0.0
    for i in range(bins):
        m = (confidence > i / bins) & (confidence <= (i + 1) / bins)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - confidence[m].mean())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args()

    train = shuffled(take_per_class(args.dir / "train", args.train_per_class), 7)
    test = take_per_class(args.dir / "test", args.test_per_class)
    with tempfile.TemporaryDirectory() as tmp:
        x_train, train_labels = features(train, Path(tmp), "train")
        x_test, test_labels = features(test, Path(tmp), "test")
    classes = sorted(set(train_labels))
    index = {c: i for i, c in enumerate(classes)}
    y_train = np.array([index[l] for l in train_labels])
    y_test = np.array([index[l] for l in test_labels])
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)

    one_pass = SGDClassifier(loss="log_loss", random_state=0)
    one_pass.partial_fit(x_train, y_train, classes=np.arange(len(classes)))
    batch = LogisticRegression(C=0.1, max_iter=2000).fit(x_train, y_train)
    print(f"\n{args.dir}: {len(train)} training images, {len(test)} held out\n")
    print("| | held-out accuracy | log-loss | ECE |")
    print("|---|---:|---:|---:|")
    for name, model in (("scikit-learn SGDClassifier, one pass", one_pass),
                        ("scikit-learn LogisticRegression (lbfgs, C=0.1), batch", batch)):
        p = model.predict_proba(x_test)
        accuracy = (p.argmax(1) == y_test).mean()
        print(f"| {name} | {accuracy:.3f} | {log_loss(y_test, p, labels=np.arange(len(classes))):.3f} | "
              f"{ece(p, y_test):.3f} |")


if __name__ == "__main__":
    sys.exit(main())
