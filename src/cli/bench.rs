//! `dlpipe bench`: the throughput figures that shape the design, as one table per stage, on this
//! machine's devices. Inputs are the shipped sample data, held in memory so that disks do not
//! enter the numbers.

use super::bench_learning::{learning_table, LearningArgs};
use super::load_featurizer;
use anyhow::Context;
use dlpipe::config::{Config, DeliveryGuarantee, HeadKind, Precision, ResizeOn, StartFrom};
use dlpipe::fetch::Fetcher;
use dlpipe::image::{decode, list_images, Preprocess};
use dlpipe::kafka::{ensure_topic, Publisher, TopicSpec};
use dlpipe::model::{crops_on_device, parse_device, set_intra_op_threads};
use dlpipe::pipeline::{run as run_pipeline, RunOptions};
use dlpipe_operators::{EpochPolicy, Pixels};
use fast_image_resize::Resizer;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Models to time the forward pass of (names in models/), each at every one of --precisions.
    #[arg(long, value_delimiter = ',', default_values_t = ["efficientnet_lite0".to_string(), "mobilenet_v2".into()])]
    models: Vec<String>,
    /// Precisions (model.precision) to time side by side, in the forward-pass table and in
    /// the pipeline benchmark: auto, f32, bf16, f16.
    #[arg(long, value_delimiter = ',', default_values_t = [Precision::F32, Precision::Bf16])]
    precisions: Vec<Precision>,
    /// Batch sizes of the forward pass.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32, 64])]
    batch_sizes: Vec<usize>,
    /// Device for the forward pass [default: first of model.devices].
    #[arg(long)]
    device: Option<String>,
    /// Minimum measuring time per cell, in seconds (the pipeline's model-alone rate: 2.5x).
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
    /// Also time the pipeline from an object store: the photos are uploaded under this prefix
    /// (e.g. `s3://dlpipe/bench/`: the bucket must exist; `[fetch.stores.*]` say where the store is
    /// and the credentials) and the same runs are timed from there beside `file://`.
    #[arg(long, value_name = "PREFIX", requires = "pipeline")]
    store: Option<String>,
    /// Backlog runs of the pipeline benchmark per source and delivery, each against the model
    /// alone timed just before and after it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Where the pipeline benchmark resizes images (auto, host, device) [default: model.resize_on].
    #[arg(long)]
    resize_on: Option<ResizeOn>,
    /// Timely workers of the pipeline benchmark.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Delivery guarantees of the pipeline benchmark, each timed for throughput (a backlog of
    /// RECORDS) and for latency (a paced stream).
    #[arg(long, value_delimiter = ',', default_values_t = [DeliveryGuarantee::AtLeastOnce])]
    delivery: Vec<DeliveryGuarantee>,
    /// Records per second of the paced stream whose latency the pipeline benchmark measures
    /// [default: half the forward pass's images/s].
    #[arg(long)]
    latency_rate: Option<f64>,
    /// Seconds of paced stream per delivery mode.
    #[arg(long, default_value_t = 20.0)]
    latency_seconds: f64,
    /// Also measure the feedback join alone: memory (RSS) with this many unlabelled images of
    /// 1280 features retained, and after their retention; labels joined per second.
    #[arg(long, value_name = "IDS")]
    feedback_join: Option<usize>,
    #[command(flatten)]
    learning: LearningArgs,
}

