//! ONNX export of SegResNet, written directly as protobuf (prost types generated from this
//! crate's `proto/onnx/onnx.proto`), no Python.
//!
//! Graph (opset 18, IR 8): input `image` `[N, C_in, X, Y, Z]` float32, output `logits`
//! `[N, C_out, X, Y, Z]` float32, N/X/Y/Z symbolic. Weights are initializers named by their
//! MONAI keys with MONAI's shapes; every other initializer is a small constant named `const.…`.
//!
//! GroupNorm ([`GroupNormLowering::StagedMeans`], the default): per group, the mean of `x` and
//! of `x²` by reductions one axis at a time (`ReduceMean` / `ReduceSumSquare` over Z first, then
//! Y, X and the channels of the group: every partial sum has at most a few hundred terms, so
//! float32 stays ~1e-7 relative where one long reduction — ONNX Runtime's
//! InstanceNormalization — drifts by 1e-4 and more), σ² = E(x²) − E(x)² (clamped at 0, as
//! torch does), then one per-channel scale and shift, `relu(x · γ/√(σ²+ε) + (β − μ·γ/√(σ²+ε)))`:
//! two reading passes and three elementwise passes over the activation, no full-size
//! temporaries besides the output. [`GroupNormLowering::InstanceNorm`] writes GroupNorm as
//! `torch.onnx.export` does (`Reshape → InstanceNormalization → Reshape → Mul γ → Add β`).
//! Upsampling is `Resize` (linear, `half_pixel`, scales [1, 1, 2, 2, 2]), identical to
//! PyTorch's `align_corners=False` for scale 2.
//!
//! **CPU fast path** (float32 with the staged lowering): ONNX Runtime's CPU provider runs 3-D
//! convolutions as im2col + SGEMM but 2-D ones with its blocked NCHWc direct kernels, ≈ 1.5–2×
//! faster per core here. So the graph is an `If` on the input's Y size: for
//! `fast_path_y_range()` (bundle: 128 ≤ Y ≤ 240, Y multiple of 8) it runs the network on a
//! *slab* layout `[N, C, X·P_l, Z]` — Y padded to a fixed pitch `P_l = (240 + 8) / 2^l` with zero
//! separator rows after the `Y_l` real rows of every X slice — where a 3×3×3 convolution is
//! exactly three 2-D convolutions (one per Y tap) over `(X·P_l, Z)` with dilation `(P_l, 1)`,
//! each shifted by one row through asymmetric padding, summed (ONNX Runtime fuses the sums
//! into the convolutions); the separator rows supply the zeros at the Y borders and are zeroed
//! again by the GroupNorm shift of every convolution input (scale 0, shift −1, then ReLU); the
//! X borders come from the convolution padding. Stride-2 convolutions stay 3-D on the same
//! layout (pitch halves with the size), the upsampling resizes the real rows edge-padded to
//! the pitch (X and Y on the 5-D view, then Z on the slab: trilinear is separable), and the
//! GroupNorm statistics skip the separator rows. Other sizes, fp16 and the InstanceNormalization
//! lowering use the plain graph. ONNX attributes are static, so the pitch is fixed at export;
//! ONNX Runtime folds the `If` when the runtime pins the input shape (`brats-inference` builds
//! one CPU session per window shape), and only uses NCHWc kernels at optimisation level 3 and
//! for channel counts that are multiples of its block (16 with AVX-512: the bundle's). Both
//! branches compute the same function (parity tests: `tests/onnx_fast_path.rs`); the fast one
//! just has a layout ONNX Runtime's CPU kernels run faster. Measurements: `benchmarks/README.md`,
//! "Inference".
//!
//! With fp16 the convolutions, additions and resizes run in float16, and every normalisation in
//! float32 (as under autocast); the graph's input and output stay float32.

use std::collections::HashSet;

use prost::Message;

mod fast_path;
mod graph;

