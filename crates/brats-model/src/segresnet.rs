//! SegResNet (Myronenko 2018) in tch, layer for layer as MONAI's `monai.networks.nets.SegResNet`
//! (3D, GroupNorm, ReLU, non-trainable trilinear upsampling), with MONAI's parameter paths.

use tch::Tensor;
use tch::nn;

use crate::config::SegResNetConfig;
use crate::error::{ConfigError, InputShapeError};

fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, bias: bool) -> nn::Conv3D {
    // MONAI's get_conv_layer → Convolution(conv_only=True): the conv sits under `.conv`.
    // Drawn as torch's `Conv3d.reset_parameters` draws them, which MONAI keeps: weights by
    // `kaiming_uniform_(a=√5)` = U(±1/√fan_in), biases U(±1/√fan_in). tch's own default
    // (Kaiming-uniform with the ReLU gain, zero bias) starts ~2.4× larger and saturates the final
    // 1×1×1 convolution's logits.
    let bound = 1.0 / ((c_in * k * k * k) as f64).sqrt();
    let init = nn::Init::Uniform { lo: -bound, up: bound };
    let config =
        nn::ConvConfig { stride, padding: (k - 1) / 2, bias, ws_init: init, bs_init: init, ..Default::default() };
    nn::conv3d(p / "conv", c_in, c_out, k, config)
}

fn group_norm(p: nn::Path, cfg: &SegResNetConfig, c: i64) -> nn::GroupNorm {
    nn::group_norm(p, cfg.num_groups, c, nn::GroupNormConfig { eps: cfg.norm_eps, affine: true, ..Default::default() })
}

/// MONAI's pre-activation `ResBlock`: GN → ReLU → conv3 → GN → ReLU → conv3, plus identity.
#[derive(Debug)]
struct ResBlock {
    norm1: nn::GroupNorm,
    norm2: nn::GroupNorm,
    conv1: nn::Conv3D,
    conv2: nn::Conv3D,
}

