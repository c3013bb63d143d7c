"""Compares our label map / logits with MONAI's (issue 4: identical label maps apart from voxels
whose logit is within 1e-4 of 0; logits within 1e-4).

Usage: compare.py OURS_SEG.nii.gz MONAI_SEG.nii.gz [OURS_LOGITS.safetensors MONAI_LOGITS.safetensors]
Prints one JSON line.
"""

import json
import sys

import nibabel as nib
import numpy as np

NEAR_ZERO = 1e-4


def main():
    ours, monai = (nib.load(p) for p in sys.argv[1:3])
    a, b = np.asarray(ours.dataobj), np.asarray(monai.dataobj)
    r = {
        "shape": list(a.shape), "dtype_ours": str(a.dtype), "dtype_monai": str(b.dtype),
        "affine_equal": bool(np.allclose(ours.affine, monai.affine)),
        "differing_voxels": int((a != b).sum()),
        "labels_ours": {int(k): int(v) for k, v in zip(*np.unique(a, return_counts=True))},
        "labels_monai": {int(k): int(v) for k, v in zip(*np.unique(b, return_counts=True))},
    }
    if len(sys.argv) >= 5:
        from safetensors.numpy import load_file

        la, lb = load_file(sys.argv[3])["logits"], load_file(sys.argv[4])["logits"]
        r["logits_max_abs_diff"] = float(np.abs(la.astype(np.float64) - lb).max())
        near = (np.abs(la) < NEAR_ZERO) | (np.abs(lb) < NEAR_ZERO)  # per channel
        near_any = near.any(axis=0)
        diff = a != b
        r["differing_voxels_outside_near_zero"] = int((diff & ~near_any).sum())
        r["near_zero_voxels"] = int(near_any.sum())
        # per-channel decision mismatches (sigmoid >= 0.5 <=> logit >= 0)
        r["channel_mismatch"] = [int(((la[c] >= 0) != (lb[c] >= 0)).sum()) for c in range(la.shape[0])]
    r["identical"] = r.get("differing_voxels_outside_near_zero", r["differing_voxels"]) == 0
    print(json.dumps(r))


if __name__ == "__main__":
    main()