/// Images per second `device` resizes and crops `encoded`'s images at, as the stream sends
/// them with `model.resize_on = "device"`: decoded, in batches of model.batch_size.
fn device_resize_per_s(encoded: &[Vec<u8>], config: &Config, pre: &Preprocess, device: Device) -> anyhow::Result<f64> {
    let images: Vec<Pixels> = encoded
        .iter()
        .map(|bytes| {
            let image = decode(bytes, &config.image)?;
            let (width, height) = image.dimensions();
            Ok(Pixels::Image { width, height, rgb: image.into_raw() })
        })
        .collect::<anyhow::Result<_>>()?;
    let batches: Vec<Vec<&Pixels>> = images.chunks(config.model.batch_size).map(|c| c.iter().collect()).collect();
    let threads = tch::get_num_threads();
    if device == Device::Cpu {
        tch::set_num_threads(1);
    }
    crops_on_device(&batches[0], pre, device)?;
    let sets_per_s = measure(Duration::from_secs(1), 1, || {
        for batch in &batches {
            std::hint::black_box(crops_on_device(batch, pre, device).expect("ran above"));
        }
    });
    tch::set_num_threads(threads);
    Ok(sets_per_s * images.len() as f64)
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
    // The stream's decode stage: the crop's bytes; the model's device normalises them.
    println!("## decode + resize + crop (one thread, to 224x224 RGB bytes; resize 256, centre crop)\n");
    let device_name = args.device.as_deref().unwrap_or(&config.model.devices[0]);
    let device = parse_device(device_name)?;
    println!(
        "| input | images | mean size | images/s per core | decode alone | share of the time in decode | \
         resize + crop on {device_name} |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|");
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
        let mut out = vec![0u8; pre.crop_len()];
        let sets_per_s = measure(min, 1, || {
            for bytes in &encoded {
                let image = decode(bytes, &config.image).expect("decoded above");
                pre.crop(&image, &mut resizer, &mut out).expect("valid");
            }
        });
        // Decode alone: what is left on the host if resize and crop moved to the model's device.
        let decoded_per_s = measure(min, 1, || {
            for bytes in &encoded {
                std::hint::black_box(decode(bytes, &config.image).expect("decoded above"));
            }
        });
        let on_device = device_resize_per_s(&encoded, config, &pre, device)?;
        let n = encoded.len() as f64;
        println!(
            "| {label} | {} | ~{side:.0}x{side:.0} px | {:.0} | {:.0} | {:.0}% | {on_device:.0} |",
            encoded.len(),
            sets_per_s * n,
            decoded_per_s * n,
            100.0 * sets_per_s / decoded_per_s
        );
    }
    println!(
        "\n(Resize + crop on the device: images/s of what `model.resize_on = \"device\"` moves there, from \
         decoded bytes on the host to crops on the device, in batches of model.batch_size; on a CPU, one \
         libtorch thread.)"
    );
    if !args.no_forward {
        // On a thread of its own, as the workers run the model (see `ModelAlone::time`).
        std::thread::scope(|scope| scope.spawn(|| forward_table(config, &args, min)).join())
            .expect("the forward-pass table panicked")?;
    }
    if let Some(records) = args.pipeline {
        for &precision in &args.precisions {
            let mut config = with_precision(config, precision);
            config.model.resize_on = args.resize_on.unwrap_or(config.model.resize_on);
            pipeline_table(&config, &args, records)?;
        }
    }
    if let Some(ids) = args.feedback_join {
        feedback_join_table(ids)?;
    }
    if let Some(dir) = &args.learning.learning {
        learning_table(config, &args.learning, dir)?;
    }
    Ok(())
}

/// This process's resident memory, from /proc (Linux).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Features per image of the feedback join benchmark.
const FEEDBACK_DIM: usize = 1280;

