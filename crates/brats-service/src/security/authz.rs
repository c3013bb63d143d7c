//! Which roles may call which RPC: one default-deny table for the four services. A method
//! not in the table is refused for everyone but `admin`; a test enumerates the proto's
//! methods and fails on any without an entry, so a new RPC cannot ship unguarded.
//!
//! | Role      | May call |
//! |-----------|----------|
//! | `segment` | `Inference/{Segment, SegmentStream, ListModels, GetModel}` |
//! | `train`   | `Trainer/*`, `Preprocessor/PreprocessDataset`, `Inference/{ListModels, GetModel}` |
//! | `viewer`  | `Trainer/{GetJob, ListJobs, WatchJob}`, `Inference/{ListModels, GetModel}` |
//! | `preprocess` | `Preprocessor/*` |
//! | `service` | `Preprocessor/*` (the inference and trainer services, over mutual TLS) |
//! | `pacs`    | `Gateway/*` (a PACS integrator's tools and scripts) |
//! | `viewer`  | also `Gateway/{GetJob, ListJobs, WatchJob}` |
//! | `admin`   | everything |
//!
//! Health (`grpc.health.v1`) needs no credentials at all (probes); reflection needs any
//! authenticated role.

use super::Principal;

/// The role that may call every RPC.
pub const ADMIN: &str = "admin";

/// What the table says about one request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// No credentials needed (health checks).
    Public,
    /// Any authenticated caller (reflection).
    Authenticated,
    /// Callers holding one of these roles (or `admin`).
    Roles(&'static [&'static str]),
    /// Not in the table: `admin` only.
    Unlisted,
}

const SEGMENT: &[&str] = &["segment"];
const MODELS: &[&str] = &["segment", "train", "viewer"];
const TRAIN: &[&str] = &["train"];
const JOBS_READ: &[&str] = &["train", "viewer"];
const PREPROCESS_CASE: &[&str] = &["preprocess", "service"];
const PREPROCESS_DATASET: &[&str] = &["preprocess", "service", "train"];
const PACS: &[&str] = &["pacs"];
const STUDY_JOBS_READ: &[&str] = &["pacs", "viewer"];

/// Every RPC of `proto/brats/v1`, with the roles that may call it.
pub const RPC_ROLES: &[(&str, &[&str])] = &[
    ("/brats.v1.Inference/Segment", SEGMENT),
    ("/brats.v1.Inference/SegmentStream", SEGMENT),
    ("/brats.v1.Inference/ListModels", MODELS),
    ("/brats.v1.Inference/GetModel", MODELS),
    ("/brats.v1.Preprocessor/PreprocessCase", PREPROCESS_CASE),
    ("/brats.v1.Preprocessor/PreprocessDataset", PREPROCESS_DATASET),
    ("/brats.v1.Trainer/StartJob", TRAIN),
    ("/brats.v1.Trainer/CancelJob", TRAIN),
    ("/brats.v1.Trainer/ResumeJob", TRAIN),
    ("/brats.v1.Trainer/GetJob", JOBS_READ),
    ("/brats.v1.Trainer/ListJobs", JOBS_READ),
    ("/brats.v1.Trainer/WatchJob", JOBS_READ),
    ("/brats.v1.Gateway/SubmitStudy", PACS),
    ("/brats.v1.Gateway/EchoDestination", PACS),
    ("/brats.v1.Gateway/GetJob", STUDY_JOBS_READ),
    ("/brats.v1.Gateway/ListJobs", STUDY_JOBS_READ),
    ("/brats.v1.Gateway/WatchJob", STUDY_JOBS_READ),
];

/// The rule for a request path (`/package.Service/Method`).
pub fn rule(path: &str) -> Rule {
    if path.starts_with("/grpc.health.v1.Health/") {
        return Rule::Public;
    }
    if path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
    {
        return Rule::Authenticated;
    }
    RPC_ROLES.iter().find(|(p, _)| *p == path).map_or(Rule::Unlisted, |(_, roles)| Rule::Roles(roles))
}

