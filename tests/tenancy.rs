//! Who may touch what: request URIs confined to the caller's tenant (`..`, symlinks, foreign
//! buckets and other tenants' folders refused), jobs of another tenant invisible, callers
//! identified by JWTs from a JWKS served over HTTP, and nothing secret or patient-identifying
//! in the logs or the audit trail of a run.

mod common;
mod trainer_harness;

use brats_cli::ClientSecurity;
use brats_proto::v1 as pb;
use brats_proto::v1::preprocessor_client::PreprocessorClient;
use brats_proto::v1::trainer_client::TrainerClient;
use brats_service::security::auth::JwtConfig;
use brats_service::security::tenants::TenantConfig;
use common::pki::write_with_mode;
use common::secured::*;
use common::*;
use std::path::Path;
use tonic::Code;
use trainer_harness::{Trainer, dataset, real_worker, spec, start_req};

fn tenants(pairs: &[(&str, &Path)]) -> std::collections::BTreeMap<String, TenantConfig> {
    pairs.iter().map(|(t, p)| (t.to_string(), TenantConfig { allowed_prefixes: vec![file_uri(p)] })).collect()
}

async fn case_code(url: &str, who: &ClientSecurity, images: &[String], output: &str) -> Code {
    let channel = who.connect(url).await.unwrap();
    let req = pb::PreprocessCaseRequest {
        case_id: "c1".into(),
        image_uris: images.to_vec(),
        output_uri: output.to_string(),
        ..Default::default()
    };
    match PreprocessorClient::new(channel).preprocess_case(req).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Every location a caller names must lie under its tenant's prefixes, after `..` and
/// symlinks are resolved; refusals are PERMISSION_DENIED and audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_uris_must_lie_inside_the_callers_tenant() {
    let s = setup();
    let (mine, theirs) = (s.dir.path().join("default"), s.dir.path().join("onco"));
    let (images, _) = synth_case(&mine.join("in"), "c1", [32, 32, 32], 5);
    std::fs::create_dir_all(&theirs).unwrap();
    std::os::unix::fs::symlink(&theirs, mine.join("link")).unwrap();
    let mut cfg = s.config();
    cfg.server.tenants = tenants(&[("default", &mine), ("onco", &theirs)]);
    let svc = Service::start(cfg).await;
    let url = svc.url();
    let me = s.with_key("preprocess");
    let uris: Vec<String> = images.iter().map(|p| file_uri(p)).collect();

    assert_eq!(case_code(&url, &me, &uris, &file_uri(&mine.join("out"))).await, Code::Ok, "inside the tenant");
    let refused = |images: Vec<String>, output: String| {
        let (url, me) = (url.clone(), me.clone());
        async move { case_code(&url, &me, &images, &output).await }
    };
    let out = file_uri(&mine.join("out"));
    let etc = vec!["file:///etc/passwd".to_string(); 4];
    assert_eq!(refused(etc, out.clone()).await, Code::PermissionDenied, "file:///etc/passwd");
    let dotdot: Vec<String> =
        uris.iter().map(|u| u.replace("/default/in/", "/default/../onco/../default/../../")).collect();
    assert_eq!(refused(dotdot, out.clone()).await, Code::PermissionDenied, "..");
    let via_link = vec![file_uri(&mine.join("link/x.nii.gz")); 4];
    assert_eq!(refused(via_link, out.clone()).await, Code::PermissionDenied, "a symlink escape");
    let bucket = vec!["s3://someone-elses-bucket/x.nii.gz".to_string(); 4];
    assert_eq!(refused(bucket, out.clone()).await, Code::PermissionDenied, "a foreign bucket");
    assert_eq!(refused(uris.clone(), file_uri(&theirs.join("out"))).await, Code::PermissionDenied, "their output");

    // A datalist of the other tenant's that names this tenant's files is refused as a whole.
    let onco = s.with_key("onco-train");
    let list = serde_json::json!({"training": [{"image": uris, "label": uris[0]}]});
    std::fs::write(theirs.join("datalist.json"), list.to_string()).unwrap();
    let req = pb::PreprocessDatasetRequest {
        datalist_uri: file_uri(&theirs.join("datalist.json")),
        output_uri: file_uri(&theirs.join("out")),
        ..Default::default()
    };
    let channel = onco.connect(&url).await.unwrap();
    let Err(e) = PreprocessorClient::new(channel).preprocess_dataset(req).await else {
        panic!("a datalist naming another tenant's files was accepted")
    };
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("datalist_uri"), "{}", e.message());
    svc.stop().await.unwrap();

    let records = audit_records(&s.audit);
    let denied = records.iter().filter(|r| r["grpc_code"] == "PERMISSION_DENIED").count();
    assert!(denied >= 6, "each refusal is audited: {denied} records");
    let text = std::fs::read_to_string(&s.audit).unwrap();
    assert!(!text.contains("/etc/passwd") && !text.contains(&*mine.to_string_lossy()), "a path in the audit log");
}

