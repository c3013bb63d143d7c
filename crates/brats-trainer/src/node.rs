//! Where a node sits in a multi-node job, read from the engine that placed it: the node
//! launcher's (`brats-trainer node`, torchrun's role) input.
//!
//! Engines describe nodes, not ranks: Kubeflow Trainer v2 gives each node `PET_NNODES`,
//! `PET_NPROC_PER_NODE`, `PET_NODE_RANK` and `PET_MASTER_ADDR`/`PET_MASTER_PORT` (it rejects the
//! torchrun names in a TrainJob's environment); Slurm, with one task per node
//! (`srun --ntasks-per-node=1`), gives `SLURM_NNODES`, `SLURM_NODEID` and the node list whose
//! first host is rank 0's. Command-line flags override both; without either the node is the
//! only one, on loopback. The launcher then starts `nproc_per_node` workers with torchrun's
//! variables (`RANK = node_rank · nproc_per_node + local_rank`).

use brats_train::spec::Device;

/// How many workers a node starts: a number, or what the node has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nproc {
    /// Exactly this many (on GPUs 0..n when the node has CUDA devices, else CPU ranks).
    Count(usize),
    /// One per CUDA device, or one CPU rank on a node without any (torchrun's `auto`).
    Auto,
    /// One per CUDA device; an error on a node without any.
    Gpu,
    /// One CPU rank.
    Cpu,
}

impl Nproc {
    /// Parses `N`, `auto`, `gpu` or `cpu`.
    pub fn parse(s: &str) -> Option<Nproc> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(Nproc::Auto),
            "gpu" => Some(Nproc::Gpu),
            "cpu" => Some(Nproc::Cpu),
            n => n.parse().ok().filter(|&n| n >= 1).map(Nproc::Count),
        }
    }

    /// The device of each local rank on a node with `cuda_devices` CUDA devices.
    pub fn devices(self, cuda_devices: usize) -> Result<Vec<Device>, NodeError> {
        let cuda = |n: usize| (0..n).map(Device::Cuda).collect();
        match self {
            Nproc::Cpu => Ok(vec![Device::Cpu]),
            Nproc::Auto if cuda_devices == 0 => Ok(vec![Device::Cpu]),
            Nproc::Auto => Ok(cuda(cuda_devices)),
            Nproc::Gpu if cuda_devices == 0 => Err(NodeError::new(
                "nproc_per_node",
                "gpu",
                "this node has no CUDA device; request GPUs for the node (Slurm --gpus-per-node, a \
                 pod's nvidia.com/gpu limit) or use cpu",
            )),
            Nproc::Gpu => Ok(cuda(cuda_devices)),
            Nproc::Count(n) if cuda_devices == 0 => Ok(vec![Device::Cpu; n]),
            Nproc::Count(n) if n > cuda_devices => Err(NodeError::new(
                "nproc_per_node",
                &n.to_string(),
                &format!("this node has {cuda_devices} CUDA device(s); start at most that many workers, or use gpu"),
            )),
            Nproc::Count(n) => Ok(cuda(n)),
        }
    }
}

/// An inconsistent or missing setting, named with its value and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}={value:?}: {reason}")]
pub struct NodeError {
    /// The variable or flag.
    pub setting: String,
    /// Its value.
    pub value: String,
    /// What is wrong and the fix.
    pub reason: String,
}

impl NodeError {
    fn new(setting: &str, value: &str, reason: &str) -> NodeError {
        NodeError { setting: setting.into(), value: value.into(), reason: reason.into() }
    }
}

/// Settings given on the command line; each overrides the engine's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFlags {
    /// `--nnodes`.
    pub nnodes: Option<usize>,
    /// `--nproc-per-node`.
    pub nproc_per_node: Option<String>,
    /// `--node-rank`.
    pub node_rank: Option<usize>,
    /// `--master-addr`.
    pub master_addr: Option<String>,
    /// `--master-port`.
    pub master_port: Option<u16>,
}

/// Where this node sits in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTopology {
    /// Nodes in the job.
    pub nnodes: usize,
    /// Workers on every node.
    pub nproc: Nproc,
    /// This node's index, `0..nnodes`.
    pub node_rank: usize,
    /// Rank 0's host (it serves the rendezvous store).
    pub master_addr: String,
    /// The rendezvous port on `master_addr`; `None` on a single node (a free loopback port).
    pub master_port: Option<u16>,
    /// Which engine the settings came from ("flags", "kubeflow", "slurm", "single node").
    pub source: &'static str,
}

