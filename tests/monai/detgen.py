"""Deterministic generators shared by the MONAI fixture scripts.

Everything here is defined with integer arithmetic (wrapping u64) and IEEE-754 double
operations that are correctly rounded (+, -, *, /, sqrt), evaluated in the exact order
written, then one final cast f64 -> f32 (round to nearest, ties to even). There is no
sin/exp/log, so a Rust implementation reproduces every value bit-exactly
(Rust never fuses a*b+c into an FMA unless asked to).

The formulas are repeated verbatim in tests/fixtures/monai/README.md.
"""

import numpy as np

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)

INPUT_STREAM = 1000  # stream id for network inputs; weights use stream id = tensor index k


def splitmix64(x):
    """splitmix64 finaliser on a uint64 array (all arithmetic wraps mod 2^64)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = x + GOLDEN
        z = (z ^ (z >> np.uint64(30))) * MIX1
        z = (z ^ (z >> np.uint64(27))) * MIX2
        z = z ^ (z >> np.uint64(31))
    return z


def uniform(stream, n):
    """u[idx] for idx in 0..n: splitmix64((stream << 32) + idx) -> top 24 bits -> (t - 2^23) / 2^23.

    Values lie in [-1, 1) and are multiples of 2^-23, so they are exact in f32 and f64.
    """
    idx = np.arange(n, dtype=np.uint64)
    h = splitmix64((np.uint64(stream) << np.uint64(32)) + idx)
    t = (h >> np.uint64(40)).astype(np.int64)  # 0 .. 2^24-1
    return (t - (1 << 23)).astype(np.float64) / float(1 << 23)


def param_kind(name, shape, state_dict_shapes):
    """'conv_weight' | 'conv_bias' | 'norm_weight' | 'norm_bias' (SegResNet only has these)."""
    if len(shape) == 5:
        return "conv_weight"
    if name.endswith(".weight"):
        return "norm_weight"
    assert name.endswith(".bias"), name
    sibling = state_dict_shapes[name[: -len(".bias")] + ".weight"]
    return "conv_bias" if len(sibling) == 5 else "norm_bias"


def det_param(k, name, shape, state_dict_shapes):
    """Deterministic value of the k-th (0-based, state_dict order) parameter tensor, float32."""
    n = int(np.prod(shape))
    u = uniform(k, n)
    kind = param_kind(name, shape, state_dict_shapes)
    if kind == "conv_weight":
        fan_in = n // shape[0]  # in_channels * kd * kh * kw
        a = np.sqrt(6.0 / float(fan_in))  # f64: 6.0 / fan_in, then sqrt
        v = u * a
    elif kind == "norm_weight":
        v = 1.0 + 0.25 * u
    elif kind == "norm_bias":
        v = 0.1 * u
    else:  # conv_bias
        v = 0.1 * u
    return v.astype(np.float32).reshape(shape)


def det_state_dict(model):
    """{name: torch.float32 tensor} with det_param values for every entry of model.state_dict()."""
    import torch

    sd = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    out = {}
    for k, (name, t) in enumerate(sd.items()):
        assert t.dtype == torch.float32, (name, t.dtype)
        out[name] = torch.from_numpy(det_param(k, name, tuple(t.shape), shapes))
    return out


def det_input(shape):
    """Deterministic network input of shape [1, C, X, Y, Z], float32.

    For c, i, j, k (f64 arithmetic, in this order):
      a  = (2*i + 1 - X) / X ;  b = (2*j + 1 - Y) / Y ;  d = (2*k + 1 - Z) / Z
      r2 = (a*a + b*b) + d*d
      u  = uniform(INPUT_STREAM, C*X*Y*Z)[((c*X + i)*Y + j)*Z + k]
      x  = ((c + 1) * (1 - r2) + 0.5 * a * (c - 1.5)) + 0.25 * u   if r2 < 1   else 0
    then cast to f32.
    """
    n_b, c_n, xs, ys, zs = shape
    assert n_b == 1
    i = np.arange(xs, dtype=np.float64)[:, None, None]
    j = np.arange(ys, dtype=np.float64)[None, :, None]
    k = np.arange(zs, dtype=np.float64)[None, None, :]
    a = (2.0 * i + 1.0 - xs) / xs
    b = (2.0 * j + 1.0 - ys) / ys
    d = (2.0 * k + 1.0 - zs) / zs
    r2 = (a * a + b * b) + d * d  # broadcast to [X, Y, Z]
    a_full = np.broadcast_to(a, r2.shape)
    u = uniform(INPUT_STREAM, c_n * xs * ys * zs).reshape(c_n, xs, ys, zs)
    out = np.empty((c_n, xs, ys, zs), dtype=np.float64)
    for c in range(c_n):
        val = ((c + 1.0) * (1.0 - r2) + 0.5 * a_full * (c - 1.5)) + 0.25 * u[c]
        out[c] = np.where(r2 < 1.0, val, 0.0)
    return np.ascontiguousarray(out.astype(np.float32)[None])
