//! Loading ONNX Runtime, building sessions and running the model contract on CPU.

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{TensorRef, ValueType};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Name of the model's input tensor.
pub const INPUT: &str = "image";
/// Name of the model's output tensor.
pub const OUTPUT: &str = "logits";
/// Input channels: T1c, T1, T2, FLAIR.
pub const IN_CHANNELS: i64 = 4;
/// Output channels: TC, WT, ET.
pub const OUT_CHANNELS: i64 = 3;

/// Errors of the inference runtime.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// ONNX Runtime could not be loaded or initialised.
    #[error("ONNX Runtime is unavailable: {0}")]
    Runtime(String),
    /// The model does not follow the platform's contract, or is not a valid ONNX model.
    #[error("model rejected: {0}")]
    Model(String),
    /// The input tensor is wrong.
    #[error("invalid input: {0}")]
    Input(String),
    /// Running the graph failed.
    #[error("inference failed: {0}")]
    Run(String),
}

/// Session settings that matter for speed and memory.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Threads inside one operator; 0 = ONNX Runtime's default (all cores).
    pub intra_threads: usize,
    /// Graph optimisation level 0–3 (disable, basic, extended, all).
    pub optimization_level: u8,
    /// Reuse activation buffers between runs of the same shape (memory pattern).
    pub memory_pattern: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions { intra_threads: 0, optimization_level: 3, memory_pattern: true }
    }
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// The library `ORT_DYLIB_PATH` names, else `libonnxruntime.so` on the loader path.
pub fn default_library() -> PathBuf {
    std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("libonnxruntime.so"))
}

/// Loads ONNX Runtime from `library` once per process and returns its environment.
pub fn environment(library: &Path) -> Result<&'static ort::environment::Environment, InferenceError> {
    let env = ENVIRONMENT.get_or_init(|| {
        let builder = ort::init_from(library).map_err(|e| {
            format!("{}: {e}; run `make bootstrap` or set ORT_DYLIB_PATH to libonnxruntime.so.1.31", library.display())
        })?;
        builder.with_name("brats-inference").build().map_err(|e| e.to_string())
    });
    env.as_ref().map_err(|e| InferenceError::Runtime(e.clone()))
}

/// A loaded segmentation model with a checked contract.
pub struct SegmentationModel {
    session: Mutex<Session>,
}

fn check_outlet(kind: &str, name: &str, ty: &ValueType, channels: i64) -> Result<(), InferenceError> {
    match ty {
        ValueType::Tensor { ty, shape, .. } => {
            if *ty != ort::value::TensorElementType::Float32 {
                return Err(InferenceError::Model(format!("{kind} '{name}' is {ty:?}; expected float32")));
            }
            if shape.len() != 5 || (shape[1] != channels && shape[1] != -1) {
                return Err(InferenceError::Model(format!(
                    "{kind} '{name}' has shape {:?}; expected [N, {channels}, X, Y, Z]",
                    &shape[..]
                )));
            }
            Ok(())
        }
        other => Err(InferenceError::Model(format!("{kind} '{name}' is {other:?}; expected a tensor"))),
    }
}

impl SegmentationModel {
    /// Builds a CPU session from ONNX bytes and checks the contract (one input `image`
    /// `[N,4,X,Y,Z]` f32, one output `logits` `[N,3,X,Y,Z]` f32).
    pub fn load(library: &Path, onnx: &[u8], options: &SessionOptions) -> Result<Self, InferenceError> {
        let env = environment(library)?;
        let model_err = |e: ort::Error| InferenceError::Model(e.to_string());
        let level = match options.optimization_level {
            0 => GraphOptimizationLevel::Disable,
            1 => GraphOptimizationLevel::Level1,
            2 => GraphOptimizationLevel::Level2,
            _ => GraphOptimizationLevel::All,
        };
        let mut builder = Session::builder(env)
            .map_err(model_err)?
            .with_optimization_level(level)
            .map_err(|e| InferenceError::Model(e.to_string()))?
            .with_memory_pattern(options.memory_pattern)
            .map_err(|e| InferenceError::Model(e.to_string()))?;
        if options.intra_threads > 0 {
            builder =
                builder.with_intra_threads(options.intra_threads).map_err(|e| InferenceError::Model(e.to_string()))?;
        }
        let session = builder
            .commit_from_memory(onnx)
            .map_err(|e| InferenceError::Model(format!("not a loadable ONNX model ({e})")))?;
        let names = |o: &[ort::value::Outlet]| o.iter().map(|x| x.name().to_string()).collect::<Vec<_>>();
        if session.inputs().len() != 1 || session.inputs()[0].name() != INPUT {
            return Err(InferenceError::Model(format!(
                "inputs are {:?}; expected exactly ['{INPUT}']",
                names(session.inputs())
            )));
        }
        if session.outputs().len() != 1 || session.outputs()[0].name() != OUTPUT {
            return Err(InferenceError::Model(format!(
                "outputs are {:?}; expected exactly ['{OUTPUT}']",
                names(session.outputs())
            )));
        }
        check_outlet("input", INPUT, session.inputs()[0].dtype(), IN_CHANNELS)?;
        check_outlet("output", OUTPUT, session.outputs()[0].dtype(), OUT_CHANNELS)?;
        Ok(SegmentationModel { session: Mutex::new(session) })
    }

