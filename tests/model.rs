//! The exported TorchScript models through tch on CPU: a forward pass, the manifest checks, and
//! `dlpipe predict` naming the sample photos.

mod common;

use dlpipe::config::Precision;
use dlpipe::image::{read_file, ImageLimits, Preprocess};
use dlpipe::model::{crops_on_device, resolve_precision, top_k, CpuFeatures, Featurizer, ModelError, Normalise};
use dlpipe_operators::Pixels;
use fast_image_resize::Resizer;
use std::path::{Path, PathBuf};
use tch::{Device, IValue, Tensor};

#[test]
fn forward_pass_on_cpu_gives_features_and_logits() {
    let featurizer = Featurizer::load(&common::model_manifest("efficientnet_lite0"), Device::Cpu).unwrap();
    let pre = featurizer.preprocess();
    let batch = crops(pre, &[common::sample("chelsea_cat.jpg"), common::sample("coffee.jpg")]);
    let out = featurizer.forward(&batch, 2).unwrap();
    let features = out.features.as_ref().unwrap();
    assert_eq!(features.len(), 2 * 1280);
    assert!(features.iter().all(|f| f.is_finite() && *f >= 0.0), "pooled ReLU6 features are finite and non-negative");
    let names = &featurizer.manifest().class_names;
    let cat = top_k(out.logits_row(0).unwrap(), 1, names);
    let coffee = top_k(out.logits_row(1).unwrap(), 1, names);
    assert!((281..=285).contains(&cat[0].class), "the cat photo is a cat: {cat:?}");
    assert_eq!(coffee[0].class, 967, "the coffee photo is espresso: {coffee:?}");
    println!(
        "forward pass (tch {}, CPU): cat -> {:?} {:.3}, coffee -> {:?} {:.3}",
        featurizer.manifest().torch_version.as_deref().unwrap_or("?"),
        cat[0].name,
        cat[0].probability,
        coffee[0].name,
        coffee[0].probability
    );
}

#[test]
fn a_manifest_that_disagrees_with_its_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let source = common::model_manifest("mobilenet_v2");
    let mut manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&source).unwrap()).unwrap();
    std::fs::copy(source.with_extension("pt"), dir.path().join("mobilenet_v2.pt")).unwrap();

    // Wrong feature dimension: found by the warm-up forward pass.
    manifest["feature_dim"] = 1024.into();
    let path = dir.path().join("wrong_dim.json");
    std::fs::write(&path, manifest.to_string()).unwrap();
    let err = Featurizer::load(&path, Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::Mismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("[1280] per image") && err.to_string().contains("says 1024"), "{err}");

    // Another model's hash: the file is not the one the manifest describes.
    manifest["feature_dim"] = 1280.into();
    manifest["sha256"] = "0".repeat(64).into();
    std::fs::write(&path, manifest.to_string()).unwrap();
    let err = Featurizer::load(&path, Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("sha256"), "{err}");

    // A manifest naming a missing file.
    manifest["file"] = "nowhere.pt".into();
    std::fs::write(&path, manifest.to_string()).unwrap();
    let err = Featurizer::load(&path, Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("nowhere.pt"), "{err}");
}

