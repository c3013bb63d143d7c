//! Parity of the preprocessing with MONAI 1.6.1 (the `brats_mri_segmentation` bundle), on the
//! committed fixtures in `tests/fixtures/monai/preprocess/` (see `tests/fixtures/monai/README.md`;
//! produced by `tests/monai/make_preprocess_fixtures.py`).
//!
//! Tolerances are the fixtures' own: images max abs diff ≤ 1e-5, labels exact. Every failure
//! names the case, the tensor, the max abs diff and the `[c, x, y, z]` index of the worst voxel.
//! Run with `--nocapture` to see the measured diffs.

mod common;

use brats_core::metadata::CropBox;
use brats_core::nifti_io::{self, ReadLimits};
use brats_core::tensors::CaseTensors;
use brats_preprocess::pipeline::{CropMode, InputFile, Options, preprocess};
use brats_preprocess::transforms;
use common::*;
use safetensors::SafeTensors;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

// ------------------------------------------------------------------------------------------
// 1. image + label, every case, the inference path (crop none)

#[test]
fn every_case_matches_monai_image_and_label() {
    let mut report = Vec::new();
    for c in cases() {
        let n = name(&c);
        let exp = expected(&c);
        let t = run_plain(&c);
        let shape = triple(&usizes(&c["loaded_image_shape"])[1..]);
        let shape = if n == "four_d" { triple(&usizes(&c["after_ensure_channel_first_shape"])[1..]) } else { shape };
        assert_eq!(t.metadata.original_shape, shape, "case {n}: original shape");
        assert_eq!(t.metadata.shape, shape, "case {n}: crop none keeps the shape");
        assert_eq!(t.metadata.crop_box, CropBox::full(shape), "case {n}: crop none box");
        let d = assert_case_tensors(n, ("image", "label"), &t, &exp);
        report.push((n.to_string(), d));

        // The affine MONAI reports (sform as stored, f32 precision) is what we record.
        let want: Vec<Vec<f64>> = c["affine"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect())
            .collect();
        for (r, row) in want.iter().enumerate() {
            for (k, &v) in row.iter().enumerate() {
                assert_eq!(t.metadata.affine[r][k], v, "case {n}: affine[{r}][{k}] differs from MONAI's");
            }
        }
        // Per-channel statistics: MONAI's non-zero count exactly; its f32 mean/std closely.
        for (ch, (ours, monai)) in
            t.metadata.channels.iter().zip(c["monai_channel_stats"].as_array().unwrap()).enumerate()
        {
            let count = monai["count"].as_u64().unwrap();
            assert_eq!(ours.nonzero_voxels, count, "case {n}, channel {ch}: non-zero voxel count");
            if count == 0 {
                continue;
            }
            let (mean, std) = (monai["mean"].as_f64().unwrap(), monai["std"].as_f64().unwrap());
            assert!(
                (ours.mean - mean).abs() <= 1e-6 * mean.abs().max(1.0),
                "case {n}, channel {ch}: mean {} vs MONAI {mean}",
                ours.mean
            );
            if std != 0.0 {
                assert!(
                    (ours.std - std).abs() <= 1e-5 * std,
                    "case {n}, channel {ch}: std {} vs MONAI {std}",
                    ours.std
                );
            } else {
                assert_eq!(ours.std, 1.0, "case {n}, channel {ch}: std 0 must divide by 1");
            }
        }
    }
    println!("image max abs diff per case: {report:?}");
}

// ------------------------------------------------------------------------------------------
// 2. augmentations with MONAI's recorded draws, and the end-to-end random path

