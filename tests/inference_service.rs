//! The inference service end to end on loopback (secured by the harness: TLS, an admin's API
//! key, mutual TLS to the preprocessing service): models from a registry in a real directory
//! store, warm-up before SERVING, `Segment` by URI, `SegmentStream` with chunked, checksummed
//! transfers, hot reload when the alias moves, and every kind of bad input and fault.

mod common;

use brats_artifacts::registry::{DEFAULT_MODEL_NAME, Registry};
use brats_artifacts::window::Extent;
use brats_cli::AuthChannel;
use brats_model::SegResNetConfig;
use brats_model::onnx::{ExportOptions, to_onnx_bytes};
use brats_model::reference::det_state_dict;
use brats_proto::v1 as pb;
use brats_proto::v1::inference_client::InferenceClient;
use common::secured::bratsctl_flags;
use common::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Code;

const ROI: [usize; 3] = TEST_ROI;

fn segresnet_onnx() -> Vec<u8> {
    let config = SegResNetConfig::default();
    to_onnx_bytes(&config, &det_state_dict(&config), ExportOptions::default()).unwrap()
}

fn case(dir: &Path, id: &str, seed: u64) -> Vec<PathBuf> {
    let (images, _) = synth_case(dir, id, [40, 40, 32], seed);
    images.to_vec()
}

