#!/usr/bin/env python3
"""Generate the training-side MONAI/PyTorch parity fixtures in tests/fixtures/monai/trainer/.

Usage (from the repository root):
    tests/monai/setup.sh && tests/monai/.venv/bin/python tests/monai/make_trainer_fixtures.py

What runs (MONAI 1.6.1, torch 2.11.0, CPU, float32 unless stated), and what is written:

- loss.safetensors + manifest["loss"]: `monai.losses.DiceLoss` forward value and d(loss)/d(input)
  (autograd) for
    single         B=1, bundle options (smooth_nr 0, smooth_dr 1e-5, squared_pred, sigmoid)
    batch2_empty   B=2, bundle options, item 0 TC target empty and item 1 ET target empty
    options        batch2_empty's inputs with smooth_nr 1e-5, squared_pred False, batch True,
                   include_background False
    probabilities  sigmoid False on inputs in [0, 1], squared_pred True
    smoothing      sigmoid False on inputs in [0, 1e-3), smooth_nr 1e-6, smooth_dr 1e-5: the
                   smoothing terms dominate (an empty channel's loss is 1 - 1e-6 / (P + 1e-5))
    half           float16 logits: MONAI is given `logits.float()` (what our loss computes), the
                   gradient flows back to float16
    large          [1, 3, 32, 32, 24] from detgen streams (not stored); loss + every 61st gradient
- metric.safetensors + manifest["metric"]: the bundle's validation post-processing and metrics per
  case: Activations(sigmoid=True) -> AsDiscrete(threshold=0.5) on each decollated item, then
  DiceMetric(include_background=True, reduction="mean") (= handlers.MeanDice, the key metric
  "val_mean_dice") on all 3 channels and on each channel alone (SplitChanneld + MeanDice:
  val_mean_dice_tc/wt/et). Per-item values (reduction "none", NaN for an empty label channel) and
  aggregates over several case subsets.
- adam.safetensors + manifest["adam"]: torch.optim.Adam(lr, betas (0.9, 0.999), eps 1e-8,
  weight_decay 1e-5) and torch.optim.AdamW(weight_decay 1e-2) (CPU default = single-tensor path)
  for 5 steps on 3 parameters whose initial values and per-step gradients come from detgen streams
  (not stored); parameter 2 has no gradient (None) in steps 1-2. Parameters after every step, and
  the moments (exp_avg, exp_avg_sq) after the last.
- manifest["cosine"]: CosineAnnealingLR(T_max, eta_min=0) lrs after 0..N scheduler steps (the lr of
  epoch index e), for T_max 5 (12 epochs, past T_max) and T_max 300 (311 epochs), as float64 bit
  patterns and decimals.
- manifest["warmup_cosine"]: monai.optimizers.WarmupCosineSchedule(warmup_steps, t_total) with its
  defaults (end_lr 0, cycles 0.5, warmup_multiplier 0), stepped once per optimiser step: the lr of
  every step 0..t_total+2 (past the end), for (warmup 15, total 300), (0, 40) and (50, 30: the
  warm-up clamped to t_total), as float64 bit patterns and decimals.
- manifest["grad_scaler"]: torch.amp.GradScaler("cpu") sequences with inf/NaN injected at known
  steps: scale before/after update, growth tracker, found_inf, and the Adam parameter after each
  iteration; plus a growth-overflow sequence (new scale not finite -> kept).
- train_steps.safetensors + manifest["train_steps"]: the whole training step end to end: SegResNet
  (small config, dropout off) from ../segresnet/small.safetensors on ../segresnet/small_input,
  train mode -> bundle DiceLoss against target_from(7000, thresholds 0.3, -0.2, 0.6) -> backward ->
  Adam(lr 5e-3, weight_decay 1e-5), 3 steps on that batch: the losses, every parameter's gradient
  after step 1 and every parameter after step 3 (every 31st element of each), and each gradient's
  largest magnitude.

Generators: detgen.uniform(stream, n) (tests/monai/detgen.py, reproduced bit for bit in
brats_model::reference::uniform) for every generated value; stream ids are listed in the manifest.
Deterministic: re-running rewrites byte-identical files on the machine that made them. On another
CPU the Adam and GradScaler values may differ in the last bit (seen between an AVX-512 and an AVX2
machine: 2e-10 on adam.safetensors); the tests' tolerances are far wider.
"""

