//! Command-line flags shared by the binaries that run the model in-process
//! (`brats-inference segment`, `brats-gateway segment`), parsed into typed values once.

use crate::runtime::{Provider, SessionOptions};
use anyhow::Context;
use brats_artifacts::window::{Blend, SlidingWindow};

/// How the model runs on this machine: execution providers, threads, ONNX Runtime session
/// knobs, and the sliding window.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Execution providers in order, comma-separated: tensorrt, cuda, cpu.
    #[arg(long, default_value = "cpu")]
    pub provider: String,
    /// Fall back to the next provider when one fails to load (the fallback is logged).
    #[arg(long)]
    pub allow_fallback: bool,
    /// Intra-op threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Sliding-window size X,Y,Z.
    #[arg(long, default_value = "240,240,160")]
    pub roi: String,
    /// Sliding-window overlap, in [0, 1).
    #[arg(long, default_value_t = 0.5)]
    pub overlap: f64,
    /// Disable ONNX Runtime's CPU memory arena (effect on CPU: benchmarks/README.md, "Inference").
    #[arg(long)]
    pub no_arena: bool,
    /// Disable the memory pattern (pre-planned activation buffers).
    #[arg(long)]
    pub no_mem_pattern: bool,
    /// Graph optimisation level 0–3 (disable, basic, extended, all).
    #[arg(long, default_value_t = 3)]
    pub opt_level: u8,
    /// Extra session configuration entry KEY=VALUE (repeatable), e.g.
    /// session.intra_op.allow_spinning=0.
    #[arg(long = "ort-config", value_name = "KEY=VALUE")]
    pub ort_config: Vec<String>,
}

impl EngineArgs {
    /// The session options these flags ask for; a bad provider name or `--ort-config` entry is
    /// named in the error.
    pub fn session(&self) -> anyhow::Result<SessionOptions> {
        let providers = self.provider.split(',').map(Provider::parse).collect::<Result<Vec<_>, _>>()?;
        let mut o = SessionOptions {
            providers,
            allow_fallback: self.allow_fallback,
            intra_threads: self.threads,
            cpu_arena: !self.no_arena,
            memory_pattern: !self.no_mem_pattern,
            optimization_level: self.opt_level,
            ..Default::default()
        };
        for kv in &self.ort_config {
            let (k, v) = kv.split_once('=').with_context(|| format!("--ort-config '{kv}': expected KEY=VALUE"))?;
            o.config_entries.push((k.to_string(), v.to_string()));
        }
        Ok(o)
    }

    /// The sliding window these flags ask for (MONAI's constant blending, no mirroring, the
    /// whole volume); callers add their own blend, mirror or extent flags.
    pub fn window(&self) -> anyhow::Result<SlidingWindow> {
        anyhow::ensure!((0.0..1.0).contains(&self.overlap), "--overlap {} must be in [0, 1)", self.overlap);
        let roi = brats_cli::parse_xyz::<usize>(&self.roi).map_err(|e| anyhow::anyhow!("--roi: {e}"))?;
        Ok(SlidingWindow { roi, overlap: self.overlap, blend: Blend::Constant, ..Default::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn parse(args: &[&str]) -> EngineArgs {
        Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap().engine
    }

    #[test]
    fn flags_become_session_options_and_a_window() {
        let e = parse(&[
            "--provider",
            "cuda,cpu",
            "--allow-fallback",
            "--threads",
            "3",
            "--roi",
            "96,96,64",
            "--overlap",
            "0.25",
            "--no-arena",
            "--ort-config",
            "a.b=1",
        ]);
        let s = e.session().unwrap();
        assert_eq!(s.providers, vec![Provider::Cuda, Provider::Cpu]);
        assert!(s.allow_fallback && !s.cpu_arena && s.memory_pattern);
        assert_eq!((s.intra_threads, s.optimization_level), (3, 3));
        assert_eq!(s.config_entries, vec![("a.b".to_string(), "1".to_string())]);
        let w = e.window().unwrap();
        assert_eq!((w.roi, w.overlap, w.blend), ([96, 96, 64], 0.25, Blend::Constant));
    }

    #[test]
    fn bad_values_name_the_flag() {
        assert!(parse(&["--overlap", "1"]).window().unwrap_err().to_string().contains("--overlap"));
        assert!(parse(&["--roi", "96,96"]).window().unwrap_err().to_string().contains("--roi"));
        assert!(parse(&["--ort-config", "novalue"]).session().unwrap_err().to_string().contains("--ort-config"));
        assert!(parse(&["--provider", "tpu"]).session().is_err());
    }
}