#[test]
fn augmentations_with_recorded_draws_match_monai() {
    let mut checked = 0;
    for c in cases() {
        let Some(aug) = c.get("augment") else {
            continue;
        };
        let n = name(&c);
        let exp = expected(&c);
        let t = run_plain(&c);
        let shape = t.metadata.shape;
        let roi = triple(&usizes(&aug["roi_size"]));
        let start = triple(&usizes(&aug["roi_start"]));
        let b = transforms::random_crop_box(shape, roi, start);
        let end = usizes(&aug["roi_end"]);
        assert_eq!(
            b,
            CropBox { start: start.map(|s| s as i64), size: roi },
            "case {n}: random_crop_box at the recorded start (MONAI roi_end {end:?})"
        );
        let mut flips = [false; 3];
        for a in usizes(&aug["flip_spatial_axes"]) {
            flips[a] = true;
        }
        let f = aug["scale_factor"].as_f64().unwrap();
        let o = aug["shift_offset"].as_f64().unwrap();
        // The f32 scalars torch uses are the ones our transforms form.
        assert_eq!(
            (1.0 + f) as f32 as f64,
            aug["scale_multiplier_1_plus_f_as_f32"].as_f64().unwrap(),
            "case {n}: f32(1 + f)"
        );
        assert_eq!(o as f32 as f64, aug["shift_offset_as_f32"].as_f64().unwrap(), "case {n}: f32(o)");
        let (image, label) = replay_augment(&t, &b, flips, Some(f), Some(o));
        let (ws, w) = f32_of(&exp, n, "image_aug");
        assert_image(n, "image_aug", &shape4(4, roi), &image, ws, w);
        let (ls, l) = u8_of(&exp, n, "label_aug");
        assert_label(n, "label_aug", &shape4(3, roi), &label, ls, l);
        checked += 1;
    }
    assert_eq!(checked, 2, "cases basic and dtypes carry recorded draws");
}

#[test]
fn end_to_end_random_augmentation_replays_from_its_metadata() {
    for n in ["basic", "dtypes"] {
        let c = case(n);
        let roi = triple(&usizes(&c["augment"]["roi_size"]));
        let plain = run_plain(&c);
        let shape = plain.metadata.shape;
        let (mut flipped_axes, mut starts) = ([0usize; 3], std::collections::BTreeSet::new());
        let seeds = 0..8u64;
        for seed in seeds.clone() {
            let options = Options {
                label_convention: convention(&c),
                crop: CropMode::Random,
                crop_size: roi,
                random_flip: true,
                flip_prob: 0.5,
                intensity_scale: 0.1,
                intensity_shift: 0.1,
                seed,
                ..Options::default()
            };
            let t = run(&c, &options);
            let m = &t.metadata;
            let what = format!("case {n}, seed {seed}");
            assert_eq!(m.original_shape, shape, "{what}: original shape");
            assert_eq!(m.shape, roi, "{what}: output shape is the roi");
            assert_eq!(m.crop_box.size, roi, "{what}: crop box size");
            for a in 0..3 {
                let s = m.crop_box.start[a];
                assert!(
                    s >= 0 && s as usize + roi[a] <= shape[a],
                    "{what}: random crop box {:?} leaves the volume",
                    m.crop_box
                );
                flipped_axes[a] += m.flipped[a] as usize;
            }
            starts.insert(m.crop_box.start);
            assert!(
                m.intensity_scale.abs() < 0.1 && m.intensity_scale != 0.0,
                "{what}: scale draw {}",
                m.intensity_scale
            );
            assert!(
                m.intensity_shift.abs() < 0.1 && m.intensity_shift != 0.0,
                "{what}: shift draw {}",
                m.intensity_shift
            );
            // Same draws through the unit transforms → the same tensors, bit for bit.
            let (image, label) =
                replay_augment(&plain, &m.crop_box, m.flipped, Some(m.intensity_scale), Some(m.intensity_shift));
            let (d, i) = max_abs_diff(&t.image, &image);
            let bits_equal = t.image.iter().zip(&image).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                bits_equal && t.image.len() == image.len(),
                "{what}: image differs from the replay of its metadata draws: max abs diff {d:e} at [c, x, y, z] = {:?}",
                unravel(i, &shape4(4, roi))
            );
            assert_eq!(t.label.as_ref(), Some(&label), "{what}: label differs from the replay of its metadata draws");
        }
        // The draws actually vary over seeds (otherwise the replay above proves little).
        assert!(starts.len() > 1, "case {n}: every seed drew the same crop start {starts:?}");
        for (a, &k) in flipped_axes.iter().enumerate() {
            assert!(k > 0 && k < seeds.clone().count(), "case {n}: axis {a} flipped in {k} of 8 seeds");
        }
    }
}

