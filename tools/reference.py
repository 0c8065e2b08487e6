#!/usr/bin/env python3
"""Reference outputs for dlpipe's parity tests: torchvision's own transforms and the eager PyTorch
model, independent of dlpipe's Rust preprocessing and of the TorchScript export.

    .venv/bin/python tools/reference.py --manifest models/efficientnet_lite0.json IMAGE... > ref.json

Prints JSON: {"images": [{"path", "features": [...], "top_k": [[class, probability], ...]}]}.
The model is rebuilt from its architecture and weights the way tools/export_model.py builds it,
and the preprocessing is torchvision's Resize(shorter side) + CenterCrop + ToTensor + Normalize on
PIL images, so the test compares two independent paths end to end.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).parent))
import export_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("images", nargs="+", type=Path)
    args = parser.parse_args()

    manifest = json.loads(args.manifest.read_text())
    spec = export_model.SPECS[manifest["architecture"]]
    model = spec.build()
    weights = manifest["weights"]
    if weights["source"] == "pretrained":
        _, path = spec.pretrained()
        model.load_state_dict(export_model.load_state_dict(path))
    elif weights["source"] == "user":
        model.load_state_dict(export_model.load_state_dict(Path(weights["file"])), strict=False)
    else:
        raise SystemExit("reference outputs need trained weights: the manifest says untrained")
    model.eval()
    body, head = export_model.split_last_linear(model)

    inp = manifest["input"]
    preprocess = transforms.Compose([
        transforms.Resize(inp["resize_shorter_side"], interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop((inp["height"], inp["width"])),
        transforms.ToTensor(),
        transforms.Normalize(inp["mean"], inp["std"]),
    ])
    out = []
    with torch.no_grad():
        for path in args.images:
            image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            batch = preprocess(image).unsqueeze(0)
            features = torch.flatten(body(batch), 1)
            probs = torch.softmax(head(features), dim=1)[0]
            top = torch.topk(probs, args.top_k)
            out.append({
                "path": str(path),
                "features": features[0].tolist(),
                "top_k": [[int(i), float(p)] for p, i in zip(top.values, top.indices)],
            })
    json.dump({"model": manifest["name"], "images": out}, sys.stdout)


if __name__ == "__main__":
    main()
