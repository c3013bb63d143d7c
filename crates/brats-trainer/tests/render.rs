//! `brats-trainer render`: the sbatch script and the Kubeflow Trainer v2 TrainJob the service
//! submits, checked against golden files (tests/golden/; `BRATS_UPDATE_GOLDEN=1` rewrites them
//! after a deliberate change), and the TrainJob and the shipped ClusterTrainingRuntime
//! validated offline against Kubeflow Trainer's API models (PyPI `kubeflow-trainer-api`,
//! scripts/k8s/validate_trainjob.py). No Kubernetes cluster runs here: this proves the objects
//! are what the API accepts, not that a cluster ran them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A trainer configuration with both engines configured as a site would.
const CONFIG: &str = r#"
store_root = "s3://brats-bucket/brats"
[store]
s3_endpoint = "https://s3.example.org"
s3_access_key_id = "AKIDEXAMPLE"
s3_secret_access_key = "not-in-any-rendering"
[cluster.slurm]
max_nodes = 4
partition = "gpu"
account = "radiology"
time_limit = "2-00:00:00"
cpus_per_node = 32
mem_per_node = "256G"
extra_directives = ["--qos=normal"]
worker_exe = "/opt/brats/bin/brats-trainer"
workdir = "/shared/brats/slurm"
[cluster.kubernetes]
max_nodes = 4
image = "registry.example.org/brats/trainer:1.0"
credentials_secret = "brats-s3-credentials"
cpu_per_node = "16"
memory_per_node = "128Gi"
"#;

fn render(config: &Path, backend: &str, nodes: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_brats-trainer"))
        .args(["render", "--backend", backend, "--nodes", nodes, "--devices-per-node", "8"])
        .args(["--job-uri", "s3://brats-bucket/brats/jobs/job-20261203-abcdef"])
        .args(["--manifest-uri", "s3://brats-bucket/brats/datasets/3f2a/manifest.json", "--config"])
        .arg(config)
        .env_remove("BRATS_TRAINER_CONFIG")
        .output()
        .unwrap()
}

fn check_golden(name: &str, got: &str) {
    let path = repo().join("crates/brats-trainer/tests/golden").join(name);
    if std::env::var_os("BRATS_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(got, want, "{name} changed; if on purpose, rerun with BRATS_UPDATE_GOLDEN=1 and review the diff");
}

#[test]
fn rendered_sbatch_and_trainjob_match_their_golden_files_and_validate() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("trainer.toml");
    std::fs::write(&config, CONFIG).unwrap();

    let o = render(&config, "slurm", "4");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sbatch = String::from_utf8(o.stdout).unwrap();
    assert!(
        !sbatch.contains("not-in-any-rendering") && !sbatch.contains("AKIDEXAMPLE"),
        "credentials leaked:\n{sbatch}"
    );
    check_golden("job.sbatch", &sbatch);
    // bash parses it.
    let script = dir.path().join("job.sbatch");
    std::fs::write(&script, &sbatch).unwrap();
    assert!(Command::new("bash").arg("-n").arg(&script).status().unwrap().success());

    let o = render(&config, "kubernetes", "4");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let trainjob = String::from_utf8(o.stdout).unwrap();
    assert!(
        !trainjob.contains("not-in-any-rendering") && !trainjob.contains("AKIDEXAMPLE"),
        "credentials leaked:\n{trainjob}"
    );
    check_golden("trainjob.json", &trainjob);

    // More nodes than max_nodes: refused, naming the setting.
    let o = render(&config, "kubernetes", "5");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("max_nodes is 4"));

    // Kubeflow Trainer's API models accept the TrainJob and the shipped runtime, and the
    // validator catches what they would miss (proven by its self-test on planted faults).
    let manifest = dir.path().join("trainjob.json");
    std::fs::write(&manifest, &trainjob).unwrap();
    let runtime = repo().join("deploy/k8s/training/cluster-training-runtime.yaml");
    let python = repo().join(".deps/venv/bin/python");
    let validator = repo().join("scripts/k8s/validate_trainjob.py");
    for args in [vec![manifest.clone(), runtime.clone()], vec![PathBuf::from("--self-test"), manifest, runtime]] {
        let o = Command::new(&python)
            .arg(&validator)
            .args(&args)
            .output()
            .expect("run .deps/venv/bin/python (make bootstrap)");
        assert!(
            o.status.success(),
            "validate_trainjob.py {args:?}:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
