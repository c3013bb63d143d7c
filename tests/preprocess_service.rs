//! The preprocessing service end to end: real gRPC on loopback (TLS, an admin's API key, as
//! the harness secures every service), real NIfTI files, a local directory store and a real
//! S3-compatible server (moto), and every kind of bad input.

mod common;

use brats_cli::AuthChannel;
use brats_core::nifti_io::{ReadLimits, write_nifti};
use brats_core::store::{StoreUri, Stores};
use brats_core::tensors::CaseTensors;
use brats_preprocess::pipeline::{self, InputFile, Options};
use brats_preprocessor::config::ServiceConfig;
use brats_proto::v1 as pb;
use common::*;
use std::path::Path;
use tonic::Code;

const SHAPE: [usize; 3] = [48, 40, 32];

fn config(root: &str) -> ServiceConfig {
    ServiceConfig { output_root: root.to_string(), ..ServiceConfig::default() }
}

fn request(images: &[std::path::PathBuf], label: &Path, id: &str) -> pb::PreprocessCaseRequest {
    pb::PreprocessCaseRequest {
        case_id: id.into(),
        image_uris: images.iter().map(|p| file_uri(p)).collect(),
        label_uri: file_uri(label),
        ..Default::default()
    }
}

/// What the offline pipeline computes for the same files, to compare the service against.
fn direct(images: &[std::path::PathBuf], label: &Path) -> CaseTensors {
    let read = |p: &Path| InputFile { name: p.display().to_string(), bytes: std::fs::read(p).unwrap().into() };
    let imgs: Vec<_> = images.iter().map(|p| read(p)).collect();
    pipeline::preprocess(&imgs, Some(&read(label)), &Options::default(), &ReadLimits::default()).unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_through_local_store_is_exact_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (images, label) = synth_case(&dir.path().join("in"), "c1", SHAPE, 11);
    let store = dir.path().join("store");
    let svc = Service::start(config(&file_uri(&store))).await;
    let mut client = svc.client().await;

    let resp = client.preprocess_case(request(&images, &label, "c1")).await.unwrap().into_inner();
    assert!(!resp.reused);
    let m = resp.metadata.clone().unwrap();
    assert_eq!(m.shape, vec![48, 40, 32]);
    assert_eq!(m.channels.len(), 4);
    assert!(m.has_label);
    assert!(resp.tensors_uri.starts_with(&file_uri(&store.join("cases/c1/prep"))), "{}", resp.tensors_uri);
    let stages: Vec<_> = resp.timings.iter().map(|t| t.stage.as_str()).collect();
    for s in ["fetch", "decompress", "convert", "normalise", "encode", "write"] {
        assert!(stages.contains(&s), "missing stage {s} in {stages:?}");
    }

    let stores = Stores::new(Default::default());
    let bytes = stores.get(&StoreUri::parse(&resp.tensors_uri).unwrap()).await.unwrap();
    let got = CaseTensors::from_bytes(&bytes, "case").unwrap();
    let want = direct(&images, &label);
    assert_eq!(got.image, want.image, "service and offline pipeline differ");
    assert_eq!(got.label, want.label);
    let side: serde_json::Value =
        serde_json::from_slice(&stores.get(&StoreUri::parse(&resp.metadata_uri).unwrap()).await.unwrap()).unwrap();
    assert_eq!(side["metadata"]["case_id"], "c1");

    let again = client.preprocess_case(request(&images, &label, "c1")).await.unwrap().into_inner();
    assert!(again.reused, "second identical request must reuse the stored result");
    assert_eq!(again.tensors_uri, resp.tensors_uri);
    let mut forced = request(&images, &label, "c1");
    forced.force = true;
    assert!(!client.preprocess_case(forced).await.unwrap().into_inner().reused);

    // A changed input is a different case version, never a stale reuse.
    std::fs::copy(&images[1], &images[0]).unwrap();
    let changed = client.preprocess_case(request(&images, &label, "c1")).await.unwrap().into_inner();
    assert!(!changed.reused);
    assert_ne!(changed.tensors_uri, resp.tensors_uri);
    svc.stop().await.unwrap();
}