/// Why a caller may not call an RPC (PERMISSION_DENIED); names the roles that would do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path} needs one of the roles {needed}; the caller has {has}")]
pub struct Denied {
    /// The RPC path.
    pub path: String,
    /// The roles that would be allowed, comma-separated.
    pub needed: String,
    /// The caller's roles, comma-separated (or "none").
    pub has: String,
}

/// Decides whether `principal` may call `path`.
pub fn authorize(principal: &Principal, path: &str) -> Result<(), Denied> {
    if principal.has_role(ADMIN) {
        return Ok(());
    }
    let needed: &[&str] = match rule(path) {
        Rule::Public => return Ok(()),
        Rule::Authenticated if principal.method != super::AuthMethod::Anonymous || !principal.roles.is_empty() => {
            return Ok(());
        }
        Rule::Authenticated => &[],
        Rule::Roles(roles) if roles.iter().any(|r| principal.has_role(r)) => return Ok(()),
        Rule::Roles(roles) => roles,
        Rule::Unlisted => &[],
    };
    let mut needed: Vec<&str> = needed.to_vec();
    needed.push(ADMIN);
    let has: Vec<&str> = principal.roles.iter().map(String::as_str).collect();
    Err(Denied {
        path: path.to_string(),
        needed: needed.join(", "),
        has: if has.is_empty() { "none".into() } else { has.join(", ") },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn with_roles(roles: &[&str]) -> Principal {
        let mut p = Principal::anonymous("t", roles.iter().map(|r| r.to_string()));
        p.method = crate::security::AuthMethod::ApiKey;
        p
    }

    /// Every method of every service in the compiled proto has an entry, and every entry
    /// names a method that exists: the table and the contract cannot drift apart.
    #[test]
    fn every_rpc_of_the_proto_is_in_the_table() {
        let set = prost_types::FileDescriptorSet::decode(brats_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.push(format!("/{}.{}/{}", file.package(), service.name(), method.name()));
                }
            }
        }
        assert!(methods.len() >= 12, "{methods:?}");
        for m in &methods {
            assert!(matches!(rule(m), Rule::Roles(_)), "{m} has no entry in security::authz::RPC_ROLES");
        }
        for (path, _) in RPC_ROLES {
            assert!(methods.iter().any(|m| m == path), "{path} is in the table but not in the proto");
        }
    }

    #[test]
    fn roles_open_their_rpcs_only() {
        let segment = with_roles(&["segment"]);
        assert!(authorize(&segment, "/brats.v1.Inference/Segment").is_ok());
        let e = authorize(&segment, "/brats.v1.Trainer/StartJob").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/brats.v1.Trainer/StartJob needs one of the roles train, admin; the caller has segment"
        );
        let viewer = with_roles(&["viewer"]);
        assert!(authorize(&viewer, "/brats.v1.Trainer/ListJobs").is_ok());
        assert!(authorize(&viewer, "/brats.v1.Inference/Segment").is_err());
        assert!(authorize(&viewer, "/brats.v1.Trainer/CancelJob").is_err());
        let service = with_roles(&["service"]);
        assert!(authorize(&service, "/brats.v1.Preprocessor/PreprocessCase").is_ok());
        assert!(authorize(&service, "/brats.v1.Trainer/StartJob").is_err());
        assert!(authorize(&with_roles(&["admin"]), "/brats.v1.Trainer/StartJob").is_ok());
    }

    #[test]
    fn unknown_methods_are_denied_and_health_is_public() {
        let train = with_roles(&["train"]);
        assert!(authorize(&train, "/brats.v1.Trainer/DeleteEverything").is_err());
        assert!(authorize(&with_roles(&["admin"]), "/brats.v1.Trainer/DeleteEverything").is_ok());
        let nobody = Principal::anonymous("t", []);
        assert!(authorize(&nobody, "/grpc.health.v1.Health/Check").is_ok());
        assert!(authorize(&nobody, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").is_err());
        assert!(authorize(&train, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").is_ok());
    }
}
