//! A cluster of three `dlpipe run` processes on three hosts, against the real broker: one is
//! killed, another is cut off from its peers, mid-stream; every process stops within the peer
//! timeout with an error naming the lost peer, and the restarted cluster finishes with every
//! record predicted exactly once.
//!
//! The hosts are distinct loopback addresses (127.0.0.2 to 127.0.0.4), each process's timely
//! connections bound to its own, and a cut is iptables dropping every packet from or to one
//! address. Network namespaces can be made here, but the broker advertises 127.0.0.1 only,
//! which a namespace cannot reach without a proxy in each. The cut leaves the process's Kafka
//! connections (from 127.0.0.1) up: a partition of the cluster's own network, the case where a
//! cut-off process could go on writing if it did not stop itself. Needs root (iptables), as
//! `make test` runs.

mod common;

use common::run::{messages, read_topic_on, Run};
use common::{fashion, free_port, produce, KillOnDrop};
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::collections::BTreeSet;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// What the processes may take beyond the timeout to stop: detection by keepalive (a probe a
/// second), and unwinding their Kafka clients.
const STOP_SLACK: Duration = Duration::from_secs(12);

/// A process of the cluster and its log.
struct Host {
    child: KillOnDrop,
    log: std::path::PathBuf,
    address: String,
}