// ------------------------------------------------------------------------------------------
// 3. center crop and foreground crop

#[test]
fn center_crop_matches_monai() {
    for n in ["dtypes", "edge"] {
        let c = case(n);
        let exp = expected(&c);
        let t = run_plain(&c);
        let info = &c["center_crop"];
        let roi = triple(&usizes(&info["roi_size"]));
        let b = transforms::center_crop_box(t.metadata.shape, roi);
        let (start, end) = (usizes(&info["start"]), usizes(&info["end"]));
        let want = CropBox { start: triple(&start).map(|s| s as i64), size: [0, 1, 2].map(|a| end[a] - start[a]) };
        assert_eq!(b, want, "case {n}: center_crop_box for roi {roi:?} vs MONAI's start {start:?} end {end:?}");
        let (image, label) = crop_both(&t, &b);
        let (ws, w) = f32_of(&exp, n, "image_center");
        assert_image(n, "image_center", &shape4(4, b.size), &image, ws, w);
        let (ls, l) = u8_of(&exp, n, "label_center");
        assert_label(n, "label_center", &shape4(3, b.size), &label, ls, l);
        // End to end where Options can express the roi (edge's 0 "full size" is not a valid crop_size).
        if roi.iter().all(|&r| r > 0) {
            let e2e = run(
                &c,
                &Options {
                    label_convention: convention(&c),
                    crop: CropMode::Center,
                    crop_size: roi,
                    ..Options::default()
                },
            );
            assert_eq!(e2e.metadata.crop_box, want, "case {n}: pipeline center crop box");
            assert_case_tensors(n, ("image_center", "label_center"), &e2e, &exp);
        }
    }
}

#[test]
fn foreground_crop_matches_monai() {
    for n in ["dtypes", "edge"] {
        let c = case(n);
        let exp = expected(&c);
        let t = run_plain(&c);
        let info = &c["foreground_crop"];
        let (k, margin) = (info["k_divisible"].as_u64().unwrap() as usize, info["margin"].as_u64().unwrap() as usize);
        let b = transforms::foreground_box(&t.image, 4, t.metadata.shape, k, margin)
            .unwrap_or_else(|| panic!("case {n}: no foreground found"));
        let (start, end) = (i64s(&info["box_start"]), i64s(&info["box_end"]));
        let want =
            CropBox { start: [start[0], start[1], start[2]], size: [0, 1, 2].map(|a| (end[a] - start[a]) as usize) };
        assert_eq!(b, want, "case {n}: foreground_box (k {k}, margin {margin}) vs MONAI's box {start:?}..{end:?}");
        let (image, label) = crop_both(&t, &b);
        let (ws, w) = f32_of(&exp, n, "image_fg");
        assert_image(n, "image_fg", &shape4(4, b.size), &image, ws, w);
        let (ls, l) = u8_of(&exp, n, "label_fg");
        assert_label(n, "label_fg", &shape4(3, b.size), &label, ls, l);
        if n == "edge" {
            assert!(start.iter().any(|&s| s < 0), "edge: the margin-1 box should start outside the volume");
        }
        // The pipeline's foreground mode is margin 0.
        if margin == 0 {
            let options = Options {
                label_convention: convention(&c),
                crop: CropMode::Foreground,
                foreground_multiple: k,
                ..Options::default()
            };
            let e2e = run(&c, &options);
            assert_eq!(e2e.metadata.crop_box, want, "case {n}: pipeline foreground crop box");
            assert_case_tensors(n, ("image_fg", "label_fg"), &e2e, &exp);
        }
    }
}

// ------------------------------------------------------------------------------------------
// 4. edge cases, named one by one (case `edge`: t1c all zero, t1 constant 37.25, t2 negative
//    with 0.0 / −0.0 background, one label voxel = 4)

