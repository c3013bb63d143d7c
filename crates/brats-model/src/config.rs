//! SegResNet hyper-parameters, named as in MONAI's `SegResNet.__init__`.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The architecture of a 3D SegResNet, with MONAI's argument names.
///
/// [`Default`] is the configuration of MONAI's `brats_mri_segmentation` bundle:
/// `SegResNet(blocks_down=[1,2,2,4], blocks_up=[1,1,1], init_filters=16, in_channels=4,
/// out_channels=3, dropout_prob=0.2)` with GroupNorm(8 groups, eps 1e-5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SegResNetConfig {
    /// Spatial dimensions; only 3 is supported (accepted so MONAI's own configs parse as-is).
    pub spatial_dims: i64,
    /// Number of ResBlocks at each level of the encoder (its length is the number of levels).
    pub blocks_down: Vec<usize>,
    /// Number of ResBlocks at each level of the decoder, from the bottom up.
    pub blocks_up: Vec<usize>,
    /// Channels of the first level; level `i` has `init_filters * 2^i`.
    pub init_filters: i64,
    /// Input channels (T1c, T1, T2, FLAIR for BraTS).
    pub in_channels: i64,
    /// Output channels (TC, WT, ET for BraTS).
    pub out_channels: i64,
    /// Probability of `Dropout3d` after the first convolution, applied in training only.
    /// `None` means no dropout layer (as in MONAI).
    pub dropout_prob: Option<f64>,
    /// Number of groups of every GroupNorm (MONAI's `norm=("GROUP", {"num_groups": 8})`).
    pub num_groups: i64,
    /// GroupNorm epsilon (PyTorch's default, 1e-5).
    pub norm_eps: f64,
}

impl Default for SegResNetConfig {
    fn default() -> Self {
        Self {
            spatial_dims: 3,
            blocks_down: vec![1, 2, 2, 4],
            blocks_up: vec![1, 1, 1],
            init_filters: 16,
            in_channels: 4,
            out_channels: 3,
            dropout_prob: Some(0.2),
            num_groups: 8,
            norm_eps: 1e-5,
        }
    }
}

/// A parameter tensor the network owns: its MONAI `state_dict` key and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// The `state_dict` key, e.g. `down_layers.1.0.conv.weight`.
    pub name: String,
    /// The tensor's shape.
    pub shape: Vec<i64>,
}

