//! Our inference path against MONAI's bundle inference, end to end: the same deterministic
//! SegResNet weights (`brats_model::reference`, `tests/monai/detgen.py`), exported to ONNX by our
//! exporter and run by ONNX Runtime through our preprocessing and sliding window, compared with
//! MONAI's `LoadImaged → NormalizeIntensityd → SlidingWindowInferer → sigmoid → threshold →
//! label map` on the committed cases of `tests/fixtures/monai/inference/`
//! (`tests/monai/make_inference_fixtures.py`): one case smaller than the window (padded), one
//! larger (six windows, the last start moved back to the border).

use brats_artifacts::window::{Blend, SlidingWindow};
use brats_core::nifti_io::ReadLimits;
use brats_inference::runtime::{SegmentationModel, SessionOptions, default_library};
use brats_inference::segment::segment;
use brats_model::SegResNetConfig;
use brats_model::onnx::{ExportOptions, to_onnx_bytes};
use brats_model::reference::det_state_dict;
use brats_preprocess::pipeline::InputFile;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/monai/inference")
}

fn expected(case: &str, name: &str) -> Vec<u8> {
    let bytes = std::fs::read(fixtures().join(case).join("expected.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name).unwrap().data().to_vec()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn run_case(model: &SegmentationModel, case: &str, blend: Blend) -> brats_inference::segment::Segmentation {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("cases.json")).unwrap()).unwrap();
    let roi: Vec<usize> = index["roi_size"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let images: Vec<InputFile> = ["t1c", "t1", "t2", "flair"]
        .iter()
        .map(|m| {
            let p = fixtures().join(case).join(format!("{m}.nii.gz"));
            InputFile { name: p.display().to_string(), bytes: std::fs::read(&p).unwrap().into() }
        })
        .collect();
    let window = SlidingWindow {
        roi: [roi[0], roi[1], roi[2]],
        overlap: index["overlap"].as_f64().unwrap(),
        blend,
        ..Default::default()
    };
    segment(model, &images, &window, true, &ReadLimits::default()).unwrap()
}

fn model() -> SegmentationModel {
    let config = SegResNetConfig::default();
    let onnx = to_onnx_bytes(&config, &det_state_dict(&config), ExportOptions::default()).unwrap();
    SegmentationModel::load(&default_library(), &onnx, &SessionOptions::default()).unwrap()
}

#[test]
fn logits_and_label_maps_match_monai() {
    let model = model();
    for case in ["small", "large"] {
        let seg = run_case(&model, case, Blend::Constant);
        let want = f32s(&expected(case, "logits"));
        let got = seg.logits.as_ref().unwrap();
        assert_eq!(got.len(), want.len(), "{case}: logits size");
        let (worst, max_diff) = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .enumerate()
            .fold((0, 0f32), |m, (i, d)| if d > m.1 { (i, d) } else { m });
        println!("{case}: logits max abs diff {max_diff:.3e} at {worst}");
        assert!(max_diff <= 1e-4, "{case}: logits differ from MONAI by {max_diff} at flat index {worst}");

        let want_label = expected(case, "label");
        let n = want_label.len();
        let near_zero = |i: usize| (0..3).any(|c| want[c * n + i].abs() < 1e-4);
        let mismatched: Vec<usize> = (0..n).filter(|&i| seg.label[i] != want_label[i] && !near_zero(i)).collect();
        assert!(
            mismatched.is_empty(),
            "{case}: {} label voxels differ from MONAI, first at {}",
            mismatched.len(),
            mismatched[0]
        );
        assert_eq!(seg.affine[0][3], if case == "small" { -19.5 } else { -37.5 });
    }
}

#[test]
fn gaussian_blending_matches_monai() {
    let model = model();
    let seg = run_case(&model, "large", Blend::Gaussian);
    let want = f32s(&expected("large", "logits_gaussian"));
    let max_diff = seg.logits.unwrap().iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("large, gaussian: logits max abs diff {max_diff:.3e}");
    assert!(max_diff <= 1e-4, "gaussian-blended logits differ from MONAI by {max_diff}");
}
