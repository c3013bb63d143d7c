//! ONNX export of SegResNet, written directly as protobuf (prost types generated from this
//! crate's `proto/onnx/onnx.proto`), no Python.
//!
//! Graph (opset 18, IR 8): input `image` `[N, C_in, X, Y, Z]` float32, output `logits`
//! `[N, C_out, X, Y, Z]` float32, N/X/Y/Z symbolic. Weights are initializers named by their
//! MONAI keys. GroupNorm is expressed exactly as `torch.onnx.export` does at opset 18:
//! `Reshape [N, G, -1] → InstanceNormalization(scale 1, bias 0) → Reshape back → Mul γ → Add β`
//! (opset 18's `GroupNormalization` takes per-group, not per-channel, affine parameters).
//! Upsampling is `Resize` (linear, `half_pixel`, scales [1, 1, 2, 2, 2]), identical to
//! PyTorch's `align_corners=False` for scale 2.
//!
//! With fp16 the convolutions, additions and resizes run in float16, and every normalisation in
//! float32 (as under autocast); the graph's input and output stay float32.

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

fn tensor_value_info(name: &str, elem: DataType, dims: &[Result<i64, &str>]) -> ValueInfoProto {
    use proto::tensor_shape_proto::{Dimension, dimension::Value};
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(proto::type_proto::Value::TensorType(proto::type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto {
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

    fn init_f32(&mut self, name: &str, dims: &[i64], v: &[f32]) -> String {
        self.inits.push(TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Float as i32,
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    /// A weight in the graph's compute precision.
    fn init_weight(&mut self, name: &str, dims: &[i64], v: &[f32]) -> String {
        if !self.fp16 {
            return self.init_f32(name, dims, v);
        }
        self.inits.push(TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Float16 as i32,
            raw_data: v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    fn init_i64(&mut self, name: &str, v: &[i64]) -> String {
        if !self.inits.iter().any(|t| t.name == name) {
            self.inits.push(TensorProto {
                name: name.into(),
                dims: vec![v.len() as i64],
                data_type: DataType::Int64 as i32,
                raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ..Default::default()
            });
        }
        name.into()
    }

    fn cast(&mut self, x: &str, to: DataType) -> String {
        self.node("Cast", &[x], vec![attr_int("to", to as i64)])
    }
}

struct Ctx<'a> {
    b: Builder,
    sd: &'a StateDict,
    cfg: &'a SegResNetConfig,
    group_norm: GroupNormLowering,
}

impl Ctx<'_> {
    fn values(&self, key: &str) -> Vec<f32> {
        self.sd.get(key).and_then(|t| t.to_f32_vec()).expect("weights conformed to the configuration")
    }

    fn conv(&mut self, x: &str, prefix: &str, k: i64, stride: i64, bias: bool) -> String {
        let wkey = format!("{prefix}.conv.weight");
        let shape = self.sd.get(&wkey).expect("conformed").shape_i64();
        let w = self.values(&wkey);
        let w = self.b.init_weight(&wkey, &shape, &w);
        let mut inputs = vec![x.to_string(), w];
        if bias {
            let bkey = format!("{prefix}.conv.bias");
            let v = self.values(&bkey);
            inputs.push(self.b.init_weight(&bkey, &[v.len() as i64], &v));
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

    /// GroupNorm (+ ReLU), computed in float32.
    fn norm_relu(&mut self, x: &str, prefix: &str) -> String {
        let g = self.cfg.num_groups;
        let gamma = self.values(&format!("{prefix}.weight"));
        let beta = self.values(&format!("{prefix}.bias"));
        let c = gamma.len() as i64;
        let x = if self.b.fp16 { self.b.cast(x, DataType::Float) } else { x.to_string() };
        let grouped = self.b.init_i64(&format!("groupnorm.shape_g{g}"), &[0, g, -1]);
        let shape = self.b.node("Shape", &[&x], vec![]);
        let normalized = match self.group_norm {
            GroupNormLowering::InstanceNorm => {
                let ones = format!("groupnorm.ones_g{g}");
                let zeros = format!("groupnorm.zeros_g{g}");
                if !self.b.inits.iter().any(|t| t.name == ones) {
                    self.b.init_f32(&ones, &[g], &vec![1.0; g as usize]);
                    self.b.init_f32(&zeros, &[g], &vec![0.0; g as usize]);
                }
                let r = self.b.node("Reshape", &[&x, &grouped], vec![]);
                let n = self.b.node(
                    "InstanceNormalization",
                    &[&r, &ones, &zeros],
                    vec![attr_float("epsilon", self.cfg.norm_eps as f32)],
                );
                self.b.node("Reshape", &[&n, &shape], vec![])
            }
            GroupNormLowering::StagedMeans => {
                let eps = format!("groupnorm.eps_{}", self.cfg.norm_eps);
                if !self.b.inits.iter().any(|t| t.name == eps) {
                    self.b.init_f32(&eps, &[], &[self.cfg.norm_eps as f32]);
                }
                let xg = self.b.node("Reshape", &[&x, &grouped], vec![]);
                let mean = self.staged_group_mean(&x, &grouped);
                let d = self.b.node("Sub", &[&xg, &mean], vec![]);
                let d2 = self.b.node("Mul", &[&d, &d], vec![]);
                let d2x = self.b.node("Reshape", &[&d2, &shape], vec![]);
                let var = self.staged_group_mean(&d2x, &grouped);
                let ve = self.b.node("Add", &[&var, &eps], vec![]);
                let sd = self.b.node("Sqrt", &[&ve], vec![]);
                let y = self.b.node("Div", &[&d, &sd], vec![]);
                self.b.node("Reshape", &[&y, &shape], vec![])
            }
        };
        let w = self.b.init_f32(&format!("{prefix}.weight"), &[c, 1, 1, 1], &gamma);
        let bb = self.b.init_f32(&format!("{prefix}.bias"), &[c, 1, 1, 1], &beta);
        let m = self.b.node("Mul", &[&normalized, &w], vec![]);
        let a = self.b.node("Add", &[&m, &bb], vec![]);
        let y = self.b.node("Relu", &[&a], vec![]);
        if self.b.fp16 { self.b.cast(&y, DataType::Float16) } else { y }
    }

    /// Mean over each group of `x` `[N, C, X, Y, Z]` as `[N, G, 1]`, reduced one axis at a
    /// time (Z, Y, X, then the channels of a group): every partial sum has at most a few
    /// hundred terms, so float32 keeps ~1e-7 relative accuracy where one long reduction
    /// (ONNX Runtime's InstanceNormalization) loses two orders of magnitude.
    fn staged_group_mean(&mut self, x: &str, grouped: &str) -> String {
        let mut m = x.to_string();
        for axis in [4, 3, 2] {
            let axes = self.b.init_i64(&format!("groupnorm.axis{axis}"), &[axis]);
            m = self.b.node("ReduceMean", &[&m, &axes], vec![attr_int("keepdims", 1)]);
        }
        let r = self.b.node("Reshape", &[&m, grouped], vec![]);
        let axes = self.b.init_i64("groupnorm.axis2", &[2]);
        self.b.node("ReduceMean", &[&r, &axes], vec![attr_int("keepdims", 1)])
    }

    fn res_block(&mut self, x: &str, prefix: &str) -> String {
        let h = self.norm_relu(x, &format!("{prefix}.norm1"));
        let h = self.conv(&h, &format!("{prefix}.conv1"), 3, 1, false);
        let h = self.norm_relu(&h, &format!("{prefix}.norm2"));
        let h = self.conv(&h, &format!("{prefix}.conv2"), 3, 1, false);
        self.b.node("Add", &[&h, x], vec![])
    }
}

/// How GroupNorm is written in the graph (opset 18 has no per-channel GroupNormalization).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupNormLowering {
    /// Mean and variance by `ReduceMean` one axis at a time, then `(x − μ) / √(σ² + ε)`.
    /// Exact in real arithmetic and accurate in float32 (ONNX Runtime CPU within ~5e-6 of
    /// torch on the bundle at 64×64×48).
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

/// Builds the ONNX model for `config` with weights `sd` (checked against the configuration).
pub fn build_model(
    config: &SegResNetConfig,
    sd: &StateDict,
    options: impl Into<ExportOptions>,
) -> Result<ModelProto, WeightsError> {
    let options = options.into();
    let precision = options.precision;
    let sd = weights::conform(config, sd)?;
    let fp16 = precision == Precision::Fp16;
    let mut cx = Ctx {
        b: Builder { nodes: Vec::new(), inits: Vec::new(), counter: 0, fp16 },
        sd: &sd,
        cfg: config,
        group_norm: options.group_norm,
    };
    let mut x = if fp16 { cx.b.cast(INPUT_NAME, DataType::Float16) } else { INPUT_NAME.to_string() };
    x = cx.conv(&x, "convInit", 3, 1, false);
    // Dropout3d is the identity at inference.
    let mut skips = Vec::new();
    for (i, &n) in config.blocks_down.iter().enumerate() {
        if i > 0 {
            x = cx.conv(&x, &format!("down_layers.{i}.0"), 3, 2, false);
        }
        for j in 0..n {
            x = cx.res_block(&x, &format!("down_layers.{i}.{}", j + 1));
        }
        skips.push(x.clone());
    }
    skips.pop();
    let scales = cx.b.init_f32("upsample.scales", &[5], &[1.0, 1.0, 2.0, 2.0, 2.0]);
    for (i, &n) in config.blocks_up.iter().enumerate() {
        let y = cx.conv(&x, &format!("up_samples.{i}.0"), 1, 1, false);
        let y = cx.b.node(
            "Resize",
            &[&y, "", &scales],
            vec![attr_str("mode", "linear"), attr_str("coordinate_transformation_mode", "half_pixel")],
        );
        let skip = skips.pop().expect("validated config");
        x = cx.b.node("Add", &[&y, &skip], vec![]);
        for j in 0..n {
            x = cx.res_block(&x, &format!("up_layers.{i}.{j}"));
        }
    }
    x = cx.norm_relu(&x, "conv_final.0");
    x = cx.conv(&x, "conv_final.2", 1, 1, true);
    if fp16 {
        cx.b.cast(&x, DataType::Float);
    }
    // Name the last value `logits`.
    let last = cx.b.nodes.last_mut().expect("graph has nodes");
    last.output = vec![OUTPUT_NAME.to_string()];

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
            &[Err("N"), Ok(config.in_channels), Err("X"), Err("Y"), Err("Z")],
        )],
        output: vec![tensor_value_info(
            OUTPUT_NAME,
            DataType::Float,
            &[Err("N"), Ok(config.out_channels), Err("X"), Err("Y"), Err("Z")],
        )],
        ..Default::default()
    };
    Ok(ModelProto {
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
    })
}

/// [`build_model`] serialised to bytes.
pub fn to_onnx_bytes(
    config: &SegResNetConfig,
    sd: &StateDict,
    options: impl Into<ExportOptions>,
) -> Result<Vec<u8>, WeightsError> {
    Ok(build_model(config, sd, options)?.encode_to_vec())
}

/// Parses ONNX bytes (for inspection and tests).
pub fn decode(bytes: &[u8]) -> Result<ModelProto, prost::DecodeError> {
    ModelProto::decode(bytes)
}