import json
import math
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from detgen import uniform  # noqa: E402

import torch  # noqa: E402
import monai  # noqa: E402
from monai.losses import DiceLoss  # noqa: E402
from monai.metrics import DiceMetric  # noqa: E402
from monai.transforms import Activations, AsDiscrete  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "monai" / "trainer"

BUNDLE_LOSS = dict(smooth_nr=0, smooth_dr=1e-05, squared_pred=True, to_onehot_y=False, sigmoid=True)


def u(stream, shape):
    """detgen uniform values in [-1, 1) as a float32 array of `shape` (exact in f32)."""
    n = int(np.prod(shape))
    return uniform(stream, n).astype(np.float32).reshape(shape)


def target_from(stream, shape, thresholds):
    """0/1 float32 target: channel c is u > thresholds[c] (c = axis 1)."""
    v = u(stream, shape)
    t = np.zeros(shape, dtype=np.float32)
    for c, thr in enumerate(thresholds):
        t[:, c] = (v[:, c] > thr).astype(np.float32)
    return t


def f64_bits(x):
    return struct.unpack("<Q", struct.pack("<d", float(x)))[0]


# ---------------------------------------------------------------------------------------- loss
def loss_fixtures(tensors):
    cases = {}

    def run(name, logits_np, target_np, options, store_inputs=True, grad_stride=None, half=False):
        if half:
            x16 = torch.from_numpy(logits_np.astype(np.float16)).requires_grad_(True)
            x = x16.float()
        else:
            x16 = None
            x = torch.from_numpy(logits_np).requires_grad_(True)
        y = torch.from_numpy(target_np)
        loss_fn = DiceLoss(**options)
        loss = loss_fn(x, y)
        loss.backward()
        leaf = x16 if half else x
        grad = leaf.grad.detach().numpy()
        if store_inputs:
            tensors[f"loss.{name}.input"] = logits_np.astype(np.float16) if half else logits_np
            tensors[f"loss.{name}.target"] = target_np.astype(np.uint8)
        if grad_stride is None:
            tensors[f"loss.{name}.grad"] = grad
        else:
            tensors[f"loss.{name}.grad_strided"] = np.ascontiguousarray(grad.reshape(-1)[::grad_stride])
        tensors[f"loss.{name}.loss"] = np.array([loss.item()], dtype=np.float32)
        opts = {k: v for k, v in options.items() if k != "to_onehot_y"}
        cases[name] = dict(
            options=opts,
            shape=list(logits_np.shape),
            input_dtype="float16" if half else "float32",
            loss=loss.item(),
            grad_stride=grad_stride,
        )

    # single: B=1, 8x8x6, logits in [-3, 3), prevalence ~ 40 % / 60 % / 15 %.
    shape = (1, 3, 8, 8, 6)
    logits = 3.0 * u(3001, shape)
    target = target_from(3002, shape, [0.2, -0.2, 0.7])
    run("single", logits, target, BUNDLE_LOSS)

    # batch2_empty: B=2, 6x6x4, one empty target channel in each item.
    shape = (2, 3, 6, 6, 4)
    logits2 = 4.0 * u(3003, shape)
    target2 = target_from(3004, shape, [0.0, -0.3, 0.5])
    target2[0, 0] = 0.0
    target2[1, 2] = 0.0
    run("batch2_empty", logits2, target2, BUNDLE_LOSS)

    # options: non-bundle settings of every option we implement, on batch2_empty's inputs.
    run(
        "options",
        logits2,
        target2,
        dict(smooth_nr=1e-5, smooth_dr=1e-5, squared_pred=False, to_onehot_y=False, sigmoid=True, batch=True,
             include_background=False),
    )

    # probabilities: sigmoid False, inputs already in [0, 1].
    probs = (0.5 * u(3005, (1, 3, 8, 8, 6)) + 0.5).astype(np.float32)
    run("probabilities", probs, target, dict(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, to_onehot_y=False,
                                             sigmoid=False))

    # smoothing: tiny probabilities (sigmoid False) so that smooth_nr / smooth_dr dominate; channel 0
    # target empty, channel 1 one voxel.
    tiny = (1e-3 * np.abs(u(3009, (1, 3, 4, 4, 2)))).astype(np.float32)
    tgt = np.zeros((1, 3, 4, 4, 2), dtype=np.float32)
    tgt[0, 1, 1, 2, 0] = 1.0
    tgt[0, 2, :2, :2, :] = 1.0
    run("smoothing", tiny, tgt, dict(smooth_nr=1e-6, smooth_dr=1e-5, squared_pred=True, to_onehot_y=False,
                                     sigmoid=False))

    # half: float16 logits.
    run("half", (6.0 * u(3006, (1, 3, 8, 8, 6))).astype(np.float32), target, BUNDLE_LOSS, half=True)

    # large: generated, not stored (streams 3007 logits x 5, 3008 target thresholds 0.3/-0.4/0.8).
    shape = (1, 3, 32, 32, 24)
    run("large", 5.0 * u(3007, shape), target_from(3008, shape, [0.3, -0.4, 0.8]), BUNDLE_LOSS,
        store_inputs=False, grad_stride=61)
    cases["large"]["generator"] = dict(
        logits="5 * uniform(3007, n)", target="uniform(3008, n)[c] > [0.3, -0.4, 0.8][c]"
    )
    return cases


