//! The batch transfer-learning workflow on Fashion-MNIST, end to end through the binary:
//! train (featurize with the real model, cache, split, epochs), evaluate, predict with the
//! classifier; and the comparison with scikit-learn's LogisticRegression on a CI-sized subset.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A CSV of the first `per_class` images of each class of `data/fashion-mnist/<side>`.
fn fashion_list(side: &str, per_class: usize, skip: usize, path: &Path) -> Vec<(PathBuf, String)> {
    let root = common::root().join("data/fashion-mnist").join(side);
    let mut classes: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make setup`)", root.display()))
        .map(|e| e.unwrap().path())
        .collect();
    classes.sort();
    let mut rows = Vec::new();
    for class in classes {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&class).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        let label = class.file_name().unwrap().to_string_lossy().into_owned();
        rows.extend(files.into_iter().skip(skip).take(per_class).map(|f| (f, label.clone())));
    }
    let mut text = String::from("uri,label\n");
    for (f, label) in &rows {
        text.push_str(&format!("{},{label}\n", f.display()));
    }
    std::fs::write(path, text).unwrap();
    rows
}

fn run_ok(args: &[&str]) -> (String, String) {
    let out = common::dlpipe(args);
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "dlpipe {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    println!("$ dlpipe {}\n{stdout}{stderr}", args.join(" "));
    (stdout, stderr)
}

/// A PNG of at least `min` pixels on each side.
fn assert_png(path: &Path, min: u32) {
    let image = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(image.width() >= min && image.height() >= min, "{}: {}x{}", path.display(), image.width(), image.height());
    // Not a blank canvas: charts have ink.
    let rgb = image.to_rgb8();
    let dark = rgb.pixels().filter(|p| p.0.iter().all(|&c| c < 128)).count();
    assert!(dark > 500, "{} looks blank ({dark} dark pixels)", path.display());
}

#[test]
fn train_evaluate_and_predict_on_fashion_mnist() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    fashion_list("train", 24, 0, &dir.path().join("train.csv"));
    let test_rows = fashion_list("test", 8, 0, &dir.path().join("test.csv"));
    let cache = p("cache");
    let common_flags = ["--feature-cache", cache.as_str()];

    let train_csv = p("train.csv");
    let train = |out: &str, report: Option<&str>| {
        let mut args = vec!["train", "--data", &train_csv, "--out", out, "--epochs", "4", "--test-split", "0.25"];
        args.extend(common_flags);
        if let Some(report) = report {
            args.extend(["--report", report]);
        }
        run_ok(&args)
    };
    let (stdout, stderr) = train(&p("first.safetensors"), Some(&p("report")));
    assert!(stderr.contains("0 from the cache, 240 computed"), "{stderr}");
    assert!(stdout.contains("held-out evaluation (60 examples)") && stdout.contains("confusion matrix"), "{stdout}");

    // What the file records.
    let classifier = dlpipe::transfer::Classifier::load(Path::new(&p("first.safetensors"))).unwrap();
    // model.precision = "auto": the bf16 export where this CPU computes bf16 natively.
    let auto = if dlpipe::model::CpuFeatures::detect().native_bf16() {
        "efficientnet_lite0_bf16"
    } else {
        "efficientnet_lite0"
    };
    assert_eq!(classifier.featurizer_name.as_deref(), Some(auto));
    assert_eq!(classifier.model.num_classes(), 10);
    assert_eq!(classifier.model.dim(), 1280);
    let record = classifier.training.as_ref().expect("a training record");
    assert_eq!((record.train_examples, record.test_examples, record.epochs, record.curve.len()), (180, 60, 4, 4));
    let held_out = record.held_out.as_ref().unwrap();
    // Ten classes: chance is 0.1. 18 images a class are enough for well above that.
    assert!(held_out.accuracy > 0.6, "held-out accuracy {}", held_out.accuracy);
    assert_png(&dir.path().join("report/training_curve.png"), 400);
    assert_png(&dir.path().join("report/confusion_matrix.png"), 400);
    assert_png(&dir.path().join("report/reliability.png"), 400);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report/evaluation.json")).unwrap()).unwrap();
    assert_eq!(json["accuracy"].as_f64().unwrap(), held_out.accuracy);

    // A second run featurizes nothing, and (same data, split, seed) trains the same bits.
    let (_, stderr) = train(&p("second.safetensors"), None);
    assert!(stderr.contains("240 from the cache, 0 computed"), "{stderr}");
    // (Not the file's length: the training record's timings are text of varying length.)
    let second = dlpipe::transfer::Classifier::load(Path::new(&p("second.safetensors"))).unwrap();
    assert_eq!(second.model.weights(), classifier.model.weights());
    assert_eq!(second.model.bias(), classifier.model.bias());
    assert_eq!(second.model.class_counts(), classifier.model.class_counts());

    // evaluate: on the test folder's images, and on the held-out split reproduced.
    let (stdout, _) = run_ok(&[
        "evaluate",
        "--data",
        &p("test.csv"),
        "--classifier",
        &p("first.safetensors"),
        "--json",
        &p("eval.json"),
        "--report",
        &p("eval"),
        "--feature-cache",
        &cache,
    ]);
    assert!(stdout.contains("macro-F1") && stdout.contains("precision"), "{stdout}");
    let eval: Value = serde_json::from_str(&std::fs::read_to_string(p("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["examples"], 80);
    assert!(eval["accuracy"].as_f64().unwrap() > 0.6, "{eval}");
    let confusion_total: u64 = eval["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(confusion_total, 80);
    assert_eq!(eval["classes"].as_array().unwrap().len(), 10);
    assert!(eval["log_loss"].as_f64().unwrap() > 0.0);
    // Calibration: the bins hold every example, and the ECE is their weighted gap.
    let bins = eval["calibration"]["bins"].as_array().unwrap();
    assert_eq!(bins.iter().map(|b| b["examples"].as_u64().unwrap()).sum::<u64>(), 80);
    let gap: f64 = bins
        .iter()
        .map(|b| {
            b["examples"].as_f64().unwrap()
                * (b["accuracy"].as_f64().unwrap() - b["confidence"].as_f64().unwrap()).abs()
        })
        .sum();
    assert!((eval["calibration"]["ece"].as_f64().unwrap() - gap / 80.0).abs() < 1e-9, "{eval}");
    assert_png(&dir.path().join("eval/reliability.png"), 400);
    assert_png(&dir.path().join("eval/confusion_matrix.png"), 400);
    assert_png(&dir.path().join("eval/training_curve.png"), 400);
    run_ok(&[
        "evaluate",
        "--data",
        &p("train.csv"),
        "--split",
        "test",
        "--classifier",
        &p("first.safetensors"),
        "--json",
        &p("held_out.json"),
        "--feature-cache",
        &cache,
    ]);
    let again: Value = serde_json::from_str(&std::fs::read_to_string(p("held_out.json")).unwrap()).unwrap();
    assert_eq!(again["examples"], 60);
    assert_eq!(again["accuracy"].as_f64().unwrap(), held_out.accuracy);

    // predict --classifier: the classifier's class names, most of them right.
    let images: Vec<String> = test_rows.iter().step_by(4).map(|(f, _)| f.display().to_string()).collect();
    let first = p("first.safetensors");
    let mut args = vec!["predict", "--json", "--top-k", "2", "--classifier", &first];
    args.extend(images.iter().map(String::as_str));
    let (stdout, _) = run_ok(&args);
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), images.len());
    let mut right = 0;
    for (line, (_, label)) in lines.iter().zip(test_rows.iter().step_by(4)) {
        let top = line["top_k"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        assert!(top[0]["probability"].as_f64().unwrap() >= top[1]["probability"].as_f64().unwrap());
        right += (top[0]["name"] == label.as_str()) as usize;
    }
    assert!(right * 2 > lines.len(), "{right} of {} right", lines.len());

    // A classifier only takes the features it was trained on.
    let out = common::dlpipe(&["predict", "--model", "mobilenet_v2", "--classifier", &first, &images[0]]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("trained on features of model efficientnet_lite0"), "{stderr}");

    // Bad input is named: a list line without a label, a missing image.
    std::fs::write(p("bad.csv"), "uri,label\n/nope/missing.png,coat\n").unwrap();
    let out =
        common::dlpipe(&["evaluate", "--data", &p("bad.csv"), "--classifier", &p("first.safetensors"), "--no-cache"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("/nope/missing.png"), "{stderr}");
}

/// The reference: on the same features and split, `dlpipe train` comes within one
/// percentage point of scikit-learn's LogisticRegression (lbfgs). A subset here; the README
/// has the full-size numbers.
#[test]
fn dlpipe_train_matches_scikit_learn_logistic_regression_on_a_subset() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::python())
        .arg(common::root().join("tools/compare_sklearn.py"))
        .args(["--per-class-train", "100", "--per-class-test", "40"])
        .args(["--dlpipe", env!("CARGO_BIN_EXE_dlpipe")])
        .arg("--work")
        .arg(dir.path())
        .arg("--feature-cache")
        .arg(dir.path().join("cache"))
        .arg("--json")
        .arg(dir.path().join("result.json"))
        .current_dir(common::root())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}");
    assert!(out.status.success(), "compare_sklearn.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("result.json")).unwrap()).unwrap();
    assert_eq!((result["train_images"].as_u64(), result["test_images"].as_u64()), (Some(1000), Some(400)));
    let (sk, dl) = (result["sklearn_accuracy"].as_f64().unwrap(), result["dlpipe_accuracy"].as_f64().unwrap());
    assert!(sk > 0.6, "scikit-learn's accuracy {sk} is implausibly low: are the features right?");
    assert!(dl >= sk - 0.01, "dlpipe {dl} vs scikit-learn {sk}");
}