/// `seed` is optional: 0 is honoured as a seed, and an unset seed is the case's own
/// (`pipeline::case_seed`, as PreprocessDataset seeds it), not silently 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unset_seed_is_the_case_seed_and_zero_is_a_seed() {
    let dir = tempfile::tempdir().unwrap();
    let (images, label) = synth_case(&dir.path().join("in"), "sd", SHAPE, 13);
    let svc = Service::start(config(&file_uri(&dir.path().join("store")))).await;
    let mut client = svc.client().await;
    let random_crop =
        pb::CropSpec { mode: pb::CropMode::Random as i32, size: vec![16, 16, 16], foreground_multiple: 0 };
    let stores = Stores::new(Default::default());
    let mut image_for = async |seed: Option<u64>| {
        let req = pb::PreprocessCaseRequest { crop: Some(random_crop.clone()), seed, ..request(&images, &label, "sd") };
        let resp = client.preprocess_case(req).await.unwrap().into_inner();
        CaseTensors::from_bytes(&stores.get(&StoreUri::parse(&resp.tensors_uri).unwrap()).await.unwrap(), "t")
            .unwrap()
            .image
    };
    let unset = image_for(None).await;
    let zero = image_for(Some(0)).await;
    assert_eq!(unset, image_for(Some(pipeline::case_seed("sd"))).await, "unset seed is the case seed");
    assert_ne!(unset, zero, "seed 0 is a seed of its own, not 'unset'");

    let read = |p: &Path| InputFile { name: p.display().to_string(), bytes: std::fs::read(p).unwrap().into() };
    let imgs: Vec<_> = images.iter().map(|p| read(p)).collect();
    let options = Options { crop: pipeline::CropMode::Random, crop_size: [16, 16, 16], seed: 0, ..Options::default() };
    let offline = pipeline::preprocess(&imgs, Some(&read(&label)), &options, &ReadLimits::default()).unwrap().0;
    assert_eq!(zero, offline.image, "seed 0 draws as the offline pipeline with seed 0");
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_through_s3_store() {
    let moto = Moto::start("brats").await;
    let dir = tempfile::tempdir().unwrap();
    let (images, label) = synth_case(dir.path(), "s1", SHAPE, 12);
    let stores = Stores::new(moto.store_config());
    let mut uris = Vec::new();
    for p in images.iter().chain([&label]) {
        let uri = StoreUri::parse(&format!("s3://brats/raw/{}", p.file_name().unwrap().to_string_lossy())).unwrap();
        stores.put(&uri, std::fs::read(p).unwrap().into()).await.unwrap();
        uris.push(uri.to_string());
    }
    let mut cfg = config("s3://brats/out");
    cfg.store = moto.store_config();
    let svc = Service::start(cfg).await;
    let mut client = svc.client().await;
    let req = pb::PreprocessCaseRequest {
        case_id: "s1".into(),
        image_uris: uris[..4].to_vec(),
        label_uri: uris[4].clone(),
        ..Default::default()
    };
    let resp = client.preprocess_case(req.clone()).await.unwrap().into_inner();
    assert!(resp.tensors_uri.starts_with("s3://brats/out/cases/s1/prep/"), "{}", resp.tensors_uri);
    let got = CaseTensors::from_bytes(&stores.get(&StoreUri::parse(&resp.tensors_uri).unwrap()).await.unwrap(), "s3")
        .unwrap();
    let want = direct(&images, &label);
    assert_eq!(got.image, want.image);
    assert_eq!(got.label, want.label);
    assert!(client.preprocess_case(req).await.unwrap().into_inner().reused);

    // A missing object in S3 is NOT_FOUND, naming its field (never the URI).
    let missing = pb::PreprocessCaseRequest {
        case_id: "s2".into(),
        image_uris: vec![uris[0].clone(), uris[1].clone(), uris[2].clone(), "s3://brats/raw/nope.nii.gz".into()],
        ..Default::default()
    };
    let e = client.preprocess_case(missing).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("image_uris[3]") && !e.message().contains("nope"), "{}", e.message());
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dataset_streams_progress_reports_failures_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut entries = Vec::new();
    for (i, seed) in [21u64, 22].iter().enumerate() {
        let (images, label) = synth_case(&data, &format!("ds{i}"), [32, 32, 24], *seed);
        let rel = |p: &Path| p.file_name().unwrap().to_string_lossy().to_string();
        entries.push(
            serde_json::json!({"image": images.iter().map(|p| rel(p)).collect::<Vec<_>>(), "label": rel(&label)}),
        );
    }
    // A broken case: one modality does not exist.
    let broken = serde_json::json!({"image": ["ds9-t1c.nii.gz", "ds0-t1n.nii.gz", "ds0-t2w.nii.gz", "ds0-t2f.nii.gz"]});
    let datalist = data.join("datalist.json");
    std::fs::write(
        &datalist,
        serde_json::to_vec(&serde_json::json!({"training": [entries[0], broken], "validation": [entries[1]]})).unwrap(),
    )
    .unwrap();
    let store = dir.path().join("store");
    let svc = Service::start(config(&file_uri(&store))).await;
    let client = svc.client().await;
    let run = |force: bool| {
        let mut client = client.clone();
        let req = pb::PreprocessDatasetRequest {
            datalist_uri: file_uri(&datalist),
            crop: Some(pb::CropSpec {
                mode: pb::CropMode::Random as i32,
                size: vec![16, 16, 16],
                foreground_multiple: 0,
            }),
            force,
            ..Default::default()
        };
        async move {
            let mut s = client.preprocess_dataset(req).await.unwrap().into_inner();
            let mut msgs = Vec::new();
            while let Some(m) = s.message().await.unwrap() {
                msgs.push(m);
            }
            msgs
        }
    };
    let msgs = run(false).await;
    let last = msgs.last().unwrap();
    assert!(last.done && last.case.is_none());
    assert_eq!((last.total, last.completed, last.failed, last.reused), (3, 3, 1, 0));
    let failed: Vec<_> = msgs.iter().filter_map(|m| m.case.as_ref()).filter(|c| !c.error.is_empty()).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].error_code, "NOT_FOUND");
    assert!(failed[0].error.contains("ds9-t1c.nii.gz"), "{}", failed[0].error);
    let manifest = StoreUri::parse(&last.manifest_uri).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&Stores::new(Default::default()).get(&manifest).await.unwrap()).unwrap();
    assert_eq!(manifest["cases"]["training"].as_array().unwrap().len(), 1);
    assert_eq!(manifest["cases"]["validation"].as_array().unwrap().len(), 1);
    // Random crops of 16³ were taken.
    let ok = msgs.iter().filter_map(|m| m.case.as_ref()).find(|c| c.error.is_empty()).unwrap();
    let t = CaseTensors::from_bytes(
        &std::fs::read(
            StoreUri::parse(&ok.tensors_uri)
                .map(|u| match u {
                    StoreUri::File(p) => p,
                    _ => unreachable!(),
                })
                .unwrap(),
        )
        .unwrap(),
        "t",
    )
    .unwrap();
    assert_eq!(t.metadata.shape, [16, 16, 16]);

    // A re-run reuses every finished case: it costs nothing and resumes a crashed run.
    let again = run(false).await;
    let last = again.last().unwrap();
    assert_eq!((last.completed, last.reused, last.failed), (3, 2, 1));
    drop(client);
    svc.stop().await.unwrap();
}

