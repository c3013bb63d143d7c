#!/usr/bin/env python3
"""Generate the MONAI SegResNet parity fixtures in tests/fixtures/monai/segresnet/.

Usage (from the repository root):
    tests/monai/setup.sh && tests/monai/.venv/bin/python tests/monai/make_segresnet_fixtures.py

Weights and inputs come from the deterministic generators in tests/monai/detgen.py (formulas in
tests/fixtures/monai/README.md), so nothing of the 19 MB bundle model has to be committed: the Rust
side regenerates them bit-exactly, runs its SegResNet and compares with the committed MONAI logits.
"""

import hashlib
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import monai
from monai.networks.nets import SegResNet
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_file_torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detgen import det_input, det_state_dict, param_kind  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "monai" / "segresnet"

BUNDLE_CONFIG = dict(
    spatial_dims=3,
    blocks_down=[1, 2, 2, 4],
    blocks_up=[1, 1, 1],
    init_filters=16,
    in_channels=4,
    out_channels=3,
    dropout_prob=0.2,
)
# NB: init_filters=8 with blocks_down=[1, 1, 1, 1] (4 levels) has 443,211 params = 1.79 MB per
# checkpoint file, over the 1.5 MB budget; 3 levels keep the same block types at ~0.43 MB.
SMALL_CONFIG = dict(
    spatial_dims=3,
    blocks_down=[1, 1, 1],
    blocks_up=[1, 1],
    init_filters=8,
    in_channels=4,
    out_channels=3,
    dropout_prob=0.2,
)
BUNDLE_SHAPES = [(64, 64, 48), (48, 32, 40)]
SMALL_SHAPE = (16, 16, 16)
LOGITS_TOL = 1e-4  # max abs; measured fp32-vs-fp64 error is recorded in manifest.json


def build(config, dtype=torch.float32):
    torch.manual_seed(0)  # irrelevant (all weights are overwritten) but keeps construction quiet/deterministic
    model = SegResNet(**config)
    model.load_state_dict(det_state_dict(model), strict=True)
    return model.to(dtype).eval()


def sha256_f32(a):
    a = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
    return hashlib.sha256(a.astype("<f4").tobytes()).hexdigest()


def keys_listing(model):
    sd = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    rows = []
    for k, (name, t) in enumerate(sd.items()):
        a = t.detach().cpu().numpy()
        rows.append(
            OrderedDict(
                index=k,
                name=name,
                shape=list(t.shape),
                dtype=str(t.dtype).replace("torch.", ""),
                numel=int(t.numel()),
                kind=param_kind(name, tuple(t.shape), shapes),
                det_sha256_f32le=sha256_f32(a),
                det_first=[float(v) for v in a.reshape(-1)[:3]],
            )
        )
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() for b in model.buffers())
    return rows, n_params, n_buffers


def forward(model, x):
    with torch.no_grad():
        return model(x)


def stats(a):
    a = np.asarray(a, dtype=np.float64)
    return {
        "min": float(a.min()),
        "max": float(a.max()),
        "mean": float(a.mean()),
        "std": float(a.std()),
        "fraction_positive": float((a > 0).mean()),
    }


