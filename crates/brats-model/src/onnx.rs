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
use proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto, attribute_proto::AttributeType,
};

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

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Ints as i32, ints: v.to_vec(), ..Default::default() }
}
fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i: v, ..Default::default() }
}
fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Float as i32, f: v, ..Default::default() }
}
fn attr_str(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn tensor_value_info(name: &str, elem: DataType, dims: Option<&[Result<i64, &str>]>) -> ValueInfoProto {
    use proto::tensor_shape_proto::{Dimension, dimension::Value};
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                elem_type: elem as i32,
                shape: dims.map(|dims| TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Ok(v) => Value::DimValue(*v),
                                Err(p) => Value::DimParam((*p).into()),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Builder {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    init_names: HashSet<String>,
    counter: usize,
    fp16: bool,
}

impl Builder {
    fn fresh(&mut self, op: &str) -> String {
        self.counter += 1;
        format!("{op}_{}", self.counter)
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(op);
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: format!("{out}_node"),
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    fn push_init(&mut self, t: TensorProto) -> String {
        let name = t.name.clone();
        if self.init_names.insert(name.clone()) {
            self.inits.push(t);
        }
        name
    }

    fn init_f32(&mut self, name: &str, dims: &[i64], v: &[f32]) -> String {
        self.push_init(TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Float as i32,
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        })
    }

    /// A weight in the graph's compute precision.
    fn init_weight(&mut self, name: &str, dims: &[i64], v: &[f32]) -> String {
        if !self.fp16 {
            return self.init_f32(name, dims, v);
        }
        self.push_init(TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Float16 as i32,
            raw_data: v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
            ..Default::default()
        })
    }

    fn init_i64(&mut self, name: &str, dims: &[i64], v: &[i64]) -> String {
        self.push_init(TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Int64 as i32,
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        })
    }

    /// A 1-D int64 constant.
    fn ints(&mut self, v: &[i64]) -> String {
        let name = format!("const.i64.{}", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("_"));
        self.init_i64(&name, &[v.len() as i64], v)
    }

    /// A scalar int64 constant.
    fn int(&mut self, v: i64) -> String {
        self.init_i64(&format!("const.i64.scalar.{v}"), &[], &[v])
    }

    /// A float32 constant of the given shape, all elements `v`.
    fn float(&mut self, v: f32, dims: &[i64]) -> String {
        let n: i64 = dims.iter().product();
        let name =
            format!("const.f32.{}.{}", v.to_bits(), dims.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("x"));
        self.init_f32(&name, dims, &vec![v; n as usize])
    }

    fn cast(&mut self, x: &str, to: DataType) -> String {
        self.node("Cast", &[x], vec![attr_int("to", to as i64)])
    }

    /// `x[..., start:end, ...]` along `axis`; `end` may be a tensor name (1-D int64).
    fn slice(&mut self, x: &str, axis: i64, start: i64, end: &str) -> String {
        let s = self.ints(&[start]);
        let a = self.ints(&[axis]);
        self.node("Slice", &[x, &s, end, &a], vec![])
    }

    /// `Shape(x)[start:end]` as a 1-D int64 tensor.
    fn dims(&mut self, x: &str, start: i64, end: i64) -> String {
        let shape = self.node("Shape", &[x], vec![]);
        let e = self.ints(&[end]);
        self.slice(&shape, 0, start, &e)
    }

    fn reshape(&mut self, x: &str, shape: &str) -> String {
        self.node("Reshape", &[x, shape], vec![])
    }

    fn reduce(&mut self, op: &str, x: &str, axis: i64) -> String {
        let a = self.ints(&[axis]);
        self.node(op, &[x, &a], vec![attr_int("keepdims", 1)])
    }
}

/// The graph body being written: the plain graph or the slab fast path.
struct Ctx<'a> {
    b: Builder,
    sd: &'a StateDict,
    cfg: &'a SegResNetConfig,
    group_norm: GroupNormLowering,
}

/// Per-level symbols of the slab layout.
struct SlabLevel {
    /// Pitch: rows per X slice (real rows + separators), fixed at export.
    pitch: i64,
    /// Real rows `Y_l` (1-D int64 `[1]`).
    y: String,
    /// `X_l` (1-D int64 `[1]`).
    x: String,
    /// Row mask `[1, 1, 1, pitch]` (1 on real rows, 0 on separators), built on first use.
    mask: Option<String>,
}