# -------------------------------------------------------------------------------------- metric
def metric_fixtures(tensors):
    sp = (8, 6, 4)
    cases = []

    def add(name, logits, label, what):
        tensors[f"metric.{name}.logits"] = logits.astype(np.float32)
        tensors[f"metric.{name}.label"] = label.astype(np.uint8)
        cases.append(dict(name=name, what=what, batch=int(logits.shape[0])))

    base = 4.0 * u(4001, (1, 3) + sp)
    lab = target_from(4002, (1, 3) + sp, [0.3, -0.2, 0.6])
    add("regular", base, lab, "all channels non-empty")

    l1 = 4.0 * u(4003, (1, 3) + sp)
    y1 = target_from(4004, (1, 3) + sp, [0.4, 0.0, 0.7])
    y1[0, 2] = 0
    add("et_empty", l1, y1, "ET label empty -> NaN, skipped")

    l2 = 4.0 * u(4005, (1, 3) + sp)
    y2 = np.zeros((1, 3) + sp, dtype=np.float32)
    add("all_empty", l2, y2, "every label channel empty -> case excluded from the mean")

    l3 = 4.0 * u(4007, (1, 3) + sp)
    y3 = target_from(4008, (1, 3) + sp, [0.5, 0.1, 0.6])
    l3[0, 1] = -np.abs(l3[0, 1]) - 0.5  # WT prediction empty with a non-empty label -> 0
    l3[0, 0] = -np.abs(l3[0, 0]) - 0.5  # TC prediction empty ...
    y3[0, 0] = 0  # ... and TC label empty -> NaN (ignore_empty)
    add("pred_empty", l3, y3, "WT prediction empty (dice 0); TC prediction and label empty (NaN)")

    l4 = 4.0 * u(4009, (2, 3) + sp)
    y4 = target_from(4010, (2, 3) + sp, [0.2, -0.1, 0.5])
    # Logits at the threshold: sigmoid(x) >= 0.5 in float32 holds for x a little below 0.
    near = np.array([-2e-7, -1e-7, -6e-8, -5e-8, -3e-8, -1e-8, 0.0, 1e-8], dtype=np.float32)
    flat = l4.reshape(-1)
    idx = np.arange(0, flat.size, 7)
    flat[idx] = near[np.arange(idx.size) % near.size]
    y4[1, 2] = 0
    add("batch2_threshold", l4, y4, "batch of 2, logits near 0 (>= 0.5 after sigmoid), item 1 ET empty")

    act = Activations(sigmoid=True)
    disc = AsDiscrete(threshold=0.5)

    def post(logits):
        # What the bundle's evaluator does: decollate, then the postprocessing per item.
        return [disc(act(torch.from_numpy(item))) for item in logits]

    per_case = {}
    for c in cases:
        logits = tensors[f"metric.{c['name']}.logits"]
        label = tensors[f"metric.{c['name']}.label"].astype(np.float32)
        preds = post(logits)
        ys = [torch.from_numpy(item) for item in label]
        m = DiceMetric(include_background=True, reduction="none")
        m(y_pred=preds, y=ys)
        per_case[c["name"]] = dict(
            preds=preds, ys=ys, none=m.aggregate().numpy(), positives=[int(p.sum().item()) for p in preds]
        )
        c["dice"] = [[None if math.isnan(v) else float(v) for v in row] for row in per_case[c["name"]]["none"]]
        tensors[f"metric.{c['name']}.dice"] = per_case[c["name"]]["none"].astype(np.float32)

    def aggregate(names):
        key = DiceMetric(include_background=True, reduction="mean")
        chans = [DiceMetric(include_background=True, reduction="mean") for _ in range(3)]
        for n in names:
            preds, ys = per_case[n]["preds"], per_case[n]["ys"]
            key(y_pred=preds, y=ys)
            for ch, m in enumerate(chans):
                # SplitChanneld: one [1, X, Y, Z] item per channel.
                m(y_pred=[p[ch : ch + 1] for p in preds], y=[y[ch : ch + 1] for y in ys])
        return dict(
            cases=names,
            mean=key.aggregate().item(),
            tc=chans[0].aggregate().item(),
            wt=chans[1].aggregate().item(),
            et=chans[2].aggregate().item(),
        )

    names = [c["name"] for c in cases]
    aggregates = {
        "all": aggregate(names),
        "all_empty_only": aggregate(["all_empty"]),
        "et_empty_pred_empty": aggregate(["et_empty", "pred_empty"]),
        "regular_batch2": aggregate(["regular", "batch2_threshold"]),
    }
    return dict(spatial=list(sp), cases=cases, aggregates=aggregates)


