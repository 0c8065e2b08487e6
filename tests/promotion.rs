//! Promotion and shadow classifiers against the real broker and model: `dlpipe promote`
//! announces classifiers from `dlpipe train` on a group's model topic; `dlpipe run` switches to
//! the champion at the announced epoch and scores the shadow beside it, bit for bit alike with
//! one worker, two workers and two processes; a restart continues both and takes neither again.

mod common;

use common::run::{assert_same_learner, messages, read_topic, Run};
use common::{fashion, free_port, produce, KillOnDrop};
use dlpipe::pipeline::model_topic::read_latest;
use dlpipe::pipeline::Checkpoint;
use dlpipe::transfer::classifier::Classifier;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// Offsets per epoch in each partition; the stream's two partitions hold 30 records each.
const RECORDS_PER_EPOCH: i64 = 5;
const PER_PARTITION: usize = 30;
/// The epochs announced: the shadow starts at epoch 1, the champion switches at epoch 3.
const SHADOW_AT: i64 = 1;
const PROMOTED_AT: i64 = 3;

/// A classifier trained with `dlpipe train` on `n` images from the `skip`-th.
fn train(dir: &Path, name: &str, n: usize, skip: usize) -> PathBuf {
    let csv = dir.join(format!("{name}.csv"));
    let rows: Vec<String> = fashion(n, skip).iter().map(|(p, l)| format!("{},{l}", p.display())).collect();
    std::fs::write(&csv, rows.join("\n")).unwrap();
    let out = dir.join(format!("{name}.safetensors"));
    let (csv_arg, out_arg) = (csv.to_str().unwrap(), out.to_str().unwrap());
    let run = common::dlpipe(&["train", "--data", csv_arg, "-o", out_arg, "--test-split", "0.2", "--epochs", "3"]);
    assert!(run.status.success(), "dlpipe train:\n{}", String::from_utf8_lossy(&run.stderr));
    out
}

