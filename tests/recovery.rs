//! Recovery against the real broker: a restarted `dlpipe run` continues the classifier from its
//! group's newest checkpoint; runs killed with SIGKILL at random points, and runs whose broker
//! restarts under them, lose no record and end with the classifier of an uninterrupted run,
//! bit for bit.

mod common;

use common::broker::Broker;
use common::run::{assert_same_learner, messages, read_topic_on, Run};
use common::{fashion, free_port, produce, produce_on, KillOnDrop};
use dlpipe::pipeline::model_topic::{read_latest, Checkpoint};
use dlpipe::transfer::dataset::SplitMix64;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The newest checkpoint of a run's group, as a restart would read it.
fn latest(run: &Run) -> Checkpoint {
    read_latest(&run.kafka(), &run.model_topic, &run.group)
        .unwrap()
        .unwrap_or_else(|| panic!("no checkpoint of group {} in {}", run.group, run.model_topic))
}

/// Predictions by id: the classes and probabilities (as JSON) and the model version.
fn predictions(run: &Run, want: usize) -> (BTreeMap<String, (String, u64)>, usize) {
    let all = read_topic_on(&run.kafka(), &run.predictions, want, Duration::from_secs(5));
    let count = all.len();
    let by_id = all
        .into_iter()
        .map(|p: Value| {
            (p["id"].as_str().unwrap().to_owned(), (p["top_k"].to_string(), p["model_version"].as_u64().unwrap()))
        })
        .collect();
    (by_id, count)
}

#[test]
fn a_restart_with_no_flags_continues_the_classifier_and_fresh_starts_over() {
    const EXTRA: &str = "epochs = { by = \"offsets\", records = 2 }\ncheckpoint_every_epochs = 1\n";
    let images = fashion(40, 8000);
    let all = messages(&images, "c", 2, |i| i % 4 != 3);

    // The reference: one run over all 40 records.
    let whole = common::unique("ckpt-whole");
    produce(&whole, 2, &all);
    let reference = Run::new("ckref", &whole, EXTRA);
    reference.to_end(&[]);
    let want = latest(&reference);
    assert_eq!(want.model.updates(), 30);

    // The same records in two halves, with a restart in between.
    let input = common::unique("ckpt-halves");
    produce(&input, 2, &all[..20]);
    let run = Run::new("ckpt", &input, EXTRA);
    let log = run.to_end(&[]);
    assert!(log.contains("no checkpoint: a new classifier"), "{log}");
    let first = latest(&run);
    assert_eq!(first.model.updates(), 15);
    assert_eq!(first.info.learned_offsets, BTreeMap::from([(0, 10), (1, 10)]));
    assert_eq!(first.info.published_offsets, BTreeMap::from([(0, 10), (1, 10)]));
    assert_eq!(first.prequential(1000).count(), 15);
    produce(&input, 2, &all[20..]);
    let log = run.to_end(&[]);
    assert!(log.contains("continuing from the newest checkpoint"), "{log}");
    assert_same_learner(&latest(&run), &want, "two halves with a restart against one run");
    // Every record is predicted once, exactly as in the one run: the second half by the
    // classifier that continued from version 15.
    let (got, count) = predictions(&run, 41);
    let (reference_predictions, _) = predictions(&reference, 40);
    assert_eq!(count, 40, "each record predicted once");
    assert_eq!(got, reference_predictions);
    assert!(got["c20"].1 >= 15, "the second half continues the model version: {:?}", got["c20"]);

    // --fresh: a new classifier from the group's committed offsets on.
    let more = messages(&fashion(4, 8100), "f", 2, |_| true);
    produce(&input, 2, &more);
    let log = run.to_end(&["--fresh"]);
    assert!(!log.contains("continuing from the newest checkpoint"), "{log}");
    let fresh = latest(&run);
    assert_eq!(fresh.model.updates(), 4, "only the new records are learned");
    assert_eq!(fresh.prequential(1000).count(), 4);
    let (got, count) = predictions(&run, 45);
    assert_eq!(count, 44, "nothing before the committed offsets is published again");
    assert_eq!(got["f0"].1, 0, "the first new record is predicted by a new classifier");
}