/// The default rendezvous port (torchrun's and Kubeflow's).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

impl NodeTopology {
    /// Reads the engine's variables through `lookup` (Kubeflow's `PET_*`, else Slurm's), with
    /// `flags` overriding them, and checks them against each other. `WORLD_SIZE`, when an
    /// engine also sets it, must equal nodes × workers per node.
    pub fn resolve(flags: &NodeFlags, lookup: impl Fn(&str) -> Option<String>) -> Result<NodeTopology, NodeError> {
        let number = |var: &str, value: String| -> Result<usize, NodeError> {
            value.trim().parse().map_err(|_| NodeError::new(var, &value, "expected an unsigned integer"))
        };
        let kubeflow = lookup("PET_NNODES").is_some();
        let slurm = !kubeflow && lookup("SLURM_NNODES").or_else(|| lookup("SLURM_JOB_NUM_NODES")).is_some();
        // Unset settings stay None until the flags have had their say; then a multi-node job
        // without them is an error naming the engine's variable.
        let (mut nnodes, mut node_rank, mut master_addr, mut master_port) = (1, None, None, None);
        let (mut nproc, mut source) = ("auto".to_string(), "single node");
        let (rank_var, addr_var) = if kubeflow {
            source = "kubeflow";
            nnodes = number("PET_NNODES", lookup("PET_NNODES").unwrap_or_default())?;
            node_rank = match (lookup("PET_NODE_RANK"), lookup("JOB_COMPLETION_INDEX")) {
                (Some(v), _) => Some(number("PET_NODE_RANK", v)?),
                (None, Some(v)) => Some(number("JOB_COMPLETION_INDEX", v)?),
                (None, None) => None,
            };
            master_addr = lookup("PET_MASTER_ADDR");
            master_port = lookup("PET_MASTER_PORT").map(|v| port("PET_MASTER_PORT", &v)).transpose()?;
            if let Some(n) = lookup("PET_NPROC_PER_NODE") {
                nproc = n;
            }
            ("PET_NODE_RANK", "PET_MASTER_ADDR")
        } else if slurm {
            source = "slurm";
            let (var, value) = match lookup("SLURM_NNODES") {
                Some(v) => ("SLURM_NNODES", v),
                None => ("SLURM_JOB_NUM_NODES", lookup("SLURM_JOB_NUM_NODES").unwrap_or_default()),
            };
            nnodes = number(var, value)?;
            node_rank = lookup("SLURM_NODEID").map(|v| number("SLURM_NODEID", v)).transpose()?;
            if let Some(tasks) = lookup("SLURM_NTASKS") {
                let tasks = number("SLURM_NTASKS", tasks)?;
                if tasks != nnodes {
                    return Err(NodeError::new(
                        "SLURM_NTASKS",
                        &tasks.to_string(),
                        &format!(
                            "run one `brats-trainer node` per node (srun --ntasks-per-node=1), not {tasks} tasks on \
                             {nnodes} node(s); the launcher starts the per-device workers itself"
                        ),
                    ));
                }
            }
            master_addr = match lookup("MASTER_ADDR") {
                Some(a) => Some(a),
                None => {
                    let list = lookup("SLURM_JOB_NODELIST").or_else(|| lookup("SLURM_NODELIST")).unwrap_or_default();
                    Some(first_host(&list).ok_or_else(|| {
                        NodeError::new("SLURM_JOB_NODELIST", &list, "cannot find the first host (rank 0's node)")
                    })?)
                }
            };
            master_port = lookup("MASTER_PORT").map(|v| port("MASTER_PORT", &v)).transpose()?;
            if let Some(gpus) = lookup("SLURM_GPUS_ON_NODE").filter(|g| g.trim() != "0") {
                nproc = gpus;
            }
            ("SLURM_NODEID", "MASTER_ADDR")
        } else {
            ("--node-rank", "--master-addr")
        };
        if let Some(n) = flags.nnodes {
            (nnodes, source) = (n, "flags");
        }
        if flags.node_rank.is_some() {
            node_rank = flags.node_rank;
        }
        if flags.master_addr.is_some() {
            master_addr = flags.master_addr.clone();
        }
        if flags.master_port.is_some() {
            master_port = flags.master_port;
        }
        if let Some(n) = &flags.nproc_per_node {
            nproc = n.clone();
        }
        if nnodes > 1 {
            if node_rank.is_none() {
                return Err(NodeError::new(
                    rank_var,
                    "",
                    &format!("unset in a {nnodes}-node job: which node is this?"),
                ));
            }
            if master_addr.is_none() {
                return Err(NodeError::new(addr_var, "", &format!("unset in a {nnodes}-node job: where is rank 0?")));
            }
        }
        let node_rank = node_rank.unwrap_or(0);
        let master_addr = master_addr.unwrap_or_else(|| "127.0.0.1".to_string());
        let nproc = Nproc::parse(&nproc)
            .ok_or_else(|| NodeError::new("nproc_per_node", &nproc, "expected a number ≥ 1, auto, gpu or cpu"))?;
        if nnodes == 0 {
            return Err(NodeError::new("nnodes", "0", "a job has at least one node"));
        }
        if node_rank >= nnodes {
            return Err(NodeError::new(
                "node_rank",
                &node_rank.to_string(),
                &format!("must be below the node count {nnodes} (nodes count from 0)"),
            ));
        }
        if nnodes > 1 && master_port.is_none() {
            master_port = Some(DEFAULT_MASTER_PORT);
        }
        if master_port == Some(0) {
            return Err(NodeError::new("master_port", "0", "must be a fixed port every node can reach"));
        }
        if master_addr.trim().is_empty() {
            return Err(NodeError::new("master_addr", "", "must be rank 0's host name or address"));
        }
        Ok(NodeTopology { nnodes, nproc, node_rank, master_addr, master_port, source })
    }