/// `dlpipe promote FILE ARGS` for `run`'s group; what it printed.
fn promote(run: &Run, file: &Path, args: &[&str]) -> String {
    let config = run.config();
    let out = common::dlpipe(&[&["-c", config.to_str().unwrap(), "promote", file.to_str().unwrap()], args].concat());
    assert!(out.status.success(), "dlpipe promote:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `run` to the end with `processes` processes of `workers` workers each.
fn to_end(run: &Run, workers: usize, processes: usize) {
    if processes == 1 {
        run.to_end(&["-w", &workers.to_string()]);
        return;
    }
    let hostfile = run.dir.path().join("hosts");
    let hosts: String = (0..processes).map(|_| format!("127.0.0.1:{}\n", free_port())).collect();
    std::fs::write(&hostfile, hosts).unwrap();
    let hosts = hostfile.to_str().unwrap();
    let (w, n) = (workers.to_string(), processes.to_string());
    let mut children: Vec<(KillOnDrop, PathBuf)> = (0..processes)
        .map(|p| {
            let log = run.dir.path().join(format!("process-{p}.log"));
            let args = ["--stop-at-end", "-w", &w, "-n", &n, "-p", &p.to_string(), "--hostfile", hosts];
            let child =
                run.command(&args).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
            (KillOnDrop(child), log)
        })
        .collect();
    for (child, log) in &mut children {
        common::run::succeeds(child, log, Duration::from_secs(300));
    }
}

/// Predictions by id: (classifier, model version, top_k).
fn predictions(run: &Run, n: usize) -> BTreeMap<String, (String, u64, String)> {
    read_topic(&run.predictions, n, Duration::from_secs(5))
        .into_iter()
        .map(|p: Value| {
            let id = p["id"].as_str().unwrap().to_owned();
            (
                id,
                (
                    p["classifier"].as_str().unwrap().to_owned(),
                    p["model_version"].as_u64().unwrap(),
                    p["top_k"].to_string(),
                ),
            )
        })
        .collect()
}

/// Labelled examples scored by prequential metrics.
fn scored(state: &dlpipe::learn::PrequentialState) -> u64 {
    dlpipe::learn::Prequential::from_state(state, 1).count()
}

fn checkpoint(run: &Run) -> Checkpoint {
    read_latest(&run.kafka(), &run.model_topic, &run.group).unwrap().expect("a checkpoint")
}

#[test]
fn a_promoted_classifier_takes_over_at_its_epoch_and_a_shadow_is_scored_alike_on_every_layout() {
    let input = common::unique("promote-images");
    let images = fashion(2 * PER_PARTITION, 400);
    produce(&input, 2, &messages(&images, "r", 2, |_| true));
    let extra =
        format!("epochs = {{ by = \"offsets\", records = {RECORDS_PER_EPOCH} }}\ncheckpoint_every_epochs = 1\n");
    let scratch = tempfile::tempdir().unwrap();
    let champion = Classifier::load(&train(scratch.path(), "champion", 100, 1000)).unwrap();
    let challenger = Classifier::load(&train(scratch.path(), "challenger", 60, 1200)).unwrap();

    let layouts = [(1, 1), (2, 1), (1, 2)];
    let mut finished = Vec::new();
    for (workers, processes) in layouts {
        let what = format!("{workers} worker(s) in {processes} process(es)");
        let run = Run::new("promote", &input, &extra);
        // Announced before the run starts (a run continuing its group takes every promotion its
        // checkpoints have not), in the order they apply.
        promote(&run, &challenger.path, &["--shadow", "--at-epoch", &SHADOW_AT.to_string()]);
        let said = promote(&run, &champion.path, &["--at-epoch", &PROMOTED_AT.to_string()]);
        assert!(said.contains(&champion.id.0) && said.contains(&format!("at epoch {PROMOTED_AT}")), "{said}");
        to_end(&run, workers, processes);

        let predicted = predictions(&run, images.len());
        assert_eq!(predicted.len(), images.len(), "{what}");
        // Record i is at offset i / 2 of its partition, of epoch offset / RECORDS_PER_EPOCH.
        for (i, _) in images.iter().enumerate() {
            let epoch = (i as i64 / 2) / RECORDS_PER_EPOCH;
            let (classifier, version, _) = &predicted[&format!("r{i}")];
            if epoch > PROMOTED_AT {
                assert_eq!(classifier, &champion.id.0, "{what}: r{i} of epoch {epoch}");
                let learned = 2 * (epoch - PROMOTED_AT) * RECORDS_PER_EPOCH;
                assert_eq!(*version, champion.model.updates() + learned as u64, "{what}: r{i}");
            } else {
                assert_eq!((classifier.as_str(), *version), ("new", (2 * epoch * RECORDS_PER_EPOCH) as u64), "{what}");
            }
        }
        let last = checkpoint(&run);
        assert_eq!(last.info.classifier, champion.id, "{what}");
        let since = |epoch: i64| 2 * (PER_PARTITION as u64 - (epoch * RECORDS_PER_EPOCH) as u64);
        assert_eq!(last.model.updates(), champion.model.updates() + since(PROMOTED_AT), "{what}");
        let shadow = last.info.shadow.as_ref().expect("the shadow is checkpointed");
        assert_eq!(shadow.classifier, challenger.id, "{what}");
        assert_eq!(scored(&shadow.prequential), since(SHADOW_AT), "{what}: the shadow is scored from its epoch on");
        let shadow_model = last.shadow_model.as_ref().expect("its classifier too");
        assert_eq!(shadow_model.updates(), challenger.model.updates() + since(SHADOW_AT), "{what}");
        finished.push((what, run, predicted, last));
    }
    let (_, _, reference, want) = &finished[0];
    for (what, _, predicted, got) in &finished[1..] {
        assert_eq!(predicted, reference, "{what}: the same predictions as with one worker");
        assert_same_learner(got, want, what);
        let (a, b) = (got.shadow_model.as_ref().unwrap(), want.shadow_model.as_ref().unwrap());
        assert!(a.weights() == b.weights() && a.bias() == b.bias(), "{what}: the same shadow");
        assert_eq!(got.info.shadow, want.info.shadow, "{what}: the same shadow metrics");
    }

    // More records, and the first run again: it continues from its checkpoint with both
    // classifiers, and takes neither promotion a second time.
    let (_, run, _, before) = &finished[0];
    let more = fashion(20, 1400);
    let messages: Vec<_> = messages(&more, "s", 2, |_| true);
    produce(&input, 2, &messages);
    to_end(run, 1, 1);
    let after = checkpoint(run);
    assert_eq!(after.info.classifier, champion.id);
    assert_eq!(after.model.updates(), before.model.updates() + 20, "the champion learns on, not promoted again");
    let shadow = after.info.shadow.as_ref().expect("the shadow continues");
    assert_eq!(scored(&shadow.prequential), scored(&before.info.shadow.as_ref().unwrap().prequential) + 20);
    assert_eq!(after.shadow_model.as_ref().unwrap().updates(), before.shadow_model.as_ref().unwrap().updates() + 20);
}

#[test]
fn a_classifier_of_other_features_is_refused_naming_the_file_and_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("three-features.safetensors");
    let model = dlpipe::learn::SoftmaxRegression::new(3, Default::default()).unwrap();
    model.save(&file, &BTreeMap::new()).unwrap();
    let run = Run::new("promote-refused", &common::unique("promote-refused-images"), "");
    let out = common::dlpipe(&["-c", run.config().to_str().unwrap(), "promote", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("three-features.safetensors") && stderr.contains("efficientnet_lite0"), "{stderr}");
}
