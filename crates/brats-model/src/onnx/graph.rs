//! The graph builder of the ONNX export: attribute and value-info helpers, [`Builder`] (nodes and
//! initializers with fresh names) and [`Ctx`], which writes the plain SegResNet graph.

use std::collections::HashSet;

use super::GroupNormLowering;
use super::proto::tensor_proto::DataType;
use super::proto::{
    self, AttributeProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
    attribute_proto::AttributeType,
};
use crate::config::SegResNetConfig;
use crate::tensors::StateDict;

pub(super) fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Ints as i32, ints: v.to_vec(), ..Default::default() }
}
pub(super) fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Int as i32, i: v, ..Default::default() }
}
pub(super) fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: AttributeType::Float as i32, f: v, ..Default::default() }
}
pub(super) fn attr_str(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

pub(super) fn tensor_value_info(name: &str, elem: DataType, dims: Option<&[Result<i64, &str>]>) -> ValueInfoProto {
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

pub(super) struct Builder {
    pub(super) nodes: Vec<NodeProto>,
    pub(super) inits: Vec<TensorProto>,
    pub(super) init_names: HashSet<String>,
    pub(super) counter: usize,
    pub(super) fp16: bool,
}

impl Builder {
    pub(super) fn fresh(&mut self, op: &str) -> String {
        self.counter += 1;
        format!("{op}_{}", self.counter)
    }

    pub(super) fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
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

    pub(super) fn push_init(&mut self, t: TensorProto) -> String {
        let name = t.name.clone();
        if self.init_names.insert(name.clone()) {
            self.inits.push(t);
        }
        name
    }

    pub(super) fn init_f32(&mut self, name: &str, dims: &[i64], v: &[f32]) -> String {
        self.push_init(TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Float as i32,
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        })
    }

    /// A weight in the graph's compute precision.
    pub(super) fn init_weight(&mut self, name: &str, dims: &[i64], v: &[f32]) -> String {
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

    pub(super) fn init_i64(&mut self, name: &str, dims: &[i64], v: &[i64]) -> String {
        self.push_init(TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Int64 as i32,
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        })
    }

    /// A 1-D int64 constant.
    pub(super) fn ints(&mut self, v: &[i64]) -> String {
        let name = format!("const.i64.{}", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("_"));
        self.init_i64(&name, &[v.len() as i64], v)
    }

    /// A scalar int64 constant.
    pub(super) fn int(&mut self, v: i64) -> String {
        self.init_i64(&format!("const.i64.scalar.{v}"), &[], &[v])
    }

    /// A float32 constant of the given shape, all elements `v`.
    pub(super) fn float(&mut self, v: f32, dims: &[i64]) -> String {
        let n: i64 = dims.iter().product();
        let name =
            format!("const.f32.{}.{}", v.to_bits(), dims.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("x"));
        self.init_f32(&name, dims, &vec![v; n as usize])
    }

    pub(super) fn cast(&mut self, x: &str, to: DataType) -> String {
        self.node("Cast", &[x], vec![attr_int("to", to as i64)])
    }

    /// `x[..., start:end, ...]` along `axis`; `end` may be a tensor name (1-D int64).
    pub(super) fn slice(&mut self, x: &str, axis: i64, start: i64, end: &str) -> String {
        let s = self.ints(&[start]);
        let a = self.ints(&[axis]);
        self.node("Slice", &[x, &s, end, &a], vec![])
    }

    /// `Shape(x)[start:end]` as a 1-D int64 tensor.
    pub(super) fn dims(&mut self, x: &str, start: i64, end: i64) -> String {
        let shape = self.node("Shape", &[x], vec![]);
        let e = self.ints(&[end]);
        self.slice(&shape, 0, start, &e)
    }

    pub(super) fn reshape(&mut self, x: &str, shape: &str) -> String {
        self.node("Reshape", &[x, shape], vec![])
    }

    pub(super) fn reduce(&mut self, op: &str, x: &str, axis: i64) -> String {
        let a = self.ints(&[axis]);
        self.node(op, &[x, &a], vec![attr_int("keepdims", 1)])
    }
}

/// The graph body being written: the plain graph or the slab fast path.
pub(super) struct Ctx<'a> {
    pub(super) b: Builder,
    pub(super) sd: &'a StateDict,
    pub(super) cfg: &'a SegResNetConfig,
    pub(super) group_norm: GroupNormLowering,
}

impl Ctx<'_> {
    pub(super) fn values(&self, key: &str) -> Vec<f32> {
        self.sd.get(key).and_then(|t| t.to_f32_vec()).expect("weights conformed to the configuration")
    }

    /// A convolution weight (MONAI key and shape) in the compute precision.
    pub(super) fn conv_weight(&mut self, prefix: &str) -> (String, Vec<i64>) {
        let key = format!("{prefix}.conv.weight");
        let shape = self.sd.get(&key).expect("conformed").shape_i64();
        let v = self.values(&key);
        (self.b.init_weight(&key, &shape, &v), shape)
    }

    pub(super) fn conv_bias(&mut self, prefix: &str) -> String {
        let key = format!("{prefix}.conv.bias");
        let v = self.values(&key);
        self.b.init_weight(&key, &[v.len() as i64], &v)
    }

    /// A GroupNorm affine parameter (MONAI key and shape `[C]`, float32) reshaped for broadcasting.
    pub(super) fn norm_param(&mut self, key: &str, rank: usize) -> String {
        let v = self.values(key);
        let t = self.b.init_f32(key, &[v.len() as i64], &v);
        let mut shape = vec![1i64; rank];
        shape[1] = -1;
        let s = self.b.ints(&shape);
        self.b.reshape(&t, &s)
    }

    pub(super) fn conv(&mut self, x: &str, prefix: &str, k: i64, stride: i64, bias: bool) -> String {
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
    pub(super) fn group_moments(
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
    pub(super) fn group_affine(&mut self, mean: &str, mean_sq: &str, prefix: &str, rank: usize) -> (String, String) {
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
    pub(super) fn norm_relu(&mut self, x: &str, prefix: &str) -> String {
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

    pub(super) fn res_block(&mut self, x: &str, prefix: &str) -> String {
        let h = self.norm_relu(x, &format!("{prefix}.norm1"));
        let h = self.conv(&h, &format!("{prefix}.conv1"), 3, 1, false);
        let h = self.norm_relu(&h, &format!("{prefix}.norm2"));
        let h = self.conv(&h, &format!("{prefix}.conv2"), 3, 1, false);
        self.b.node("Add", &[&h, x], vec![])
    }

    /// The plain graph from `image` to logits; returns the logits' value name.
    pub(super) fn plain(&mut self, image: &str) -> String {
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
}