impl Ctx<'_> {
    fn values(&self, key: &str) -> Vec<f32> {
        self.sd.get(key).and_then(|t| t.to_f32_vec()).expect("weights conformed to the configuration")
    }

    /// A convolution weight (MONAI key and shape) in the compute precision.
    fn conv_weight(&mut self, prefix: &str) -> (String, Vec<i64>) {
        let key = format!("{prefix}.conv.weight");
        let shape = self.sd.get(&key).expect("conformed").shape_i64();
        let v = self.values(&key);
        (self.b.init_weight(&key, &shape, &v), shape)
    }

    fn conv_bias(&mut self, prefix: &str) -> String {
        let key = format!("{prefix}.conv.bias");
        let v = self.values(&key);
        self.b.init_weight(&key, &[v.len() as i64], &v)
    }

    /// A GroupNorm affine parameter (MONAI key and shape `[C]`, float32) reshaped for broadcasting.
    fn norm_param(&mut self, key: &str, rank: usize) -> String {
        let v = self.values(key);
        let t = self.b.init_f32(key, &[v.len() as i64], &v);
        let mut shape = vec![1i64; rank];
        shape[1] = -1;
        let s = self.b.ints(&shape);
        self.b.reshape(&t, &s)
    }

    fn conv(&mut self, x: &str, prefix: &str, k: i64, stride: i64, bias: bool) -> String {
        let (w, _) = self.conv_weight(prefix);
        let mut inputs = vec![x.to_string(), w];
        if bias {
            inputs.push(self.conv_bias(prefix));
        }
        let p = (k - 1) / 2;
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.b.node(
            "Conv",
            &refs,
            vec![
                attr_ints("kernel_shape", &[k, k, k]),
                attr_ints("strides", &[stride; 3]),
                attr_ints("pads", &[p; 6]),
                attr_ints("dilations", &[1, 1, 1]),
                attr_int("group", 1),
            ],
        )
    }

    /// Per-group mean of `x` and of `x²` as `[N, G, 1]`, from per-channel statistics `[N, C, 1…]`
    /// that `per_channel(op)` reduces (`ReduceMean` or `ReduceSumSquare` first over the
    /// innermost axis, whose length `inner` divides the sum of squares).
    fn group_moments(
        &mut self,
        per_channel: &mut dyn FnMut(&mut Builder, &str) -> String,
        inner: &str,
    ) -> (String, String) {
        let g = self.cfg.num_groups;
        let mean_c = per_channel(&mut self.b, "ReduceMean");
        let sq_c = per_channel(&mut self.b, "ReduceSumSquare");
        let inner = self.b.cast(inner, DataType::Float);
        let sq_c = self.b.node("Div", &[&sq_c, &inner], vec![]);
        let grouped = self.b.ints(&[0, g, -1]);
        let by_group = |b: &mut Builder, t: &str| {
            let r = b.reshape(t, &grouped);
            b.reduce("ReduceMean", &r, 2)
        };
        (by_group(&mut self.b, &mean_c), by_group(&mut self.b, &sq_c))
    }

    /// Per-channel scale γ/√(σ²+ε) and shift β − μ·scale, each `[N, C, 1, …]` of `rank`.
    fn group_affine(&mut self, mean: &str, mean_sq: &str, prefix: &str, rank: usize) -> (String, String) {
        let g = self.cfg.num_groups;
        let c = self.values(&format!("{prefix}.weight")).len() as i64;
        let m2 = self.b.node("Mul", &[mean, mean], vec![]);
        let var = self.b.node("Sub", &[mean_sq, &m2], vec![]);
        let zero = self.b.float(0.0, &[]);
        let var = self.b.node("Max", &[&var, &zero], vec![]);
        let eps = self.b.float(self.cfg.norm_eps as f32, &[]);
        let ve = self.b.node("Add", &[&var, &eps], vec![]);
        let sd = self.b.node("Sqrt", &[&ve], vec![]);
        let inv = self.b.node("Reciprocal", &[&sd], vec![]);
        // [N, G, 1] → [N, G, C/G] → [N, C, 1, …]
        let per_group = self.b.ints(&[1, 1, c / g]);
        let mut channel_shape = vec![1i64; rank];
        channel_shape[0] = 0;
        channel_shape[1] = -1;
        let channel_shape = self.b.ints(&channel_shape);
        let to_channels = |b: &mut Builder, t: &str| {
            let e = b.node("Expand", &[t, &per_group], vec![]);
            b.reshape(&e, &channel_shape)
        };
        let inv_c = to_channels(&mut self.b, &inv);
        let mean_c = to_channels(&mut self.b, mean);
        let gamma = self.norm_param(&format!("{prefix}.weight"), rank);
        let beta = self.norm_param(&format!("{prefix}.bias"), rank);
        let scale = self.b.node("Mul", &[&inv_c, &gamma], vec![]);
        let ms = self.b.node("Mul", &[&mean_c, &scale], vec![]);
        let shift = self.b.node("Sub", &[&beta, &ms], vec![]);
        (scale, shift)
    }

    /// GroupNorm (+ ReLU) of the plain graph, computed in float32.
    fn norm_relu(&mut self, x: &str, prefix: &str) -> String {
        let x = if self.b.fp16 { self.b.cast(x, DataType::Float) } else { x.to_string() };
        let y = match self.group_norm {
            GroupNormLowering::InstanceNorm => {
                let g = self.cfg.num_groups;
                let grouped = self.b.ints(&[0, g, -1]);
                let shape = self.b.node("Shape", &[&x], vec![]);
                let ones = self.b.float(1.0, &[g]);
                let zeros = self.b.float(0.0, &[g]);
                let r = self.b.reshape(&x, &grouped);
                let n = self.b.node(
                    "InstanceNormalization",
                    &[&r, &ones, &zeros],
                    vec![attr_float("epsilon", self.cfg.norm_eps as f32)],
                );
                let n = self.b.reshape(&n, &shape);
                let gamma = self.norm_param(&format!("{prefix}.weight"), 5);
                let beta = self.norm_param(&format!("{prefix}.bias"), 5);
                let m = self.b.node("Mul", &[&n, &gamma], vec![]);
                self.b.node("Add", &[&m, &beta], vec![])
            }
            GroupNormLowering::StagedMeans => {
                let z = self.b.dims(&x, 4, 5);
                let xs = x.clone();
                let mut per_channel = |b: &mut Builder, op: &str| {
                    let m = b.reduce(op, &xs, 4);
                    let m = b.reduce("ReduceMean", &m, 3);
                    b.reduce("ReduceMean", &m, 2)
                };
                let (mean, mean_sq) = self.group_moments(&mut per_channel, &z);
                let (scale, shift) = self.group_affine(&mean, &mean_sq, prefix, 5);
                let m = self.b.node("Mul", &[&x, &scale], vec![]);
                self.b.node("Add", &[&m, &shift], vec![])
            }
        };
        let y = self.b.node("Relu", &[&y], vec![]);
        if self.b.fp16 { self.b.cast(&y, DataType::Float16) } else { y }
    }

    fn res_block(&mut self, x: &str, prefix: &str) -> String {
        let h = self.norm_relu(x, &format!("{prefix}.norm1"));
        let h = self.conv(&h, &format!("{prefix}.conv1"), 3, 1, false);
        let h = self.norm_relu(&h, &format!("{prefix}.norm2"));
        let h = self.conv(&h, &format!("{prefix}.conv2"), 3, 1, false);
        self.b.node("Add", &[&h, x], vec![])
    }

    /// The plain graph from `image` to logits; returns the logits' value name.
    fn plain(&mut self, image: &str) -> String {
        let config = self.cfg;
        let mut x = if self.b.fp16 { self.b.cast(image, DataType::Float16) } else { image.to_string() };
        x = self.conv(&x, "convInit", 3, 1, false);
        // Dropout3d is the identity at inference.
        let mut skips = Vec::new();
        for (i, &n) in config.blocks_down.iter().enumerate() {
            if i > 0 {
                x = self.conv(&x, &format!("down_layers.{i}.0"), 3, 2, false);
            }
            for j in 0..n {
                x = self.res_block(&x, &format!("down_layers.{i}.{}", j + 1));
            }
            skips.push(x.clone());
        }
        skips.pop();
        let scales = self.b.init_f32("const.upsample_scales", &[5], &[1.0, 1.0, 2.0, 2.0, 2.0]);
        for (i, &n) in config.blocks_up.iter().enumerate() {
            let y = self.conv(&x, &format!("up_samples.{i}.0"), 1, 1, false);
            let y = self.b.node(
                "Resize",
                &[&y, "", &scales],
                vec![attr_str("mode", "linear"), attr_str("coordinate_transformation_mode", "half_pixel")],
            );
            let skip = skips.pop().expect("validated config");
            x = self.b.node("Add", &[&y, &skip], vec![]);
            for j in 0..n {
                x = self.res_block(&x, &format!("up_layers.{i}.{j}"));
            }
        }
        x = self.norm_relu(&x, "conv_final.0");
        x = self.conv(&x, "conv_final.2", 1, 1, true);
        if self.b.fp16 { self.b.cast(&x, DataType::Float) } else { x }
    }

    // ---- slab fast path (float32) ----

    /// `[N, C, X·P, Z]` → `[N, C, X, P, Z]`.
    fn slab_to5(&mut self, x: &str, lv: &SlabLevel) -> String {
        let z = self.b.dims(x, 3, 4);
        let head = self.b.ints(&[0, 0, -1, lv.pitch]);
        let shape = self.b.node("Concat", &[&head, &z], vec![attr_int("axis", 0)]);
        self.b.reshape(x, &shape)
    }

    /// `[N, C, X, P, Z]` → `[N, C, X·P, Z]`.
    fn slab_to4(&mut self, x: &str) -> String {
        let z = self.b.dims(x, 4, 5);
        let head = self.b.ints(&[0, 0, -1]);
        let shape = self.b.node("Concat", &[&head, &z], vec![attr_int("axis", 0)]);
        self.b.reshape(x, &shape)
    }

    /// 3×3×3 stride-1 convolution on the slab: one 2-D convolution per Y tap over (X·P, Z),
    /// dilation (P, 1), shifted by the tap through asymmetric row padding, summed.
    fn slab_conv3(&mut self, x: &str, prefix: &str, lv: &SlabLevel) -> String {
        let (w, _) = self.conv_weight(prefix);
        let p = lv.pitch;
        let mut sum: Option<String> = None;
        for ky in 0..3i64 {
            let dy = ky - 1;
            let idx = self.b.int(ky);
            // [Cout, Cin, kx, ky, kz] → [Cout, Cin, kx, kz] for this Y tap (constant-folded).
            let wk = self.b.node("Gather", &[&w, &idx], vec![attr_int("axis", 3)]);
            let y = self.b.node(
                "Conv",
                &[x, &wk],
                vec![
                    attr_ints("kernel_shape", &[3, 3]),
                    attr_ints("strides", &[1, 1]),
                    attr_ints("pads", &[p - dy, 1, p + dy, 1]),
                    attr_ints("dilations", &[p, 1]),
                    attr_int("group", 1),
                ],
            );
            sum = Some(match sum {
                None => y,
                Some(s) => self.b.node("Add", &[&s, &y], vec![]),
            });
        }
        sum.expect("three taps")
    }

    /// 1×1×1 convolution on the slab as a 2-D 1×1 convolution.
    fn slab_conv1(&mut self, x: &str, prefix: &str, bias: bool) -> String {
        let (w, shape) = self.conv_weight(prefix);
        let s = self.b.ints(&[shape[0], shape[1], 1, 1]);
        let w2 = self.b.reshape(&w, &s);
        let mut inputs = vec![x.to_string(), w2];
        if bias {
            inputs.push(self.conv_bias(prefix));
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.b.node("Conv", &refs, vec![attr_ints("kernel_shape", &[1, 1])])
    }

    fn slab_mask(&mut self, lv: &mut SlabLevel) -> String {
        if let Some(m) = &lv.mask {
            return m.clone();
        }
        let start = self.b.int(0);
        let limit = self.b.int(lv.pitch);
        let delta = self.b.int(1);
        let rows = self.b.node("Range", &[&start, &limit, &delta], vec![]);
        let real = self.b.node("Less", &[&rows, &lv.y], vec![]);
        let real = self.b.cast(&real, DataType::Float);
        let s = self.b.ints(&[1, 1, 1, lv.pitch]);
        let m = self.b.reshape(&real, &s);
        lv.mask = Some(m.clone());
        m
    }

    /// GroupNorm + ReLU on the slab; with `zero_separators` the separator rows come out 0.
    fn slab_norm_relu(&mut self, x: &str, prefix: &str, lv: &mut SlabLevel, zero_separators: bool) -> String {
        let z = self.b.dims(x, 3, 4);
        let rows = self.b.ints(&[0, 0, -1, lv.pitch]);
        let (xs, ly) = (x.to_string(), lv.y.clone());
        let mut per_channel = |b: &mut Builder, op: &str| {
            let m = b.reduce(op, &xs, 3); // [N, C, X·P, 1]
            let m = b.reshape(&m, &rows); // [N, C, X, P]
            let m = b.slice(&m, 3, 0, &ly); // real rows only
            let m = b.reduce("ReduceMean", &m, 3);
            b.reduce("ReduceMean", &m, 2) // [N, C, 1, 1]
        };
        let (mean, mean_sq) = self.group_moments(&mut per_channel, &z);
        let (mut scale, mut shift) = self.group_affine(&mean, &mean_sq, prefix, 4);
        if zero_separators {
            // Row parameters [N, C, X·P, 1]: separator rows get scale 0 and shift −1.
            let mask = self.slab_mask(lv);
            let one = self.b.float(1.0, &[]);
            let s = self.b.node("Mul", &[&scale, &mask], vec![]);
            let t = self.b.node("Mul", &[&shift, &mask], vec![]);
            let off = self.b.node("Sub", &[&mask, &one], vec![]);
            let t = self.b.node("Add", &[&t, &off], vec![]);
            let ones = self.b.ints(&[1, 1]);
            let one1 = self.b.ints(&[1]);
            let expand = self.b.node("Concat", &[&ones, &lv.x, &one1], vec![attr_int("axis", 0)]);
            let flat = self.b.ints(&[0, 0, -1, 1]);
            let per_row = |b: &mut Builder, t: &str| {
                let e = b.node("Expand", &[t, &expand], vec![]);
                b.reshape(&e, &flat)
            };
            scale = per_row(&mut self.b, &s);
            shift = per_row(&mut self.b, &t);
        }
        let m = self.b.node("Mul", &[x, &scale], vec![]);
        let a = self.b.node("Add", &[&m, &shift], vec![]);
        self.b.node("Relu", &[&a], vec![])
    }

    fn slab_res_block(&mut self, x: &str, prefix: &str, lv: &mut SlabLevel) -> String {
        let h = self.slab_norm_relu(x, &format!("{prefix}.norm1"), lv, true);
        let h = self.slab_conv3(&h, &format!("{prefix}.conv1"), lv);
        let h = self.slab_norm_relu(&h, &format!("{prefix}.norm2"), lv, true);
        let h = self.slab_conv3(&h, &format!("{prefix}.conv2"), lv);
        self.b.node("Add", &[&h, x], vec![])
    }

    /// The slab graph from `image` to logits (pitch `pitch0` at level 0).
    fn slab(&mut self, image: &str, pitch0: i64) -> String {
        let config = self.cfg;
        let levels = config.levels();
        let xyz = self.b.dims(image, 2, 5);
        let mut lv: Vec<SlabLevel> = (0..levels)
            .map(|l| {
                let d = if l == 0 {
                    xyz.clone()
                } else {
                    let div = self.b.ints(&[1 << l; 3]);
                    self.b.node("Div", &[&xyz, &div], vec![])
                };
                let (i1, i2) = (self.b.ints(&[1]), self.b.ints(&[2]));
                let x = self.b.slice(&d, 0, 0, &i1);
                let y = self.b.slice(&d, 0, 1, &i2);
                SlabLevel { pitch: pitch0 >> l, y, x, mask: None }
            })
            .collect();
        // Pad Y to the pitch with zero rows, then [N, C, X·P, Z].
        let p0 = self.b.ints(&[pitch0]);
        let pad_rows = self.b.node("Sub", &[&p0, &lv[0].y], vec![]);
        let before = self.b.ints(&[0; 8]);
        let after = self.b.ints(&[0]);
        let pads = self.b.node("Concat", &[&before, &pad_rows, &after], vec![attr_int("axis", 0)]);
        let x = self.b.node("Pad", &[image, &pads], vec![]);
        let mut x = self.slab_to4(&x);
        x = self.slab_conv3(&x, "convInit", &lv[0]);
        let mut skips = Vec::new();
        for (i, &n) in config.blocks_down.iter().enumerate() {
            if i > 0 {
                // Stride 2 stays 3-D: the real output rows only read real input rows, and the
                // pitch halves with the size.
                let x5 = self.slab_to5(&x, &lv[i - 1]);
                let y5 = self.conv(&x5, &format!("down_layers.{i}.0"), 3, 2, false);
                x = self.slab_to4(&y5);
            }
            for j in 0..n {
                x = self.slab_res_block(&x, &format!("down_layers.{i}.{}", j + 1), &mut lv[i]);
            }
            skips.push(x.clone());
        }
        skips.pop();
        let scales_xy = self.b.init_f32("const.upsample_scales_xy", &[5], &[1.0, 1.0, 2.0, 2.0, 1.0]);
        let scales_z = self.b.init_f32("const.upsample_scales_z", &[4], &[1.0, 1.0, 1.0, 2.0]);
        let mut level = levels - 1;
        for (i, &n) in config.blocks_up.iter().enumerate() {
            let y = self.slab_conv1(&x, &format!("up_samples.{i}.0"), false);
            // Resize the real rows, edge-padded to the pitch (what the border clamp reads).
            let y5 = self.slab_to5(&y, &lv[level]);
            let real = self.b.slice(&y5, 3, 0, &lv[level].y.clone());
            let p = self.b.ints(&[lv[level].pitch]);
            let pad_rows = self.b.node("Sub", &[&p, &lv[level].y], vec![]);
            let pads = self.b.node("Concat", &[&before, &pad_rows, &after], vec![attr_int("axis", 0)]);
            let padded = self.b.node("Pad", &[&real, &pads], vec![attr_str("mode", "edge")]);
            // Trilinear ×2 is separable: X and Y on the 5-D view, then Z on the slab, so that
            // the full-size output has the slab's shape (ONNX Runtime's planner then reuses a
            // buffer it already holds instead of allocating another full-size one).
            let linear = || vec![attr_str("mode", "linear"), attr_str("coordinate_transformation_mode", "half_pixel")];
            let up = self.b.node("Resize", &[&padded, "", &scales_xy], linear());
            level -= 1;
            let up = self.slab_to4(&up);
            let up = self.b.node("Resize", &[&up, "", &scales_z], linear());
            let skip = skips.pop().expect("validated config");
            x = self.b.node("Add", &[&up, &skip], vec![]);
            for j in 0..n {
                x = self.slab_res_block(&x, &format!("up_layers.{i}.{j}"), &mut lv[level]);
            }
        }
        x = self.slab_norm_relu(&x, "conv_final.0", &mut lv[0], false);
        x = self.slab_conv1(&x, "conv_final.2", true);
        let x5 = self.slab_to5(&x, &lv[0]);
        self.b.slice(&x5, 3, 0, &lv[0].y.clone())
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

/// One `If` attribute (`then_branch` / `else_branch`) as encoded bytes: the subset proto has no
/// graph-valued attributes, so field 6 (`AttributeProto.g`) is written by hand (wire format of
/// the ONNX specification).
fn graph_attribute_bytes(name: &str, graph: &GraphProto) -> Vec<u8> {
    let mut buf = Vec::new();
    prost::encoding::string::encode(1, &name.to_string(), &mut buf);
    prost::encoding::message::encode(6, graph, &mut buf);
    prost::encoding::int32::encode(20, &(AttributeType::Graph as i32), &mut buf);
    buf
}

fn length_delimited(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

fn branch_graph(name: &str, nodes: Vec<NodeProto>, output: &str) -> GraphProto {
    GraphProto {
        name: name.into(),
        node: nodes,
        output: vec![tensor_value_info(output, DataType::Float, None)],
        ..Default::default()
    }
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