fn edge() -> (Value, CaseTensors, HashMap<String, Tensor>) {
    let c = case("edge");
    let t = run_plain(&c);
    let exp = expected(&c);
    (c, t, exp)
}

fn channel(v: &[f32], shape: [usize; 3], c: usize) -> &[f32] {
    let n = shape.iter().product::<usize>();
    &v[c * n..(c + 1) * n]
}

fn raw_channel(c: &Value, file: &str) -> Vec<f32> {
    let f = input(c, file);
    nifti_io::read_nifti(&f.bytes, file, &ReadLimits::default()).unwrap().data
}

#[test]
fn edge_all_zero_channel_is_unchanged() {
    let (c, t, exp) = edge();
    let s = t.metadata.shape;
    let ours = channel(&t.image, s, 0);
    assert!(ours.iter().all(|v| v.to_bits() == 0), "edge t1c: an all-zero channel must stay all +0.0");
    assert_eq!(t.metadata.channels[0].nonzero_voxels, 0, "edge t1c: non-zero count");
    let (_, w) = f32_of(&exp, "edge", "image");
    assert!(channel(w, s, 0).iter().all(|&v| v == 0.0), "fixture: MONAI leaves t1c at zero");
    assert_eq!(raw_channel(&c, "t1c.nii.gz"), ours, "edge t1c: output equals input");
}

#[test]
fn edge_constant_channel_becomes_zero() {
    let (c, t, exp) = edge();
    let s = t.metadata.shape;
    assert!(raw_channel(&c, "t1.nii.gz").iter().all(|&v| v == 37.25), "fixture: t1 is 37.25 everywhere");
    let ours = channel(&t.image, s, 1);
    let bad = ours.iter().position(|&v| v != 0.0);
    assert!(
        bad.is_none(),
        "edge t1 (constant): voxel {:?} is {} after normalisation, expected 0",
        bad.map(|i| unravel(i, &s)),
        ours[bad.unwrap_or(0)]
    );
    assert_eq!(t.metadata.channels[1].std, 1.0, "edge t1: std 0 → divisor 1");
    let (_, w) = f32_of(&exp, "edge", "image");
    assert!(channel(w, s, 1).iter().all(|&v| v == 0.0), "fixture: MONAI gives 0 for t1");
}

#[test]
fn edge_negative_intensities_are_foreground_for_normalisation() {
    let (c, t, exp) = edge();
    let s = t.metadata.shape;
    let raw = raw_channel(&c, "t2.nii.gz");
    let negatives = raw.iter().filter(|&&v| v < 0.0).count();
    assert!(negatives > 100, "fixture: t2 should be mostly negative, has {negatives} negative voxels");
    let count = raw.iter().filter(|&&v| v != 0.0).count() as u64;
    assert_eq!(t.metadata.channels[2].nonzero_voxels, count, "edge t2: negatives count as non-zero");
    assert_eq!(count, c["monai_channel_stats"][2]["count"].as_u64().unwrap(), "edge t2: MONAI's non-zero count");
    assert!(t.metadata.channels[2].mean < 0.0, "edge t2: the mean of a negative channel is negative");
    let (ws, w) = f32_of(&exp, "edge", "image");
    let n: usize = s.iter().product();
    assert_image("edge", "image[t2]", &ws[1..], channel(&t.image, s, 2), &ws[1..], &w[2 * n..3 * n]);
    // Normalised → the non-zero voxels have mean 0 and std 1.
    let nz: Vec<f64> =
        raw.iter().zip(channel(&t.image, s, 2)).filter(|(r, _)| **r != 0.0).map(|(_, &o)| o as f64).collect();
    let mean = nz.iter().sum::<f64>() / nz.len() as f64;
    let std = (nz.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / nz.len() as f64).sqrt();
    assert!(mean.abs() < 1e-5 && (std - 1.0).abs() < 1e-5, "edge t2: normalised mean {mean}, std {std}");
}

