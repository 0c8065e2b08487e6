//! `dlpipe bench`: the throughput figures that shape the design, as one table per stage, on this
//! machine's devices. Inputs are the shipped sample data, held in memory so that disks do not
//! enter the numbers.

use super::load_featurizer;
use dlpipe::config::{Config, HeadKind, StartFrom};
use dlpipe::image::{decode, list_images, Preprocess};
use dlpipe::kafka::{ensure_topic, Publisher, TopicSpec};
use dlpipe::pipeline::{run as run_pipeline, RunOptions};
use dlpipe_operators::EpochPolicy;
use fast_image_resize::Resizer;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Models to time the forward pass of (names in models/, e.g. efficientnet_lite0_bf16).
    #[arg(long, value_delimiter = ',', default_values_t = ["efficientnet_lite0".to_string(), "efficientnet_lite0_bf16".into(), "mobilenet_v2".into(), "mobilenet_v2_bf16".into()])]
    models: Vec<String>,
    /// Batch sizes of the forward pass.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32, 64])]
    batch_sizes: Vec<usize>,
    /// Device for the forward pass [default: first of model.devices].
    #[arg(long)]
    device: Option<String>,
    /// Minimum measuring time per cell, in seconds.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Photos for the decode benchmark.
    #[arg(long, default_value = "data/samples")]
    photos: PathBuf,
    /// Small PNGs for the decode benchmark (Fashion-MNIST's test split).
    #[arg(long, default_value = "data/fashion-mnist/test/sneaker")]
    small: PathBuf,
    /// Skip the forward-pass table.
    #[arg(long)]
    no_forward: bool,
    /// Also time the whole stream: this many records (the photos, repeated) through real Kafka
    /// and `dlpipe run`'s pipeline, against the model's own forward pass at model.batch_size.
    #[arg(long, value_name = "RECORDS")]
    pipeline: Option<usize>,
    /// Timely workers of the pipeline benchmark.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

/// Runs `f` until at least `min` has passed and at least `min_runs` runs; returns runs per second.
fn measure(min: Duration, min_runs: usize, mut f: impl FnMut()) -> f64 {
    let started = Instant::now();
    let mut runs = 0;
    while runs < min_runs || started.elapsed() < min {
        f();
        runs += 1;
    }
    runs as f64 / started.elapsed().as_secs_f64()
}

pub fn run(config: &Config, args: BenchArgs) -> anyhow::Result<()> {
    let min = Duration::from_secs_f64(args.seconds);
    println!("## decode + preprocess (one thread, to 3x224x224 f32; resize 256, centre crop)\n");
    println!("| input | images | mean size | images/s per core |");
    println!("|---|---:|---|---:|");
    let pre = Preprocess::new(224, 224, 256, [0.5; 3], [0.5; 3])?;
    for (label, folder, take) in
        [("photos (JPEG)", &args.photos, usize::MAX), ("Fashion-MNIST (PNG 28x28)", &args.small, 500)]
    {
        let paths: Vec<PathBuf> = list_images(std::slice::from_ref(folder))?.into_iter().take(take).collect();
        if paths.is_empty() {
            println!("| {label} | 0 | no images in {} (run make setup) | |", folder.display());
            continue;
        }
        let encoded: Vec<Vec<u8>> = paths.iter().map(std::fs::read).collect::<Result<_, _>>()?;
        let mut pixels = 0u64;
        for bytes in &encoded {
            let image = decode(bytes, &config.image)?;
            pixels += u64::from(image.width()) * u64::from(image.height());
        }
        let side = ((pixels / encoded.len() as u64) as f64).sqrt();
        let mut resizer = Resizer::new();
        let mut out = vec![0f32; pre.tensor_len()];
        let sets_per_s = measure(min, 1, || {
            for bytes in &encoded {
                let image = decode(bytes, &config.image).expect("decoded above");
                pre.run(&image, &mut resizer, &mut out).expect("valid");
            }
        });
        println!(
            "| {label} | {} | ~{side:.0}x{side:.0} px | {:.0} |",
            encoded.len(),
            sets_per_s * encoded.len() as f64
        );
    }
    if !args.no_forward {
        forward_table(config, &args, min)?;
    }
    if let Some(records) = args.pipeline {
        pipeline_table(config, &args, records)?;
    }
    Ok(())
}

