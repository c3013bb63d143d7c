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

/// An ONNX Runtime execution provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// NVIDIA TensorRT (fp16 by default, engine and timing caches on disk).
    TensorRt,
    /// NVIDIA CUDA.
    Cuda,
    /// ONNX Runtime's CPU kernels.
    Cpu,
}

impl Provider {
    /// Parses `tensorrt`, `cuda` or `cpu`.
    pub fn parse(s: &str) -> Result<Self, InferenceError> {
        match s.to_ascii_lowercase().as_str() {
            "tensorrt" | "trt" => Ok(Provider::TensorRt),
            "cuda" => Ok(Provider::Cuda),
            "cpu" => Ok(Provider::Cpu),
            other => Err(InferenceError::Input(format!("provider '{other}' is unknown: use tensorrt, cuda or cpu"))),
        }
    }

    /// Lowercase name, as reported in responses.
    pub fn name(self) -> &'static str {
        match self {
            Provider::TensorRt => "tensorrt",
            Provider::Cuda => "cuda",
            Provider::Cpu => "cpu",
        }
    }
}

/// Session settings that matter for speed and memory.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Execution providers to try, in order (e.g. TensorRT, CUDA, CPU).
    pub providers: Vec<Provider>,
    /// When a requested provider fails to load, fall through to the next one (logged, and
    /// reported by [`SegmentationModel::provider`]) instead of failing.
    pub allow_fallback: bool,
    /// TensorRT: build fp16 engines.
    pub fp16: bool,
    /// TensorRT: directory of the engine and timing caches (persist it across restarts).
    pub cache_dir: Option<PathBuf>,
    /// CUDA device ordinal.
    pub device_id: i32,
    /// Threads inside one operator; 0 = ONNX Runtime's default (all cores).
    pub intra_threads: usize,
    /// Graph optimisation level 0–3 (disable, basic, extended, all).
    pub optimization_level: u8,
    /// Reuse activation buffers between runs of the same shape (memory pattern).
    pub memory_pattern: bool,
    /// ONNX Runtime's CPU memory arena (`EnableCpuMemArena`, ORT's default) for sessions with
    /// symbolic shapes. Off, CPU tensors are allocated and freed one by one: lower peak RSS, at
    /// some speed cost. Shape-pinned CPU sessions ([`SessionOptions::pin_shapes`]) never use it:
    /// their allocation plan is static, and the arena only added ≈ 1.3 GB of fragmentation on
    /// the bundle window (see `benchmarks/README.md`, "Inference").
    pub cpu_arena: bool,
    /// CPU: run each input shape on its own session whose symbolic input dimensions are fixed
    /// to that shape (`AddFreeDimensionOverrideByName`), built on first use (a sliding window
    /// always feeds one shape; the last [`PINNED_SESSIONS`] shapes are kept). With static shapes
    /// ONNX Runtime plans every buffer ahead, folds the exporter's fast-path `If` and fuses the
    /// convolution sums of the NCHWc kernels (`brats_model::onnx`, "CPU fast path"). Default on;
    /// off, one session with symbolic shapes runs everything.
    pub pin_shapes: bool,
    /// Extra session configuration entries (`AddSessionConfigEntry`), e.g.
    /// `("session.intra_op.allow_spinning", "0")`; empty by default.
    pub config_entries: Vec<(String, String)>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            providers: vec![Provider::Cpu],
            allow_fallback: false,
            fp16: true,
            cache_dir: None,
            device_id: 0,
            intra_threads: 0,
            optimization_level: 3,
            memory_pattern: true,
            cpu_arena: true,
            pin_shapes: true,
            config_entries: Vec::new(),
        }
    }
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// The library `ORT_DYLIB_PATH` names at run time, else the one the build was configured with
/// (the bootstrap's, when it still exists), else `libonnxruntime.so` on the loader path.
pub fn default_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(p);
    }
    match option_env!("ORT_DYLIB_PATH") {
        Some(p) if Path::new(p).exists() => PathBuf::from(p),
        _ => PathBuf::from("libonnxruntime.so"),
    }
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

/// How many shape-pinned CPU sessions a model keeps (the least recently used goes first).
pub const PINNED_SESSIONS: usize = 2;