#[test]
fn an_unknown_model_name_says_what_exists() {
    let out = common::dlpipe(&["predict", "--model", "alexnet9000", "data/samples"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("alexnet9000") && stderr.contains("efficientnet_lite0") && stderr.contains("export_model.py"),
        "{stderr}"
    );
}

#[test]
fn a_missing_cuda_device_is_a_clear_error() {
    if tch::Cuda::device_count() > 0 {
        return; // the machine has a GPU: cuda:99 is still absent, checked below
    }
    let err = dlpipe::model::parse_device("cuda:0").unwrap_err();
    assert!(err.to_string().contains("0 CUDA device"), "{err}");
    assert!(dlpipe::model::parse_device("tpu").is_err());
}

fn predict_json(model: &str, files: &[&str]) -> (std::process::Output, Vec<serde_json::Value>) {
    let mut args = vec!["predict", "--model", model, "--json", "--top-k", "3"];
    args.extend_from_slice(files);
    let out = common::dlpipe(&args);
    let lines = String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    (out, lines)
}

fn top1(line: &serde_json::Value) -> u64 {
    line["top_k"][0]["class"].as_u64().unwrap()
}

#[test]
fn predict_names_the_cat_and_the_espresso_with_both_pretrained_models() {
    for model in ["efficientnet_lite0", "mobilenet_v2"] {
        let (out, lines) = predict_json(model, &["data/samples/chelsea_cat.jpg", "data/samples/coffee.jpg"]);
        assert!(out.status.success(), "{model}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(lines.len(), 2);
        assert!((281..=285).contains(&top1(&lines[0])), "{model}: cat photo -> {}", lines[0]);
        assert_eq!(top1(&lines[1]), 967, "{model}: coffee photo -> {}", lines[1]);
        assert_eq!(lines[1]["top_k"][0]["name"], "espresso");
        println!("dlpipe predict --model {model}: {} / {}", lines[0]["top_k"][0]["name"], lines[1]["top_k"][0]["name"]);
    }
}

#[test]
fn bad_images_get_clear_errors_and_the_good_ones_still_get_predictions() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    std::fs::write(p("empty.jpg"), b"").unwrap();
    // A text file whose first bytes are a secret: the error must say what it is, not quote it.
    std::fs::write(p("text.jpg"), b"SECRET-token-91c2 is a text file, not a JPEG\n").unwrap();
    let coffee = std::fs::read(common::sample("coffee.jpg")).unwrap();
    std::fs::write(p("truncated.jpg"), &coffee[..coffee.len() / 3]).unwrap();
    // A real PNG whose header claims 60000 x 60000 pixels (a decompression bomb's shape).
    let mut png = Vec::new();
    image::DynamicImage::new_rgb8(1, 1).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    png[16..24].copy_from_slice(&[0, 0, 0xea, 0x60, 0, 0, 0xea, 0x60]);
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(p("huge.png"), &png).unwrap();
    std::fs::copy(common::sample("chelsea_cat.jpg"), p("cat.jpg")).unwrap();

    let files: Vec<String> = ["cat.jpg", "empty.jpg", "huge.png", "missing.jpg", "text.jpg", "truncated.jpg"]
        .iter()
        .map(|n| p(n).display().to_string())
        .collect();
    let refs: Vec<&str> = files.iter().map(String::as_str).collect();
    let (out, lines) = predict_json("efficientnet_lite0", &refs);
    assert!(!out.status.success(), "bad inputs make the command fail overall");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("5 of 6 input(s) could not be processed"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let by_file: std::collections::HashMap<String, &serde_json::Value> = lines
        .iter()
        .map(|l| {
            (std::path::Path::new(l["path"].as_str().unwrap()).file_name().unwrap().to_string_lossy().into_owned(), l)
        })
        .collect();
    assert!((281..=285).contains(&top1(by_file["cat.jpg"])), "the good image is still predicted");
    for (file, kind, says) in [
        ("empty.jpg", "empty", "0 bytes"),
        ("huge.png", "too_large", "60000x60000"),
        ("missing.jpg", "not_found", "missing.jpg"),
        ("text.jpg", "unsupported_format", "45 bytes of text"),
        ("truncated.jpg", "undecodable", "truncated.jpg"),
    ] {
        let line = by_file[file];
        assert_eq!(line["error_kind"], kind, "{file}: {line}");
        let error = line["error"].as_str().unwrap();
        assert!(
            error.contains(file) && error.contains(says),
            "{file}: the error names the input and the cause: {error}"
        );
        assert!(!error.contains("SECRET") && !error.contains("91c2"), "{file}: the error quotes the file: {error}");
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn the_bf16_export_still_sees_the_cat_and_the_espresso() {
    let (out, lines) =
        predict_json("efficientnet_lite0_bf16", &["data/samples/chelsea_cat.jpg", "data/samples/coffee.jpg"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!((281..=285).contains(&top1(&lines[0])), "{}", lines[0]);
    assert_eq!(top1(&lines[1]), 967, "{}", lines[1]);
}

#[test]
fn an_untrained_export_is_recorded_and_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let export = std::process::Command::new(common::python())
        .arg(common::root().join("tools/export_model.py"))
        .args(["resnet18", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let manifest_path = dir.path().join("resnet18.json");
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    assert_eq!(manifest["weights"]["source"], "untrained");
    assert_eq!(manifest["feature_dim"], 512);
    let out = common::dlpipe(&["predict", "--model", manifest_path.to_str().unwrap(), "data/samples/coffee.jpg"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("UNTRAINED"), "{stderr}");
}

#[test]
fn featurize_writes_a_npy_matrix_and_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let classes = dir.path().join("classes");
    for (class, files) in [("cats", ["chelsea_cat.jpg"]), ("drinks", ["coffee.jpg"])] {
        std::fs::create_dir_all(classes.join(class)).unwrap();
        for f in files {
            std::fs::copy(common::sample(f), classes.join(class).join(f)).unwrap();
        }
    }
    let out_file = dir.path().join("features.npy");
    let out = common::dlpipe(&[
        "featurize",
        "--model",
        "mobilenet_v2",
        "-o",
        out_file.to_str().unwrap(),
        classes.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (rows, cols, values) = dlpipe::npy::read_f32(&out_file).unwrap();
    assert_eq!((rows, cols), (2, 1280));
    // The rows are the model's features of those files: compare with a direct forward pass of
    // the export model.precision = "auto" (the default) runs here.
    let auto = resolve_precision("mobilenet_v2", &common::root().join("models"), Precision::Auto, &[Device::Cpu]);
    let featurizer = Featurizer::load(&auto.unwrap(), Device::Cpu).unwrap();
    let image = read_file(&common::sample("coffee.jpg"), &ImageLimits::default()).unwrap();
    let mut input = vec![0u8; featurizer.preprocess().crop_len()];
    featurizer.preprocess().crop(&image, &mut Resizer::new(), &mut input).unwrap();
    let direct = featurizer.forward(&input, 1).unwrap();
    let row1 = &values[1280..];
    let max_diff = row1.iter().zip(direct.features_row(0).unwrap()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(max_diff < 1e-4, "row 1 is coffee.jpg's features (max diff {max_diff})");
    let index = std::fs::read_to_string(dir.path().join("features.rows.jsonl")).unwrap();
    let labels: Vec<String> = index
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["label"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(labels, ["cats", "drinks"]);
}

#[test]
fn features_do_not_depend_on_how_images_are_batched() {
    // bf16 too: the stream's determinism across worker counts rests on it at "auto".
    for model in ["efficientnet_lite0", "efficientnet_lite0_bf16"] {
        batch_invariance(model);
    }
}

fn batch_invariance(model: &str) {
    let featurizer = Featurizer::load(&common::model_manifest(model), Device::Cpu).unwrap();
    let pre = featurizer.preprocess();
    let len = pre.crop_len();
    let names = ["chelsea_cat.jpg", "coffee.jpg", "rocket.jpg"];
    let batch = crops(pre, &names.map(common::sample));
    let together = featurizer.forward(&batch, 3).unwrap();
    for i in 0..3 {
        let alone = featurizer.forward(&batch[i * len..(i + 1) * len], 1).unwrap();
        assert!(
            alone.features_row(0) == together.features_row(i),
            "{model} {}: bit-identical alone and in a batch",
            names[i]
        );
        assert!(alone.logits_row(0) == together.logits_row(i));
    }
}

/// The crops of `paths`, back to back: the model's input bytes.
fn crops(pre: &Preprocess, paths: &[PathBuf]) -> Vec<u8> {
    let mut batch = vec![0u8; paths.len() * pre.crop_len()];
    for (path, out) in paths.iter().zip(batch.chunks_exact_mut(pre.crop_len())) {
        let image = read_file(path, &ImageLimits::default()).unwrap();
        pre.crop(&image, &mut Resizer::new(), out).unwrap();
    }
    batch
}

#[test]
fn crops_normalised_on_the_host_or_the_device_give_the_features_of_host_normalised_input_bit_for_bit() {
    let photos = [common::sample("chelsea_cat.jpg"), common::sample("rocket.jpg")];
    let fashion: Vec<PathBuf> = common::fashion(2, 0).into_iter().map(|(path, _)| path).collect();
    // efficientnet_lite0 normalises every channel alike; mobilenet_v2 (ImageNet's mean and
    // std) checks that each channel goes through its own table.
    for model in ["efficientnet_lite0", "efficientnet_lite0_bf16", "mobilenet_v2", "mobilenet_v2_bf16"] {
        let manifest = common::model_manifest(model);
        // The CPU's own path (on the host), then a GPU's (tensor operations), on the CPU.
        for normalise in [Normalise::OnHost, Normalise::OnDevice] {
            let featurizer = Featurizer::load(&manifest, Device::Cpu).unwrap().normalising(normalise);
            for paths in [&photos[..1], &fashion[..1], &[&photos[..], &fashion[..]].concat()[..]] {
                let batch = crops(featurizer.preprocess(), paths);
                let ours = featurizer.forward(&batch, paths.len()).unwrap();
                let (features, logits) = host_normalised_outputs(&manifest, &featurizer, &batch, paths.len());
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let what = format!("{model} normalised {normalise:?}, batch of {}", paths.len());
                assert_eq!(bits(ours.features.as_ref().unwrap()), bits(&features), "{what}: features");
                assert_eq!(bits(ours.logits.as_ref().unwrap()), bits(&logits), "{what}: logits");
            }
        }
    }
}

/// The reference for the device-side normalisation: the crops normalised on the host by
/// `Preprocess::normalise`, through the model file loaded by tch directly (a pair for a single
/// image, as `Featurizer::forward` runs it); the features and logits of the `n` images.
fn host_normalised_outputs(manifest: &Path, featurizer: &Featurizer, crops: &[u8], n: usize) -> (Vec<f32>, Vec<f32>) {
    let pre = featurizer.preprocess();
    let mut input = vec![0f32; n * pre.tensor_len()];
    for (crop, out) in crops.chunks_exact(pre.crop_len()).zip(input.chunks_exact_mut(pre.tensor_len())) {
        pre.normalise(crop, out);
    }
    let rows = n.max(2);
    let input = input.repeat(rows / n);
    let mut module =
        tch::CModule::load_on_device(manifest.parent().unwrap().join(&featurizer.manifest().file), Device::Cpu)
            .unwrap();
    module.set_eval();
    let (h, w) = pre.output_size();
    let input = Tensor::from_slice(&input)
        .view([rows as i64, 3, i64::from(h), i64::from(w)])
        .to_kind(featurizer.manifest().input.dtype.kind());
    let IValue::Tuple(out) = tch::no_grad(|| module.forward_is(&[IValue::Tensor(input)])).unwrap() else {
        panic!("the model returns (features, logits)")
    };
    let host = |value: &IValue| {
        let IValue::Tensor(t) = value else { panic!("a tensor") };
        let t = t.narrow(0, 0, n as i64).to_kind(tch::Kind::Float).contiguous();
        let mut values = vec![0f32; t.numel()];
        t.copy_data(&mut values, t.numel());
        values
    };
    (host(&out[0]), host(&out[1]))
}

/// Writes an image with PIL (the reference library), so the test covers files as cameras and
/// other tools write them rather than as `image` writes them.
fn pil_write(script: &str, path: &std::path::Path) {
    let out = std::process::Command::new(common::python()).arg("-c").arg(script).arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn exif_orientation_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rotated.jpg");
    // Stored 40 wide x 20 high, left half red, right half blue; EXIF orientation 6 says
    // "rotate 90 degrees clockwise to display", so upright it is 20 x 40 with red on top.
    pil_write(
        "import sys; from PIL import Image\n\
         im = Image.new('RGB', (40, 20), (0, 0, 255)); im.paste((255, 0, 0), (0, 0, 20, 20))\n\
         exif = Image.Exif(); exif[0x0112] = 6\n\
         im.save(sys.argv[1], quality=95, exif=exif.tobytes())",
        &path,
    );
    let image = read_file(&path, &ImageLimits::default()).unwrap();
    assert_eq!(image.dimensions(), (20, 40), "upright dimensions");
    let (top, bottom) = (image.get_pixel(10, 5), image.get_pixel(10, 35));
    assert!(top[0] > 200 && top[2] < 60, "red on top after rotation: {top:?}");
    assert!(bottom[2] > 200 && bottom[0] < 60, "blue at the bottom: {bottom:?}");
}

#[test]
fn cmyk_jpeg_and_palette_gif_become_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let cmyk = dir.path().join("cmyk.jpg");
    // Pure cyan in CMYK is (0, 255, 255) in RGB.
    pil_write(
        "import sys; from PIL import Image\nImage.new('CMYK', (16, 16), (255, 0, 0, 0)).save(sys.argv[1], quality=95)",
        &cmyk,
    );
    let image = read_file(&cmyk, &ImageLimits::default()).unwrap();
    let p = image.get_pixel(8, 8);
    assert!(p[0] < 40 && p[1] > 215 && p[2] > 215, "cyan: {p:?}");
    let gif = dir.path().join("palette.gif");
    pil_write(
        "import sys; from PIL import Image\nImage.new('RGB', (16, 16), (0, 255, 0)).convert('P').save(sys.argv[1])",
        &gif,
    );
    let p = *read_file(&gif, &ImageLimits::default()).unwrap().get_pixel(3, 3);
    assert!(p[1] > 215 && p[0] < 40 && p[2] < 40, "green: {p:?}");
}

#[test]
fn model_precision_picks_the_export_auto_by_the_cpus_bf16_and_explicit_ones_or_a_clear_error() {
    let models = common::root().join("models");
    let pick = |name: &str, precision: Precision, devices: &[Device]| {
        resolve_precision(name, &models, precision, devices)
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
    };
    let cpu = [Device::Cpu];
    assert_eq!(pick("efficientnet_lite0", Precision::F32, &cpu).unwrap(), "efficientnet_lite0.json");
    assert_eq!(pick("efficientnet_lite0", Precision::Bf16, &cpu).unwrap(), "efficientnet_lite0_bf16.json");
    assert_eq!(pick("efficientnet_lite0_bf16", Precision::F32, &cpu).unwrap(), "efficientnet_lite0.json");
    assert_eq!(pick("efficientnet_lite0_bf16", Precision::Auto, &cpu).unwrap(), "efficientnet_lite0_bf16.json");
    let native = CpuFeatures::detect().native_bf16();
    println!("this CPU: {:?}, native bf16 {native}", CpuFeatures::detect().names());
    let auto = if native { "mobilenet_v2_bf16.json" } else { "mobilenet_v2.json" };
    assert_eq!(pick("mobilenet_v2", Precision::Auto, &cpu).unwrap(), auto);

    let f16 = pick("efficientnet_lite0", Precision::F16, &cpu).unwrap_err().to_string();
    assert!(f16.contains("model.precision = \"f16\"") && f16.contains("CPU"), "{f16}");
    // A model with only its f32 export: "auto" runs it in f32, an explicit bf16 is an error
    // that says how to export one.
    let dir = tempfile::tempdir().unwrap();
    for file in ["mobilenet_v2.json", "mobilenet_v2.pt"] {
        std::os::unix::fs::symlink(models.join(file), dir.path().join(file)).unwrap();
    }
    let only_f32 = |precision| resolve_precision("mobilenet_v2", dir.path(), precision, &cpu);
    assert_eq!(only_f32(Precision::Auto).unwrap(), dir.path().join("mobilenet_v2.json"));
    let bf16 = only_f32(Precision::Bf16).unwrap_err().to_string();
    assert!(bf16.contains("model.precision = \"bf16\"") && bf16.contains("--dtype bf16"), "{bf16}");
}

#[test]
fn an_impossible_precision_stops_the_command_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("f16.toml");
    let models = common::root().join("models");
    std::fs::write(&config, format!("[model]\ndir = {:?}\nprecision = \"f16\"\n", models.display().to_string()))
        .unwrap();
    let out = common::dlpipe(&["-c", config.to_str().unwrap(), "predict", "data/samples/coffee.jpg"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("model.precision = \"f16\""), "{stderr}");
    std::fs::write(&config, "[model]\nprecision = \"f8\"\n").unwrap();
    let out = common::dlpipe(&["-c", config.to_str().unwrap(), "predict", "data/samples/coffee.jpg"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("precision") && stderr.contains("bf16"), "{stderr}");
}

/// `paths` decoded, as the stream carries an image for the device to resize.
fn decoded(paths: &[PathBuf]) -> Vec<Pixels> {
    paths
        .iter()
        .map(|path| {
            let image = read_file(path, &ImageLimits::default()).unwrap();
            let (width, height) = image.dimensions();
            Pixels::Image { width, height, rgb: image.into_raw() }
        })
        .collect()
}

#[test]
fn images_resized_on_the_device_match_the_hosts_crops() {
    let photos: Vec<PathBuf> =
        ["chelsea_cat.jpg", "coffee.jpg", "astronaut.jpg", "motorcycle.jpg"].map(common::sample).to_vec();
    let fashion: Vec<PathBuf> = common::fashion(10, 0).into_iter().map(|(path, _)| path).collect();
    let source = common::model_manifest("efficientnet_lite0");
    // PIL's bicubic too: the same model under a manifest that asks for it.
    let dir = tempfile::tempdir().unwrap();
    let mut bicubic: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&source).unwrap()).unwrap();
    bicubic["input"]["interpolation"] = "bicubic".into();
    bicubic["file"] = source.with_extension("pt").to_str().unwrap().into();
    std::fs::write(dir.path().join("bicubic.json"), bicubic.to_string()).unwrap();
    for manifest in [source, dir.path().join("bicubic.json")] {
        let featurizer = Featurizer::load(&manifest, Device::Cpu).unwrap();
        let pre = featurizer.preprocess();
        let filter = if pre.bicubic() { "bicubic" } else { "bilinear" };
        // A few bytes in a thousand differ, where the host's fixed-point sums and the device's
        // float ones round apart (by two where bicubic's lobes add up); bilinear upscaling, none.
        let limits = if pre.bicubic() { [(0.005, 2), (0.01, 2)] } else { [(0.002, 1), (0.0, 0)] };
        for (paths, (most_off, most_far)) in [&photos, &fashion].into_iter().zip(limits) {
            let images = decoded(paths);
            let on_device = crops_on_device(&images.iter().collect::<Vec<_>>(), pre, Device::Cpu).unwrap();
            let on_host = crops(pre, paths);
            let off = on_device.iter().zip(&on_host).filter(|(d, h)| d != h).count();
            let furthest = on_device.iter().zip(&on_host).map(|(d, h)| d.abs_diff(*h)).max().unwrap();
            let share = off as f64 / on_host.len() as f64;
            println!(
                "{filter}, {} images: {off} of {} bytes off the host's by at most {furthest}",
                paths.len(),
                on_host.len()
            );
            assert!(
                furthest <= most_far && share <= most_off,
                "{filter} {paths:?}: {share:.4} of the bytes off by up to {furthest}"
            );
        }
    }
}

#[test]
fn a_batch_of_crops_and_images_of_several_sizes_gives_each_images_own_features() {
    // What the stream runs with model.resize_on = "device": photos cropped by the host beside
    // 28x28 images sent as decoded (and a 56x40 one, another size in the same batch).
    let featurizer = Featurizer::load(&common::model_manifest("efficientnet_lite0"), Device::Cpu).unwrap();
    let pre = featurizer.preprocess();
    let fashion: Vec<PathBuf> = common::fashion(3, 0).into_iter().map(|(path, _)| path).collect();
    let photo = common::sample("coffee.jpg");
    let small = image::imageops::thumbnail(&read_file(&photo, &ImageLimits::default()).unwrap(), 56, 40);
    let mut batch = vec![Pixels::Crop(crops(pre, std::slice::from_ref(&photo)))];
    batch.extend(decoded(&fashion));
    batch.push(Pixels::Image { width: 56, height: 40, rgb: small.into_raw() });
    let together = featurizer.forward_pixels(&batch.iter().collect::<Vec<_>>()).unwrap();
    for (i, pixels) in batch.iter().enumerate() {
        let alone = featurizer.forward_pixels(&[pixels]).unwrap();
        assert!(alone.features_row(0) == together.features_row(i), "image {i}: bit-identical alone and in the batch");
    }
    // Fashion-MNIST resized on the device is the host's crop exactly: the same features.
    let host = featurizer.forward(&crops(pre, &fashion), 3).unwrap();
    for (i, path) in fashion.iter().enumerate() {
        assert!(host.features_row(i) == together.features_row(i + 1), "{}", path.display());
    }
    // Pixels that are not the image they claim to be: an error, not a panic.
    let bad = Pixels::Image { width: 3, height: 2, rgb: vec![0; 5] };
    let err = featurizer.forward_pixels(&[&bad, &batch[0]]).unwrap_err();
    assert!(err.to_string().contains("3x2 image of 5 bytes"), "{err}");
}

#[test]
fn featurize_and_predict_follow_model_resize_on_and_give_the_hosts_results_on_fashion_mnist() {
    // The batch commands resize where the stream would; on 28x28 images the device's crops are
    // the host's byte for byte, so features and predictions are too.
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<String> = common::fashion(12, 40).into_iter().map(|(p, _)| p.display().to_string()).collect();
    let run = |resize_on: &str, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dlpipe"))
            .args(args)
            .args(&images)
            .current_dir(common::root())
            .env_remove("DLPIPE_CONFIG")
            .env("DLPIPE__MODEL__RESIZE_ON", resize_on)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out
    };
    let mut features = Vec::new();
    for resize_on in ["host", "device"] {
        let npy = dir.path().join(format!("{resize_on}.npy"));
        let out = run(resize_on, &["featurize", "--no-cache", "-o", npy.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("resize_on={resize_on}")), "{stderr}");
        features.push(dlpipe::npy::read_f32(&npy).unwrap());
    }
    assert_eq!(features[0].0, 12);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&features[0].2), bits(&features[1].2), "the same features, bit for bit");
    let predictions = ["host", "device"].map(|r| run(r, &["predict", "--json"]).stdout);
    assert!(!predictions[0].is_empty() && predictions[0] == predictions[1], "the same predictions");
}