# ---------------------------------------------------------------------------------------- adam
ADAM_SHAPES = [[8, 4, 3, 3, 3], [16], [37]]
ADAM_GRAD_SCALE = [1e-2, 1e-9, 1.0]
ADAM_LRS = [1e-4, 1e-4, 1e-4, 5e-5, 1e-4]
ADAM_NO_GRAD = {2: [1, 2]}  # parameter index -> steps (1-based) with grad None


def adam_fixtures(tensors):
    def init_params():
        return [torch.from_numpy(0.1 * u(5000 + k, s)).clone().requires_grad_(True) for k, s in enumerate(ADAM_SHAPES)]

    def grad(k, step):
        # float32 multiply of an exact uniform by the scale, as the Rust test does.
        return torch.from_numpy(u(5100 + 10 * k + step, ADAM_SHAPES[k])) * ADAM_GRAD_SCALE[k]

    out = {}
    for name, ctor, wd in [
        ("adam", torch.optim.Adam, 1e-5),
        ("adamw", torch.optim.AdamW, 1e-2),
    ]:
        params = init_params()
        opt = ctor(params, lr=ADAM_LRS[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
        for s, lr in enumerate(ADAM_LRS, start=1):
            for g in opt.param_groups:
                g["lr"] = lr
            for k, p in enumerate(params):
                p.grad = None if s in ADAM_NO_GRAD.get(k, []) else grad(k, s)
            opt.step()
            for k, p in enumerate(params):
                tensors[f"{name}.step{s}.p{k}"] = p.detach().numpy().copy()
        for k, p in enumerate(params):
            for moment in ["exp_avg", "exp_avg_sq"]:
                tensors[f"{name}.final.{moment}.p{k}"] = opt.state[p][moment].numpy().copy()
        steps = [int(opt.state[p]["step"].item()) if p in opt.state else 0 for p in params]
        out[name] = dict(weight_decay=wd, final_steps=steps)
    return dict(
        shapes=ADAM_SHAPES,
        grad_scale=ADAM_GRAD_SCALE,
        lrs=ADAM_LRS,
        no_grad_steps={str(k): v for k, v in ADAM_NO_GRAD.items()},
        init="0.1 * uniform(5000 + k, n) as float32",
        grad="uniform(5100 + 10 * k + step, n) as float32, times grad_scale[k] in float32",
        betas=[0.9, 0.999],
        eps=1e-8,
        runs=out,
    )


# -------------------------------------------------------------------------------------- cosine
def cosine_fixtures():
    out = {}
    for t_max, epochs in [(5, 12), (300, 311)]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([p], lr=1e-4, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)
        lrs = [opt.param_groups[0]["lr"]]
        for _ in range(epochs - 1):
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        closed = [0.5 * 1e-4 * (1 + math.cos(math.pi * e / t_max)) for e in range(epochs)]
        out[f"t_max_{t_max}"] = dict(
            base_lr=1e-4,
            t_max=t_max,
            eta_min=0.0,
            lrs=lrs,
            lrs_f64_bits=[f64_bits(v) for v in lrs],
            max_abs_diff_to_closed_form=max(abs(a - b) for a, b in zip(lrs, closed)),
        )
    return out


def warmup_cosine_fixtures():
    from monai.optimizers import WarmupCosineSchedule

    out = {}
    for warmup, total in [(15, 300), (0, 40), (50, 30)]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([p], lr=5e-3)
        sched = WarmupCosineSchedule(opt, warmup_steps=warmup, t_total=total)
        lrs = []
        for _ in range(total + 3):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        out[f"warmup_{warmup}_total_{total}"] = dict(
            base_lr=5e-3,
            warmup_steps=warmup,
            t_total=total,
            lrs=lrs,
            lrs_f64_bits=[f64_bits(v) for v in lrs],
        )
    return out


# --------------------------------------------------------------------------------- grad scaler
def scaler_sequence(init_scale, growth_interval, steps, bad, grad_scale):
    """Adam(lr 1e-2) on one [5] parameter; the loss is sum(p * g_s), g_s from stream 6100 + s."""
    p = torch.nn.Parameter(torch.from_numpy(0.5 * u(6000, (5,))).clone())
    opt = torch.optim.Adam([p], lr=1e-2)
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=init_scale, growth_factor=2.0, backoff_factor=0.5, growth_interval=growth_interval
    )
    seq = []
    for s in range(1, steps + 1):
        g = torch.from_numpy(u(6100 + s, (5,))) * grad_scale
        if s in bad:
            idx, val = bad[s]
            g[idx] = float(val)
        opt.zero_grad()
        loss = (p * g).sum()
        scale_before = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        unscaled = p.grad.detach().clone()
        found_inf = sum(v.item() for v in scaler._found_inf_per_device(opt).values()) > 0
        scaler.step(opt)
        scaler.update()
        seq.append(
            dict(
                step=s,
                scale_before=scale_before,
                found_inf=bool(found_inf),
                scale_after=scaler.get_scale(),
                growth_tracker=int(scaler._growth_tracker.item()),
                unscaled_grad=[None if not math.isfinite(v) else v for v in unscaled.tolist()],
                param=p.detach().tolist(),
            )
        )
    return dict(
        init_scale=init_scale,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=growth_interval,
        steps=steps,
        grad_scale=grad_scale,
        bad={str(k): [v[0], str(v[1])] for k, v in bad.items()},
        sequence=seq,
    )


def scaler_fixtures():
    return dict(
        param_init="0.5 * uniform(6000, 5) as float32",
        grad="uniform(6100 + step, 5) as float32 * grad_scale (float32), bad[step] = [index, value] overrides",
        optimizer="Adam(lr=1e-2), no weight decay",
        injected=scaler_sequence(65536.0, 3, 12, {4: (2, "inf"), 7: (0, "nan"), 8: (4, "-inf")}, 1.0),
        overflow=scaler_sequence(2.0**127, 1, 3, {}, 1e-10),
    )


# ------------------------------------------------------------------------------ training steps
TRAIN_STEPS = 3
TRAIN_TARGET_THRESHOLDS = (0.3, -0.2, 0.6)
TRAIN_STRIDE = 31  # every 31st element of each flattened tensor is stored (the fixtures stay small)


def train_steps_fixtures(tensors):
    """The whole training step, end to end: SegResNet (the small config of
    make_segresnet_fixtures.py without dropout, whose RNG stream cannot be shared) from
    ../segresnet/small.safetensors, on ../segresnet/small_input.safetensors, DiceLoss (bundle),
    backward, Adam(lr 5e-3, weight_decay 1e-5), TRAIN_STEPS steps on the same batch."""
    from monai.networks.nets import SegResNet
    from safetensors.torch import load_file

    seg = ROOT / "tests" / "fixtures" / "monai" / "segresnet"
    config = dict(spatial_dims=3, blocks_down=[1, 1, 1], blocks_up=[1, 1], init_filters=8,
                  in_channels=4, out_channels=3, dropout_prob=None)
    net = SegResNet(**config)
    net.load_state_dict(load_file(str(seg / "small.safetensors")))
    net.train()
    x = load_file(str(seg / "small_input.safetensors"))["input"]
    target = torch.from_numpy(target_from(7000, tuple(x.shape[:1]) + (3,) + tuple(x.shape[2:]), TRAIN_TARGET_THRESHOLDS))
    loss_fn = DiceLoss(**BUNDLE_LOSS)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3, weight_decay=1e-5)
    losses = []
    for step in range(1, TRAIN_STEPS + 1):
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(net(x), target)
        loss.backward()
        if step == 1:
            grad_max = {name: p.grad.abs().max() for name, p in net.named_parameters()}
            for name, p in net.named_parameters():
                tensors[f"grad1.{name}"] = p.grad.detach().numpy().reshape(-1)[::TRAIN_STRIDE].copy()
        opt.step()
        losses.append(float(loss.detach()))
    for name, p in net.named_parameters():
        tensors[f"param{TRAIN_STEPS}.{name}"] = p.detach().numpy().reshape(-1)[::TRAIN_STRIDE].copy()
    return dict(
        config=config,
        weights="../segresnet/small.safetensors",
        input="../segresnet/small_input.safetensors (input)",
        target=f"target_from(7000, [1, 3, 16, 16, 16], {list(TRAIN_TARGET_THRESHOLDS)})",
        loss="DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, sigmoid=True)",
        optimizer="Adam(lr=5e-3, betas (0.9, 0.999), eps 1e-8, weight_decay=1e-5), zero_grad(set_to_none=False)",
        steps=TRAIN_STEPS,
        losses=losses,
        stride=TRAIN_STRIDE,
        grad1_max_abs={name: float(g) for name, g in grad_max.items()},
        tensors="grad1.<name>: d(loss)/d(param) of step 1, param3.<name>: parameters after the last step; "
        "each flattened (C order) and every `stride`-th element kept",
    )


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)

    loss_t, metric_t, adam_t, steps_t = {}, {}, {}, {}
    manifest = dict(
        generated_by="tests/monai/make_trainer_fixtures.py",
        versions=dict(monai=monai.__version__, torch=torch.__version__, numpy=np.__version__),
        loss=loss_fixtures(loss_t),
        metric=metric_fixtures(metric_t),
        adam=adam_fixtures(adam_t),
        cosine=cosine_fixtures(),
        warmup_cosine=warmup_cosine_fixtures(),
        grad_scaler=scaler_fixtures(),
        train_steps=train_steps_fixtures(steps_t),
    )
    save_file(loss_t, str(OUT / "loss.safetensors"))
    save_file(metric_t, str(OUT / "metric.safetensors"))
    save_file(adam_t, str(OUT / "adam.safetensors"))
    save_file(steps_t, str(OUT / "train_steps.safetensors"))
    with open(OUT / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True, allow_nan=False)
        f.write("\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