/// A loaded segmentation model with a checked contract.
pub struct SegmentationModel {
    sessions: Sessions,
    provider: Provider,
}

enum Sessions {
    /// One session with symbolic shapes (GPU providers, or `pin_shapes` off).
    Shared(Mutex<Session>),
    /// CPU sessions with the input shape fixed, built per shape on first use.
    Pinned(PinnedSessions),
}

struct PinnedSessions {
    env: &'static ort::environment::Environment,
    onnx: Vec<u8>,
    options: SessionOptions,
    /// Input axes that carry a named symbolic dimension.
    symbols: Vec<(usize, String)>,
    /// Least recently used first.
    cache: Mutex<Vec<([usize; 5], Session)>>,
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

/// A session for `provider`; `pinned` fixes named symbolic input dimensions (CPU), and
/// `level` overrides the optimisation level.
fn build_session(
    env: &ort::environment::Environment,
    onnx: &[u8],
    options: &SessionOptions,
    provider: Provider,
    pinned: Option<&[(String, i64)]>,
    level: Option<u8>,
) -> Result<Session, InferenceError> {
    let builder_err = |e: ort::Error| InferenceError::Runtime(e.to_string());
    let level = match level.unwrap_or(options.optimization_level) {
        0 => GraphOptimizationLevel::Disable,
        1 => GraphOptimizationLevel::Level1,
        2 => GraphOptimizationLevel::Level2,
        _ => GraphOptimizationLevel::All,
    };
    let mut builder = Session::builder(env)
        .map_err(builder_err)?
        .with_optimization_level(level)
        .map_err(|e| InferenceError::Runtime(e.to_string()))?
        .with_memory_pattern(options.memory_pattern)
        .map_err(|e| InferenceError::Runtime(e.to_string()))?;
    if options.intra_threads > 0 {
        builder =
            builder.with_intra_threads(options.intra_threads).map_err(|e| InferenceError::Runtime(e.to_string()))?;
    }
    for (key, value) in &options.config_entries {
        builder = builder.with_config_entry(key, value).map_err(|e| InferenceError::Runtime(e.to_string()))?;
    }
    for (name, size) in pinned.unwrap_or_default() {
        builder = builder.with_dimension_override(name, *size).map_err(|e| InferenceError::Runtime(e.to_string()))?;
    }
    if !options.cpu_arena || pinned.is_some() {
        // Only calls DisableCpuMemArena on the session options; the providers below are unchanged.
        builder = builder
            .with_execution_providers([ort::ep::CPU::default().with_arena_allocator(false).build()])
            .map_err(|e| InferenceError::Runtime(e.to_string()))?;
    }
    let ep = match provider {
        Provider::Cpu => None,
        Provider::Cuda => Some(ort::ep::CUDA::default().with_device_id(options.device_id).build().error_on_failure()),
        Provider::TensorRt => {
            let cache = options.cache_dir.clone().unwrap_or_else(|| std::env::temp_dir().join("brats-trt-cache"));
            let profile = "image:1x4x240x240x160";
            Some(
                ort::ep::TensorRT::default()
                    .with_device_id(options.device_id)
                    .with_fp16(options.fp16)
                    .with_engine_cache(true)
                    .with_engine_cache_path(cache.display())
                    .with_timing_cache(true)
                    .with_timing_cache_path(cache.display())
                    .with_profile_min_shapes("image:1x4x32x32x32")
                    .with_profile_opt_shapes(profile)
                    .with_profile_max_shapes("image:1x4x256x256x256")
                    .build()
                    .error_on_failure(),
            )
        }
    };
    if let Some(ep) = ep {
        builder = builder.with_execution_providers([ep]).map_err(|e| InferenceError::Runtime(e.to_string()))?;
    }
    builder.commit_from_memory(onnx).map_err(|e| {
        let msg = e.to_string();
        // Registration failures of GPU providers surface here too; keep them distinct from bad models.
        if provider != Provider::Cpu
            && (msg.contains("provider")
                || msg.contains("Provider")
                || msg.contains("CUDA")
                || msg.contains("TensorRT"))
        {
            InferenceError::Runtime(msg)
        } else {
            InferenceError::Model(format!("not a loadable ONNX model ({msg})"))
        }
    })
}

/// `(axis, name)` of every named symbolic dimension of the model input.
fn input_symbols(session: &Session) -> Vec<(usize, String)> {
    match session.inputs()[0].dtype() {
        ValueType::Tensor { shape, dimension_symbols, .. } => dimension_symbols
            .iter()
            .enumerate()
            .filter(|(axis, name)| !name.is_empty() && shape.get(*axis) == Some(&-1))
            .map(|(axis, name)| (axis, name.clone()))
            .collect(),
        _ => Vec::new(),
    }
}

fn check_contract(session: &Session) -> Result<(), InferenceError> {
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
    check_outlet("output", OUTPUT, session.outputs()[0].dtype(), OUT_CHANNELS)
}

impl SegmentationModel {
    /// Builds a session on the first usable provider of `options.providers` from ONNX bytes and
    /// checks the contract (one input `image` `[N,4,X,Y,Z]` f32, one output `logits`
    /// `[N,3,X,Y,Z]` f32). A requested provider that fails is an error unless
    /// `allow_fallback` is set.
    pub fn load(library: &Path, onnx: &[u8], options: &SessionOptions) -> Result<Self, InferenceError> {
        let env = environment(library)?;
        let mut failures = Vec::new();
        let mut providers = options.providers.clone();
        if providers.is_empty() {
            providers.push(Provider::Cpu);
        }
        for (i, &provider) in providers.iter().enumerate() {
            let pin = provider == Provider::Cpu && options.pin_shapes;
            // A pinned model runs on per-shape sessions; this one only checks the model (no
            // graph optimisation, which the per-shape sessions redo with their static shapes).
            match build_session(env, onnx, options, provider, None, pin.then_some(0)) {
                Ok(session) => {
                    if i > 0 {
                        tracing::warn!(
                            requested = providers[0].name(),
                            running = provider.name(),
                            ?failures,
                            "execution provider fell back"
                        );
                    }
                    check_contract(&session)?;
                    let symbols = input_symbols(&session);
                    let sessions = if pin && !symbols.is_empty() {
                        Sessions::Pinned(PinnedSessions {
                            env,
                            onnx: onnx.to_vec(),
                            options: options.clone(),
                            symbols,
                            cache: Mutex::new(Vec::new()),
                        })
                    } else if pin {
                        // Static input shape already: optimise once.
                        Sessions::Shared(Mutex::new(build_session(env, onnx, options, provider, Some(&[]), None)?))
                    } else {
                        Sessions::Shared(Mutex::new(session))
                    };
                    return Ok(SegmentationModel { sessions, provider });
                }
                // A model that does not load will not load on any provider.
                Err(e @ InferenceError::Model(_)) => return Err(e),
                Err(e) => {
                    failures.push(format!("{}: {e}", provider.name()));
                    if !options.allow_fallback {
                        break;
                    }
                }
            }
        }
        Err(InferenceError::Runtime(format!(
            "no requested execution provider could be used ({}); {}",
            failures.join("; "),
            if options.allow_fallback {
                "install the GPU runtime libraries"
            } else {
                "allow fallback to run on the next provider (e.g. CPU)"
            }
        )))
    }