/// Seeds of the kill test: `DLPIPE_SOAK_RUNS` (5 by default; `make soak` runs 50).
fn soak_runs() -> u64 {
    std::env::var("DLPIPE_SOAK_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5)
}

/// Runs `spawn()`'s processes, killing them with SIGKILL at random moments within `span` (a
/// whole run's time; 1 to 3 times), and returns the kill times.
fn kill_and_restart(
    rng: &mut SplitMix64,
    spawn: &dyn Fn() -> Vec<Process>,
    span: Duration,
    kill_one_of_two: bool,
    observe: &dyn Fn() -> String,
) -> Vec<String> {
    let mut killed_at = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let mut children = spawn();
        let at = Duration::from_millis(rng.below(span.as_millis() as u64));
        let started = Instant::now();
        while started.elapsed() < at && children.iter_mut().any(|c| c.child.0.try_wait().unwrap().is_none()) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if children.iter_mut().all(|c| c.child.0.try_wait().unwrap().is_some()) {
            // Finished before the kill: the rest of the loop has nothing to do.
            for c in &mut children {
                assert!(c.child.0.wait().unwrap().success(), "a run failed on its own:\n{}", c.log());
            }
            break;
        }
        killed_at.push(format!("{} ms", at.as_millis()));
        if kill_one_of_two {
            // One process dies; its peer loses its connection and fails or is stopped.
            let victim = rng.below(children.len() as u64) as usize;
            children[victim].child.0.kill().unwrap();
            children[victim].child.0.wait().unwrap();
            std::thread::sleep(Duration::from_millis(500));
        }
        drop(children); // SIGKILL to whatever still runs
        let last = killed_at.pop().expect("pushed above");
        killed_at.push(format!("{last} ({})", observe()));
    }
    killed_at
}

/// A `dlpipe run` process and its log.
struct Process {
    child: KillOnDrop,
    log: std::path::PathBuf,
}

impl Process {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `run`'s processes: one process of two workers, or two processes of one worker each.
fn spawn(run: &Run, processes: usize) -> Vec<Process> {
    let quiet = |mut c: std::process::Command| {
        let log = run.dir.path().join(format!("{}.log", common::unique("process")));
        let child = c.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
        Process { child: KillOnDrop(child), log }
    };
    if processes == 1 {
        return vec![quiet(run.command(&["--stop-at-end", "-w", "2"]))];
    }
    let hosts = run.dir.path().join(format!("hosts-{}", common::unique("h")));
    std::fs::write(&hosts, format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port())).unwrap();
    let hosts = hosts.to_str().unwrap().to_owned();
    (0..processes)
        .map(|p| {
            quiet(run.command(&["--stop-at-end", "-w", "1", "-n", "2", "-p", &p.to_string(), "--hostfile", &hosts]))
        })
        .collect()
}