    /// Runs the model on `image` (`[N, 4, X, Y, Z]`, C order) and returns the logits
    /// (`[N, 3, X, Y, Z]`, C order).
    pub fn run(&self, image: &[f32], shape: [usize; 5]) -> Result<Vec<f32>, InferenceError> {
        if shape[1] != IN_CHANNELS as usize || image.len() != shape.iter().product::<usize>() {
            return Err(InferenceError::Input(format!(
                "image has {} values for shape {shape:?}; expected [N, 4, X, Y, Z]",
                image.len()
            )));
        }
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let input = TensorRef::from_array_view((dims, image)).map_err(|e| InferenceError::Input(e.to_string()))?;
        let mut session = self.session.lock().map_err(|_| InferenceError::Run("session lock poisoned".into()))?;
        let outputs = session.run(ort::inputs![INPUT => input]).map_err(|e| InferenceError::Run(e.to_string()))?;
        let (out_shape, data) =
            outputs[OUTPUT].try_extract_tensor::<f32>().map_err(|e| InferenceError::Run(e.to_string()))?;
        let expected = [shape[0] as i64, OUT_CHANNELS, shape[2] as i64, shape[3] as i64, shape[4] as i64];
        if out_shape[..] != expected[..] {
            return Err(InferenceError::Model(format!(
                "returned logits of shape {:?}; expected {expected:?}",
                &out_shape[..]
            )));
        }
        Ok(data.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/onnx").join(name)).unwrap()
    }

    /// The committed 1×1×1 conv head (tests/monai/make_onnx_smoke_fixture.py) computed by hand.
    #[test]
    fn runs_the_contract_model_on_cpu() {
        let model = SegmentationModel::load(
            &default_library(),
            &fixture("pointwise_head.onnx"),
            &SessionOptions { intra_threads: 1, ..Default::default() },
        )
        .expect("ONNX Runtime 1.31 loads (make bootstrap)");
        let shape = [2, 4, 3, 2, 5];
        let n = 3 * 2 * 5;
        let image: Vec<f32> = (0..2 * 4 * n).map(|i| (i as f32 * 0.37).sin()).collect();
        let logits = model.run(&image, shape).unwrap();
        assert_eq!(logits.len(), 2 * 3 * n);
        let mut max_diff = 0f32;
        for b in 0..2 {
            for o in 0..3 {
                for v in 0..n {
                    let mut want = o as f32 / 4.0 - 0.25;
                    for i in 0..4 {
                        want += ((o + 1) as f32 / 10.0 - i as f32 / 20.0) * image[(b * 4 + i) * n + v];
                    }
                    max_diff = max_diff.max((logits[(b * 3 + o) * n + v] - want).abs());
                }
            }
        }
        assert!(max_diff < 1e-6, "max diff {max_diff}");
        let e = model.run(&image[..10], shape).unwrap_err();
        assert!(matches!(e, InferenceError::Input(_)));
    }

    #[test]
    fn corrupt_model_is_rejected_clearly() {
        let mut bytes = fixture("pointwise_head.onnx");
        bytes.truncate(bytes.len() / 2);
        let e = SegmentationModel::load(&default_library(), &bytes, &SessionOptions::default()).err().unwrap();
        assert!(e.to_string().contains("not a loadable ONNX model"), "{e}");
    }
}