use crate::config::SegResNetConfig;
use crate::error::WeightsError;
use crate::tensors::StateDict;
use crate::weights;

/// Generated protobuf types (a subset of `onnx.proto`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use proto::tensor_proto::DataType;
use proto::{GraphProto, ModelProto, NodeProto, OperatorSetIdProto};

use fast_path::{branch_graph, graph_attribute_bytes, length_delimited};
use graph::{Builder, Ctx, attr_int, tensor_value_info};

/// The ONNX operator set the graph uses.
pub const OPSET: i64 = 18;
/// The ONNX IR version written (ONNX 1.13, the first with opset 18).
pub const IR_VERSION: i64 = 8;
/// Name of the graph input.
pub const INPUT_NAME: &str = "image";
/// Name of the graph output.
pub const OUTPUT_NAME: &str = "logits";
/// Largest Y (third input axis) the CPU fast path takes: the bundle window's 240.
pub const FAST_PATH_MAX_Y: i64 = 240;

/// Numeric precision of the exported graph's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Everything float32.
    #[default]
    Fp32,
    /// Convolutions in float16, normalisations in float32, input and output float32.
    Fp16,
}

impl Precision {
    /// `"fp32"` or `"fp16"`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
        }
    }
}

/// How GroupNorm is written in the graph (opset 18 has no per-channel GroupNormalization).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupNormLowering {
    /// Group means of `x` and `x²` by reductions one axis at a time, σ² = E(x²) − E(x)², then
    /// one per-channel scale and shift. Exact in real arithmetic and accurate in float32 (ONNX
    /// Runtime CPU within ~1e-5 of torch on the bundle); enables the CPU fast path (fp32).
    #[default]
    StagedMeans,
    /// `Reshape → InstanceNormalization → Reshape`, as `torch.onnx.export` writes it: fewer
    /// nodes (TensorRT fuses it), but ONNX Runtime's single long float32 reduction drifts
    /// (~3e-4 from torch on the bundle at 64×64×48, for torch's own export too).
    InstanceNorm,
}

/// Export settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportOptions {
    /// Weight and activation precision.
    pub precision: Precision,
    /// GroupNorm lowering.
    pub group_norm: GroupNormLowering,
}

impl From<Precision> for ExportOptions {
    fn from(precision: Precision) -> Self {
        Self { precision, ..Default::default() }
    }
}