#[test]
fn edge_one_voxel_label_gives_one_voxel_per_region() {
    let (_, t, exp) = edge();
    let s = t.metadata.shape;
    let label = t.label.as_ref().unwrap();
    let n: usize = s.iter().product();
    let at = (20 * s[1] + 2) * s[2] + 13; // the voxel (20, 2, 13) = 4 → TC, WT and ET
    for (ch, region) in ["TC", "WT", "ET"].iter().enumerate() {
        let set: Vec<Vec<usize>> = (0..n).filter(|&i| label[ch * n + i] != 0).map(|i| unravel(i, &s)).collect();
        assert_eq!(set, vec![vec![20, 2, 13]], "edge: region {region} should be exactly voxel (20, 2, 13)");
        assert_eq!(label[ch * n + at], 1, "edge: region {region} value");
    }
    let (ls, l) = u8_of(&exp, "edge", "label");
    assert_label("edge", "label", &shape4(3, s), label, ls, l);
}

#[test]
fn edge_negative_zero_stays_zero_and_is_not_counted() {
    let (c, t, exp) = edge();
    let s = t.metadata.shape;
    let raw = raw_channel(&c, "t2.nii.gz");
    let neg_zero: Vec<usize> = (0..raw.len()).filter(|&i| raw[i] == 0.0 && raw[i].is_sign_negative()).collect();
    let pos_zero = raw.iter().filter(|v| v.to_bits() == 0).count();
    assert!(!neg_zero.is_empty() && pos_zero > 0, "fixture: t2 background holds both 0.0 and −0.0");
    let ours = channel(&t.image, s, 2);
    let (_, w) = f32_of(&exp, "edge", "image");
    let monai = channel(w, s, 2);
    for &i in &neg_zero {
        assert_eq!(ours[i], 0.0, "edge t2: −0.0 input at {:?} became {}", unravel(i, &s), ours[i]);
        assert!(ours[i].is_sign_negative(), "edge t2: −0.0 at {:?} lost its sign (MONAI keeps −0.0)", unravel(i, &s));
        assert_eq!(
            monai[i].to_bits(),
            ours[i].to_bits(),
            "edge t2: −0.0 at {:?} differs from MONAI bitwise",
            unravel(i, &s)
        );
    }
    // Not counted: the count is over v != 0, which −0.0 is not.
    let count = raw.iter().filter(|&&v| v != 0.0).count() as u64;
    assert_eq!(t.metadata.channels[2].nonzero_voxels, count, "edge t2: −0.0 must not be counted as non-zero");
    assert_eq!(count + (neg_zero.len() + pos_zero) as u64, raw.len() as u64);
    assert_eq!(c["negative_zero_preserved_in_output"], Value::Bool(true), "fixture flag");
}

// ------------------------------------------------------------------------------------------
// 5. the real BraTS 2023 case (optional: skipped when the data are absent), and MONAI on it
//    when the MONAI venv exists

fn real_case_dir() -> Option<PathBuf> {
    const CASE: &str = "BraTS-GLI-00001-000";
    [PathBuf::from("/work/shared/data/real").join(CASE), repo_root().join("../shared/data/real").join(CASE)]
        .into_iter()
        .find(|d| d.is_dir())
}

/// The four files in the bundle's order T1c, T1, T2, FLAIR.
fn real_case_files(dir: &Path) -> Option<Vec<PathBuf>> {
    let names: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ["-t1c.nii.gz", "-t1n.nii.gz", "-t2w.nii.gz", "-t2f.nii.gz"]
        .iter()
        .map(|suffix| names.iter().find(|n| n.ends_with(suffix)).map(|n| dir.join(n)))
        .collect()
}