/// The `i`-th unlabelled image of the feedback join benchmark, at input offset `offset`, with
/// pseudo-random features drawn from `seed` (an LCG: cheap, and never the same twice).
fn unlabelled_image(id: String, i: usize, offset: usize, seed: &mut u64) -> dlpipe_operators::Featured {
    let features: Vec<f32> = (0..FEEDBACK_DIM)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (*seed >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    let record = dlpipe_operators::ImageRecord {
        id,
        uri: String::new(),
        label: None,
        partition: (i % 4) as i32,
        offset: offset as i64,
        kafka_ts_ms: None,
        image: None,
    };
    dlpipe_operators::Featured { record, features, logits: None }
}

/// The feedback join on one timely worker, in this process: `ids` unlabelled images of 1280
/// features over 10 epochs (retention 20 epochs), then a label for each in epoch 10, then
/// epochs past every retention with nothing new. Prints RSS at each stage and the join's rate.
fn feedback_join_table(ids: usize) -> anyhow::Result<()> {
    use dlpipe_operators::{feedback_join, Feedback, FeedbackJoinMetrics};
    use timely::dataflow::operators::Probe;
    use timely::dataflow::InputHandle;
    const EPOCHS: u64 = 10;
    const RETENTION: u64 = 20;
    let mib = |b: Option<u64>| b.map_or("?".to_string(), |b| format!("{:.0}", b as f64 / (1 << 20) as f64));
    let mut config = timely::Config::thread();
    dlpipe_operators::feedback_join::configure(&mut config.worker);
    let guards = timely::execute(config, move |worker| {
        let metrics = FeedbackJoinMetrics::default();
        let (mut images, mut labels) = (InputHandle::new(), InputHandle::new());
        let probe = worker.dataflow::<u64, _, _>(|scope| {
            let joined = feedback_join(images.to_stream(scope), labels.to_stream(scope), RETENTION, metrics.clone());
            let (probe, _) = joined.examples.probe();
            probe
        });
        let step_to = |worker: &mut timely::worker::Worker, epoch: u64| {
            while probe.less_than(&epoch) {
                worker.step();
            }
        };
        let record = |row: &mut Vec<(String, String)>, what: &str, extra: String| {
            row.push((what.to_owned(), format!("{} MiB{extra}", mib(rss_bytes()))));
        };
        let mut out: Vec<(String, String)> = Vec::new();
        record(&mut out, "before", String::new());
        let mut seed = 1u64;
        // Two waves: the second shows whether memory freed by the first's retention is reused.
        for wave in 0..2 {
            let base = wave as u64 * (EPOCHS + 3 * RETENTION + 2);
            let per_epoch = ids.div_ceil(EPOCHS as usize);
            let started = Instant::now();
            for i in 0..ids {
                let epoch = base + (i / per_epoch) as u64;
                if epoch > *images.time() {
                    images.advance_to(epoch);
                    labels.advance_to(epoch);
                    step_to(worker, epoch);
                }
                images.send(unlabelled_image(format!("image-{wave}-{i:08}"), i, wave * ids + i, &mut seed));
            }
            images.advance_to(base + EPOCHS);
            labels.advance_to(base + EPOCHS);
            step_to(worker, base + EPOCHS);
            let retained = (metrics.retained_images.get(), metrics.retained_bytes.get());
            record(
                &mut out,
                &format!("wave {}: {ids} images retained", wave + 1),
                format!(
                    " ({} images, {} MiB of features; fed in {:.1} s)",
                    retained.0,
                    mib(Some(retained.1 as u64)),
                    started.elapsed().as_secs_f64()
                ),
            );
            let started = Instant::now();
            for i in 0..ids {
                let id = format!("image-{wave}-{i:08}");
                labels.send(Feedback {
                    id,
                    label: format!("class-{}", i % 10),
                    ts_ms: 0,
                    partition: 0,
                    offset: (wave * ids + i) as i64,
                });
            }
            images.advance_to(base + EPOCHS + 1);
            labels.advance_to(base + EPOCHS + 1);
            step_to(worker, base + EPOCHS + 1);
            let seconds = started.elapsed().as_secs_f64();
            record(
                &mut out,
                &format!("wave {}: {ids} labels joined", wave + 1),
                format!(" ({} pairs in all, {:.0} labels/s)", metrics.joined.get(), ids as f64 / seconds),
            );
            let past = base + EPOCHS + 3 * RETENTION + 2;
            images.advance_to(past);
            labels.advance_to(past);
            step_to(worker, past);
            // Give the arrangements' idle merging a moment to compact what was retracted.
            for _ in 0..1000 {
                worker.step();
            }
            record(
                &mut out,
                &format!("wave {}: after the retention", wave + 1),
                format!(" ({} images retained)", metrics.retained_images.get()),
            );
        }
        out
    })
    .map_err(anyhow::Error::msg)?;
    let rows: Vec<(String, String)> = guards.join().into_iter().flat_map(|r| r.unwrap_or_default()).collect();
    println!("\n## feedback join (one worker, {FEEDBACK_DIM} features, retention {RETENTION} epochs)\n");
    print_table(["stage", "resident memory"], rows);
    Ok(())
}

/// A two-column Markdown table.
fn print_table(header: [&str; 2], rows: Vec<(String, String)>) {
    println!("| {} | {} |\n|---|---|", header[0], header[1]);
    for (a, b) in rows {
        println!("| {a} | {b} |");
    }
}

/// Runs the model a few times before it is timed: the allocator, oneDNN's or cuDNN's choice of
/// algorithms, and TorchScript's profiling executor, which optimises the graph on the second
/// run of a shape (seconds on this CPU) and would otherwise be counted as forward time.
fn warm_up(featurizer: &dlpipe::model::Featurizer, input: &[u8], batch: usize) -> anyhow::Result<()> {
    for _ in 0..3 {
        featurizer.forward(input, batch)?;
    }
    Ok(())
}

/// `batch` crops of varied bytes: the model's time does not depend on what the pixels show.
fn synthetic_crops(featurizer: &dlpipe::model::Featurizer, batch: usize) -> Vec<u8> {
    (0..batch * featurizer.preprocess().crop_len()).map(|i| ((i * 7919) % 256) as u8).collect()
}

/// `config` with model.precision = `precision`.
fn with_precision(config: &Config, precision: Precision) -> Config {
    let mut config = config.clone();
    config.model.precision = precision;
    config
}

fn forward_table(config: &Config, args: &BenchArgs, min: Duration) -> anyhow::Result<()> {
    println!(
        "\n## forward pass (images/s of synthetic crops, normalisation on the device included; libtorch {} thread(s))\n",
        tch::get_num_threads()
    );
    let header: Vec<String> = args.batch_sizes.iter().map(|b| format!("batch {b}")).collect();
    println!("| model | precision | device | {} |", header.join(" | "));
    println!("|---|---|---|{}", "---:|".repeat(args.batch_sizes.len()));
    let runs = args.models.iter().flat_map(|m| args.precisions.iter().map(move |p| (m, *p)));
    for (model, precision) in runs {
        let featurizer = match load_featurizer(&with_precision(config, precision), Some(model), args.device.as_deref())
        {
            Ok(f) => f,
            Err(e) => {
                println!("| {model} | {precision} | | {e:#} |");
                continue;
            }
        };
        let mut cells = Vec::new();
        for &batch in &args.batch_sizes {
            let input = synthetic_crops(&featurizer, batch);
            warm_up(&featurizer, &input, batch)?;
            let batches_per_s = measure(min, 3, || {
                featurizer.forward(&input, batch).expect("forward ran in warm-up");
            });
            cells.push(format!("{:.1}", batches_per_s * batch as f64));
        }
        let name = &featurizer.manifest().name;
        println!("| {name} | {precision} | {:?} | {} |", featurizer.device(), cells.join(" | "));
    }
    Ok(())
}

/// Per delivery mode: end-to-end images/s through real Kafka on a backlog (publishing the
/// input is not timed; reading, decoding, the model, the head, publishing predictions and
/// committing are), next to the forward pass alone; and the latency of a paced stream, from
/// sending a record to its prediction being visible to a `read_committed` consumer.
fn pipeline_table(config: &Config, args: &BenchArgs, records: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        records >= 10,
        "--pipeline {records}: time at least 10 records (the sustained rate is of the middle 80%)"
    );
    let photos = list_images(std::slice::from_ref(&args.photos))?;
    anyhow::ensure!(!photos.is_empty(), "no photos in {} (run make setup)", args.photos.display());
    let uris: Vec<String> = photos
        .iter()
        .map(|p| Ok(format!("file://{}", std::fs::canonicalize(p)?.display())))
        .collect::<std::io::Result<_>>()?;
    let fetcher = Fetcher::new(config.fetch.clone())?;
    let mut sources = vec![uris];
    if let Some(prefix) = &args.store {
        sources.push(upload(&fetcher, prefix, &photos)?);
    }

    let batch = config.model.batch_size;
    let load_before = load_average();
    let Bracketed { runs, first_alone, model, alone_cores: (min_cores, max_cores) } =
        bracketed_backlog_runs(config, args, &sources, records, batch)?;
    let load_after = load_average();
    let rate = args.latency_rate.unwrap_or(first_alone / 2.0);
    anyhow::ensure!(rate > 0.0, "--latency-rate must be positive");
    let paced = ((rate * args.latency_seconds) as usize).max(10);
    let mut latency_rows = Vec::new();
    for uris in &sources {
        let fetch_ms = fetch_cost_ms(&fetcher, uris, config.image.max_encoded_bytes)?;
        for &delivery in &args.delivery {
            let latencies = paced_run(config, args, uris, delivery, rate, paced)?;
            latency_rows.push((dlpipe::fetch::UriScheme::of(&uris[0]).as_str(), fetch_ms, delivery, latencies));
        }
    }
    println!(
        "\n## end to end through Kafka ({model}, precision {}, resize on {}, {} worker(s), batch {batch}, imagenet head, \
         epochs {})\n",
        config.model.precision,
        config.model.resize_on.resolve(config.model.devices.iter().all(|d| parse_device(d).is_ok_and(|d| d.is_cuda()))),
        args.workers,
        match config.pipeline.epochs {
            EpochPolicy::Time { millis } => format!("of {millis} ms"),
            EpochPolicy::Offsets { records } => format!("of {records} offsets"),
        }
    );
    println!(
        "A backlog of {records} records ({} photos, each fetched {} times), {} run(s) per source and delivery.\n",
        photos.len(),
        records.div_ceil(photos.len()),
        args.runs
    );
    println!("| source | delivery | forward pass alone | pipeline, whole run | sustained (middle 80%) | ratio |");
    println!("|---|---|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for BacklogRun { scheme, delivery, forward, throughput } in runs {
        let ratio = throughput.sustained / forward;
        ratios.push(ratio);
        println!(
            "| {scheme} | {delivery} | {forward:.1} images/s | {:.1} images/s | {:.1} images/s | {:.0}% |",
            throughput.wall,
            throughput.sustained,
            100.0 * ratio
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "\nRatio: median {:.0}%, lowest {:.0}%, highest {:.0}%. Forward pass alone: {} instance(s) at once, one per \
         worker, {} libtorch thread(s) each, timed before and after every backlog run (the ratio is against the mean \
         of the two), using {min_cores:.2}-{max_cores:.2} cores. Load average {load_before:.2} before, \
         {load_after:.2} after, on {} cores: where the model alone got far fewer cores than its {} threads, other \
         processes held them and the figures say little. The whole run's images/s include loading the model and \
         joining the group, about a second; the sustained rate is over the middle 80% of the predictions (their \
         Kafka timestamps), without the run's start and end.",
        100.0 * (ratios[(ratios.len() - 1) / 2] + ratios[ratios.len() / 2]) / 2.0,
        100.0 * quantile(&ratios, 0.0),
        100.0 * quantile(&ratios, 1.0),
        args.workers.max(1),
        tch::get_num_threads(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.workers.max(1) * tch::get_num_threads() as usize,
    );
    println!("\nLatency of {paced} records at {rate:.1}/s: until predicted, and until visible to a read_committed consumer.\n");
    println!("| source | one fetch | delivery | predicted p50 | visible p50 | visible p99 | visible max |");
    println!("|---|---:|---|---:|---:|---:|---:|");
    for (scheme, fetch_ms, delivery, l) in latency_rows {
        println!(
            "| {scheme} | {fetch_ms:.2} ms | {delivery} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |",
            quantile(&l.predicted, 0.5),
            quantile(&l.visible, 0.5),
            quantile(&l.visible, 0.99),
            quantile(&l.visible, 1.0),
        );
    }
    println!(
        "\n(One fetch: the mean time to fetch one photo on one thread, sequentially, so the cost an image \
         adds to a fetch thread; the pipeline runs up to pipeline.max_decoding of them at once. Visible latency \
         runs from handing the record to the producer to the prediction's arrival at the consumer; predicted, \
         from the input's Kafka timestamp to the prediction.)"
    );
    Ok(())
}

/// One backlog run, and the model alone's images/s around it.
struct BacklogRun {
    scheme: &'static str,
    delivery: DeliveryGuarantee,
    forward: f64,
    throughput: Throughput,
}

/// Backlog runs with the model alone timed around each, the name of the model, its first
/// timing, and the fewest and most cores it used.
struct Bracketed {
    runs: Vec<BacklogRun>,
    first_alone: f64,
    model: String,
    alone_cores: (f64, f64),
}

/// `args.runs` backlog runs per source and delivery, each between two timings of the model
/// alone (one shared with the next run), its `forward` the mean of the two: this machine's speed
/// moves by more than the 10% being judged within minutes, so a timing long before or after a
/// run is not the rate it ran beside.
fn bracketed_backlog_runs(
    config: &Config,
    args: &BenchArgs,
    sources: &[Vec<String>],
    records: usize,
    batch: usize,
) -> anyhow::Result<Bracketed> {
    let model = ModelAlone::load(config, args, batch)?;
    let mut alone = model.time(config, args, batch)?;
    let first_alone = alone.images_per_s;
    let mut alone_cores = (alone.cores, alone.cores);
    let mut runs = Vec::new();
    for uris in sources {
        let scheme = dlpipe::fetch::UriScheme::of(&uris[0]).as_str();
        for &delivery in &args.delivery {
            for _ in 0..args.runs {
                let throughput = backlog_run(config, args, uris, delivery, records)?;
                let after = model.time(config, args, batch)?;
                alone_cores = (alone_cores.0.min(after.cores), alone_cores.1.max(after.cores));
                let forward = (alone.images_per_s + after.images_per_s) / 2.0;
                runs.push(BacklogRun { scheme, delivery, forward, throughput });
                alone = after;
            }
        }
    }
    Ok(Bracketed { runs, first_alone, model: model.featurizers[0].manifest().name.clone(), alone_cores })
}

/// The model's own forward rate at `batch`, and how many cores the process used meanwhile.
struct ForwardAlone {
    images_per_s: f64,
    cores: f64,
}

/// The config's model as the pipeline's workers run it: one instance per worker, each on the
/// device the pipeline gives that worker; loaded once for every timing of it alone.
struct ModelAlone {
    featurizers: Vec<dlpipe::model::Featurizer>,
    input: Vec<u8>,
}

impl ModelAlone {
    fn load(config: &Config, args: &BenchArgs, batch: usize) -> anyhow::Result<ModelAlone> {
        let devices = &config.model.devices;
        let featurizers: Vec<_> = (0..args.workers.max(1))
            .map(|w| load_featurizer(config, None, Some(&devices[w % devices.len()])))
            .collect::<anyhow::Result<_>>()?;
        let input = synthetic_crops(&featurizers[0], batch);
        Ok(ModelAlone { featurizers, input })
    }

    /// Times the forward pass alone on synthetic crops (for 2.5x `--seconds`), every instance at
    /// once at model.intra_op_threads, so that the pipeline's workers are compared with what
    /// their models do together.
    fn time(&self, config: &Config, args: &BenchArgs, batch: usize) -> anyhow::Result<ForwardAlone> {
        let (featurizers, input) = (&self.featurizers, &self.input);
        // Loading set them for one model, a pipeline run for its own workers: these run at once.
        set_intra_op_threads(config.model.intra_op_threads, featurizers.len());
        let min = Duration::from_secs_f64(2.5 * args.seconds);
        // Warmed up and timed on threads of their own, as the workers run the model: libgomp's
        // threads run it at another rate on a process's first thread than on the others (README,
        // Benchmarks).
        let warm = std::sync::Barrier::new(featurizers.len() + 1);
        let (rates, cores) = std::thread::scope(|scope| -> anyhow::Result<(Vec<f64>, f64)> {
            let handles: Vec<_> = featurizers
                .iter()
                .map(|featurizer| {
                    let warm = &warm;
                    scope.spawn(move || -> anyhow::Result<f64> {
                        let warmed = warm_up(featurizer, input, batch);
                        warm.wait();
                        warmed?;
                        Ok(measure(min, 3, || {
                            featurizer.forward(input, batch).expect("forward ran in warm-up");
                        }))
                    })
                })
                .collect();
            warm.wait();
            let (cpu, wall) = (cpu_seconds(), Instant::now());
            let rates =
                handles.into_iter().map(|h| h.join().expect("a forward pass panicked")).collect::<Result<_, _>>()?;
            Ok((rates, (cpu_seconds() - cpu) / wall.elapsed().as_secs_f64()))
        })?;
        let images_per_s = rates.iter().sum::<f64>() * batch as f64;
        Ok(ForwardAlone { images_per_s, cores })
    }
}

/// CPU seconds this process has used (user and system, all threads).
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given; RUSAGE_SELF is always valid.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// The one-minute load average (0 where /proc is not there).
fn load_average() -> f64 {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().next().and_then(|l| l.parse().ok()).unwrap_or(0.0)
}

/// Uploads each photo under `prefix` (`s3://bucket/some/prefix/`), returning their URIs.
fn upload(fetcher: &Fetcher, prefix: &str, photos: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let prefix = if prefix.ends_with('/') { prefix.to_owned() } else { format!("{prefix}/") };
    let mut uris = Vec::new();
    for photo in photos {
        let name = photo.file_name().and_then(|n| n.to_str()).context("a photo without a UTF-8 file name")?;
        let uri = format!("{prefix}{name}");
        let bytes = std::fs::read(photo).with_context(|| format!("reading {}", photo.display()))?;
        fetcher.put(&uri, bytes).with_context(|| format!("uploading the photos for --store to {prefix}"))?;
        uris.push(uri);
    }
    Ok(uris)
}

/// Mean milliseconds to fetch one of `uris` on one thread (after one untimed round, which opens
/// the connections).
fn fetch_cost_ms(fetcher: &Fetcher, uris: &[String], max_bytes: u64) -> anyhow::Result<f64> {
    for uri in uris {
        fetcher.fetch(uri, max_bytes)?;
    }
    let rounds_per_s = measure(Duration::from_secs(2), 3, || {
        for uri in uris {
            fetcher.fetch(uri, max_bytes).expect("fetched in the first round");
        }
    });
    Ok(1000.0 / (rounds_per_s * uris.len() as f64))
}

/// A config of its own topics and group for one benchmark run of `delivery`.
pub(super) fn bench_config(config: &Config, delivery: DeliveryGuarantee, what: &str) -> anyhow::Result<Config> {
    let run_id = format!(
        "{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis()
    );
    let mut config = config.clone();
    // Several runs in one process: each would serve its metrics on the configured port.
    config.metrics.listen = String::new();
    let p = &mut config.pipeline;
    p.input_topic = format!("bench-images-{run_id}");
    p.predictions_topic = format!("bench-predictions-{run_id}");
    p.dead_letter_topic = format!("bench-dead-letters-{run_id}");
    p.group_id = format!("bench-{run_id}");
    p.head = HeadKind::Imagenet;
    p.start_from = StartFrom::Earliest;
    p.delivery = delivery;
    Ok(config)
}

fn run_options(config: Config, args: &BenchArgs, stop: Arc<AtomicBool>) -> RunOptions {
    let timely = dlpipe::pipeline::one_process(args.workers);
    RunOptions { config, timely, metrics_port_offset: 0, init_model: None, fresh: true, stop }
}

/// Images/s of `dlpipe run --stop-at-end` over a backlog of `records` photos.
fn backlog_run(
    config: &Config,
    args: &BenchArgs,
    uris: &[String],
    delivery: DeliveryGuarantee,
    records: usize,
) -> anyhow::Result<Throughput> {
    let mut config = bench_config(config, delivery, "backlog")?;
    let p = &mut config.pipeline;
    p.stop_at_end = true;
    p.epochs = EpochPolicy::Offsets { records: 64 };
    let partitions = (2 * args.workers).max(2) as i32;
    let properties = p.topic_properties();
    let shared: Vec<(&str, &str)> = properties.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let spec = TopicSpec { partitions, replication_factor: p.topic_replication_factor, configs: &shared };
    ensure_topic(&config.kafka, &p.input_topic, spec)?;
    let publisher = Publisher::new(&config.kafka)?;
    // Round-robin over the partitions, not by key: every worker gets the same share of the
    // backlog, as every instance of the model alone runs for the same time.
    for i in 0..records {
        let record = serde_json::json!({"id": format!("b{i}"), "uri": uris[i % uris.len()]});
        publisher.send_to_partition(&p.input_topic, i as i32 % partitions, &format!("b{i}"), &record.to_string())?;
    }
    publisher.finish(Duration::from_secs(60))?;
    let started = Instant::now();
    run_pipeline(run_options(config.clone(), args, Arc::new(AtomicBool::new(false))))?;
    let wall = records as f64 / started.elapsed().as_secs_f64();
    Ok(Throughput { wall, sustained: sustained_rate(&config, records)? })
}

/// A backlog run's images/s: over the whole run (loading the model and joining the group
/// included: about a second), and sustained, over the middle 80% of its predictions.
struct Throughput {
    wall: f64,
    sustained: f64,
}

/// Predictions per second over the middle 80% of a run's `records` predictions, by their Kafka
/// timestamps (set when the pipeline produced them): the rate of a stream that keeps flowing,
/// which a short run's start (model loading, workers starting a little apart) and end (one
/// worker finishing its partitions before another) understate.
fn sustained_rate(config: &Config, records: usize) -> anyhow::Result<f64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let reader: BaseConsumer = dlpipe::kafka::client_config(&config.kafka)
        .set("group.id", format!("{}-timestamps", config.pipeline.group_id))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    reader.subscribe(&[&config.pipeline.predictions_topic])?;
    let mut stamps = Vec::with_capacity(records);
    let deadline = Instant::now() + Duration::from_secs(60);
    while stamps.len() < records && Instant::now() < deadline {
        if let Some(message) = reader.poll(Duration::from_millis(100)) {
            stamps.extend(message?.timestamp().to_millis());
        }
    }
    anyhow::ensure!(stamps.len() == records, "read {} of {records} predictions back", stamps.len());
    stamps.sort_unstable();
    let (from, to) = (records / 10, records - 1 - records / 10);
    Ok((to - from) as f64 * 1000.0 / (stamps[to] - stamps[from]).max(1) as f64)
}

/// Milliseconds from sending each of `records` photos, `rate` a second, to its prediction
/// reaching a `read_committed` consumer, sorted; with the config's epochs (live streams use
/// time epochs: exactly-once outputs wait for their epoch's end).
fn paced_run(
    config: &Config,
    args: &BenchArgs,
    uris: &[String],
    delivery: DeliveryGuarantee,
    rate: f64,
    records: usize,
) -> anyhow::Result<Latencies> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let mut config = bench_config(config, delivery, "paced")?;
    config.pipeline.stop_at_end = false;
    let p = config.pipeline.clone();
    let partitions = (2 * args.workers).max(2) as i32;
    for topic in [&p.input_topic, &p.predictions_topic] {
        let properties = p.topic_properties();
        let shared: Vec<(&str, &str)> = properties.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let spec = TopicSpec { partitions, replication_factor: p.topic_replication_factor, configs: &shared };
        ensure_topic(&config.kafka, topic, spec)?;
    }
    let reader: BaseConsumer = dlpipe::kafka::client_config(&config.kafka)
        .set("group.id", format!("{}-reader", p.group_id))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    reader.subscribe(&[&p.predictions_topic])?;
    let stop = Arc::new(AtomicBool::new(false));
    let pipeline = {
        let (config, stop) = (config.clone(), Arc::clone(&stop));
        let options = run_options(config, args, stop);
        std::thread::spawn(move || run_pipeline(options))
    };
    let publisher = Publisher::new(&config.kafka)?;
    // Calls `arrived` with each prediction's id and `latency_ms` until `want(id)` or the deadline.
    let wait_for = |want: &dyn Fn(&str) -> bool, deadline: Instant, arrived: &mut dyn FnMut(&str, Option<f64>)| {
        while Instant::now() < deadline && !pipeline.is_finished() {
            let Some(Ok(message)) = reader.poll(Duration::from_millis(5)) else { continue };
            let prediction = serde_json::from_slice::<serde_json::Value>(message.payload().unwrap_or_default()).ok();
            if let Some(v) = prediction {
                let Some(id) = v["id"].as_str() else { continue };
                arrived(id, v["latency_ms"].as_f64());
                if want(id) {
                    return true;
                }
            }
        }
        false
    };
    // One record first, so that loading the model and joining the topics are not measured.
    let warm = serde_json::json!({"id": "warm-up", "uri": uris[0]});
    publisher.send(&p.input_topic, "warm-up", &warm.to_string())?;
    let ready = wait_for(&|id| id == "warm-up", Instant::now() + Duration::from_secs(120), &mut |_, _| {});
    let mut sent = vec![None::<Instant>; records];
    let (mut latencies, mut predicted) = (Vec::with_capacity(records), Vec::with_capacity(records));
    if ready {
        let started = Instant::now();
        let mut next = 0;
        let mut arrivals = 0;
        let deadline = started + Duration::from_secs_f64(records as f64 / rate) + Duration::from_secs(60);
        while arrivals < records && Instant::now() < deadline && !pipeline.is_finished() {
            while next < records && started.elapsed().as_secs_f64() >= next as f64 / rate {
                let record = serde_json::json!({"id": format!("l{next}"), "uri": uris[next % uris.len()]});
                sent[next] = Some(Instant::now());
                publisher.send(&p.input_topic, &format!("l{next}"), &record.to_string())?;
                next += 1;
            }
            let mut on_arrival = |id: &str, latency_ms: Option<f64>| {
                let index = id.strip_prefix('l').and_then(|i| i.parse::<usize>().ok());
                if let Some(Some(at)) = index.and_then(|i| sent.get(i)) {
                    latencies.push(at.elapsed().as_secs_f64() * 1000.0);
                    predicted.extend(latency_ms);
                    arrivals += 1;
                }
            };
            wait_for(&|_| true, Instant::now() + Duration::from_millis(5), &mut on_arrival);
        }
    }
    publisher.finish(Duration::from_secs(10))?;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    pipeline.join().map_err(|_| anyhow::anyhow!("the benchmark's pipeline panicked"))??;
    anyhow::ensure!(ready, "the pipeline did not predict its first record within 120 s");
    anyhow::ensure!(
        latencies.len() == records,
        "{delivery}: {} of {records} paced predictions arrived",
        latencies.len()
    );
    latencies.sort_by(f64::total_cmp);
    predicted.sort_by(f64::total_cmp);
    Ok(Latencies { visible: latencies, predicted })
}

/// Sorted milliseconds of a paced run: until each prediction is visible to a read_committed
/// consumer, and (the predictions' own `latency_ms`) until it is made.
struct Latencies {
    visible: Vec<f64>,
    predicted: Vec<f64>,
}

/// The `q` quantile of sorted `values`.
fn quantile(values: &[f64], q: f64) -> f64 {
    values.get(((values.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(f64::NAN)
}