    /// Checks `WORLD_SIZE`, when set beside the node settings, against `nnodes × workers`.
    pub fn check_world_size(&self, workers: usize, world_size: Option<String>) -> Result<(), NodeError> {
        let Some(value) = world_size else { return Ok(()) };
        let expected = self.nnodes * workers;
        match value.trim().parse::<usize>() {
            Ok(w) if w == expected => Ok(()),
            _ => Err(NodeError::new(
                "WORLD_SIZE",
                &value,
                &format!(
                    "does not add up: {} node(s) × {workers} worker(s) per node = {expected}; unset it (the launcher \
                     sets it per worker) or fix the node count and workers per node",
                    self.nnodes
                ),
            )),
        }
    }
}

fn port(var: &str, value: &str) -> Result<u16, NodeError> {
    value.trim().parse().map_err(|_| NodeError::new(var, value, "expected a port number below 65536"))
}

/// The first host of a Slurm host list: `node[07-09,12],gpu1` → `node07`, `a,b` → `a`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let end = list.find(',').unwrap_or(list.len());
    let bracket = list.find('[');
    match bracket {
        Some(b) if b < end => {
            let prefix = &list[..b];
            let inner = &list[b + 1..list[b..].find(']')? + b];
            let first = inner.split([',', '-']).next()?.trim();
            (!first.is_empty()).then(|| format!("{prefix}{first}"))
        }
        _ => Some(list[..end].trim().to_string()).filter(|h| !h.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(var, _)| *var == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn kubeflow_variables_place_the_node() {
        let t = NodeTopology::resolve(
            &NodeFlags::default(),
            env(&[
                ("PET_NNODES", "4"),
                ("PET_NPROC_PER_NODE", "8"),
                ("PET_NODE_RANK", "3"),
                ("PET_MASTER_ADDR", "job-node-0-0.job"),
                ("PET_MASTER_PORT", "29500"),
            ]),
        )
        .unwrap();
        assert_eq!(
            t,
            NodeTopology {
                nnodes: 4,
                nproc: Nproc::Count(8),
                node_rank: 3,
                master_addr: "job-node-0-0.job".into(),
                master_port: Some(29500),
                source: "kubeflow"
            }
        );
        // JobSet's completion index stands in for PET_NODE_RANK.
        let t = NodeTopology::resolve(
            &NodeFlags::default(),
            env(&[("PET_NNODES", "2"), ("JOB_COMPLETION_INDEX", "1"), ("PET_MASTER_ADDR", "m")]),
        )
        .unwrap();
        assert_eq!((t.node_rank, t.master_port, t.nproc), (1, Some(DEFAULT_MASTER_PORT), Nproc::Auto));
    }

    #[test]
    fn slurm_variables_place_the_node_and_the_first_host_is_the_master() {
        let t = NodeTopology::resolve(
            &NodeFlags::default(),
            env(&[
                ("SLURM_NNODES", "2"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_NODEID", "1"),
                ("SLURM_JOB_NODELIST", "gpu[07-08]"),
                ("SLURM_GPUS_ON_NODE", "4"),
            ]),
        )
        .unwrap();
        assert_eq!((t.nnodes, t.node_rank, t.master_addr.as_str(), t.nproc), (2, 1, "gpu07", Nproc::Count(4)));
        assert_eq!(t.source, "slurm");
        let e = NodeTopology::resolve(
            &NodeFlags::default(),
            env(&[("SLURM_NNODES", "2"), ("SLURM_NTASKS", "16"), ("SLURM_NODEID", "0"), ("SLURM_JOB_NODELIST", "a,b")]),
        )
        .unwrap_err();
        assert_eq!(e.setting, "SLURM_NTASKS");
        assert!(e.reason.contains("--ntasks-per-node=1"), "{e}");
        assert_eq!(first_host("node[07-09,12],gpu1").as_deref(), Some("node07"));
        assert_eq!(first_host("a,b").as_deref(), Some("a"));
        assert_eq!(first_host("c1").as_deref(), Some("c1"));
        assert_eq!(first_host(""), None);
    }

    #[test]
    fn flags_override_and_inconsistencies_are_named() {
        let flags = NodeFlags { nnodes: Some(2), node_rank: Some(1), master_port: Some(4000), ..Default::default() };
        let e = NodeTopology::resolve(&flags, env(&[("PET_NNODES", "8"), ("PET_NODE_RANK", "7")])).unwrap_err();
        assert_eq!(e.setting, "PET_MASTER_ADDR");
        assert!(e.reason.contains("where is rank 0"), "{e}");
        let flags = NodeFlags { master_addr: Some("10.0.0.1".into()), ..flags };
        let t = NodeTopology::resolve(&flags, env(&[("PET_NNODES", "8"), ("PET_NODE_RANK", "7")])).unwrap();
        assert_eq!((t.nnodes, t.node_rank, t.master_port, t.source), (2, 1, Some(4000), "flags"));
        assert_eq!(t.master_addr, "10.0.0.1");
        let e = NodeTopology::resolve(
            &NodeFlags::default(),
            env(&[("PET_NNODES", "2"), ("PET_NODE_RANK", "2"), ("PET_MASTER_ADDR", "m")]),
        )
        .unwrap_err();
        assert_eq!(e.setting, "node_rank");
        assert!(e.to_string().contains("below the node count 2"), "{e}");
        let bad = NodeFlags { nproc_per_node: Some("0".into()), ..Default::default() };
        assert_eq!(NodeTopology::resolve(&bad, env(&[])).unwrap_err().setting, "nproc_per_node");
        let single = NodeTopology::resolve(&NodeFlags::default(), env(&[])).unwrap();
        assert_eq!((single.nnodes, single.master_port, single.source), (1, None, "single node"));
        assert!(single.check_world_size(2, Some("2".into())).is_ok());
        let e = single.check_world_size(2, Some("8".into())).unwrap_err();
        assert!(e.reason.contains("1 node(s) × 2 worker(s) per node = 2"), "{e}");
    }

    #[test]
    fn workers_per_node_follow_the_devices() {
        assert_eq!(Nproc::Auto.devices(0).unwrap(), vec![Device::Cpu]);
        assert_eq!(Nproc::Auto.devices(2).unwrap(), vec![Device::Cuda(0), Device::Cuda(1)]);
        assert_eq!(Nproc::Count(2).devices(0).unwrap(), vec![Device::Cpu, Device::Cpu]);
        assert_eq!(Nproc::Cpu.devices(8).unwrap(), vec![Device::Cpu]);
        let e = Nproc::Gpu.devices(0).unwrap_err();
        assert!(e.reason.contains("no CUDA device"), "{e}");
        assert!(Nproc::Count(9).devices(8).is_err());
    }
}