impl Host {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts the three processes, process `p` at `addresses[p]`.
fn start(run: &Run, addresses: &[String], args: &[&str]) -> Vec<Host> {
    let hostfile = run.dir.path().join("hosts.txt");
    std::fs::write(&hostfile, addresses.join("\n") + "\n").unwrap();
    (0..addresses.len())
        .map(|p| {
            let log = run.dir.path().join(format!("{}.log", common::unique(&format!("process{p}"))));
            let n = addresses.len().to_string();
            let mut command = run.command(&[&["-w", "1", "-n", &n, "-p", &p.to_string()], args].concat());
            command.arg("--hostfile").arg(&hostfile);
            let child = command.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
            Host { child: KillOnDrop(child), log, address: addresses[p].clone() }
        })
        .collect()
}

/// Records written to the predictions topic so far (committed or not): how far the stream is.
fn written(run: &Run) -> i64 {
    let consumer: BaseConsumer = dlpipe::kafka::client_config(&run.kafka()).create().unwrap();
    (0..2).map(|p| consumer.fetch_watermarks(&run.predictions, p, Duration::from_secs(5)).map_or(0, |w| w.1)).sum()
}

/// Waits until the cluster has written `more` predictions beyond `from`.
fn wait_for_progress(run: &Run, hosts: &mut [Host], from: i64, more: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let now = written(run);
        if now >= from + more {
            return now;
        }
        for host in hosts.iter_mut() {
            assert!(host.child.0.try_wait().unwrap().is_none(), "a process stopped on its own:\n{}", host.log());
        }
        assert!(Instant::now() < deadline, "no progress in 180 s:\n{}", hosts[0].log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for every host to exit; returns when each did (since `since`) and its status.
fn stops(hosts: &mut [Host], since: Instant) -> Vec<(Duration, ExitStatus)> {
    let limit = PEER_TIMEOUT + STOP_SLACK + Duration::from_secs(30);
    let mut stopped: Vec<Option<(Duration, ExitStatus)>> = vec![None; hosts.len()];
    while stopped.iter().any(Option::is_none) {
        for (host, stop) in hosts.iter_mut().zip(&mut stopped).filter(|(_, s)| s.is_none()) {
            *stop = host.child.0.try_wait().unwrap().map(|status| (since.elapsed(), status));
            assert!(since.elapsed() < limit, "{} still runs after {limit:?}:\n{}", host.address, host.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stopped.into_iter().flatten().collect()
}

/// iptables rules dropping every packet from or to one address, removed on drop.
struct Cut(String);

impl Cut {
    fn off(ip: &str) -> Cut {
        for rule in [["-s", ip], ["-d", ip]] {
            iptables(&[&["-I", "OUTPUT"], &rule[..], &["-j", "DROP"]].concat());
        }
        Cut(ip.to_owned())
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        for rule in [["-s", self.0.as_str()], ["-d", self.0.as_str()]] {
            iptables(&[&["-D", "OUTPUT"], &rule[..], &["-j", "DROP"]].concat());
        }
    }
}

fn iptables(args: &[&str]) {
    let status = Command::new("iptables").args(args).status().expect("iptables (run the tests as root)");
    assert!(status.success(), "iptables {args:?} failed: the test needs root and iptables");
}

/// Asserts that every host stopped non-zero within the bound and that every process not killed
/// names a lost peer and says what to do; returns each one's log.
fn assert_stopped(
    hosts: &[Host],
    stopped: &[(Duration, ExitStatus)],
    killed: Option<usize>,
    what: &str,
) -> Vec<String> {
    let mut logs = Vec::new();
    for (p, (host, (after, status))) in hosts.iter().zip(stopped).enumerate() {
        let log = host.log();
        println!("{what}: process {p} ({}) stopped after {:.1} s with {status}", host.address, after.as_secs_f64());
        assert!(!status.success(), "{what}: process {p} exited 0:\n{log}");
        assert!(*after <= PEER_TIMEOUT + STOP_SLACK, "{what}: process {p} took {after:?} to stop:\n{log}");
        if killed != Some(p) {
            assert!(log.contains("restart the whole cluster"), "{what}: process {p} says not what to do:\n{log}");
            assert!(!log.contains("MergeQueue poisoned"), "{what}: timely's panics reach the log:\n{log}");
        }
        logs.push(log);
    }
    logs
}

fn names(log: &str, lost: usize, host: &Host) -> bool {
    log.contains(&format!("lost process {lost} of the cluster ({})", host.address))
}

#[test]
fn a_cluster_of_three_hosts_stops_on_a_killed_or_cut_off_process_and_restarts_losing_nothing() {
    const N: usize = 300;
    let images = fashion(N, 12000);
    let input = common::unique("hosts-images");
    produce(&input, 3, &messages(&images, "h", 3, |i| i % 4 != 3));
    let extra = format!(
        "epochs = {{ by = \"offsets\", records = 4 }}\ncheckpoint_every_epochs = 2\nmax_backlog = 16\n\
         delivery = \"exactly_once\"\n\n[cluster]\npeer_timeout_ms = {}\n",
        PEER_TIMEOUT.as_millis()
    );
    let run = Run::new("hosts", &input, &extra);
    let addresses: Vec<String> = (2..5).map(|h| format!("127.0.0.{h}:{}", free_port())).collect();

    // 1. Process 1 is killed: its peers see its connections close and stop at once.
    let mut hosts = start(&run, &addresses, &[]);
    wait_for_progress(&run, &mut hosts, 0, 20);
    let killed = Instant::now();
    hosts[1].child.0.kill().unwrap();
    let stopped = stops(&mut hosts, killed);
    let logs = assert_stopped(&hosts, &stopped, Some(1), "process 1 killed");
    for p in [0, 2] {
        // The kernel closes a killed process's connections: both peers see it at once.
        assert!(names(&logs[p], 1, &hosts[1]), "process 1 killed: process {p} does not name it:\n{}", logs[p]);
    }

    // 2. The restarted cluster goes on; process 2's network is cut: nothing answers it, and
    // every process stops within the peer timeout (process 2 itself too, cut off from both).
    // Where the killed cluster left off (its last, aborted, transactions included).
    let before = written(&run);
    let restarted = Instant::now();
    let mut hosts = start(&run, &addresses, &[]);
    wait_for_progress(&run, &mut hosts, before, 1);
    println!("restarted cluster: first new prediction {:.1} s after the start", restarted.elapsed().as_secs_f64());
    wait_for_progress(&run, &mut hosts, before, 20);
    let cut = Cut::off("127.0.0.4");
    let since = Instant::now();
    let stopped = stops(&mut hosts, since);
    drop(cut);
    let logs = assert_stopped(&hosts, &stopped, None, "process 2 cut off");
    // The timeouts of the cut links end within a second of each other: a process may first
    // see a peer that stopped on its own timeout close, and name that one; someone names 2.
    let silent = "no answer within cluster.peer_timeout_ms";
    assert!(
        (0..2).any(|p| names(&logs[p], 2, &hosts[2]) && logs[p].contains(silent)),
        "process 2 cut off: neither peer names it:\n{}",
        logs.join("\n---\n")
    );
    assert!(logs[2].contains(silent), "process 2 cut off: it does not say why:\n{}", logs[2]);

    // 3. The cluster restarted once more reads to the end: every record predicted, once.
    let mut hosts = start(&run, &addresses, &["--stop-at-end"]);
    for host in &mut hosts {
        let status = common::run::succeeds(&mut host.child, &host.log, Duration::from_secs(300));
        assert!(status.contains("worker finished"), "{status}");
    }
    let outputs = read_topic_on(&run.kafka(), &run.predictions, 2 * N, Duration::from_secs(5));
    let ids: BTreeSet<&str> = outputs.iter().map(|p| p["id"].as_str().unwrap()).collect();
    let missing: Vec<String> = (0..N).map(|i| format!("h{i}")).filter(|id| !ids.contains(id.as_str())).collect();
    assert!(missing.is_empty(), "no prediction for {missing:?}");
    assert_eq!(outputs.len(), N, "predictions published twice under exactly-once");
    println!("{N} records, each predicted once, across a killed and a cut-off process");
}

/// A process that stops on an error of its own leaves its peers a dataflow that cannot go on:
/// they stop, at once where its connections break as it exits, else once the peer timeout has
/// passed after it said goodbye (timely's clean shutdown of the connections).
#[test]
fn a_process_stopping_on_its_own_error_stops_its_peers_within_the_peer_timeout() {
    let images = fashion(40, 12500);
    let input = common::unique("hosts-own-error-images");
    produce(&input, 2, &messages(&images, "e", 2, |_| true));
    let extra = format!("\n[cluster]\npeer_timeout_ms = {}\n", PEER_TIMEOUT.as_millis());
    let run = Run::new("hosts-own-error", &input, &extra);
    let addresses: Vec<String> = (2..4).map(|h| format!("127.0.0.{h}:{}", free_port())).collect();
    let hostfile = run.dir.path().join("hosts.txt");
    std::fs::write(&hostfile, addresses.join("\n") + "\n").unwrap();
    let mut hosts: Vec<Host> = (0..2)
        .map(|p| {
            let log = run.dir.path().join(format!("process{p}.log"));
            let mut command = run.command(&["-w", "1", "-n", "2", "-p", &p.to_string()]);
            command.arg("--hostfile").arg(&hostfile);
            if p == 1 {
                // A device this machine lacks: the worker fails after the cluster connected.
                command.env("DLPIPE__MODEL__DEVICES", "[\"cuda:7\"]");
            }
            let child = command.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
            Host { child: KillOnDrop(child), log, address: addresses[p].clone() }
        })
        .collect();
    let since = Instant::now();
    let stopped = stops(&mut hosts, since);
    let own = hosts[1].log();
    assert!(!stopped[1].1.success() && own.contains("cuda:7"), "process 1 does not fail on its device:\n{own}");
    let log = hosts[0].log();
    assert!(!stopped[0].1.success(), "process 0 exited 0:\n{log}");
    assert!(names(&log, 1, &hosts[1]) && log.contains("restart the whole cluster"), "process 0:\n{log}");
    let waited = stopped[0].0.saturating_sub(stopped[1].0);
    println!("process 0 stopped {:.1} s after process 1 failed on its own", waited.as_secs_f64());
    // Process 1 closes its connections when its worker fails, before its Kafka clients wind
    // down: process 0 may stop before process 1 has exited, never long after.
    assert!(waited <= PEER_TIMEOUT + STOP_SLACK, "process 0 stopped {waited:?} after 1");
}
