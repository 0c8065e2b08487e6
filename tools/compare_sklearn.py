#!/usr/bin/env python3
"""dlpipe train versus scikit-learn's LogisticRegression (lbfgs) on the same features and split.

Both classifiers see exactly the same inputs: the features `dlpipe featurize` exports (from the
same feature cache `dlpipe train` reads) of the same train and test images. scikit-learn fits
LogisticRegression(solver="lbfgs") on standardised features; dlpipe trains its online learner
for several epochs (`dlpipe train --test-split 0`) and is scored by `dlpipe evaluate`. The script
prints both accuracies and exits 1 when dlpipe's is more than --tolerance below scikit-learn's.

    tools/compare_sklearn.py --train data/fashion-mnist/train --test data/fashion-mnist/test
    tools/compare_sklearn.py --per-class-train 100 --per-class-test 50   # a CI-sized subset

A subset takes the first N images of each class folder (sorted by name), so it is the same on
every machine.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def list_images(folder: Path, per_class: int | None) -> list[tuple[str, str]]:
    out = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.iterdir() if p.is_file())
        if per_class is not None:
            files = files[:per_class]
        out.extend((str(f.resolve()), class_dir.name) for f in files)
    return out


def write_list(rows: list[tuple[str, str]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri", "label"])
        w.writerows(rows)


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def load_features(npy: Path) -> tuple[np.ndarray, list[str]]:
    x = np.load(npy)
    rows = [json.loads(line) for line in npy.with_suffix(".rows.jsonl").read_text().splitlines()]
    return x, [r["label"] for r in rows]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, default=ROOT / "data/fashion-mnist/train")
    ap.add_argument("--test", type=Path, default=ROOT / "data/fashion-mnist/test")
    ap.add_argument("--per-class-train", type=int, help="first N images of each training class")
    ap.add_argument("--per-class-test", type=int, help="first N images of each test class")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--dlpipe", default=os.environ.get("DLPIPE_BIN", str(ROOT / "target/release/dlpipe")))
    ap.add_argument("--work", type=Path, default=ROOT / "out/compare-sklearn")
    ap.add_argument("--feature-cache", type=Path, help="dlpipe's feature cache folder (default: its config's)")
    ap.add_argument("--tolerance", type=float, default=0.01, help="how far below scikit-learn dlpipe may be")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    lists = {}
    for side, folder, n in (("train", args.train, args.per_class_train), ("test", args.test, args.per_class_test)):
        rows = list_images(folder, n)
        lists[side] = args.work / f"{side}.csv"
        write_list(rows, lists[side])
        print(f"{side}: {len(rows)} images from {folder}", file=sys.stderr)

    cache = ["--feature-cache", str(args.feature_cache)] if args.feature_cache else []
    dl = [args.dlpipe]
    for side in ("train", "test"):
        run(dl + ["featurize", "--model", args.model, "--data", str(lists[side]),
                  "-o", str(args.work / f"{side}.npy")] + cache)

    # scikit-learn on the exported features.
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = load_features(args.work / "train.npy")
    x_test, y_test = load_features(args.work / "test.npy")
    started = time.time()
    sk = make_pipeline(StandardScaler(), LogisticRegression(solver="lbfgs", max_iter=1000))
    sk.fit(x_train, y_train)
    sk_seconds = time.time() - started
    sk_accuracy = float((sk.predict(x_test) == np.array(y_test)).mean())

    # dlpipe on the same images (its features come from the same cache).
    classifier = args.work / "classifier.safetensors"
    evaluation = args.work / "evaluation.json"
    started = time.time()
    run(dl + ["train", "--model", args.model, "--data", str(lists["train"]), "--test-split", "0",
              "--epochs", str(args.epochs), "--out", str(classifier)] + cache)
    dl_train_seconds = time.time() - started
    run(dl + ["evaluate", "--data", str(lists["test"]), "--classifier", str(classifier),
              "--json", str(evaluation)] + cache)
    dl_accuracy = json.loads(evaluation.read_text())["accuracy"]

    gap = dl_accuracy - sk_accuracy
    result = {
        "model": args.model,
        "train_images": len(y_train),
        "test_images": len(y_test),
        "sklearn_accuracy": sk_accuracy,
        "sklearn_fit_seconds": round(sk_seconds, 2),
        "dlpipe_accuracy": dl_accuracy,
        "dlpipe_train_seconds": round(dl_train_seconds, 2),
        "dlpipe_epochs": args.epochs,
        "gap_percentage_points": round(100 * gap, 2),
        "tolerance_percentage_points": round(100 * args.tolerance, 2),
    }
    print(f"scikit-learn LogisticRegression (lbfgs): accuracy {sk_accuracy:.4f}  ({len(y_train)} train, "
          f"{len(y_test)} test images; fit {sk_seconds:.1f} s)")
    print(f"dlpipe train ({args.epochs} epochs):           accuracy {dl_accuracy:.4f}  "
          f"(train {dl_train_seconds:.1f} s incl. start-up)")
    print(f"difference: {100 * gap:+.2f} percentage points (dlpipe - scikit-learn); "
          f"allowed: -{100 * args.tolerance:.2f}")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if gap >= -args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