fn segment_request(images: &[PathBuf]) -> pb::SegmentRequest {
    pb::SegmentRequest { image_uris: images.iter().map(|p| file_uri(p)).collect(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_warmup_segment_and_hot_reload() {
    let svc = InferenceServer::start(|_| {}).await;
    // No alias yet: the service is up but not SERVING, and says why when called.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(svc.health().await, tonic_health::pb::health_check_response::ServingStatus::NotServing);
    let images = case(svc.dir.path(), "c1", 1);
    let e = svc.client().await.segment(segment_request(&images)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");

    let onnx = segresnet_onnx();
    svc.registry.register(DEFAULT_MODEL_NAME, "1", onnx.clone().into(), None, Some("production")).await.unwrap();
    svc.wait_serving().await;
    let mut client = svc.client().await;
    let resp = client.segment(segment_request(&images)).await.unwrap().into_inner();
    assert_eq!((resp.model_name.as_str(), resp.model_version.as_str()), (DEFAULT_MODEL_NAME, "1"));
    assert_eq!(resp.provider, pb::ExecutionProvider::Cpu as i32);
    assert!(!resp.fallback);
    assert_eq!(resp.shape, vec![40, 40, 32]);
    let t = resp.timings.unwrap();
    assert!(t.inference_seconds > 0.0 && t.decode_seconds > 0.0 && t.total_seconds >= t.inference_seconds);
    let label_path = match brats_core::StoreUri::parse(&resp.label_map_uri).unwrap() {
        brats_core::StoreUri::File(p) => p,
        _ => unreachable!(),
    };
    let bytes = std::fs::read(&label_path).unwrap();
    assert_eq!(hex(&bytes), resp.label_map_sha256);

    // The same pipeline in-process gives the same label map, header and affine included.
    let seg = in_process(&onnx, &images);
    let read = brats_core::nifti_io::read_nifti(&bytes, "seg", &Default::default()).unwrap();
    assert_eq!(read.data.iter().map(|&v| v as u8).collect::<Vec<_>>(), seg.label);
    assert_eq!(read.affine, seg.affine);
    let [tc, wt, et] = seg.volumes_ml;
    let v = resp.volumes.unwrap();
    assert_eq!((v.tc_ml, v.wt_ml, v.et_ml), (tc, wt, et));

    // The opt-in fast mode reaches the windows: the in-process fast mode's label map.
    let mut fast = segment_request(&images);
    fast.options = Some(pb::SegmentOptions { foreground_crop: true, ..Default::default() });
    let r = client.segment(fast).await.unwrap().into_inner();
    let brats_core::StoreUri::File(fast_path) = brats_core::StoreUri::parse(&r.label_map_uri).unwrap() else {
        unreachable!()
    };
    let fast_read = brats_core::nifti_io::read_nifti(&std::fs::read(fast_path).unwrap(), "seg", &Default::default());
    let fast_seg = in_process_with(&onnx, &images, Extent::FOREGROUND);
    assert_eq!(fast_read.unwrap().data.iter().map(|&v| v as u8).collect::<Vec<_>>(), fast_seg.label);

    // ListModels / GetModel.
    let models = client.list_models(pb::ListModelsRequest::default()).await.unwrap().into_inner().models;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].aliases.get("production").map(String::as_str), Some("1"));
    assert!(models[0].versions[0].loaded);
    let e = client.get_model(pb::GetModelRequest { name: "nope".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Move the alias: the service hot-reloads and answers with version 2, no restart.
    svc.registry.register(DEFAULT_MODEL_NAME, "2", onnx.into(), None, Some("production")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client.segment(segment_request(&images)).await.unwrap().into_inner();
        if r.model_version == "2" {
            break;
        }
        assert!(Instant::now() < deadline, "alias move never picked up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A request may still name version 1 explicitly.
    let mut pinned = segment_request(&images);
    pinned.model = Some(pb::ModelSelector { version: "1".into(), ..Default::default() });
    assert_eq!(client.segment(pinned).await.unwrap().into_inner().model_version, "1");
    svc.stop().await;
}

/// The same segmentation run in-process, to compare the service with.
fn in_process(onnx: &[u8], images: &[PathBuf]) -> brats_inference::segment::Segmentation {
    in_process_with(onnx, images, Extent::Full)
}

/// [`in_process`] with the windows covering `extent`.
fn in_process_with(onnx: &[u8], images: &[PathBuf], extent: Extent) -> brats_inference::segment::Segmentation {
    let model = brats_inference::runtime::SegmentationModel::load(
        &brats_inference::runtime::default_library(),
        onnx,
        &Default::default(),
    )
    .unwrap();
    let files: Vec<_> = images
        .iter()
        .map(|p| brats_preprocess::pipeline::InputFile {
            name: p.display().to_string(),
            bytes: std::fs::read(p).unwrap().into(),
        })
        .collect();
    let window = brats_artifacts::window::SlidingWindow { roi: ROI, extent, ..Default::default() };
    brats_inference::segment::segment(&model, &files, &window, false, &Default::default()).unwrap()
}

fn hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

async fn upload(
    client: &mut InferenceClient<AuthChannel>,
    images: &[PathBuf],
    corrupt_sha: bool,
    stop_after_chunks: Option<usize>,
) -> Result<Vec<pb::SegmentStreamResponse>, tonic::Status> {
    let files: Vec<Vec<u8>> = images.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut msgs = vec![pb::SegmentStreamRequest {
        msg: Some(pb::segment_stream_request::Msg::Header(pb::SegmentStreamHeader {
            files: files
                .iter()
                .enumerate()
                .map(|(i, f)| pb::StreamFile {
                    name: format!("m{i}.nii.gz"),
                    size_bytes: f.len() as u64,
                    content_type: String::new(),
                })
                .collect(),
            chunk_size: 64 << 10,
            ..Default::default()
        })),
    }];
    for (i, f) in files.iter().enumerate() {
        for (k, part) in f.chunks(100_000).enumerate() {
            msgs.push(pb::SegmentStreamRequest {
                msg: Some(pb::segment_stream_request::Msg::Chunk(pb::FileChunk {
                    file_index: i as u32,
                    offset: (k * 100_000) as u64,
                    data: part.to_vec(),
                    crc32c: Some(crc32c::crc32c(part)),
                })),
            });
        }
    }
    msgs.push(pb::SegmentStreamRequest {
        msg: Some(pb::segment_stream_request::Msg::Trailer(pb::StreamTrailer {
            checksums: files
                .iter()
                .enumerate()
                .map(|(i, f)| pb::FileChecksum {
                    file_index: i as u32,
                    sha256: if corrupt_sha && i == 2 { "00".repeat(32) } else { hex(f) },
                    crc32c: None,
                    size_bytes: f.len() as u64,
                })
                .collect(),
        })),
    });
    if let Some(n) = stop_after_chunks {
        msgs.truncate(n);
    }
    let mut out = client.segment_stream(tokio_stream::iter(msgs)).await?.into_inner();
    let mut got = Vec::new();
    while let Some(m) = out.message().await? {
        got.push(m);
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_stream_uploads_and_downloads_in_checked_chunks() {
    let svc = InferenceServer::start(|_| {}).await;
    svc.registry.register(DEFAULT_MODEL_NAME, "1", segresnet_onnx().into(), None, Some("production")).await.unwrap();
    svc.wait_serving().await;
    let images = case(svc.dir.path(), "s1", 2);
    let mut client = svc.client().await;
    let by_uri = client.segment(segment_request(&images)).await.unwrap().into_inner();

    let msgs = upload(&mut client, &images, false, None).await.unwrap();
    use pb::segment_stream_response::Msg;
    assert!(
        msgs.iter().any(|m| matches!(&m.msg, Some(Msg::Progress(p)) if p.windows_total > 0)),
        "no inference progress"
    );
    let result =
        msgs.iter().find_map(|m| if let Some(Msg::Result(r)) = &m.msg { Some(r.clone()) } else { None }).unwrap();
    assert_eq!(result.label_map_sha256, by_uri.label_map_sha256, "streamed and by-URI label maps differ");
    assert!(result.label_map_uri.is_empty(), "nothing stored without output_uri");
    let mut label = Vec::new();
    for m in &msgs {
        if let Some(Msg::Chunk(c)) = &m.msg {
            assert_eq!(c.offset as usize, label.len());
            assert_eq!(Some(crc32c::crc32c(&c.data)), c.crc32c);
            label.extend_from_slice(&c.data);
        }
    }
    let Some(Msg::Trailer(t)) = &msgs.last().unwrap().msg else { panic!("no trailer") };
    assert_eq!(t.checksums[0].sha256, hex(&label));
    assert_eq!(hex(&label), result.label_map_sha256);

    // A corrupted upload is DATA_LOSS naming the file by its header field, not by the caller's
    // file name; a client that gives up mid-upload costs
    // nothing; the service keeps serving.
    let e = upload(&mut client, &images, true, None).await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().starts_with("header.files[2].name: sha256"), "{}", e.message());
    let e = upload(&mut client, &images, false, Some(3)).await.unwrap_err();
    assert_eq!(e.code(), Code::Cancelled, "{e:?}");
    assert!(client.segment(segment_request(&images)).await.is_ok());
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_models_inputs_and_faults_get_clear_statuses() {
    let svc = InferenceServer::start(|c| {
        c.max_concurrent = 1;
        c.max_queue = 0;
        // An S3 endpoint where nothing listens: the "store that disappears".
        c.store.s3_endpoint = Some(format!("http://127.0.0.1:{}", free_port()));
        c.store.s3_access_key_id = Some("k".into());
        c.store.s3_secret_access_key = Some("s".into());
    })
    .await;
    let onnx = segresnet_onnx();
    svc.registry.register(DEFAULT_MODEL_NAME, "1", onnx.clone().into(), None, Some("production")).await.unwrap();
    // A corrupt graph, a graph whose output is misnamed, a graph that does not match its metadata.
    svc.registry
        .register(DEFAULT_MODEL_NAME, "corrupt", onnx[..onnx.len() / 2].to_vec().into(), None, None)
        .await
        .unwrap();
    let fixture =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/pointwise_head.onnx")).unwrap();
    // Same graph with its output tensor renamed (every occurrence, same length, so still valid).
    let mut misnamed = fixture.clone();
    let hits: Vec<usize> = misnamed.windows(6).enumerate().filter(|(_, w)| *w == b"logits").map(|(i, _)| i).collect();
    assert!(hits.len() >= 2, "fixture layout changed");
    for i in hits {
        misnamed[i..i + 6].copy_from_slice(b"scores");
    }
    svc.registry.register(DEFAULT_MODEL_NAME, "misnamed", misnamed.into(), None, None).await.unwrap();
    let meta = serde_json::json!({"onnx": {"sha256": "ab".repeat(32)}});
    svc.registry
        .register(DEFAULT_MODEL_NAME, "tampered", onnx.into(), Some(serde_json::to_vec(&meta).unwrap().into()), None)
        .await
        .unwrap();
    svc.wait_serving().await;
    let images = case(svc.dir.path(), "b1", 3);
    let mut client = svc.client().await;
    let with_model = |sel: pb::ModelSelector| pb::SegmentRequest { model: Some(sel), ..segment_request(&images) };
    let v = |s: &str| pb::ModelSelector { version: s.into(), ..Default::default() };
    let cases: Vec<(&str, pb::SegmentRequest, Code, &str)> = vec![
        ("corrupt onnx", with_model(v("corrupt")), Code::InvalidArgument, "not a loadable ONNX model"),
        ("misnamed output", with_model(v("misnamed")), Code::InvalidArgument, "outputs are [\"scores\"]"),
        ("tampered graph", with_model(v("tampered")), Code::InvalidArgument, "sha256"),
        ("unknown version", with_model(v("9")), Code::NotFound, "version '9'"),
        (
            "missing alias",
            with_model(pb::ModelSelector { alias: "staging".into(), ..Default::default() }),
            Code::NotFound,
            "staging",
        ),
        ("three modalities", segment_request(&images[..3]), Code::InvalidArgument, "image_uris"),
        (
            "missing image",
            segment_request(&[
                images[0].clone(),
                images[1].clone(),
                images[2].clone(),
                svc.dir.path().join("gone.nii.gz"),
            ]),
            Code::NotFound,
            "image_uris[3]",
        ),
        (
            "bad roi",
            pb::SegmentRequest {
                options: Some(pb::SegmentOptions { roi_size: vec![30, 32, 32], ..Default::default() }),
                ..segment_request(&images)
            },
            Code::InvalidArgument,
            "roi_size",
        ),
    ];
    for (what, req, code, needle) in cases {
        let e = client.segment(req).await.expect_err(what);
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(e.message().contains(needle), "{what}: '{}' should contain '{needle}'", e.message());
    }
    // The store vanishes for the output: UNAVAILABLE, nothing half-written, still serving.
    let mut gone = segment_request(&images);
    gone.output_uri = "s3://nowhere/out".into();
    let e = client.segment(gone).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("output_uri"), "{}", e.message());
    assert!(!svc.dir.path().join("predictions").exists() || list_files(&svc.dir.path().join("predictions")).is_empty());

    // One slot, no queue: of three simultaneous requests, one runs and the others are refused
    // with RESOURCE_EXHAUSTED rather than queued without bound.
    let racers: Vec<_> = (0..3)
        .map(|_| {
            let mut c = client.clone();
            let r = segment_request(&images);
            tokio::spawn(async move { c.segment(r).await })
        })
        .collect();
    let mut codes = Vec::new();
    for r in racers {
        codes.push(match r.await.unwrap() {
            Ok(_) => Code::Ok,
            Err(e) => {
                if e.code() == Code::ResourceExhausted {
                    // A retry hint: gRPC's pushback key, at least the 1 s floor, and in words.
                    let ms: u64 = e
                        .metadata()
                        .get("grpc-retry-pushback-ms")
                        .expect("retry hint")
                        .to_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    assert!(ms >= 1, "{ms}");
                    assert!(e.message().contains("retry in about"), "{}", e.message());
                }
                e.code()
            }
        });
    }
    assert!(codes.contains(&Code::Ok), "{codes:?}");
    assert!(codes.contains(&Code::ResourceExhausted), "{codes:?}");
    assert!(codes.iter().all(|c| matches!(c, Code::Ok | Code::ResourceExhausted)), "{codes:?}");
    assert!(client.segment(segment_request(&images)).await.is_ok(), "still serving");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_deadline_cancels_and_service_survives() {
    let svc = InferenceServer::start(|_| {}).await;
    svc.registry.register(DEFAULT_MODEL_NAME, "1", segresnet_onnx().into(), None, Some("production")).await.unwrap();
    svc.wait_serving().await;
    let images = case(svc.dir.path(), "d1", 4);
    let mut client = svc.client().await;
    let mut req = tonic::Request::new(segment_request(&images));
    req.set_timeout(Duration::from_millis(50));
    let e = client.segment(req).await.unwrap_err();
    assert!(matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled), "{e:?}");
    assert!(client.segment(segment_request(&images)).await.is_ok());
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preprocessing_through_the_preprocessing_service_gives_the_same_result() {
    let prep_dir = tempfile::tempdir().unwrap();
    let prep = Service::start(brats_preprocessor::config::ServiceConfig {
        output_root: file_uri(&prep_dir.path().join("store")),
        ..Default::default()
    })
    .await;
    // Mutual TLS between the two: inference calls with its client certificate, which the
    // preprocessing service's security (shared here) knows as a service identity.
    let endpoint = prep.url();
    let security = prep.security.clone().unwrap();
    let svc = InferenceServer::start_with(security, move |c| c.preprocess_endpoint = endpoint).await;
    let onnx = segresnet_onnx();
    svc.registry.register(DEFAULT_MODEL_NAME, "1", onnx.clone().into(), None, Some("production")).await.unwrap();
    svc.wait_serving().await;
    let images = case(svc.dir.path(), "r1", 6);
    let resp = svc.client().await.segment(segment_request(&images)).await.unwrap().into_inner();
    let t = resp.timings.unwrap();
    assert!(t.transfer_seconds > 0.0, "tensors should come through the store");
    assert_eq!(t.decode_seconds, 0.0, "decoding happened in the preprocessing service");

    let local = in_process(&onnx, &images);
    assert_eq!(hex(&local.label_nifti().unwrap()), resp.label_map_sha256, "remote and in-process preprocessing differ");
    svc.stop().await;
    prep.stop().await.unwrap();
}

/// Versions are claimed with a create-if-absent put: registrations racing for the next number
/// each get their own version, on a local directory and on an S3-compatible server, and an
/// existing version is refused without being touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_versions_are_claimed_atomically_on_disk_and_on_s3() {
    let moto = Moto::start("models").await;
    let dir = tempfile::tempdir().unwrap();
    for (stores, root) in [
        (brats_core::Stores::new(Default::default()), dir.path().join("models").display().to_string()),
        (brats_core::Stores::new(moto.store_config()), "s3://models/registry".to_string()),
    ] {
        let registry = Arc::new(Registry::new(Arc::new(stores), brats_core::StoreUri::parse(&root).unwrap()));
        let racers: Vec<_> = (0..6u8)
            .map(|i| {
                let registry = registry.clone();
                tokio::spawn(async move { registry.register_next("race", vec![i; 16].into(), None, None).await })
            })
            .collect();
        let mut versions: Vec<(String, u8)> = Vec::new();
        for (i, racer) in racers.into_iter().enumerate() {
            let (version, _) = racer.await.unwrap().unwrap();
            // Each version holds the graph of the writer that claimed it.
            assert_eq!(
                registry.fetch("race", &version).await.unwrap().onnx.as_ref(),
                &[i as u8; 16],
                "{root} v{version}"
            );
            versions.push((version, i as u8));
        }
        let mut numbers: Vec<u64> = versions.iter().map(|(v, _)| v.parse().unwrap()).collect();
        numbers.sort();
        assert_eq!(numbers, (1..=6).collect::<Vec<_>>(), "{root}");

        let e = registry.register("race", "3", vec![9u8; 16].into(), None, Some("production")).await.unwrap_err();
        assert!(matches!(e, brats_core::CoreError::AlreadyExists(_)), "{root}: {e}");
        assert!(e.to_string().contains("versions are immutable"), "{e}");
        let kept = versions.iter().find(|(v, _)| v == "3").unwrap().1;
        assert_eq!(registry.fetch("race", "3").await.unwrap().onnx.as_ref(), &[kept; 16]);
        assert!(registry.aliases("race").await.unwrap().is_empty(), "a refused registration moved an alias");
    }
}

/// An `InferenceService` over a registry in `dir` (no server, no default model loaded).
fn service_at(dir: &Path, max_concurrent: usize) -> brats_inference::service::InferenceService {
    use brats_inference::service::{InferenceService, Metrics, ServiceSettings};
    let settings = ServiceSettings {
        registry: brats_core::StoreUri::parse(&file_uri(&dir.join("models"))).unwrap(),
        output_root: brats_core::StoreUri::parse(&file_uri(&dir.join("predictions"))).unwrap(),
        model: "brats_mri_segmentation".into(),
        alias: "production".into(),
        session: brats_inference::SessionOptions { intra_threads: 1, ..Default::default() },
        window: brats_artifacts::window::SlidingWindow { roi: ROI, ..Default::default() },
        max_concurrent,
        max_queue: 16,
        preprocessor: None,
        uris: Default::default(),
    };
    InferenceService::new(Arc::new(brats_core::Stores::new(Default::default())), settings, Metrics::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_model_returns_every_metadata_field_the_trainer_writes() {
    use brats_model::metadata::{WeightsInfo, model_metadata, sha256_hex};
    use brats_proto::v1::inference_server::Inference as _;
    let dir = tempfile::tempdir().unwrap();
    let svc = service_at(dir.path(), 1);
    let config = SegResNetConfig { init_filters: 8, ..SegResNetConfig::default() };
    let onnx = to_onnx_bytes(&config, &det_state_dict(&config), ExportOptions::default()).unwrap();
    // The provenance `brats-trainer`'s train.rs records, as the weights carry it.
    let provenance = serde_json::json!({
        "trained": true, "run": "job-42", "epoch": 3, "epochs": 4, "best_epoch": 3,
        "validation_dice": {"tc": 0.61, "wt": 0.82, "et": 0.55, "mean": 0.66},
        "seed": 7, "datalist": "file:///data/datalist.json",
        "recipe": {"optimizer": "adam", "learning_rate": 1e-4, "batch_size": 1},
        "labels": {"team": "neuro", "site": "a"},
        "label_convention": "brats2023", "pipeline_version": "brats-preprocess/1",
    });
    let weights = WeightsInfo { sha256: "ab".repeat(32), file: Some("best.safetensors".into()) };
    let mut metadata =
        model_metadata(&config, ExportOptions::default(), "model.onnx", sha256_hex(&onnx), weights, Some(provenance));
    // As train.rs `finish` records the validation window, then the trainer service's registration.
    metadata.postprocessing["sliding_window"]["roi_size"] = serde_json::json!([32, 32, 16]);
    let mut json = serde_json::to_value(&metadata).unwrap();
    json["description"] = "glioma model, site A".into();
    json["trainer_job"] = serde_json::json!({"job_id": "job-42", "labels": {"team": "neuro", "site": "a"},
                                            "seed": 7, "epochs": 4, "best_epoch": 3});
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    svc.registry()
        .register("brats_mri_segmentation", "1", onnx.into(), Some(serde_json::to_vec(&json).unwrap().into()), None)
        .await
        .unwrap();
    let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let model = svc
        .get_model(tonic::Request::new(pb::GetModelRequest { name: "brats_mri_segmentation".into() }))
        .await
        .unwrap()
        .into_inner();
    let created = model.versions[0].created_at.expect("created_at: when the version was registered");
    assert!((before..=after).contains(&created.seconds), "created_at {created:?} not within {before}..={after}");
    let m = model.versions[0].metadata.clone().expect("metadata");
    assert_eq!(m.input_channels, ["T1c", "T1", "T2", "FLAIR"]);
    assert_eq!(m.output_channels, ["TC", "WT", "ET"]);
    assert_eq!(m.roi_size, [32, 32, 16]);
    assert_eq!(m.validation_dice, Some(pb::DiceScores { tc: 0.61, wt: 0.82, et: 0.55, mean: 0.66 }));
    assert_eq!(m.weights_sha256, "ab".repeat(32));
    assert_eq!(m.onnx_sha256, metadata.onnx.sha256);
    let arch = m.architecture.clone().expect("architecture");
    assert_eq!((arch.blocks_down, arch.blocks_up), (vec![1, 2, 2, 4], vec![1, 1, 1]));
    assert_eq!((arch.init_filters, arch.in_channels, arch.out_channels), (Some(8), Some(4), Some(3)));
    assert_eq!(arch.dropout_prob, Some(0.2));
    assert_eq!(m.training_job_id, "job-42");
    assert_eq!(m.pipeline_version, "brats-preprocess/1");
    assert_eq!(m.label_convention(), pb::LabelConvention::Brats2023);
    assert_eq!(m.description, "glioma model, site A");
    let labels: std::collections::BTreeMap<String, String> = m.labels.into_iter().collect();
    assert_eq!(labels, [("site", "a"), ("team", "neuro")].map(|(k, v)| (k.to_string(), v.to_string())).into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_models_pages_through_every_model_exactly_once() {
    use brats_proto::v1::inference_server::Inference as _;
    let dir = tempfile::tempdir().unwrap();
    let svc = service_at(dir.path(), 1);
    let names = ["alpha", "beta", "delta", "epsilon", "gamma"];
    for name in names {
        for v in ["1", "2", "10"] {
            svc.registry().register(name, v, vec![1u8; 8].into(), None, None).await.unwrap();
        }
    }
    let list = |page_size: u32, page_token: String| {
        let svc = svc.clone();
        async move {
            svc.list_models(tonic::Request::new(pb::ListModelsRequest { page_size, page_token }))
                .await
                .map(|r| r.into_inner())
        }
    };
    let (mut seen, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let page = list(2, token).await.unwrap();
        assert!(page.models.len() <= 2);
        pages += 1;
        for m in &page.models {
            let versions: Vec<&str> = m.versions.iter().map(|v| v.version.as_str()).collect();
            assert_eq!(versions, ["10", "2", "1"], "versions newest first");
            seen.push(m.name.clone());
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!((seen, pages), (names.map(String::from).to_vec(), 3));
    // 0 = the documented default (50): one page.
    let all = list(0, String::new()).await.unwrap();
    assert_eq!((all.models.len(), all.next_page_token.as_str()), (5, ""));
    // Malformed tokens and a token from another server's registry are refused.
    let other = service_at(&dir.path().join("elsewhere"), 1);
    for name in names {
        other.registry().register(name, "1", vec![1u8; 8].into(), None, None).await.unwrap();
    }
    let foreign = other
        .list_models(tonic::Request::new(pb::ListModelsRequest { page_size: 1, page_token: String::new() }))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!foreign.is_empty());
    for bad in [foreign, "not-a-token".to_string(), "m1..".to_string()] {
        let e = list(2, bad.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
        assert!(e.message().starts_with("page_token"), "{}", e.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_an_uncached_version_load_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let svc = service_at(dir.path(), 2);
    let config = SegResNetConfig { init_filters: 8, ..SegResNetConfig::default() };
    let onnx = to_onnx_bytes(&config, &det_state_dict(&config), ExportOptions::default()).unwrap();
    svc.registry().register("brats_mri_segmentation", "7", onnx.into(), None, None).await.unwrap();
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                let sel = pb::ModelSelector { version: "7".into(), ..Default::default() };
                svc.models().select(Some(&sel)).await.map(|m| m.version.clone())
            })
        })
        .collect();
    for r in requests {
        assert_eq!(r.await.unwrap().unwrap(), "7");
    }
    assert_eq!(svc.models().loads(), 1, "one load for 8 concurrent requests");
    assert!(svc.models().is_loaded("brats_mri_segmentation", "7"));
    // Cached now: more requests load nothing.
    let sel = pb::ModelSelector { version: "7".into(), ..Default::default() };
    svc.models().select(Some(&sel)).await.unwrap();
    assert_eq!(svc.models().loads(), 1);
}

/// The proto documents the output files the service writes (it used to promise `label.nii.gz`
/// and a NIfTI `probabilities.nii.gz` while the code wrote these).
#[test]
fn the_proto_names_the_files_the_service_writes() {
    let proto = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/brats/v1/inference.proto"),
    )
    .unwrap();
    for name in [brats_inference::LABEL_MAP_FILE, brats_inference::PROBABILITIES_FILE] {
        assert!(proto.contains(&format!("\"{name}\"")), "inference.proto does not name {name}");
    }
    for stale in ["label.nii.gz", "probabilities.nii.gz"] {
        assert!(!proto.contains(stale), "inference.proto still promises {stale}");
    }
}

/// `bratsctl segment` on a busy service (one slot, no queue, kept occupied by another client):
/// RESOURCE_EXHAUSTED with a retry hint, a wait of that long, and the case sent again, which
/// succeeds once the other client stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bratsctl_waits_out_a_busy_service_as_it_asks() {
    let svc = InferenceServer::start(|c| {
        c.max_concurrent = 1;
        c.max_queue = 0;
    })
    .await;
    svc.registry.register(DEFAULT_MODEL_NAME, "1", segresnet_onnx().into(), None, Some("production")).await.unwrap();
    svc.wait_serving().await;
    let images = case(svc.dir.path(), "busy", 7);
    let out = svc.dir.path().join("busy-seg.nii.gz");
    // A landing in a gap between the other client's requests is not busy: try a few times.
    let mut retried = false;
    for _ in 0..3 {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hog = {
            let (mut client, images, stop) = (svc.client().await, images.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = client.segment(segment_request(&images)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut cmd = tokio::process::Command::new(bratsctl_exe());
        cmd.args(bratsctl_flags(&svc.security.admin()))
            .args(["segment", "--server", &svc.url(), "--retries", "50", "--out"])
            .arg(&out)
            .arg("--image")
            .args(&images)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
        let mut log = String::new();
        let mut line = String::new();
        while tokio::io::AsyncBufReadExt::read_line(&mut stderr, &mut line).await.unwrap() > 0 {
            if line.contains("retry 1 of 50") {
                // The first refusal names its wait; now let the retry through.
                assert!(line.contains("ResourceExhausted") && line.contains("retry in about"), "{line}");
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                retried = true;
            }
            log.push_str(&line);
            line.clear();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let status = child.wait().await.unwrap();
        hog.await.unwrap();
        assert!(status.success(), "bratsctl segment failed:\n{log}");
        assert!(out.is_file(), "no label map written");
        if retried {
            break;
        }
    }
    assert!(retried, "bratsctl never found the service busy in three tries");
    svc.stop().await;
}