#[test]
fn real_brats_case_normalises_like_monai() {
    let Some(dir) = real_case_dir() else {
        println!(
            "SKIP real_brats_case_normalises_like_monai: BraTS-GLI-00001-000 not found under /work/shared/data/real or ../shared/data/real"
        );
        return;
    };
    let Some(files) = real_case_files(&dir) else {
        println!(
            "SKIP real_brats_case_normalises_like_monai: {} lacks one of *-t1c/-t1n/-t2w/-t2f.nii.gz",
            dir.display()
        );
        return;
    };
    let inputs: Vec<InputFile> = files
        .iter()
        .map(|p| InputFile {
            name: p.file_name().unwrap().to_string_lossy().into_owned(),
            bytes: std::fs::read(p).unwrap().into(),
        })
        .collect();
    let (t, _) =
        preprocess(&inputs, None, &Options::default(), &ReadLimits::default()).expect("real case preprocesses");
    let s = t.metadata.shape;
    assert_eq!(s, [240, 240, 155], "real case: shape");
    assert_eq!(t.image.len(), 4 * 240 * 240 * 155);
    for (c, f) in inputs.iter().enumerate() {
        let raw = nifti_io::read_nifti(&f.bytes, &f.name, &ReadLimits::default()).unwrap();
        assert_eq!(raw.dtype, "int16", "{}: dtype", f.name);
        let out = channel(&t.image, s, c);
        let zero_moved = (0..out.len()).find(|&i| raw.data[i] == 0.0 && out[i] != 0.0);
        assert!(
            zero_moved.is_none(),
            "{}: zero voxel {:?} became {}",
            f.name,
            zero_moved.map(|i| unravel(i, &s)),
            out[zero_moved.unwrap_or(0)]
        );
        let nz: Vec<f64> = raw.data.iter().zip(out).filter(|(r, _)| **r != 0.0).map(|(_, &o)| o as f64).collect();
        assert!(nz.len() > 1_000_000, "{}: only {} non-zero voxels", f.name, nz.len());
        let mean = nz.iter().sum::<f64>() / nz.len() as f64;
        let std = (nz.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / nz.len() as f64).sqrt();
        println!("real {:<32} non-zero {:>8}  mean {mean:+.3e}  std-1 {:+.3e}", f.name, nz.len(), std - 1.0);
        assert!(mean.abs() < 1e-4, "{}: normalised non-zero mean {mean}", f.name);
        assert!((std - 1.0).abs() < 1e-3, "{}: normalised non-zero std {std}", f.name);
    }

    let python = repo_root().join("tests/monai/.venv/bin/python");
    if !python.exists() {
        println!("SKIP MONAI comparison on the real case: {} not found (run tests/monai/setup.sh)", python.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("monai_real.safetensors");
    let script = r#"
import sys
import numpy as np
import torch
from monai.transforms import LoadImaged, NormalizeIntensityd
from safetensors.numpy import save_file
torch.set_num_threads(1)
out, files = sys.argv[1], sys.argv[2:]
d = LoadImaged(keys="image", image_only=True)({"image": files})
d = NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)(d)
save_file({"image": np.ascontiguousarray(d["image"].as_tensor().numpy())}, out)
"#;
    let status = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&out)
        .args(&files)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    assert!(status.success(), "the MONAI script failed ({status})");
    let bytes = std::fs::read(&out).unwrap();
    let exp = read_tensors(&bytes, "MONAI real case");
    let (ws, w) = f32_of(&exp, "real", "image");
    assert_image("real", "image", &shape4(4, s), &t.image, ws, w);
}

// ------------------------------------------------------------------------------------------
// The CLI

fn cli() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_brats-preprocess"));
    c.env_remove("RUST_LOG");
    c
}

fn basic_path(file: &str) -> PathBuf {
    fixtures().join("basic").join(file)
}

