//! Recovery against the real broker: a restarted `dlpipe run` continues the classifier from its
//! group's newest checkpoint; runs killed with SIGKILL at random points, and runs whose broker
//! restarts under them, lose no record and end with the classifier of an uninterrupted run,
//! bit for bit.

mod common;

use common::broker::Broker;
use common::run::{assert_same_learner, logs, messages, read_topic_on, succeeds, Run};
use common::{fashion, free_port, produce, produce_on, KillOnDrop};
use dlpipe::pipeline::model_topic::{read_latest, Checkpoint};
use dlpipe::transfer::dataset::SplitMix64;
use dlpipe_operators::transactions::RESTART_EXIT_CODE;
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

/// Seeds of the kill test: `DLPIPE_SOAK_RUNS` of them (3 by default; `make soak` runs 50) from
/// `DLPIPE_SOAK_SEED`, else from one drawn anew by each run, so that successive runs try other
/// kill points; a failure names its seed, and `DLPIPE_SOAK_SEED` replays it.
fn soak_seeds() -> std::ops::Range<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let runs = var("DLPIPE_SOAK_RUNS").unwrap_or(3);
    let drawn =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000;
    let first = var("DLPIPE_SOAK_SEED").unwrap_or_else(drawn);
    first..first + runs
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
    match processes {
        1 => cluster(run, 1, 2, true),
        _ => cluster(run, processes, 1, true),
    }
}