/// Waits for every process to succeed (5 minutes at most); returns the end of their logs, for
/// the messages of later assertions.
fn to_end(mut children: Vec<Process>, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(300);
    for child in &mut children {
        loop {
            if let Some(status) = child.child.0.try_wait().unwrap() {
                assert!(status.success(), "{what}: a process failed:\n{}", child.log());
                break;
            }
            assert!(Instant::now() < deadline, "{what}: did not finish in 300 s:\n{}", child.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let tail =
        |log: String| log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    children.iter().map(|c| tail(c.log())).collect::<Vec<_>>().join("\n---\n")
}

/// Kills a run at random points and restarts it until it reaches the end of its input; then
/// checks that nothing was lost and that the classifier is the uninterrupted one.
fn soak(name: &str, processes: usize, exactly_once: bool) {
    const N: usize = 120;
    // A small backlog makes the records flow a few at a time, as on a live stream, rather than
    // all at once: kills land between many learned frontiers and checkpoints.
    let delivery = if exactly_once { "exactly_once" } else { "at_least_once" };
    let extra = format!(
        "epochs = {{ by = \"offsets\", records = 3 }}\ncheckpoint_every_epochs = 4\nmax_backlog = 8\n\
         delivery = \"{delivery}\"\n"
    );
    let images = fashion(N, 9000);
    let all = messages(&images, "s", 2, |i| i % 5 != 2);
    let input = common::unique(&format!("{name}-images"));
    produce(&input, 2, &all);
    // The uninterrupted run; its duration is the window the kills land in.
    let reference = Run::new(&format!("{name}ref"), &input, &extra);
    let started = Instant::now();
    to_end(spawn(&reference, processes), "the uninterrupted run");
    let span = started.elapsed();
    let want = latest(&reference);
    assert_eq!(want.model.updates(), 96);

    for seed in 0..soak_runs() {
        let mut rng = SplitMix64(seed);
        let run = Run::new(&format!("{name}{seed}"), &input, &extra);
        let killed_at =
            kill_and_restart(&mut rng, &|| spawn(&run, processes), span, processes > 1, &|| match read_latest(
                &run.kafka(),
                &run.model_topic,
                &run.group,
            )
            .unwrap()
            {
                Some(c) => {
                    format!("checkpoint of {} updates, learned up to {:?}", c.model.updates(), c.info.learned_offsets)
                }
                None => "no checkpoint yet".into(),
            });
        let log = to_end(spawn(&run, processes), &format!("seed {seed}: the last run"));
        let context = format!("{killed_at:?}; the last run's log ends:\n{log}\n");
        assert_same_learner(&latest(&run), &want, &format!("{name} seed {seed}, killed at {context}"));
        let outputs = read_topic_on(&run.kafka(), &run.predictions, 4 * N, Duration::from_secs(5));
        let ids: BTreeSet<&str> = outputs.iter().map(|p| p["id"].as_str().unwrap()).collect();
        let missing: Vec<String> = (0..N).map(|i| format!("s{i}")).filter(|id| !ids.contains(id.as_str())).collect();
        assert!(missing.is_empty(), "seed {seed}, killed at {context}: no prediction for {missing:?}");
        let twice = outputs.len() - ids.len();
        println!(
            "{name} seed {seed}: killed at {killed_at:?}; {} predictions for {N} records ({twice} published twice, \
             {delivery}); the classifier equals the uninterrupted one",
            outputs.len(),
        );
        if exactly_once {
            assert_eq!(twice, 0, "seed {seed}, killed at {context}: predictions published twice");
        }
    }
}

#[test]
fn killed_at_random_points_an_at_least_once_run_loses_nothing_and_learns_every_label_once() {
    soak("soak", 1, false);
}

#[test]
fn killed_at_random_points_an_exactly_once_run_publishes_every_output_once_and_learns_every_label_once() {
    soak("soakx", 1, true);
}

#[test]
fn killing_one_of_two_exactly_once_processes_publishes_every_output_once_and_learns_every_label_once() {
    soak("soakx2p", 2, true);
}

/// The broker crashes (SIGKILL) under a running pipeline and comes back `DOWN` later, in each
/// delivery mode: the pipeline waits for it (its transactions, checkpoints and commits retry)
/// and goes on; every record gets its prediction, exactly once under exactly-once, and the
/// classifier ends bit-identical to an uninterrupted run's.
#[test]
fn a_broker_restart_mid_stream_loses_nothing_and_the_pipeline_goes_on() {
    const N: usize = 240;
    let broker = Broker::new(None);
    broker.start();
    let kafka = broker.kafka_config();
    let input = common::unique("restart-images");
    produce_on(&kafka, &input, 2, &messages(&fashion(N, 10000), "r", 2, |i| i % 5 != 2));
    for delivery in ["at_least_once", "exactly_once"] {
        let extra = format!(
            "epochs = {{ by = \"offsets\", records = 3 }}\ncheckpoint_every_epochs = 4\nmax_backlog = 8\n\
             delivery = \"{delivery}\"\n"
        );
        let reference = Run::on(&broker.plaintext(), &format!("rref-{delivery}"), &input, &extra);
        reference.to_end(&["-w", "2"]);
        let want = latest(&reference);
        assert_eq!(want.model.updates(), 192);

        let run = Run::on(&broker.plaintext(), &format!("restart-{delivery}"), &input, &extra);
        let (mut child, log_file) = run.spawn(&["--stop-at-end", "-w", "2"]);
        let log = || std::fs::read_to_string(&log_file).unwrap_or_default();
        // Mid-stream: a first checkpoint is written, most records are still to come.
        let deadline = Instant::now() + Duration::from_secs(120);
        let at_stop = loop {
            match read_latest(&kafka, &run.model_topic, &run.group).unwrap() {
                Some(c) if c.model.updates() >= 12 => break c.model.updates(),
                _ => {}
            }
            assert!(child.0.try_wait().unwrap().is_none(), "{delivery}: the run ended early:\n{}", log());
            assert!(Instant::now() < deadline, "{delivery}: no checkpoint in 120 s:\n{}", log());
            std::thread::sleep(Duration::from_millis(100));
        };
        // Longer than a transaction call waits (30 s): calls time out, and aborts meet a queue of
        // messages that cannot be delivered.
        const DOWN: Duration = Duration::from_secs(32);
        broker.kill();
        std::thread::sleep(DOWN);
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "{delivery}: the run did not wait for the broker (it had learned {at_stop} of 192):\n{}",
            log()
        );
        broker.start();
        let deadline = Instant::now() + Duration::from_secs(300);
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "{delivery}: the run did not finish after the restart:\n{}", log());
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "{delivery}: the run failed across the broker restart:\n{}", log());
        assert!(at_stop < 192, "{delivery}: the broker stopped after the stream ended");
        assert_same_learner(&latest(&run), &want, &format!("{delivery}: across a broker restart"));
        let outputs = read_topic_on(&kafka, &run.predictions, 4 * N, Duration::from_secs(5));
        let ids: BTreeSet<&str> = outputs.iter().map(|p| p["id"].as_str().unwrap()).collect();
        let missing: Vec<String> = (0..N).map(|i| format!("r{i}")).filter(|id| !ids.contains(id.as_str())).collect();
        assert!(missing.is_empty(), "{delivery}: no prediction for {missing:?}");
        let twice = outputs.len() - ids.len();
        let log = log();
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
        println!("broker restart ({delivery}): {} warnings, the first: {:?}", warnings.len(), warnings.first());
        println!(
            "broker restart ({delivery}): killed at {at_stop} of 192 updates; {} predictions for {N} records \
             ({twice} published twice); the classifier equals the uninterrupted one",
            outputs.len()
        );
        if delivery == "exactly_once" {
            assert_eq!(twice, 0, "predictions published twice under exactly-once");
        }
    }
}