#[test]
fn cli_run_writes_monai_matching_file_with_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("basic.safetensors");
    let o = cli()
        .arg("run")
        .arg("--image")
        .args(["t1c", "t1", "t2", "flair"].map(|m| basic_path(&format!("{m}.nii.gz"))))
        .arg("--label")
        .arg(basic_path("seg.nii.gz"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "CLI failed ({}): {}", o.status, String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    let got = read_tensors(&bytes, "CLI output");
    let exp = expected(&case("basic"));
    let (gs, g) = f32_of(&got, "basic (CLI)", "image");
    let (ws, w) = f32_of(&exp, "basic", "image");
    assert_image("basic (CLI)", "image", gs, g, ws, w);
    let (gs, g) = u8_of(&got, "basic (CLI)", "label");
    let (ls, l) = u8_of(&exp, "basic", "label");
    assert_label("basic (CLI)", "label", gs, g, ls, l);
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().as_ref().expect("CLI output has __metadata__");
    for key in ["affine", "original_shape", "crop_box"] {
        assert!(
            meta.contains_key(key),
            "CLI output __metadata__ lacks '{key}' (has {:?})",
            meta.keys().collect::<Vec<_>>()
        );
    }
    let shape: Vec<usize> = serde_json::from_str(&meta["original_shape"]).unwrap();
    assert_eq!(shape, [40, 36, 28], "__metadata__ original_shape");
    let crop: Value = serde_json::from_str(&meta["crop_box"]).unwrap();
    assert_eq!(crop, serde_json::json!({"start": [0, 0, 0], "size": [40, 36, 28]}), "__metadata__ crop_box");
    let affine: Vec<Vec<f64>> = serde_json::from_str(&meta["affine"]).unwrap();
    assert_eq!(affine[0][3], -19.5, "__metadata__ affine origin x");
    assert_eq!(affine[2][3], 7.25, "__metadata__ affine origin z");
}

/// Runs `brats-preprocess run` expecting a failure: exit non-zero, exactly one stderr line
/// `error: …` naming `names`, and no output file (the output folder stays empty).
fn assert_cli_fails(what: &str, images: &[PathBuf], label: Option<&Path>, names: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("case.safetensors");
    let mut cmd = cli();
    cmd.arg("run").arg("--image").args(images);
    if let Some(l) = label {
        cmd.arg("--label").arg(l);
    }
    let o = cmd.arg("--out").arg(&out).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{what}: the CLI succeeded; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: expected exactly one stderr line, got {}: {stderr:?}", lines.len());
    assert!(lines[0].starts_with("error:"), "{what}: stderr line does not start with 'error:': {}", lines[0]);
    assert!(lines[0].contains(names), "{what}: error does not name {names}: {}", lines[0]);
    let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "{what}: files left behind in the output folder: {left:?}");
    println!("{what}: {}", lines[0]);
}

#[test]
fn cli_bad_input_fails_with_one_error_line_and_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let basic = ["t1c", "t1", "t2", "flair"].map(|m| basic_path(&format!("{m}.nii.gz")));

    // A truncated copy of t1c.nii.gz.
    let whole = std::fs::read(&basic[0]).unwrap();
    let truncated = tmp.path().join("t1c-truncated.nii.gz");
    std::fs::write(&truncated, &whole[..whole.len() / 2]).unwrap();
    let images = [truncated.clone(), basic[1].clone(), basic[2].clone(), basic[3].clone()];
    assert_cli_fails("truncated t1c", &images, Some(&basic_path("seg.nii.gz")), "t1c-truncated.nii.gz");

    // A modality from another case: a different grid.
    let other = tmp.path().join("flair-from-brats2023.nii.gz");
    std::fs::copy(fixtures().join("brats2023/flair.nii.gz"), &other).unwrap();
    let images = [basic[0].clone(), basic[1].clone(), basic[2].clone(), other];
    assert_cli_fails("mismatched shapes", &images, Some(&basic_path("seg.nii.gz")), "flair-from-brats2023.nii.gz");

    // A label from another case.
    let other_seg = tmp.path().join("seg-from-four_d.nii.gz");
    std::fs::copy(fixtures().join("four_d/seg.nii.gz"), &other_seg).unwrap();
    assert_cli_fails("mismatched label", &basic, Some(&other_seg), "seg-from-four_d.nii.gz");

    // A file that does not exist.
    let missing = tmp.path().join("no-such-t2.nii.gz");
    let images = [basic[0].clone(), basic[1].clone(), missing, basic[3].clone()];
    assert_cli_fails("missing file", &images, None, "no-such-t2.nii.gz");
}
