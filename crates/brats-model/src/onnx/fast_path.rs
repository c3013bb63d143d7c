//! The CPU fast path of the ONNX export: the slab-layout branch (3-D convolutions as 2-D ones
//! over `[N, C, X·P, Z]`, see the `onnx` module documentation) and the raw-protobuf writer of the
//! `If` node's graph-valued attributes, which the subset proto cannot express.

use super::graph::{Builder, Ctx, attr_int, attr_ints, attr_str, tensor_value_info};
use super::proto::tensor_proto::DataType;
use super::proto::{GraphProto, NodeProto, attribute_proto::AttributeType};

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
    pub(super) fn slab(&mut self, image: &str, pitch0: i64) -> String {
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

/// One `If` attribute (`then_branch` / `else_branch`) as encoded bytes: the subset proto has no
/// graph-valued attributes, so field 6 (`AttributeProto.g`) is written by hand (wire format of
/// the ONNX specification).
pub(super) fn graph_attribute_bytes(name: &str, graph: &GraphProto) -> Vec<u8> {
    let mut buf = Vec::new();
    prost::encoding::string::encode(1, &name.to_string(), &mut buf);
    prost::encoding::message::encode(6, graph, &mut buf);
    prost::encoding::int32::encode(20, &(AttributeType::Graph as i32), &mut buf);
    buf
}

pub(super) fn length_delimited(tag: u32, bytes: &[u8], buf: &mut Vec<u8>) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(bytes.len() as u64, buf);
    buf.extend_from_slice(bytes);
}

pub(super) fn branch_graph(name: &str, nodes: Vec<NodeProto>, output: &str) -> GraphProto {
    GraphProto {
        name: name.into(),
        node: nodes,
        output: vec![tensor_value_info(output, DataType::Float, None)],
        ..Default::default()
    }
}