#[test]
fn a_second_pipeline_of_the_same_group_fences_the_first() {
    let input = common::unique("fence-images");
    produce(&input, 2, &messages(&fashion(10, 9500), "a", 2, |_| true));
    let run = Run::new("fence", &input, "epochs = { by = \"time\", millis = 200 }\ncheckpoint_every_epochs = 1\n");
    let log_of = |name: &str| run.dir.path().join(format!("{name}.log"));
    let start = |name: &str| {
        let log = std::fs::File::create(log_of(name)).unwrap();
        KillOnDrop(run.command(&[]).stdout(Stdio::null()).stderr(log).spawn().unwrap())
    };
    let updates = || read_latest(&run.kafka(), &run.model_topic, &run.group).unwrap().map(|c| c.model.updates());
    let mut first = start("first");
    let deadline = Instant::now() + Duration::from_secs(120);
    while updates() < Some(10) {
        assert!(Instant::now() < deadline, "the first pipeline wrote no checkpoint of its 10 records in 120 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut second = start("second");
    // The second pipeline's checkpoint writer fences the first's; the first finds out at its
    // next checkpoint, which new records bring.
    std::thread::sleep(Duration::from_secs(5));
    produce(&input, 2, &messages(&fashion(6, 9600), "b", 2, |_| true));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = first.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the first pipeline still runs 60 s after the second started");
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(log_of("first")).unwrap();
    assert!(!status.success(), "the fenced pipeline exits with an error:\n{log}");
    assert!(log.contains("fenced this one"), "{log}");
    assert!(second.0.try_wait().unwrap().is_none(), "the second pipeline runs on");
    // The second pipeline goes on learning: the new records too.
    let deadline = Instant::now() + Duration::from_secs(120);
    while updates() < Some(16) {
        assert!(Instant::now() < deadline, "the second pipeline did not learn the new records in 120 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pid = second.0.id().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    assert!(second.0.wait().unwrap().success(), "{}", std::fs::read_to_string(log_of("second")).unwrap());
}

/// Exactly-once: a restart whose checkpoint is older than the group's committed offsets learns
/// the records in between again without publishing them, and its transactions never move
/// those offsets back (if they did, a crash during the replay would make the next restart
/// publish them twice: what the kill soak found under load).
#[test]
fn a_replay_for_the_learner_never_moves_the_committed_offsets_back() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    const EXTRA: &str = "epochs = { by = \"offsets\", records = 2 }\ncheckpoint_every_epochs = 1\n\
                         delivery = \"exactly_once\"\n";
    let images = fashion(40, 9300);
    let all = messages(&images, "m", 2, |_| true);
    let input = common::unique("replay-images");
    produce(&input, 2, &all[..20]);
    let run = Run::new("replay", &input, EXTRA);
    run.to_end(&[]);
    assert_eq!(latest(&run).info.learned_offsets, BTreeMap::from([(0, 10), (1, 10)]));
    produce(&input, 2, &all[20..]);
    // As if a run had published up to offset 18 of each partition and died before checkpointing.
    let group: BaseConsumer = dlpipe::kafka::client_config(&run.kafka()).set("group.id", &run.group).create().unwrap();
    let mut committed = TopicPartitionList::new();
    for partition in 0..2 {
        committed.add_partition_offset(&input, partition, Offset::Offset(18)).unwrap();
    }
    group.commit(&committed, CommitMode::Sync).unwrap();

    let mut child =
        KillOnDrop(run.command(&["--stop-at-end"]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let mut lowest = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the restart did not finish in 300 s");
        // A transaction in flight makes the read fail (unstable offsets): skip that sample.
        if let Ok(list) = group.committed_offsets(committed.clone(), Duration::from_secs(5)) {
            for e in list.elements() {
                if let Offset::Offset(o) = e.offset() {
                    let low = lowest.entry(e.partition()).or_insert(o);
                    *low = (*low).min(o);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.0.wait().unwrap().success());
    assert_eq!(lowest, BTreeMap::from([(0, 18), (1, 18)]), "the lowest committed offsets seen during the replay");
    assert_eq!(latest(&run).model.updates(), 40, "the records between the checkpoint and the commits learned again");
    let (_, count) = predictions(&run, 30);
    assert_eq!(count, 20 + 4, "records 10 to 17 of each partition are not published again");
}