impl ResBlock {
    fn new(p: nn::Path, cfg: &SegResNetConfig, c: i64) -> Self {
        Self {
            norm1: group_norm(&p / "norm1", cfg, c),
            norm2: group_norm(&p / "norm2", cfg, c),
            conv1: conv(&p / "conv1", c, c, 3, 1, false),
            conv2: conv(&p / "conv2", c, c, 3, 1, false),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.apply(&self.norm1).relu().apply(&self.conv1).apply(&self.norm2).relu().apply(&self.conv2);
        y + x
    }
}

#[derive(Debug)]
struct DownLevel {
    /// Stride-2 conv that halves the resolution and doubles channels (`down_layers.i.0`);
    /// `nn.Identity` at level 0.
    pre: Option<nn::Conv3D>,
    blocks: Vec<ResBlock>,
}

#[derive(Debug)]
struct UpLevel {
    /// 1×1×1 conv halving channels (`up_samples.i.0`), followed by trilinear ×2.
    conv: nn::Conv3D,
    /// `up_layers.i.*`.
    blocks: Vec<ResBlock>,
}

/// The network. Its parameters live in the [`nn::VarStore`] it was built in, under MONAI's
/// `state_dict` keys (see [`SegResNetConfig::parameters`]).
#[derive(Debug)]
pub struct SegResNet {
    config: SegResNetConfig,
    conv_init: nn::Conv3D,
    down: Vec<DownLevel>,
    up: Vec<UpLevel>,
    final_norm: nn::GroupNorm,
    final_conv: nn::Conv3D,
}

impl SegResNet {
    /// Creates the network's variables under `root` (normally `vs.root()`), initialised as
    /// PyTorch (and so MONAI) initialises them: convolution weights and biases U(±1/√fan_in),
    /// GroupNorm weight 1 and bias 0 (checked against MONAI by `tests/init.rs`).
    pub fn new(root: &nn::Path, config: &SegResNetConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        let cfg = config;
        let f = cfg.init_filters;
        let conv_init = conv(root / "convInit", cfg.in_channels, f, 3, 1, false);
        let down = cfg
            .blocks_down
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let p = root / "down_layers" / i;
                let c = cfg.channels_at(i);
                DownLevel {
                    pre: (i > 0).then(|| conv(&p / 0, c / 2, c, 3, 2, false)),
                    blocks: (0..n).map(|j| ResBlock::new(&p / (j + 1), cfg, c)).collect(),
                }
            })
            .collect();
        let n_up = cfg.blocks_up.len();
        let up = cfg
            .blocks_up
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let c = f << (n_up - i);
                UpLevel {
                    conv: conv(root / "up_samples" / i / 0, c, c / 2, 1, 1, false),
                    blocks: (0..n).map(|j| ResBlock::new(root / "up_layers" / i / j, cfg, c / 2)).collect(),
                }
            })
            .collect();
        let final_norm = group_norm(root / "conv_final" / 0, cfg, f);
        let final_conv = conv(root / "conv_final" / 2, f, cfg.out_channels, 1, 1, true);
        Ok(Self { config: cfg.clone(), conv_init, down, up, final_norm, final_conv })
    }

    /// The configuration the network was built with.
    pub fn config(&self) -> &SegResNetConfig {
        &self.config
    }

    /// Checks an input shape `[N, in_channels, X, Y, Z]` with X, Y, Z multiples of
    /// [`SegResNetConfig::spatial_multiple`].
    pub fn check_input_shape(&self, size: &[i64]) -> Result<(), InputShapeError> {
        let m = self.config.spatial_multiple();
        let ok = size.len() == 5
            && size[0] >= 1
            && size[1] == self.config.in_channels
            && size[2..].iter().all(|&d| d > 0 && d % m == 0);
        if ok {
            Ok(())
        } else {
            Err(InputShapeError(format!(
                "input must be [N, {}, X, Y, Z] with X, Y, Z positive multiples of {m}; got {size:?}",
                self.config.in_channels
            )))
        }
    }

    /// Forward pass: `[N, in_channels, X, Y, Z]` → logits `[N, out_channels, X, Y, Z]`.
    /// With `train`, `Dropout3d` is applied after the first convolution (as in MONAI).
    /// Call [`Self::check_input_shape`] first for a clear error on bad input sizes.
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let mut x = x.apply(&self.conv_init);
        if let Some(p) = self.config.dropout_prob {
            x = x.feature_dropout(p, train);
        }
        let mut skips = Vec::with_capacity(self.down.len());
        for level in &self.down {
            if let Some(pre) = &level.pre {
                x = x.apply(pre);
            }
            for b in &level.blocks {
                x = b.forward(&x);
            }
            skips.push(x.shallow_clone());
        }
        skips.pop(); // the bottom level is `x` itself
        for level in &self.up {
            let y = x.apply(&level.conv);
            let s = y.size();
            // MONAI: nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False).
            let y = y.upsample_trilinear3d([s[2] * 2, s[3] * 2, s[4] * 2], false, Some(2.0), Some(2.0), Some(2.0));
            let skip = skips.pop().expect("one skip per up level (validated config)");
            // Add, not concatenate (under autocast, type promotion handles mixed kinds).
            x = y + skip;
            for b in &level.blocks {
                x = b.forward(&x);
            }
        }
        x.apply(&self.final_norm).relu().apply(&self.final_conv)
    }
}

impl nn::ModuleT for SegResNet {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward(xs, train)
    }
}

/// Trilinear ×2 upsampling with `align_corners=False` along one axis, written out
/// (MONAI reference notes): used by tests to pin libtorch's kernel to the formula.
pub fn upsample2_reference(input: &[f32]) -> Vec<f32> {
    let n = input.len();
    let mut out = vec![0.0; 2 * n];
    for k in 0..n {
        let prev = input[k.saturating_sub(1)];
        let next = input[(k + 1).min(n - 1)];
        out[2 * k] = if k == 0 { input[0] } else { 0.25 * prev + 0.75 * input[k] };
        out[2 * k + 1] = 0.75 * input[k] + 0.25 * next;
    }
    out
}
