//! dlpipe's Rust preprocessing + TorchScript model against torchvision's reference transforms +
//! the eager PyTorch model, on the sample photos. The reference numbers are computed here, at
//! test time, by tools/reference.py.

mod common;

use dlpipe::batch::{run_files, FileOutcome, Resizing};
use dlpipe::image::ImageLimits;
use dlpipe::model::{top_k, Featurizer};
use std::process::Command;

const PHOTOS: &[&str] =
    &["chelsea_cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg", "china.jpg", "flower.jpg", "motorcycle.jpg"];

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * y).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y.powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn parity(model: &str) {
    let manifest = common::model_manifest(model);
    let paths: Vec<_> = PHOTOS.iter().map(|p| common::sample(p)).collect();
    let reference = Command::new(common::python())
        .arg(common::root().join("tools/reference.py"))
        .arg("--manifest")
        .arg(&manifest)
        .args(&paths)
        .output()
        .expect("run tools/reference.py");
    assert!(reference.status.success(), "reference.py: {}", String::from_utf8_lossy(&reference.stderr));
    let reference: serde_json::Value = serde_json::from_slice(&reference.stdout).unwrap();

    let featurizer = Featurizer::load(&manifest, tch::Device::Cpu).unwrap();
    let names = featurizer.manifest().class_names.clone();
    let mut worst = 1f64;
    run_files(&featurizer, &ImageLimits::default(), Resizing::ON_HOST, &paths, 4, |i, path, outcome| {
        let FileOutcome::Done { outputs, row } = outcome else { panic!("{} failed", path.display()) };
        let want = &reference["images"][i];
        let want_features: Vec<f64> =
            want["features"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let cos = cosine(outputs.features_row(row).unwrap(), &want_features);
        let ours = top_k(outputs.logits_row(row).unwrap(), 1, &names);
        let theirs = want["top_k"][0][0].as_u64().unwrap() as usize;
        println!("{model} {}: cosine {cos:.6}, top-1 dlpipe {} torchvision {theirs}", PHOTOS[i], ours[0].class);
        assert!(cos >= 0.999, "{model} {}: feature cosine {cos} < 0.999", PHOTOS[i]);
        assert_eq!(ours[0].class, theirs, "{model} {}: top-1 differs", PHOTOS[i]);
        worst = worst.min(cos);
    })
    .unwrap();
    println!("{model}: worst feature cosine over {} photos {worst:.6}", PHOTOS.len());
}

#[test]
fn efficientnet_lite0_matches_torchvision() {
    parity("efficientnet_lite0");
}

#[test]
fn mobilenet_v2_matches_torchvision() {
    parity("mobilenet_v2");
}