fn forward_table(config: &Config, args: &BenchArgs, min: Duration) -> anyhow::Result<()> {
    println!("\n## forward pass (images/s; libtorch {} thread(s))\n", tch::get_num_threads());
    let header: Vec<String> = args.batch_sizes.iter().map(|b| format!("batch {b}")).collect();
    println!("| model | device | {} |", header.join(" | "));
    println!("|---|---|{}", "---:|".repeat(args.batch_sizes.len()));
    for model in &args.models {
        let featurizer = match load_featurizer(config, Some(model), args.device.as_deref()) {
            Ok(f) => f,
            Err(e) => {
                println!("| {model} | | {e:#} |");
                continue;
            }
        };
        let len = featurizer.preprocess().tensor_len();
        let mut cells = Vec::new();
        for &batch in &args.batch_sizes {
            let input: Vec<f32> = (0..batch * len).map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0).collect();
            featurizer.forward(&input, batch)?; // warm-up: allocator, oneDNN / cuDNN algorithm choice
            let batches_per_s = measure(min, 3, || {
                featurizer.forward(&input, batch).expect("forward ran in warm-up");
            });
            cells.push(format!("{:.1}", batches_per_s * batch as f64));
        }
        println!("| {model} | {:?} | {} |", featurizer.device(), cells.join(" | "));
    }
    Ok(())
}

/// End-to-end images/s through real Kafka (publish is not timed; reading, decoding, the model,
/// the classifier, publishing predictions and committing are), next to the forward pass alone.
fn pipeline_table(config: &Config, args: &BenchArgs, records: usize) -> anyhow::Result<()> {
    let photos = list_images(std::slice::from_ref(&args.photos))?;
    anyhow::ensure!(!photos.is_empty(), "no photos in {} (run make setup)", args.photos.display());
    let run_id = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis()
    );
    let mut config = config.clone();
    let p = &mut config.pipeline;
    p.input_topic = format!("bench-images-{run_id}");
    p.predictions_topic = format!("bench-predictions-{run_id}");
    p.dead_letter_topic = format!("bench-dead-letters-{run_id}");
    p.group_id = format!("bench-{run_id}");
    p.head = HeadKind::Imagenet;
    p.stop_at_end = true;
    p.start_from = StartFrom::Earliest;
    p.epochs = EpochPolicy::Offsets { records: 64 };
    let partitions = (2 * args.workers).max(2) as i32;
    let spec = TopicSpec { partitions, replication_factor: p.topic_replication_factor, configs: &[] };
    ensure_topic(&config.kafka, &p.input_topic, spec)?;
    let uris: Vec<String> = photos
        .iter()
        .map(|p| Ok(format!("file://{}", std::fs::canonicalize(p)?.display())))
        .collect::<std::io::Result<_>>()?;
    let publisher = Publisher::new(&config.kafka)?;
    for i in 0..records {
        let record = serde_json::json!({"id": format!("b{i}"), "uri": uris[i % uris.len()]});
        publisher.send(&p.input_topic, &format!("b{i}"), &record.to_string())?;
    }
    publisher.finish(Duration::from_secs(60))?;

    let batch = config.model.batch_size;
    let featurizer = load_featurizer(&config, None, args.device.as_deref())?;
    let len = featurizer.preprocess().tensor_len();
    let input: Vec<f32> = (0..batch * len).map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0).collect();
    featurizer.forward(&input, batch)?;
    let forward = batch as f64
        * measure(Duration::from_secs(5), 3, || {
            featurizer.forward(&input, batch).expect("forward ran in warm-up");
        });
    drop(featurizer);

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    run_pipeline(RunOptions {
        config,
        timely_args: vec!["-w".into(), args.workers.to_string()],
        init_model: None,
        fresh: true,
        stop,
    })?;
    let end_to_end = records as f64 / started.elapsed().as_secs_f64();
    println!(
        "\n## end to end through Kafka ({records} photos, {} worker(s), batch {batch}, imagenet head)\n",
        args.workers
    );
    println!("| forward pass alone | pipeline, Kafka to Kafka | ratio |");
    println!("|---:|---:|---:|");
    println!("| {forward:.1} images/s | {end_to_end:.1} images/s | {:.0}% |", 100.0 * end_to_end / forward);
    println!("\n(The pipeline's time includes loading the model and joining the topic: about a second.)");
    Ok(())
}