def main():
    torch.set_num_threads(1)  # shared machine
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = OrderedDict()
    manifest["generator"] = "tests/monai/make_segresnet_fixtures.py (generators in tests/monai/detgen.py)"
    manifest["command"] = "tests/monai/setup.sh && tests/monai/.venv/bin/python tests/monai/make_segresnet_fixtures.py"
    manifest["versions"] = {
        "monai": monai.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    manifest["device"] = "CPU, float32, model.eval() (dropout off), torch.no_grad()"

    # ---------------------------------------------------------------- bundle config
    model = build(BUNDLE_CONFIG)
    model64 = build(BUNDLE_CONFIG, torch.float64)
    rows, n_params, n_buffers = keys_listing(model)
    assert len(rows) == 83 and n_params == 4_702_227 and n_buffers == 0, (len(rows), n_params, n_buffers)
    (OUT / "state_dict_keys.json").write_text(
        json.dumps(
            {
                "config": BUNDLE_CONFIG,
                "num_tensors": len(rows),
                "num_params": n_params,
                "num_buffers": n_buffers,
                "note": "state_dict order; det_sha256_f32le = sha256 of the deterministic weights "
                "(README formula) as little-endian float32 in C order; det_first = their first 3 values",
                "tensors": rows,
            },
            indent=1,
        )
        + "\n"
    )
    bundle_cases = []
    for shp in BUNDLE_SHAPES:
        tag = "x".join(map(str, shp))
        x = det_input((1, 4) + shp)
        y = forward(model, torch.from_numpy(x)).numpy()
        y64 = forward(model64, torch.from_numpy(x).double()).numpy()
        assert y.dtype == np.float32 and y.shape == (1, 3) + shp
        err = float(np.abs(y.astype(np.float64) - y64).max())
        save_file({f"logits_{tag}": np.ascontiguousarray(y)}, str(OUT / f"logits_{tag}.safetensors"))
        bundle_cases.append(
            OrderedDict(
                file=f"logits_{tag}.safetensors",
                tensor=f"logits_{tag}",
                shape=list(y.shape),
                dtype="float32",
                input_shape=[1, 4, *shp],
                input="det_input (README), not committed",
                input_sha256_f32le=sha256_f32(x),
                input_sum_f64=float(x.astype(np.float64).sum()),
                input_probe={str(p): float(x[(0,) + p]) for p in [(0, 32 % shp[0], 32 % shp[1], 24 % shp[2]), (3, 10, 20, 30 % shp[2]), (1, 0, 0, 0)]},
                logits_stats=stats(y),
                max_abs_diff_fp32_vs_fp64=err,
            )
        )
        print(f"bundle {tag}: logits {stats(y)}, |fp32-fp64| max {err:.3g}")
    manifest["bundle"] = OrderedDict(
        config=BUNDLE_CONFIG,
        weights="det_state_dict (README), not committed; keys/shapes/sha256 in state_dict_keys.json",
        cases=bundle_cases,
        tolerance={"logits_max_abs": LOGITS_TOL},
    )

    # ---------------------------------------------------------------- small checkpoint
    small = build(SMALL_CONFIG)
    sd = small.state_dict()  # OrderedDict of float32 tensors
    rows_s, n_params_s, _ = keys_listing(small)
    torch.save(sd, str(OUT / "small_state_dict.pt"))
    torch.save({"model": sd}, str(OUT / "small_wrapped.pt"))
    save_file_torch({k: v.contiguous() for k, v in sd.items()}, str(OUT / "small.safetensors"))
    xs = det_input((1, 4) + SMALL_SHAPE)
    ys = forward(small, torch.from_numpy(xs)).numpy()
    ys64 = forward(build(SMALL_CONFIG, torch.float64), torch.from_numpy(xs).double()).numpy()
    err_s = float(np.abs(ys.astype(np.float64) - ys64).max())
    save_file({"input": xs}, str(OUT / "small_input.safetensors"))
    save_file({"logits": np.ascontiguousarray(ys)}, str(OUT / "small_logits.safetensors"))
    # the three checkpoint files must hold identical tensors
    from safetensors.torch import load_file

    a = torch.load(str(OUT / "small_state_dict.pt"), map_location="cpu", weights_only=True)
    b = torch.load(str(OUT / "small_wrapped.pt"), map_location="cpu", weights_only=True)["model"]
    c = load_file(str(OUT / "small.safetensors"))
    for k, v in sd.items():
        assert torch.equal(a[k], v) and torch.equal(b[k], v) and torch.equal(c[k], v), k
    assert list(a.keys()) == list(sd.keys()) == list(b.keys())
    size_pt = (OUT / "small_state_dict.pt").stat().st_size
    print(f"small: {len(rows_s)} tensors, {n_params_s} params, .pt {size_pt} bytes, |fp32-fp64| max {err_s:.3g}")
    manifest["small"] = OrderedDict(
        config=SMALL_CONFIG,
        num_tensors=len(rows_s),
        num_params=n_params_s,
        weights="det_state_dict (README) of this config, k = index in this model's state_dict",
        files={
            "small_state_dict.pt": "torch.save(model.state_dict()) - zip format, pickled collections.OrderedDict "
            "of float32 tensors (torch._utils._rebuild_tensor_v2 + FloatStorage)",
            "small_wrapped.pt": 'torch.save({"model": model.state_dict()})',
            "small.safetensors": "same tensors, same names (safetensors sorts its header by name)",
            "small_input.safetensors": f"tensor `input` float32 [1, 4, {SMALL_SHAPE[0]}, {SMALL_SHAPE[1]}, {SMALL_SHAPE[2]}] = det_input",
            "small_logits.safetensors": f"tensor `logits` float32 [1, 3, {SMALL_SHAPE[0]}, {SMALL_SHAPE[1]}, {SMALL_SHAPE[2]}]",
        },
        torch_save_sizes_bytes={
            "small_state_dict.pt": size_pt,
            "small_wrapped.pt": (OUT / "small_wrapped.pt").stat().st_size,
            "small.safetensors": (OUT / "small.safetensors").stat().st_size,
        },
        input_sha256_f32le=sha256_f32(xs),
        logits_stats=stats(ys),
        max_abs_diff_fp32_vs_fp64=err_s,
        tolerance={"logits_max_abs": LOGITS_TOL},
        tensors=[OrderedDict((k, r[k]) for k in ("index", "name", "shape", "kind", "det_sha256_f32le")) for r in rows_s],
    )
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
