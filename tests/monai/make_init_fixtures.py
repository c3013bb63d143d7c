#!/usr/bin/env python3
"""Record how MONAI initialises a fresh SegResNet: tests/fixtures/monai/segresnet/init_stats.json.

Usage (from the repository root):
    tests/monai/setup.sh && tests/monai/.venv/bin/python tests/monai/make_init_fixtures.py

MONAI's SegResNet keeps PyTorch's default initialisation: every Conv3d weight is drawn by
`kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), every conv bias by
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and GroupNorm starts at weight 1, bias 0. For each parameter of
the bundle's network (state_dict order) this writes its shape, fan_in, the bound the draw uses and
the statistics of the drawn values (min, max, mean, std over several seeds pooled), so the Rust side
can check that a network it builds fresh draws from the same distributions
(crates/brats-model/tests/init.rs).
"""

import json
import math
import sys
from pathlib import Path

import monai
import torch
from monai.networks.nets import SegResNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_segresnet_fixtures import BUNDLE_CONFIG  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "monai" / "segresnet" / "init_stats.json"

SEEDS = [0, 1, 2, 3]


def fan_in(module_weight_shape):
    # torch.nn.init._calculate_fan_in_and_fan_out: in_channels × kernel volume.
    fan = module_weight_shape[1]
    for k in module_weight_shape[2:]:
        fan *= k
    return fan


def main():
    nets = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        nets.append(SegResNet(**BUNDLE_CONFIG).state_dict())
    convs = {}
    for name, module in SegResNet(**BUNDLE_CONFIG).named_modules():
        if isinstance(module, torch.nn.Conv3d):
            convs[name] = fan_in(tuple(module.weight.shape))
    params = []
    for name, t in nets[0].items():
        owner, kind = name.rsplit(".", 1)
        pooled = torch.cat([sd[name].flatten().double() for sd in nets])
        entry = dict(
            name=name,
            shape=list(t.shape),
            min=pooled.min().item(),
            max=pooled.max().item(),
            mean=pooled.mean().item(),
            std=pooled.std(unbiased=False).item(),
            samples=pooled.numel(),
        )
        if owner in convs:
            entry["fan_in"] = convs[owner]
            entry["bound"] = 1.0 / math.sqrt(convs[owner])
            entry["init"] = "uniform"
        else:
            entry["init"] = "constant"
        params.append(entry)
    doc = dict(
        generator="tests/monai/make_init_fixtures.py",
        monai=monai.__version__,
        torch=torch.__version__,
        config=BUNDLE_CONFIG,
        seeds=SEEDS,
        parameters=params,
    )
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT} ({len(params)} parameters)")


if __name__ == "__main__":
    main()