/// Writes a NIfTI file with the given header edits applied to a valid one.
fn edited(dir: &Path, name: &str, src: &Path, edit: impl Fn(&mut Vec<u8>)) -> std::path::PathBuf {
    let raw = brats_core::nifti_io::decompress(&std::fs::read(src).unwrap(), "x", 1 << 30).unwrap().into_owned();
    let mut raw = raw;
    edit(&mut raw);
    let p = dir.join(name);
    std::fs::write(&p, &raw).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_clear_statuses_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let (images, label) = synth_case(&input, "b", SHAPE, 31);
    let (other, _) = synth_case(&input, "o", [48, 40, 30], 32);
    let store = dir.path().join("store");
    let svc = Service::start(config(&file_uri(&store))).await;
    let mut client = svc.client().await;
    let t1c = images[0].clone();
    let affine = [[1.0, 0.0, 0.0, 5.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]];
    let shifted = input.join("shifted.nii");
    std::fs::write(&shifted, write_nifti(&vec![1.0f32; 48 * 40 * 32], SHAPE, &affine, None, None).unwrap()).unwrap();
    let gz = std::fs::read(&t1c).unwrap();
    let truncated_gz = input.join("truncated.nii.gz");
    std::fs::write(&truncated_gz, &gz[..gz.len() / 2]).unwrap();
    let truncated_body = edited(&input, "short.nii", &t1c, |r| r.truncate(r.len() - 1000));
    let nan = edited(&input, "nan.nii", &t1c, |r| {
        let mid = 352 + (r.len() - 352) / 2 / 4 * 4;
        r[mid..mid + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let absurd = edited(&input, "absurd.nii", &t1c, |r| r[42..44].copy_from_slice(&4000i16.to_le_bytes()));
    let complex = edited(&input, "complex.nii", &t1c, |r| r[70..72].copy_from_slice(&32i16.to_le_bytes()));
    let flat = edited(&input, "flat.nii", &t1c, |r| r[40..42].copy_from_slice(&2i16.to_le_bytes()));
    let bad_label = input.join("badlabel.nii.gz");
    let mut lab = vec![0u8; 48 * 40 * 32];
    lab[100] = 3;
    std::fs::write(
        &bad_label,
        write_nifti(
            &lab,
            SHAPE,
            &[[1.0, 0.0, 0.0, -24.0], [0.0, 1.0, 0.0, -20.0], [0.0, 0.0, 1.0, -16.0], [0.0, 0.0, 0.0, 1.0]],
            None,
            Some(1),
        )
        .unwrap(),
    )
    .unwrap();

    let with = |i: usize, p: &Path| {
        let mut v = images.to_vec();
        v[i] = p.to_path_buf();
        v
    };
    let cases: Vec<(&str, pb::PreprocessCaseRequest, Code, &str)> = vec![
        ("mismatched shape", request(&with(2, &other[2]), &label, "e1"), Code::InvalidArgument, "image_uris[2]"),
        ("mismatched affine", request(&with(1, &shifted), &label, "e2"), Code::InvalidArgument, "affine"),
        ("three modalities", request(&images[..3], &label, "e3"), Code::InvalidArgument, "image_uris"),
        ("2D data", request(&with(0, &flat), &label, "e4"), Code::InvalidArgument, "3D"),
        ("truncated gzip", request(&with(3, &truncated_gz), &label, "e5"), Code::InvalidArgument, "image_uris[3]"),
        (
            "truncated body",
            request(&with(0, &truncated_body), &label, "e6"),
            Code::InvalidArgument,
            "truncated NIfTI body",
        ),
        ("NaN voxels", request(&with(0, &nan), &label, "e7"), Code::InvalidArgument, "NaN"),
        ("absurd dimensions", request(&with(0, &absurd), &label, "e8"), Code::InvalidArgument, "image_uris[0]"),
        ("unsupported dtype", request(&with(0, &complex), &label, "e9"), Code::InvalidArgument, "complex64"),
        ("label out of convention", request(&images, &bad_label, "e10"), Code::InvalidArgument, "brats2018"),
        (
            "missing object",
            request(&with(0, &input.join("nope.nii.gz")), &label, "e11"),
            Code::NotFound,
            "image_uris[0]",
        ),
        ("bad case id", request(&images, &label, "../x"), Code::InvalidArgument, "case_id"),
    ];
    for (what, req, code, needle) in cases {
        let e = client.preprocess_case(req).await.expect_err(what);
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(e.message().contains(needle), "{what}: message '{}' should name '{needle}'", e.message());
    }
    let bad_crop = pb::PreprocessCaseRequest {
        crop: Some(pb::CropSpec { mode: pb::CropMode::Center as i32, size: vec![0, 5], foreground_multiple: 0 }),
        ..request(&images, &label, "e12")
    };
    let e = client.preprocess_case(bad_crop).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("crop.size"), "{}", e.message());
    assert!(list_files(&store).is_empty(), "failed requests left objects: {:?}", list_files(&store));

    // The service keeps serving after all of that.
    let ok = client.preprocess_case(request(&images, &label, "fine")).await.unwrap().into_inner();
    assert!(ok.metadata.unwrap().has_label);
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_store_is_unavailable_and_service_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (images, label) = synth_case(dir.path(), "u", [32, 32, 24], 41);
    let mut cfg = config(&file_uri(&dir.path().join("store")));
    // Nothing listens on this port.
    cfg.store.s3_endpoint = Some(format!("http://127.0.0.1:{}", free_port()));
    cfg.store.s3_access_key_id = Some("k".into());
    cfg.store.s3_secret_access_key = Some("s".into());
    let svc = Service::start(cfg).await;
    let mut client = svc.client().await;
    let req = pb::PreprocessCaseRequest {
        case_id: "u".into(),
        image_uris: (0..4).map(|i| format!("s3://gone/u{i}.nii.gz")).collect(),
        ..Default::default()
    };
    let e = client.preprocess_case(req).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("image_uris[") && !e.message().contains("s3://gone/"), "{}", e.message());
    // Local output, unreachable S3 output prefix: the case fails UNAVAILABLE, nothing local written.
    let mut to_s3 = request(&images, &label, "u2");
    to_s3.output_uri = "s3://gone/out".into();
    let e = client.preprocess_case(to_s3).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(client.preprocess_case(request(&images, &label, "u3")).await.is_ok());
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_metrics_backpressure_and_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (images, label) = synth_case(dir.path(), "h", [96, 96, 64], 51);
    let mut cfg = config(&file_uri(&dir.path().join("store")));
    cfg.max_parallel = 1;
    cfg.max_queue = 0;
    let svc = Service::start(cfg).await;

    let channel = svc.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "brats.v1.Preprocessor".into() })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving);

    // Reflection in both protocol versions lists exactly what this server serves, and resolves
    // the service's symbols (older grpcurl, Postman and several SDKs speak only v1alpha).
    let served = [
        "brats.v1.Preprocessor",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let (v1, v1alpha) = reflection_services(channel.clone()).await;
    assert_eq!(v1, served, "grpc.reflection.v1 ListServices");
    assert_eq!(v1alpha, served, "grpc.reflection.v1alpha ListServices");
    assert!(reflection_v1alpha_resolves(channel.clone(), "brats.v1.Preprocessor").await);

    // One slot, no queue: while a case runs, a second request is refused, not queued unbounded.
    let client = svc.client().await;
    let first = {
        let mut c = client.clone();
        let r = request(&[images[0].clone(), images[1].clone(), images[2].clone(), images[3].clone()], &label, "h1");
        tokio::spawn(async move { c.preprocess_case(r).await })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, body) = http("GET", svc.metrics_port, "/metrics").await.unwrap();
        if body.lines().any(|l| l == "brats_preprocess_cases_in_flight 1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "first request never started");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let mut second = request(&images, &label, "h2");
    second.force = true;
    let refused = client.clone().preprocess_case(second).await;
    // The first may have finished in the meantime on a fast machine; then the second simply ran.
    if let Err(e) = refused {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    }
    first.await.unwrap().unwrap();

    let (code, body) = http("GET", svc.metrics_port, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("brats_preprocess_requests_total{code=\"Ok\",method=\"PreprocessCase\"}"), "{body}");
    assert!(body.contains("brats_preprocess_stage_seconds_bucket"), "{body}");

    // Graceful shutdown: the server returns cleanly and stops answering.
    let (url, admin) = (svc.url(), svc.admin());
    svc.stop().await.unwrap();
    assert!(admin.connect(&url).await.is_err());
}

/// The sorted service names a server lists through `grpc.reflection.v1` and `v1alpha`.
async fn reflection_services(channel: AuthChannel) -> (Vec<String>, Vec<String>) {
    use tonic_reflection::pb::{v1, v1alpha};
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let mut resp = client.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("unexpected v1 reflection answer")
    };
    let mut v1_names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    v1_names.sort();

    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let mut resp = client.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("unexpected v1alpha reflection answer")
    };
    let mut v1alpha_names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    v1alpha_names.sort();
    (v1_names, v1alpha_names)
}

/// Whether `grpc.reflection.v1alpha` answers `FileContainingSymbol(symbol)` with descriptors.
async fn reflection_v1alpha_resolves(channel: AuthChannel, symbol: &str) -> bool {
    use tonic_reflection::pb::v1alpha;
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            symbol.to_string(),
        )),
    };
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let mut resp = client.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
    matches!(
        resp.message().await.unwrap().unwrap().message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(f))
            if !f.file_descriptor_proto.is_empty()
    )
}