/// The Y sizes (inclusive) that take the CPU fast path for `config` and `options`, or `None`
/// when the graph has none (fp16, InstanceNormalization lowering, or a level count whose
/// spatial multiple does not divide [`FAST_PATH_MAX_Y`]). The lower bound keeps the padding to
/// the fixed pitch under 2× the work.
pub fn fast_path_y_range(config: &SegResNetConfig, options: impl Into<ExportOptions>) -> Option<(i64, i64)> {
    let options = options.into();
    let m = config.spatial_multiple();
    if options.precision != Precision::Fp32
        || options.group_norm != GroupNormLowering::StagedMeans
        || FAST_PATH_MAX_Y % m != 0
    {
        return None;
    }
    let pitch = FAST_PATH_MAX_Y + m;
    // Smallest multiple of m above pitch / 2.
    let min = (pitch / 2 / m + 1) * m;
    Some((min, FAST_PATH_MAX_Y))
}
/// Builds the ONNX model for `config` with weights `sd` (checked against the configuration)
/// and serialises it.
pub fn to_onnx_bytes(
    config: &SegResNetConfig,
    sd: &StateDict,
    options: impl Into<ExportOptions>,
) -> Result<Vec<u8>, WeightsError> {
    let options = options.into();
    let precision = options.precision;
    let sd = weights::conform(config, sd)?;
    let fp16 = precision == Precision::Fp16;
    let mut cx = Ctx {
        b: Builder { nodes: Vec::new(), inits: Vec::new(), init_names: HashSet::new(), counter: 0, fp16 },
        sd: &sd,
        cfg: config,
        group_norm: options.group_norm,
    };
    let mut branches = None;
    match fast_path_y_range(config, options) {
        None => {
            cx.plain(INPUT_NAME);
            // Name the last value `logits`.
            let last = cx.b.nodes.last_mut().expect("graph has nodes");
            last.output = vec![OUTPUT_NAME.to_string()];
        }
        Some((min_y, max_y)) => {
            let pitch = FAST_PATH_MAX_Y + config.spatial_multiple();
            let fast_out = cx.slab(INPUT_NAME, pitch);
            let fast = std::mem::take(&mut cx.b.nodes);
            let plain_out = cx.plain(INPUT_NAME);
            let plain = std::mem::take(&mut cx.b.nodes);
            let shape = cx.b.node("Shape", &[INPUT_NAME], vec![]);
            let three = cx.b.int(3);
            let y = cx.b.node("Gather", &[&shape, &three], vec![attr_int("axis", 0)]);
            let lo = cx.b.int(min_y);
            let hi = cx.b.int(max_y);
            let ge = cx.b.node("GreaterOrEqual", &[&y, &lo], vec![]);
            let le = cx.b.node("LessOrEqual", &[&y, &hi], vec![]);
            let cond = cx.b.node("And", &[&ge, &le], vec![]);
            let node = NodeProto {
                input: vec![cond],
                output: vec![OUTPUT_NAME.to_string()],
                name: "fast_path_if".into(),
                op_type: "If".into(),
                ..Default::default()
            };
            let mut bytes = node.encode_to_vec();
            for (attr, graph) in [
                ("then_branch", branch_graph("slab_fast_path", fast, &fast_out)),
                ("else_branch", branch_graph("plain", plain, &plain_out)),
            ] {
                length_delimited(5, &graph_attribute_bytes(attr, &graph), &mut bytes);
            }
            branches = Some(bytes);
        }
    }
    let graph = GraphProto {
        name: "SegResNet".into(),
        doc_string: format!(
            "MONAI SegResNet {}; spatial sizes must be multiples of {}",
            serde_json::to_string(config).expect("config serialises"),
            config.spatial_multiple()
        ),
        node: cx.b.nodes,
        initializer: cx.b.inits,
        input: vec![tensor_value_info(
            INPUT_NAME,
            DataType::Float,
            Some(&[Err("N"), Ok(config.in_channels), Err("X"), Err("Y"), Err("Z")]),
        )],
        output: vec![tensor_value_info(
            OUTPUT_NAME,
            DataType::Float,
            Some(&[Err("N"), Ok(config.out_channels), Err("X"), Err("Y"), Err("Z")]),
        )],
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: "brats-model".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        model_version: 1,
        doc_string: format!(
            "BraTS SegResNet ({} precision): image [N,4,X,Y,Z] (T1c, T1, T2, FLAIR) -> logits \
             [N,3,X,Y,Z] (TC, WT, ET); sigmoid and threshold 0.5 give the regions",
            precision.name()
        ),
        graph: Some(graph),
        metadata_props: vec![proto::StringStringEntryProto {
            key: weights::META_CONFIG.into(),
            value: serde_json::to_string(config).expect("config serialises"),
        }],
        ..Default::default()
    };
    let mut bytes = model.encode_to_vec();
    if let Some(if_node) = branches {
        // A second `graph` field merges into the first (protobuf semantics): it appends the
        // `If` node, last, after the nodes computing its condition.
        let mut g = Vec::new();
        length_delimited(1, &if_node, &mut g);
        length_delimited(7, &g, &mut bytes);
    }
    Ok(bytes)
}

/// Parses ONNX bytes (for inspection and tests). The `If` branches of the fast path are not
/// part of the subset proto and are skipped.
pub fn decode(bytes: &[u8]) -> Result<ModelProto, prost::DecodeError> {
    ModelProto::decode(bytes)
}