/// `run` as `processes` processes of `workers` workers each (a hostfile on loopback when more
/// than one), to the end of the input with `stop_at_end`, else until killed.
fn cluster(run: &Run, processes: usize, workers: usize, stop_at_end: bool) -> Vec<Process> {
    let quiet = |mut c: std::process::Command| {
        let log = run.dir.path().join(format!("{}.log", common::unique("process")));
        let child = c.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
        Process { child: KillOnDrop(child), log }
    };
    let workers = workers.to_string();
    let mut args = vec!["-w", workers.as_str()];
    if stop_at_end {
        args.push("--stop-at-end");
    }
    if processes == 1 {
        return vec![quiet(run.command(&args))];
    }
    let hosts = run.dir.path().join(format!("hosts-{}", common::unique("h")));
    let lines: String = (0..processes).map(|_| format!("127.0.0.1:{}\n", free_port())).collect();
    std::fs::write(&hosts, lines).unwrap();
    let (hosts, n) = (hosts.to_str().unwrap().to_owned(), processes.to_string());
    (0..processes)
        .map(|p| {
            let p = p.to_string();
            quiet(run.command(&[args.as_slice(), &["-n", &n, "-p", &p, "--hostfile", &hosts]].concat()))
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

    let seeds = soak_seeds();
    println!("{name}: seeds {seeds:?} (DLPIPE_SOAK_SEED={} replays them)", seeds.start);
    for seed in seeds {
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
/// and goes on, or, where librdkafka let a transactional call hang past its bound, exits 75 and
/// is restarted; every record gets its prediction, exactly once under exactly-once, and the
/// classifier ends bit-identical to an uninterrupted run's.
/// One delivery mode's run across the broker's restart, and the run of it without one.
struct AcrossRestart {
    delivery: &'static str,
    run: Run,
    child: KillOnDrop,
    log_files: Vec<std::path::PathBuf>,
    /// Updates of its newest checkpoint when the broker was killed.
    at_stop: u64,
    restarts: usize,
}

impl AcrossRestart {
    const ARGS: [&str; 3] = ["--stop-at-end", "-w", "2"];

    /// Waits for the run to end (until `deadline`), restarting it, as an orchestrator does,
    /// when it exits 75 (twice at most); returns how the last one ended.
    fn wait_restarting(&mut self, deadline: Instant) -> std::process::ExitStatus {
        loop {
            match self.child.0.try_wait().unwrap() {
                Some(status) if status.code() == Some(RESTART_EXIT_CODE) && self.restarts < 2 => {
                    self.restarts += 1;
                    let (again, log_file) = self.run.spawn(&Self::ARGS);
                    self.child = again;
                    self.log_files.push(log_file);
                }
                Some(status) => return status,
                None => {}
            }
            let log = || logs(&self.log_files);
            assert!(
                Instant::now() < deadline,
                "{}: the run did not finish after the restart:\n{}",
                self.delivery,
                log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_broker_restart_mid_stream_loses_nothing_and_the_pipeline_goes_on() {
    const N: usize = 240;
    const ARGS: [&str; 3] = AcrossRestart::ARGS;
    let broker = Broker::new(None);
    broker.start();
    let kafka = broker.kafka_config();
    let input = common::unique("restart-images");
    produce_on(&kafka, &input, 2, &messages(&fashion(N, 10000), "r", 2, |i| i % 5 != 2));
    // Both delivery modes at once, through one outage. The broker stays away longer than the
    // transactions' timeout (a minute by default; 10 s here, so that every run meets it, as a
    // slow machine's 36-51 s broker start-up did): the coordinator aborts the transactions open
    // at the kill and fences their producers.
    let config = |delivery: &str| {
        format!(
            "epochs = {{ by = \"offsets\", records = 3 }}\ncheckpoint_every_epochs = 4\nmax_backlog = 8\n\
             delivery = \"{delivery}\"\n\n[kafka.properties]\n\"transaction.timeout.ms\" = \"10000\"\n"
        )
    };
    let mut runs: Vec<AcrossRestart> = ["at_least_once", "exactly_once"]
        .into_iter()
        .map(|delivery| {
            let run = Run::on(&broker.plaintext(), &format!("restart-{delivery}"), &input, &config(delivery));
            let (child, log_file) = run.spawn(&ARGS);
            AcrossRestart { delivery, run, child, log_files: vec![log_file], at_stop: 0, restarts: 0 }
        })
        .collect();
    // Mid-stream: a first checkpoint is written, most records are still to come.
    let deadline = Instant::now() + Duration::from_secs(120);
    while runs.iter().any(|r| r.at_stop < 12) {
        for r in &mut runs {
            let latest = read_latest(&kafka, &r.run.model_topic, &r.run.group).unwrap();
            r.at_stop = latest.map_or(0, |c| c.model.updates());
            let log = || logs(&r.log_files);
            assert!(r.child.0.try_wait().unwrap().is_none(), "{}: the run ended early:\n{}", r.delivery, log());
            assert!(Instant::now() < deadline, "{}: no checkpoint in 120 s:\n{}", r.delivery, log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Longer than a transaction call waits (30 s): calls time out, and aborts meet a queue of
    // messages that cannot be delivered.
    const DOWN: Duration = Duration::from_secs(32);
    broker.kill();
    std::thread::sleep(DOWN);
    for r in &mut runs {
        let (delivery, at_stop, log) = (r.delivery, r.at_stop, logs(&r.log_files));
        let waited = r.child.0.try_wait().unwrap().is_none();
        assert!(waited, "{delivery}: the run did not wait for the broker (it had learned {at_stop} of 192):\n{log}");
    }
    broker.start();
    // A transactional call that librdkafka let hang past its bound (librdkafka#5456; the
    // broker is away for longer than the bound), or a transaction the broker aborted as
    // expired, ends a run with exit code 75: restarted, as an orchestrator does, it continues
    // from the checkpoint.
    let deadline = Instant::now() + Duration::from_secs(300);
    for r in &mut runs {
        let status = r.wait_restarting(deadline);
        let (delivery, log) = (r.delivery, logs(&r.log_files));
        assert!(status.success(), "{delivery}: the run failed across the broker restart:\n{log}");
        assert!(r.at_stop < 192, "{delivery}: the broker stopped after the stream ended");
        let (hung, expired) =
            (log.matches("has not returned after").count(), log.matches("longer than transaction.timeout.ms").count());
        assert!(hung + expired >= r.restarts, "{delivery}: a run exited 75 without saying why:\n{log}");
        let outputs = read_topic_on(&kafka, &r.run.predictions, 4 * N, Duration::from_secs(5));
        let ids: BTreeSet<&str> = outputs.iter().map(|p| p["id"].as_str().unwrap()).collect();
        let missing: Vec<String> = (0..N).map(|i| format!("r{i}")).filter(|id| !ids.contains(id.as_str())).collect();
        assert!(missing.is_empty(), "{delivery}: no prediction for {missing:?}");
        let twice = outputs.len() - ids.len();
        if delivery == "exactly_once" {
            assert_eq!(twice, 0, "predictions published twice under exactly-once");
        }
        println!(
            "broker restart ({delivery}): killed at {} of 192 updates; {} predictions for {N} records ({twice} \
             published twice); {} restarts ({hung} calls overran, {expired} transactions expired)",
            r.at_stop,
            outputs.len(),
            r.restarts
        );
    }
    // The uninterrupted runs, both at once: the classifier each mode ends with.
    let references: Vec<_> = runs
        .iter()
        .map(|r| {
            let reference = Run::on(&broker.plaintext(), &format!("rref-{}", r.delivery), &input, &config(r.delivery));
            let (child, log) = reference.spawn(&ARGS);
            (reference, child, log)
        })
        .collect();
    for (r, (reference, mut child, log)) in runs.iter().zip(references) {
        succeeds(&mut child, &log, Duration::from_secs(300));
        let want = latest(&reference);
        assert_eq!(want.model.updates(), 192);
        assert_same_learner(&latest(&r.run), &want, &format!("{}: across a broker restart", r.delivery));
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

/// Where `read_committed` readers of a topic stand: per partition, the last stable offset (what
/// they can read up to) and the high watermark (what is written, committed or not).
struct Stability {
    committed: rdkafka::consumer::BaseConsumer,
    uncommitted: rdkafka::consumer::BaseConsumer,
    topic: String,
    partitions: Vec<i32>,
}

impl Stability {
    fn of(run: &Run, topic: &str) -> Stability {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer = |isolation: &str| -> BaseConsumer {
            dlpipe::kafka::client_config(&run.kafka())
                .set("group.id", common::unique("stability"))
                .set("isolation.level", isolation)
                .set("enable.auto.commit", "false")
                .create()
                .unwrap()
        };
        let (committed, uncommitted) = (consumer("read_committed"), consumer("read_uncommitted"));
        let metadata = committed.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
        let partitions: Vec<i32> =
            metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
        assert!(!partitions.is_empty(), "topic {topic} has no partitions");
        Stability { committed, uncommitted, topic: topic.to_owned(), partitions }
    }

    /// Per partition: (last stable offset, high watermark).
    fn offsets(&self) -> BTreeMap<i32, (i64, i64)> {
        use rdkafka::consumer::Consumer;
        let timeout = Duration::from_secs(10);
        self.partitions
            .iter()
            .map(|&p| {
                let stable = self.committed.fetch_watermarks(&self.topic, p, timeout).unwrap().1;
                let high = self.uncommitted.fetch_watermarks(&self.topic, p, timeout).unwrap().1;
                (p, (stable, high))
            })
            .collect()
    }

    /// The key (the record id) of the message at `offset` of `partition`, committed or not.
    fn key_at(&self, partition: i32, offset: i64) -> String {
        use rdkafka::consumer::Consumer;
        let mut assignment = rdkafka::TopicPartitionList::new();
        assignment.add_partition_offset(&self.topic, partition, rdkafka::Offset::Offset(offset)).unwrap();
        self.uncommitted.assign(&assignment).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < deadline, "no message at {partition}:{offset} of {}", self.topic);
            if let Some(Ok(message)) = self.uncommitted.poll(Duration::from_millis(100)) {
                use rdkafka::Message;
                return String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
            }
        }
    }
}

/// Waits (120 s at most) for `run`'s newest checkpoint to have learned more than `after`
/// examples, while `children` run; returns its count.
fn checkpoint_after(run: &Run, children: &mut [Process], after: u64, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(c) = read_latest(&run.kafka(), &run.model_topic, &run.group).unwrap() {
            if c.model.updates() > after {
                return c.model.updates();
            }
        }
        for c in children.iter_mut() {
            assert!(c.child.0.try_wait().unwrap().is_none(), "{what}: a process ended:\n{}", c.log());
        }
        assert!(Instant::now() < deadline, "{what}: no checkpoint past {after} updates in 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Makes a producer with worker `index`'s transactional id of `run`'s group and initialises it,
/// as that worker does at start: this fences the id's earlier producer and aborts its open
/// transaction.
fn fence_worker(run: &Run, index: usize) {
    use rdkafka::producer::{BaseProducer, Producer};
    let id = dlpipe::pipeline::worker_ids::transactional_id(&run.group, index);
    let producer: BaseProducer =
        dlpipe::kafka::client_config(&run.kafka()).set("transactional.id", &id).create().unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
}

/// Sends `signal` (`STOP`, `CONT`) to every process of `children`.
fn signal(children: &[Process], signal: &str) {
    let pids: Vec<String> = children.iter().map(|c| c.child.0.id().to_string()).collect();
    let status = std::process::Command::new("kill").arg(format!("-{signal}")).args(&pids).status().unwrap();
    assert!(status.success(), "kill -{signal} {pids:?}");
}

/// Runs `run` as three processes of one worker each, and kills them (SIGKILL) while a worker
/// index that the next run (of `next_workers`) will not have holds a transaction open on the
/// predictions topic: the transaction stays open, and `read_committed` readers wait behind it
/// until something aborts it. Record `{prefix}i` is in input partition i mod 3: worker i mod 3's.
///
/// A transaction is open for milliseconds, so the processes are stopped (SIGSTOP) whenever one
/// is seen open, and killed if the first open one of a partition is a removed worker's, else
/// continued. Tries again (each try a restart from the checkpoint) if what the kill left open
/// was not a removed worker's after all; returns the examples learned by then and what was
/// left open. The first try runs until it has written a checkpoint past `after` examples.
fn kill_in_a_removed_workers_transaction(run: &Run, prefix: &str, after: u64, next_workers: usize) -> (u64, String) {
    let stability = Stability::of(run, &run.predictions);
    let unstable = || -> Vec<(i32, i64)> {
        stability.offsets().into_iter().filter(|(_, (stable, high))| stable < high).map(|(p, (s, _))| (p, s)).collect()
    };
    for attempt in 0..8 {
        let mut children = cluster(run, 3, 1, false);
        if attempt == 0 {
            checkpoint_after(run, &mut children, after, "three processes");
        }
        let alive = |children: &mut Vec<Process>| {
            for c in children.iter_mut() {
                assert!(c.child.0.try_wait().unwrap().is_none(), "three processes: one ended:\n{}", c.log());
            }
        };
        // What the last run left open is aborted as the workers start (each fences its own
        // index); then the first transaction seen open is where the kill lands.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !unstable().is_empty() {
            alive(&mut children);
            assert!(Instant::now() < deadline, "three processes: earlier transactions not aborted in 120 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        let worker = |id: &str| id.strip_prefix(prefix).and_then(|i| i.parse::<usize>().ok()).map(|i| i % 3);
        loop {
            alive(&mut children);
            assert!(Instant::now() < deadline, "three processes: no transaction of a removed worker in 120 s");
            if unstable().is_empty() {
                continue;
            }
            signal(&children, "STOP");
            // A commit already on its way to the coordinator completes meanwhile.
            std::thread::sleep(Duration::from_millis(50));
            let removed = |(p, offset)| worker(&stability.key_at(p, offset)).is_some_and(|w| w >= next_workers);
            if unstable().into_iter().any(removed) {
                break;
            }
            signal(&children, "CONT");
        }
        // All at once: no process commits after another died.
        for c in children.iter_mut() {
            c.child.0.kill().unwrap();
        }
        drop(children);
        // What the next run's worker 0 aborts by starting; what stays open is a removed index's.
        for index in 0..next_workers {
            fence_worker(run, index);
        }
        let learned = latest(run).model.updates();
        let open: Vec<String> = unstable()
            .into_iter()
            .map(|(p, offset)| format!("{p}:{offset} ({})", stability.key_at(p, offset)))
            .collect();
        println!("try {attempt}: killed after {learned} updates; open then: {open:?}");
        if !open.is_empty() {
            return (learned, format!("transactions of removed workers open at {}", open.join(", ")));
        }
    }
    panic!("no kill in 8 tries left a transaction of a removed worker open");
}

/// 2 workers, then 3 processes, then 1 worker, each run killed (SIGKILL) mid-stream but the
/// last; checks that every record is predicted (once under exactly-once), that the classifier
/// ends as an uninterrupted run's, and how long `read_committed` readers of the predictions
/// wait, after the scale-down, for what the killed run left.
fn rescale(name: &str, exactly_once: bool, reference: &Checkpoint, input: &str, n: usize, prefix: &str) {
    let delivery = if exactly_once { "exactly_once" } else { "at_least_once" };
    let run = Run::new(name, input, &rescale_config(delivery));
    let started = Instant::now();
    let mut first = cluster(&run, 1, 2, false);
    let learned = checkpoint_after(&run, &mut first, 0, "two workers");
    drop(first);
    let (learned, open) = if exactly_once {
        kill_in_a_removed_workers_transaction(&run, prefix, learned, 1)
    } else {
        let mut second = cluster(&run, 3, 1, false);
        (checkpoint_after(&run, &mut second, learned, "three processes"), "no transactions".to_owned())
    };
    let stability = Stability::of(&run, &run.predictions);
    let killed = Instant::now();
    let written = stability.offsets();
    let last = cluster(&run, 1, 1, true);
    // The scale-down's readers: how long until they can read past all the killed run wrote.
    let deadline = killed + Duration::from_secs(120);
    let stalled = loop {
        let now = stability.offsets();
        if written.iter().all(|(p, (_, high))| now[p].0 >= *high) {
            break killed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{delivery}: readers still wait after 120 s: {now:?} (at the kill: {written:?})"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let whole_log = last[0].log.clone();
    let log = to_end(last, &format!("{delivery}: the scaled-down run"));
    let context = format!("{delivery}: killed after {learned} updates with {open}; the last run's log ends:\n{log}");
    println!(
        "rescale {delivery}: killed after {learned} of {} updates with {open}; read_committed readers waited {:.2} s \
         after the kill for the scaled-down run; {:.1} s in all",
        reference.model.updates(),
        stalled.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(learned < reference.model.updates(), "{context}\nthe runs were not killed mid-stream");
    assert_same_learner(&latest(&run), reference, &context);
    let outputs = read_topic_on(&run.kafka(), &run.predictions, 4 * n, Duration::from_secs(5));
    let ids: BTreeSet<&str> = outputs.iter().map(|p| p["id"].as_str().unwrap()).collect();
    let missing: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).filter(|id| !ids.contains(id.as_str())).collect();
    assert!(missing.is_empty(), "{context}\nno prediction for {missing:?}");
    if exactly_once {
        assert_eq!(outputs.len(), n, "{context}\npredictions published twice");
        let whole_log = std::fs::read_to_string(&whole_log).unwrap();
        let fenced: Vec<&str> = whole_log.lines().filter(|l| l.contains("fenced the transactional id")).collect();
        let summary = whole_log.lines().find(|l| l.contains("fenced the removed worker indexes"));
        println!("rescale {delivery}: {}", summary.unwrap_or("no fencing logged"));
        assert_eq!(fenced.len(), 2, "{context}\nworker indexes 1 and 2 are fenced:\n{whole_log}");
        for index in [1, 2] {
            let id = dlpipe::pipeline::worker_ids::transactional_id(&run.group, index);
            assert!(fenced.iter().any(|l| l.contains(&id)), "{context}\n{id} not fenced:\n{whole_log}");
        }
    }
    // Start-up (the fence is the first thing a worker does) and an epoch, far below the
    // transaction timeout (60 s) that readers would wait otherwise.
    assert!(stalled < Duration::from_secs(15), "{context}\nread_committed readers waited {stalled:?}");
}

/// The pipeline config of the rescale test: small offset epochs, a checkpoint every 4.
fn rescale_config(delivery: &str) -> String {
    format!(
        "epochs = {{ by = \"offsets\", records = 3 }}\ncheckpoint_every_epochs = 4\nmax_backlog = 8\n\
         delivery = \"{delivery}\"\n"
    )
}

#[test]
fn rescaling_from_two_workers_to_three_processes_to_one_fences_removed_workers_and_loses_nothing() {
    const N: usize = 180;
    let prefix = "q";
    let input = common::unique("rescale-images");
    produce(&input, 3, &messages(&fashion(N, 11000), prefix, 3, |i| i % 5 != 2));
    let reference = Run::new("rescaleref", &input, &rescale_config("at_least_once"));
    let started = Instant::now();
    to_end(cluster(&reference, 1, 1, true), "the uninterrupted run");
    println!("rescale: the uninterrupted run took {:.1} s", started.elapsed().as_secs_f64());
    let want = latest(&reference);
    assert_eq!(want.model.updates(), 144);
    rescale("rescalex", true, &want, &input, N, prefix);
    rescale("rescale", false, &want, &input, N, prefix);
}