/// A tiny HTTP server on loopback serving a JWKS document, as an OIDC provider does.
async fn serve_jwks(body: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else { return };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/jwks")
}

/// Callers identified by JWTs: a token from the configured issuer and audience, signed by a
/// key of the JWKS, reaches the service with its roles; expired, foreign-audience, unsigned
/// and role-less tokens do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_callers_are_checked_against_the_providers_jwks() {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
    let s = setup();
    let key = rcgen::KeyPair::generate().unwrap();
    let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&signing, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let jwks_uri = serve_jwks(serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap()).await;
    let mut cfg = s.config();
    cfg.server.auth.jwt = Some(JwtConfig {
        jwks_uri,
        issuers: vec!["https://idp.hospital.test/realms/brats".into()],
        audiences: vec!["brats".into()],
        ..JwtConfig::default()
    });
    let svc = Service::start(cfg).await;
    let url = svc.url();
    let now = get_current_timestamp();
    let sign = |claims: serde_json::Value| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        encode(&header, &claims, &signing).unwrap()
    };
    let claims = |roles: &[&str], aud: &str, exp: u64| {
        serde_json::json!({"sub": "dr-who", "iss": "https://idp.hospital.test/realms/brats", "aud": aud,
                           "exp": exp, "iat": now, "roles": roles})
    };
    let with_token = |name: &str, token: String| {
        let path = s.dir.path().join(format!("{name}.jwt"));
        write_with_mode(&path, &token, 0o600);
        ClientSecurity { token_file: Some(path), ..s.client() }
    };
    let good = with_token("good", sign(claims(&["preprocess"], "brats", now + 300)));
    assert_eq!(preprocess_case(&url, &good).await, Code::InvalidArgument, "a valid token reaches the service");
    let segment = with_token("segment", sign(claims(&["segment"], "brats", now + 300)));
    assert_eq!(preprocess_case(&url, &segment).await, Code::PermissionDenied);
    let expired = with_token("expired", sign(claims(&["preprocess"], "brats", now - 600)));
    assert_eq!(preprocess_case(&url, &expired).await, Code::Unauthenticated, "expired");
    let foreign = with_token("aud", sign(claims(&["preprocess"], "another-api", now + 300)));
    assert_eq!(preprocess_case(&url, &foreign).await, Code::Unauthenticated, "wrong audience");
    let b64 = |v: serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let unsigned = format!(
        "{}.{}.",
        b64(serde_json::json!({"alg": "none", "kid": "k1"})),
        b64(claims(&["admin"], "brats", now + 300))
    );
    assert_eq!(preprocess_case(&url, &with_token("none", unsigned)).await, Code::Unauthenticated, "alg none");
    svc.stop().await.unwrap();
    let records = audit_records(&s.audit);
    assert!(records.iter().any(|r| r["principal"]["method"] == "jwt" && r["principal"]["subject"] == "dr-who"));
}

