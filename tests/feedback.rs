//! Labels that arrive on the feedback topic, before or after their images, joined to the
//! images' features (differential dataflow) against the real broker.

mod common;

use common::run::{assert_same_learner, messages, read_topic, Run};
use common::{fashion, free_port, produce, KillOnDrop};
use dlpipe::pipeline::model_topic::{read_latest, Checkpoint};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Offset epochs of 4 records: image i (partition i mod 2, offset i / 2) is in epoch i / 8;
/// feedback record k (one partition) in epoch k / 4.
const EXTRA: &str = "epochs = { by = \"offsets\", records = 4 }\ncheckpoint_every_epochs = 1\n\
                     feedback_retention = { epochs = 3 }\n";

fn latest(run: &Run) -> Checkpoint {
    read_latest(&run.kafka(), &run.model_topic, &run.group).unwrap().expect("a checkpoint")
}

/// The feedback records, by feedback epoch (4 a epoch; "pad" fills an epoch with a record
/// that is not JSON). Labels are Fashion-MNIST's true ones unless a wrong one is given.
fn feedback_plan() -> Vec<[(&'static str, Option<&'static str>); 4]> {
    const PAD: (&str, Option<&str>) = ("pad", None);
    let ok = |id: &'static str| (id, Some(""));
    vec![
        // 0: images 0 and 1 (epoch 0) labelled in their own epoch; 10 (epoch 1) before its
        // image; an id no image ever has.
        [ok("fb0"), ok("fb1"), ok("fb10"), ("nobody", Some("Bag"))],
        // 1: image 3 first gets a wrong label.
        [ok("fb2"), ("fb3", Some("Bag")), ok("fb12"), PAD],
        // 2: 3's correction (learned again); 2's label again (a duplicate: nothing new).
        [ok("fb3"), ok("fb2"), ok("fb4"), PAD],
        // 3: images of epoch 1, in the last epoch of their retention.
        [ok("fb9"), ok("fb11"), PAD, PAD],
        // 4, 5: images of epochs 2 and 3, within their 3 epochs of retention.
        [ok("fb16"), ok("fb17"), ok("fb18"), ok("fb19")],
        [ok("fb24"), ok("fb25"), ok("fb26"), ok("fb27")],
        // 6: image 8 (epoch 1) was dropped at epoch 4: too late. 36 and 38 (epoch 4) join.
        [ok("fb8"), ok("fb36"), ok("fb38"), PAD],
    ]
}