impl SegResNetConfig {
    /// Checks that the configuration describes a network MONAI can build and whose skips add up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError(msg));
        if self.spatial_dims != 3 {
            return bad(format!("spatial_dims must be 3, got {}", self.spatial_dims));
        }
        if self.blocks_down.is_empty() {
            return bad("blocks_down must have at least one level".into());
        }
        if self.blocks_up.len() + 1 != self.blocks_down.len() {
            return bad(format!(
                "blocks_up must have one level fewer than blocks_down (got {} and {})",
                self.blocks_up.len(),
                self.blocks_down.len()
            ));
        }
        if self.blocks_down.len() > 8 {
            return bad("at most 8 levels are supported".into());
        }
        if self.init_filters <= 0 || self.in_channels <= 0 || self.out_channels <= 0 {
            return bad("init_filters, in_channels and out_channels must be positive".into());
        }
        if self.num_groups <= 0 || self.init_filters % self.num_groups != 0 {
            return bad(format!(
                "init_filters ({}) must be a positive multiple of num_groups ({})",
                self.init_filters, self.num_groups
            ));
        }
        if let Some(p) = self.dropout_prob
            && !(0.0..1.0).contains(&p)
        {
            return bad(format!("dropout_prob must be in [0, 1), got {p}"));
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return bad(format!("norm_eps must be positive, got {}", self.norm_eps));
        }
        Ok(())
    }

    /// Number of resolution levels (the length of `blocks_down`).
    pub fn levels(&self) -> usize {
        self.blocks_down.len()
    }

    /// Each spatial size of the input must be a multiple of this (2^(levels − 1); 8 for the bundle).
    pub fn spatial_multiple(&self) -> i64 {
        1 << (self.levels() - 1)
    }

    /// Channels at encoder level `i`.
    pub fn channels_at(&self, level: usize) -> i64 {
        self.init_filters << level
    }

    /// Every parameter of the network in MONAI's `state_dict` order with its shape.
    ///
    /// This is the contract for weight files: a checkpoint must hold exactly these keys.
    pub fn parameters(&self) -> Vec<ParamSpec> {
        let mut out = Vec::new();
        let mut push = |name: String, shape: Vec<i64>| out.push(ParamSpec { name, shape });
        let f = self.init_filters;
        push("convInit.conv.weight".into(), vec![f, self.in_channels, 3, 3, 3]);
        let res_block = |push: &mut dyn FnMut(String, Vec<i64>), prefix: &str, c: i64| {
            push(format!("{prefix}.norm1.weight"), vec![c]);
            push(format!("{prefix}.norm1.bias"), vec![c]);
            push(format!("{prefix}.norm2.weight"), vec![c]);
            push(format!("{prefix}.norm2.bias"), vec![c]);
            push(format!("{prefix}.conv1.conv.weight"), vec![c, c, 3, 3, 3]);
            push(format!("{prefix}.conv2.conv.weight"), vec![c, c, 3, 3, 3]);
        };
        for (i, &n) in self.blocks_down.iter().enumerate() {
            let c = self.channels_at(i);
            if i > 0 {
                push(format!("down_layers.{i}.0.conv.weight"), vec![c, c / 2, 3, 3, 3]);
            }
            for j in 0..n {
                res_block(&mut push, &format!("down_layers.{i}.{}", j + 1), c);
            }
        }
        let n_up = self.blocks_up.len();
        for (i, &n) in self.blocks_up.iter().enumerate() {
            let c = f << (n_up - i);
            for j in 0..n {
                res_block(&mut push, &format!("up_layers.{i}.{j}"), c / 2);
            }
        }
        for i in 0..n_up {
            let c = f << (n_up - i);
            push(format!("up_samples.{i}.0.conv.weight"), vec![c / 2, c, 1, 1, 1]);
        }
        push("conv_final.0.weight".into(), vec![f]);
        push("conv_final.0.bias".into(), vec![f]);
        push("conv_final.2.conv.weight".into(), vec![self.out_channels, f, 1, 1, 1]);
        push("conv_final.2.conv.bias".into(), vec![self.out_channels]);
        out
    }

    /// Total number of scalar parameters.
    pub fn parameter_count(&self) -> i64 {
        self.parameters().iter().map(|p| p.shape.iter().product::<i64>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_config_has_monai_counts() {
        let c = SegResNetConfig::default();
        c.validate().unwrap();
        assert_eq!(c.parameters().len(), 83);
        assert_eq!(c.parameter_count(), 4_702_227);
        assert_eq!(c.spatial_multiple(), 8);
    }

    #[test]
    fn keys_are_unique() {
        let ps = SegResNetConfig::default().parameters();
        let set: std::collections::BTreeSet<_> = ps.iter().map(|p| &p.name).collect();
        assert_eq!(set.len(), ps.len());
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let mut c = SegResNetConfig { blocks_up: vec![1, 1], ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("blocks_up"));
        c = SegResNetConfig { init_filters: 12, ..Default::default() };
        assert!(c.validate().is_err());
        c = SegResNetConfig { dropout_prob: Some(1.5), ..Default::default() };
        assert!(c.validate().is_err());
    }

    #[test]
    fn monai_config_json_parses() {
        let c: SegResNetConfig = serde_json::from_str(
            r#"{"spatial_dims": 3, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1],
                "init_filters": 16, "in_channels": 4, "out_channels": 3, "dropout_prob": 0.2}"#,
        )
        .unwrap();
        assert_eq!(c, SegResNetConfig::default());
        assert!(serde_json::from_str::<SegResNetConfig>(r#"{"blocks": 1}"#).is_err());
    }

    #[test]
    fn config_json_round_trips() {
        let c = SegResNetConfig { dropout_prob: None, ..Default::default() };
        let s = serde_json::to_string(&c).unwrap();
        let back: SegResNetConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(back, c);
    }
}