    /// The execution provider the session runs on.
    pub fn provider(&self) -> Provider {
        self.provider
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
        let (mut shared, mut cache);
        let session: &mut Session = match &self.sessions {
            Sessions::Shared(m) => {
                shared = m.lock().map_err(|_| InferenceError::Run("session lock poisoned".into()))?;
                &mut shared
            }
            Sessions::Pinned(p) => {
                cache = p.cache.lock().map_err(|_| InferenceError::Run("session lock poisoned".into()))?;
                let at = match cache.iter().position(|(s, _)| *s == shape) {
                    Some(at) => at,
                    None => {
                        let t = std::time::Instant::now();
                        let fixed: Vec<(String, i64)> =
                            p.symbols.iter().map(|(axis, name)| (name.clone(), shape[*axis] as i64)).collect();
                        let session = build_session(p.env, &p.onnx, &p.options, Provider::Cpu, Some(&fixed), None)?;
                        tracing::debug!(?shape, seconds = t.elapsed().as_secs_f64(), "pinned CPU session built");
                        if cache.len() >= PINNED_SESSIONS {
                            cache.remove(0);
                        }
                        cache.push((shape, session));
                        cache.len() - 1
                    }
                };
                let entry = cache.remove(at);
                cache.push(entry);
                &mut cache.last_mut().expect("just pushed").1
            }
        };
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

    /// The CPU knobs of the benchmark (arena off, memory pattern off, level 0, a config entry)
    /// give the same logits as the defaults (ORT does not validate config values at session
    /// creation, so there is no error case to test here).
    #[test]
    fn session_knobs_keep_results() {
        let image: Vec<f32> = (0..4 * 24).map(|i| (i as f32 * 0.11).cos()).collect();
        let run = |o: SessionOptions| {
            SegmentationModel::load(&default_library(), &fixture("pointwise_head.onnx"), &o)
                .expect("ONNX Runtime 1.31 loads (make bootstrap)")
                .run(&image, [1, 4, 2, 3, 4])
                .unwrap()
        };
        let base = run(SessionOptions { intra_threads: 1, ..Default::default() });
        let knobs = run(SessionOptions {
            intra_threads: 1,
            cpu_arena: false,
            memory_pattern: false,
            optimization_level: 0,
            config_entries: vec![("session.intra_op.allow_spinning".into(), "0".into())],
            ..Default::default()
        });
        assert_eq!(base, knobs);
    }

    /// Shape-pinned CPU sessions (the default) give the same logits as one shared session with
    /// symbolic shapes, over more shapes than the cache keeps (an evicted shape is rebuilt).
    #[test]
    fn pinned_sessions_match_the_shared_session() {
        let onnx = fixture("pointwise_head.onnx");
        let load = |pin_shapes| {
            let o = SessionOptions { intra_threads: 1, pin_shapes, ..Default::default() };
            SegmentationModel::load(&default_library(), &onnx, &o).expect("ONNX Runtime 1.31 loads (make bootstrap)")
        };
        let (shared, pinned) = (load(false), load(true));
        assert!(matches!(shared.sessions, Sessions::Shared(_)));
        let Sessions::Pinned(p) = &pinned.sessions else { panic!("the fixture has symbolic N, X, Y, Z") };
        assert_eq!(
            p.symbols.iter().map(|(a, n)| (*a, n.as_str())).collect::<Vec<_>>(),
            [(0, "N"), (2, "X"), (3, "Y"), (4, "Z")]
        );
        for shape in [[1, 4, 2, 3, 4], [2, 4, 3, 2, 5], [1, 4, 4, 4, 4], [1, 4, 2, 3, 4]] {
            let n: usize = shape.iter().product();
            let image: Vec<f32> = (0..n).map(|i| (i as f32 * 0.29).sin()).collect();
            assert_eq!(shared.run(&image, shape).unwrap(), pinned.run(&image, shape).unwrap(), "{shape:?}");
        }
        let cache = p.cache.lock().unwrap();
        assert_eq!(cache.len(), PINNED_SESSIONS);
        assert_eq!(cache.last().unwrap().0, [1, 4, 2, 3, 4], "most recently used last");
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

    #[test]
    fn wrong_channel_count_is_rejected_clearly() {
        let e = SegmentationModel::load(
            &default_library(),
            &fixture("pointwise_head_2ch.onnx"),
            &SessionOptions::default(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("expected [N, 3, X, Y, Z]"), "{e}");
    }

    /// This machine's ONNX Runtime has no CUDA provider: asking for it fails clearly, and with
    /// fallback allowed the session runs on CPU and says so.
    #[test]
    fn missing_gpu_provider_fails_or_falls_back() {
        let onnx = fixture("pointwise_head.onnx");
        let strict = SessionOptions { providers: vec![Provider::Cuda, Provider::Cpu], ..Default::default() };
        match SegmentationModel::load(&default_library(), &onnx, &strict) {
            Err(InferenceError::Runtime(msg)) => assert!(msg.contains("cuda"), "{msg}"),
            Err(other) => panic!("unexpected error {other}"),
            // A machine with a CUDA-enabled ONNX Runtime may really have it.
            Ok(m) => assert_eq!(m.provider(), Provider::Cuda),
        }
        let lenient = SessionOptions { allow_fallback: true, ..strict };
        let m = SegmentationModel::load(&default_library(), &onnx, &lenient).unwrap();
        assert!(matches!(m.provider(), Provider::Cuda | Provider::Cpu));
    }
}