/// Runs `run` to the end of its input as one process of `workers` workers, or as two
/// processes of one worker each.
fn to_end(run: &Run, workers: usize, processes: usize) {
    if processes == 1 {
        run.to_end(&["-w", &workers.to_string()]);
        return;
    }
    let hosts = run.dir.path().join("hosts");
    std::fs::write(&hosts, format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port())).unwrap();
    let hosts = hosts.to_str().unwrap().to_owned();
    let mut children: Vec<(KillOnDrop, std::path::PathBuf)> = (0..processes)
        .map(|p| {
            let log = run.dir.path().join(format!("process-{p}.log"));
            let child = run
                .command(&["--stop-at-end", "-w", "1", "-n", "2", "-p", &p.to_string(), "--hostfile", &hosts])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            (KillOnDrop(child), log)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    for (child, log) in &mut children {
        loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                assert!(status.success(), "a process failed:\n{}", std::fs::read_to_string(&*log).unwrap());
                break;
            }
            assert!(Instant::now() < deadline, "did not finish in 300 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn labels_before_after_twice_corrected_never_and_too_late_teach_the_same_learner_on_any_number_of_workers() {
    const N: usize = 40;
    let images = fashion(N, 11000);
    let input = common::unique("fb-images");
    produce(&input, 2, &messages(&images, "fb", 2, |_| false));
    let feedback_topic = common::unique("fb-feedback");
    let mut feedback = Vec::new();
    let mut pads = 0;
    for (k, (id, label)) in feedback_plan().into_iter().flatten().enumerate() {
        let payload = match label {
            None => {
                pads += 1;
                "not json".to_string()
            }
            Some("") => {
                let i: usize = id.trim_start_matches("fb").parse().unwrap();
                serde_json::json!({"id": id, "label": images[i].1, "ts": 1_000 + k}).to_string()
            }
            Some(label) => serde_json::json!({"id": id, "label": label, "ts": 1_000 + k}).to_string(),
        };
        feedback.push((0, id.to_string(), payload));
    }
    produce(&feedback_topic, 1, &feedback);
    let extra = format!("{EXTRA}feedback_topic = \"{feedback_topic}\"\n");

    let mut learners = Vec::new();
    // The two-process run delivers exactly once: feedback dead letters go in the transactions
    // too, and epochs with nothing but those move no input offset.
    for (workers, processes, delivery) in [(1, 1, "at_least_once"), (2, 1, "at_least_once"), (1, 2, "exactly_once")] {
        let what = format!("{workers} worker(s) in {processes} process(es), {delivery}");
        let run = Run::new("fb", &input, &format!("{extra}delivery = \"{delivery}\"\n"));
        to_end(&run, workers, processes);
        // Every image is predicted once, none is dead-lettered; the model version of an
        // epoch's predictions counts the pairs complete in the epochs before it.
        let predictions: BTreeMap<String, Value> = read_topic(&run.predictions, N + 1, Duration::from_secs(5))
            .into_iter()
            .map(|p| (p["id"].as_str().unwrap().to_owned(), p))
            .collect();
        assert_eq!(predictions.len(), N, "{what}");
        let version = |id: &str| predictions[id]["model_version"].as_u64().unwrap();
        // Epoch 0 learns fb0, fb1; epoch 1 fb2, fb3 (wrong), fb10, fb12; epoch 2 fb3 again, fb4;
        // epoch 3 fb9, fb11: images of epoch 4 see all ten.
        assert_eq!(
            [version("fb0"), version("fb8"), version("fb16"), version("fb24"), version("fb39")],
            [0, 2, 6, 8, 10]
        );

        let dead = read_topic(&run.dead, pads + 3, Duration::from_secs(5));
        let kinds: BTreeMap<(String, String), usize> = dead.iter().fold(BTreeMap::new(), |mut m, d| {
            let key = (d["id"].as_str().unwrap_or_default().to_owned(), d["error_kind"].as_str().unwrap().to_owned());
            *m.entry(key).or_default() += 1;
            m
        });
        let want = BTreeMap::from([
            (("pad".to_string(), "malformed_json".to_string()), pads),
            (("fb8".into(), "label_too_late".into()), 1),
            (("nobody".into(), "unknown_id".into()), 1),
        ]);
        assert_eq!(kinds, want, "{what}: dead letters {dead:?}");

        // Ten pairs by epoch 3, eight images of epochs 2 and 3 in epochs 4 and 5, two in 6.
        let checkpoint = latest(&run);
        assert_eq!(checkpoint.model.updates(), 20, "{what}");
        learners.push((what, checkpoint));
    }
    let (first, reference) = &learners[0];
    for (what, other) in &learners[1..] {
        assert_same_learner(other, reference, &format!("{what} against {first}"));
    }
    let classes: BTreeSet<&str> = reference.model.classes().iter().map(String::as_str).collect();
    assert!(classes.contains("Bag"), "the wrong label was learned too (a correction adds an update): {classes:?}");
}

/// Top-1 accuracy of the published predictions against the images' true classes.
fn published_accuracy(run: &Run, images: &[(std::path::PathBuf, &str)], prefix: &str) -> f64 {
    let predictions = read_topic(&run.predictions, images.len() + 1, Duration::from_secs(5));
    assert_eq!(predictions.len(), images.len());
    let correct = predictions
        .iter()
        .filter(|p| {
            let i: usize = p["id"].as_str().unwrap().trim_start_matches(prefix).parse().unwrap();
            p["top_k"][0]["class"] == images[i].1
        })
        .count();
    correct as f64 / images.len() as f64
}

#[test]
fn labels_a_few_epochs_late_learn_fashion_mnist_as_well_as_inline_labels() {
    const N: usize = 2000;
    const DELAY: usize = 3; // epochs
    const RECORDS: usize = 4; // offsets per epoch and partition
    let images = fashion(N, 10000);
    let extra = format!("epochs = {{ by = \"offsets\", records = {RECORDS} }}\ncheckpoint_every_epochs = 100000\n");

    let inline_input = common::unique("fbacc-inline");
    produce(&inline_input, 2, &messages(&images, "a", 2, |_| true));
    let inline = Run::new("fbacc-inline", &inline_input, &extra);
    inline.to_end(&["-w", "2"]);

    // The same images without labels; each partition's labels come DELAY epochs after their
    // images on the feedback partition of the same number. The first DELAY epochs of feedback
    // are the labels of the last images, which come early and wait for them.
    let late_input = common::unique("fbacc-late");
    produce(&late_input, 2, &messages(&images, "a", 2, |_| false));
    let feedback_topic = common::unique("fbacc-feedback");
    let mut feedback = Vec::new();
    for partition in 0..2 {
        let ids: Vec<usize> = (0..N).filter(|i| i % 2 == partition).collect();
        let early = ids.len() - DELAY * RECORDS;
        for &i in ids[early..].iter().chain(&ids[..early]) {
            let id = format!("a{i}");
            feedback.push((
                partition as i32,
                id.clone(),
                serde_json::json!({"id": id, "label": images[i].1}).to_string(),
            ));
        }
    }
    produce(&feedback_topic, 2, &feedback);
    let retention = N / 2 / RECORDS; // the whole stream: the early labels wait for the last images
    let late = Run::new(
        "fbacc-late",
        &late_input,
        &format!("{extra}feedback_topic = \"{feedback_topic}\"\nfeedback_retention = {{ epochs = {retention} }}\n"),
    );
    late.to_end(&["-w", "2"]);

    // Online (prequential) accuracy: each example predicted by the classifier just before it
    // learns it, as dlpipe_online_accuracy_ratio reports it.
    let (inline_learner, late_learner) = (latest(&inline), latest(&late));
    assert_eq!((inline_learner.model.updates(), late_learner.model.updates()), (N as u64, N as u64));
    let online = |c: &Checkpoint| c.prequential(N).accuracy().unwrap();
    let (inline_online, late_online) = (online(&inline_learner), online(&late_learner));
    // The published predictions: the late run predicts each image with a classifier
    // 2 x DELAY x RECORDS = 24 examples behind the inline run's, which costs about 24 / N of
    // what the classifier gains over the stream.
    let (inline_published, late_published) =
        (published_accuracy(&inline, &images, "a"), published_accuracy(&late, &images, "a"));
    println!(
        "Fashion-MNIST, {N} images, labels {DELAY} epochs ({} images) late: online accuracy {:.2}% inline, {:.2}% \
         late; published predictions {:.2}% inline, {:.2}% late",
        2 * DELAY * RECORDS,
        100.0 * inline_online,
        100.0 * late_online,
        100.0 * inline_published,
        100.0 * late_published,
    );
    assert!(inline_online > 0.6, "the inline run learns: {inline_online}");
    assert!((inline_online - late_online).abs() <= 0.01, "online accuracy {inline_online} inline, {late_online} late");
    assert!(
        inline_published - late_published < 0.04,
        "published accuracy {inline_published} inline, {late_published} late"
    );
}

/// The README's late-label run: `dlpipe produce` publishes images without labels, `dlpipe
/// produce --feedback` their labels (same ids); the pipeline learns every one.
#[test]
fn dlpipe_produce_feedback_labels_the_images_dlpipe_produce_published() {
    let dir = tempfile::tempdir().unwrap();
    let images = fashion(12, 13000);
    for (i, (path, label)) in images.iter().enumerate() {
        let class = dir.path().join(label);
        std::fs::create_dir_all(&class).unwrap();
        std::fs::copy(path, class.join(format!("{i}.png"))).unwrap();
    }
    let input = common::unique("fbcli-images");
    let feedback_topic = common::unique("fbcli-feedback");
    let run = Run::new("fbcli", &input, &format!("feedback_topic = \"{feedback_topic}\"\n"));
    let produce = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_dlpipe"))
            .arg("-c")
            .arg(run.config())
            .arg("produce")
            .args(args)
            .arg(dir.path())
            .current_dir(common::root())
            .output()
            .unwrap();
        assert!(out.status.success(), "dlpipe produce {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    produce(&["--shuffle", "7"]);
    produce(&["--feedback", "--shuffle", "7"]);
    run.to_end(&[]);
    let checkpoint = latest(&run);
    assert_eq!(checkpoint.model.updates(), 12, "every image learned from its late label");
    let classes: BTreeSet<&str> = checkpoint.model.classes().iter().map(String::as_str).collect();
    assert_eq!(classes, images.iter().map(|(_, l)| *l).collect::<BTreeSet<_>>());
    assert!(read_topic(&run.dead, 1, Duration::from_secs(3)).is_empty(), "no dead letters");
}

/// A restart that continues from a checkpoint reads the feedback topic again only from the
/// retention before the checkpoint's cut: labels consumed long before are not processed again
/// (they would all be `unknown_id` now: their images are not read again), and labels that come
/// before their images, across the restart, are learned.
#[test]
fn a_restart_reads_again_only_the_feedback_within_the_retention_before_its_checkpoint() {
    let images = fashion(16, 14000);
    let input = common::unique("fbre-images");
    let feedback_topic = common::unique("fbre-feedback");
    let labels = |range: std::ops::Range<usize>| -> Vec<(i32, String, String)> {
        range
            .map(|i| (0, format!("r{i}"), serde_json::json!({"id": format!("r{i}"), "label": images[i].1}).to_string()))
            .collect()
    };
    let unlabelled = messages(&images, "r", 2, |_| false);
    produce(&input, 2, &unlabelled[..8]);
    produce(&feedback_topic, 1, &labels(0..8));
    // The first labels are older than the retention (3 s) when the first run's checkpoint is cut.
    std::thread::sleep(Duration::from_millis(3500));
    let extra = format!(
        "epochs = {{ by = \"time\", millis = 200 }}\nfeedback_topic = \"{feedback_topic}\"\n\
         feedback_retention = {{ seconds = 3 }}\n"
    );
    let run = Run::new("fbre", &input, &extra);
    run.to_end(&[]);
    assert_eq!(latest(&run).model.updates(), 8);

    // Labels first, then their images, then the restart.
    produce(&feedback_topic, 1, &labels(8..16));
    produce(&input, 2, &unlabelled[8..]);
    let log = run.to_end(&[]);
    assert!(log.contains("continuing from the newest checkpoint"), "{log}");
    assert_eq!(latest(&run).model.updates(), 16, "the second half learned, the first not again");
    let dead = read_topic(&run.dead, 1, Duration::from_secs(3));
    assert!(dead.is_empty(), "the first labels were not processed again: {dead:?}");
}