/// Jobs belong to the tenant that started them: another tenant's callers get NOT_FOUND for
/// them and do not see them listed, and cannot start a job on the first tenant's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_another_tenant_are_not_found() {
    let s = std::sync::Arc::new(setup());
    let data = s.dir.path().join("data");
    let datalist = dataset(&data, 2, 1);
    let (store, onco) = (s.dir.path().join("store"), s.dir.path().join("onco"));
    std::fs::create_dir_all(&onco).unwrap();
    let extra = format!(
        "[server.tenants.default]\nallowed_prefixes = [\"{}\"]\n[server.tenants.onco]\nallowed_prefixes = [\"{}\"]\n",
        file_uri(&data),
        file_uri(&onco),
    );
    let (store_root, registry) = (file_uri(&store), file_uri(&store.join("models")));
    let t =
        Trainer::start_with(s.clone(), s.dir.path(), &store_root, &registry, real_worker().as_deref(), &extra).await;
    let client = |name: &str| {
        let who = s.with_key(name);
        let url = t.url.clone();
        async move { TrainerClient::new(who.connect(&url).await.unwrap()) }
    };
    let (mut mine, mut theirs, mut viewer) =
        (client("train").await, client("onco-train").await, client("viewer").await);

    let job = mine.start_job(start_req(spec(&datalist, 1))).await.unwrap().into_inner();
    let get = |id: &str| pb::GetJobRequest { job_id: id.into() };
    assert_eq!(theirs.get_job(get(&job.id)).await.unwrap_err().code(), Code::NotFound);
    let cancel = pb::CancelJobRequest { job_id: job.id.clone(), ..Default::default() };
    assert_eq!(theirs.cancel_job(cancel).await.unwrap_err().code(), Code::NotFound);
    let watch = pb::WatchJobRequest { job_id: job.id.clone(), ..Default::default() };
    assert_eq!(theirs.watch_job(watch).await.unwrap_err().code(), Code::NotFound);
    let listed = |r: pb::ListJobsResponse| r.jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    assert_eq!(
        listed(theirs.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner()),
        Vec::<String>::new()
    );
    assert_eq!(
        listed(mine.list_jobs(pb::ListJobsRequest::default()).await.unwrap().into_inner()),
        std::slice::from_ref(&job.id)
    );
    assert_eq!(viewer.get_job(get(&job.id)).await.unwrap().into_inner().id, job.id, "a viewer of the same tenant");
    let e = viewer.start_job(start_req(spec(&datalist, 1))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "a viewer cannot start jobs");
    let e = theirs.start_job(start_req(spec(&datalist, 1))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "another tenant's datalist: {e:?}");
    // Their own datalist, naming our cases' files, is refused too.
    let ours = std::fs::read_to_string(data.join("datalist.json")).unwrap();
    let absolute = ours.replace("\"synth-", &format!("\"{}/synth-", data.display()));
    std::fs::write(onco.join("datalist.json"), absolute).unwrap();
    let e = theirs.start_job(start_req(spec(&file_uri(&onco.join("datalist.json")), 1))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "a datalist naming another tenant's files: {e:?}");
    let anonymous =
        TrainerClient::new(s.client().connect(&t.url).await.unwrap()).list_jobs(pb::ListJobsRequest::default()).await;
    assert_eq!(anonymous.unwrap_err().code(), Code::Unauthenticated);
    t.stop();

    let records = audit_records(&s.audit_log(ServiceKind::Trainer));
    let started = records.iter().find(|r| r["action"] == "job_started").expect("the job's start is audited");
    assert_eq!(
        (started["resource"]["type"].as_str(), started["resource"]["id"].as_str()),
        (Some("job"), Some(job.id.as_str()))
    );
    assert_eq!(started["principal"]["tenant"], "default");
}
