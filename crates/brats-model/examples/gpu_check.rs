//! GPU checks for issue 3 (run by `scripts/gpu-run.sh run` on a CUDA machine):
//! CUDA forward vs CPU (fp32), autocast fp16 and pure bf16 vs fp32, and the exported ONNX
//! graphs (fp32 and fp16) written to a folder for ONNX Runtime's CUDA/TensorRT providers,
//! together with the weights they were exported from (`weights.safetensors`, MONAI's keys), so
//! that the MONAI side of the inference benchmark runs exactly the same network.
//!
//! Usage: `gpu_check OUT_DIR [X Y Z]` (default 96 96 64). Prints one `key: value` line per
//! measurement; exits non-zero if CUDA is unavailable or a check fails.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use brats_model::onnx::{self, Precision};
use brats_model::weights::{load_into_var_store, save_weights};
use brats_model::{SegResNet, SegResNetConfig};
use common::{det_input, det_state_dict};
use tch::{Device, Kind, Tensor, nn};

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float).to_device(Device::Cpu) - b.to_kind(Kind::Float).to_device(Device::Cpu))
        .abs()
        .max()
        .double_value(&[])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = std::path::PathBuf::from(args.get(1).map(String::as_str).unwrap_or("gpu-check-out"));
    let dims: Vec<i64> =
        if args.len() >= 5 { args[2..5].iter().map(|s| s.parse().expect("X Y Z")).collect() } else { vec![96, 96, 64] };
    std::fs::create_dir_all(&out).expect("output folder");
    let cfg = SegResNetConfig::default();
    let sd = det_state_dict(&cfg);
    for (p, name) in [(Precision::Fp32, "model_fp32.onnx"), (Precision::Fp16, "model_fp16.onnx")] {
        let bytes = onnx::to_onnx_bytes(&cfg, &sd, p).expect("export");
        std::fs::write(out.join(name), bytes).expect("write onnx");
    }
    save_weights(&out.join("weights.safetensors"), &sd, &cfg, None).expect("write weights");
    let (x, y, z) = (dims[0] as usize, dims[1] as usize, dims[2] as usize);
    let input = Tensor::from_slice(&det_input(4, x, y, z)).reshape([1, 4, dims[0], dims[1], dims[2]]);
    let raw: Vec<f32> = Vec::try_from(&input.flatten(0, -1)).expect("input");
    let bytes: Vec<u8> = raw.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out.join("input_f32le.bin"), bytes).expect("write input");
    println!("input_shape: [1, 4, {x}, {y}, {z}]");
    println!("cuda_available: {}", tch::Cuda::is_available());
    println!("cudnn_available: {}", tch::Cuda::cudnn_is_available());

    let vs_cpu = nn::VarStore::new(Device::Cpu);
    let net_cpu = SegResNet::new(&vs_cpu.root(), &cfg).expect("net");
    load_into_var_store(&vs_cpu, &cfg, &sd).expect("weights");
    let t0 = Instant::now();
    let ref_cpu = tch::no_grad(|| net_cpu.forward(&input, false));
    println!("cpu_fp32_forward_s: {:.3}", t0.elapsed().as_secs_f64());
    let logits: Vec<f32> = Vec::try_from(&ref_cpu.flatten(0, -1)).expect("logits");
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out.join("logits_cpu_f32le.bin"), bytes).expect("write logits");

    if !tch::Cuda::is_available() {
        println!("result: NO_CUDA (no GPU/driver, or libtorch_cuda not loaded: set LD_LIBRARY_PATH to torch/lib)");
        std::process::exit(2);
    }
    let dev = Device::Cuda(0);
    let vs = nn::VarStore::new(dev);
    let net = SegResNet::new(&vs.root(), &cfg).expect("net");
    load_into_var_store(&vs, &cfg, &sd).expect("weights");
    let xg = input.to_device(dev);
    let timed = |label: &str, f: &dyn Fn() -> Tensor| {
        let _ = f(); // warm-up (cuDNN algorithm selection)
        tch::Cuda::synchronize(0);
        let t0 = Instant::now();
        let y = f();
        tch::Cuda::synchronize(0);
        println!("{label}_forward_ms: {:.1}", t0.elapsed().as_secs_f64() * 1e3);
        y
    };
    let fp32 = timed("cuda_fp32", &|| tch::no_grad(|| net.forward(&xg, false)));
    let d32 = max_abs(&fp32, &ref_cpu);
    println!("max_abs_cuda_fp32_vs_cpu: {d32:.3e}  (cuDNN may use TF32 for convolutions)");
    let fp16 = timed("cuda_autocast_fp16", &|| tch::no_grad(|| tch::autocast(true, || net.forward(&xg, false))));
    println!("autocast_output_kind: {:?}", fp16.kind());
    let d16 = max_abs(&fp16, &fp32);
    println!("max_abs_autocast_fp16_vs_cuda_fp32: {d16:.3e}");

    let mut vs_bf = nn::VarStore::new(dev);
    let net_bf = SegResNet::new(&vs_bf.root(), &cfg).expect("net");
    load_into_var_store(&vs_bf, &cfg, &sd).expect("weights");
    vs_bf.bfloat16();
    let xb = xg.to_kind(Kind::BFloat16);
    let bf = timed("cuda_pure_bf16", &|| tch::no_grad(|| net_bf.forward(&xb, false)));
    let dbf = max_abs(&bf, &fp32);
    println!("max_abs_pure_bf16_vs_cuda_fp32: {dbf:.3e}");

    // Agreement of the decisions (sigmoid >= 0.5 <=> logit >= 0).
    let pos = |t: &Tensor| t.to_kind(Kind::Float).to_device(Device::Cpu).ge(0.0);
    let agree = |a: &Tensor| pos(a).eq_tensor(&pos(&ref_cpu)).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
    println!("voxel_agreement_fp32: {:.6}", agree(&fp32));
    println!("voxel_agreement_fp16: {:.6}", agree(&fp16));
    println!("voxel_agreement_bf16: {:.6}", agree(&bf));
    let ok = d32 < 1e-2 && d16 < 0.1 && dbf < 0.5;
    println!("result: {}", if ok { "PASS" } else { "FAIL" });
    if !ok {
        std::process::exit(1);
    }
}
