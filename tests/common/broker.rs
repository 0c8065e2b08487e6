//! A broker of a test's own: `scripts/kafka` with its own ports and storage, for tests that
//! start, stop or secure it without disturbing the shared broker other tests use; or a cluster
//! of several (`scripts/kafka start --brokers N`) whose nodes a test kills and restarts.

use super::{free_port, root};
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub struct Broker {
    pub port: u16,
    /// Nodes of the cluster: node k (from 1) listens on port + 2(k-1), its controller one above.
    pub nodes: u16,
    pub sasl_ssl_port: Option<u16>,
    pub home: tempfile::TempDir,
    pub tls_dir: Option<PathBuf>,
}

impl Broker {
    /// A broker not yet started; with `tls_dir`, it also listens with SASL_SSL.
    pub fn new(tls_dir: Option<PathBuf>) -> Broker {
        let port = free_ports(2);
        let sasl_ssl_port = tls_dir.as_ref().map(|_| free_port());
        Broker { port, nodes: 1, sasl_ssl_port, home: tempfile::tempdir().unwrap(), tls_dir }
    }

    /// A cluster of `nodes` brokers (each also a KRaft controller), not yet started.
    pub fn cluster(nodes: u16) -> Broker {
        let port = free_ports(2 * nodes);
        Broker { port, nodes, sasl_ssl_port: None, home: tempfile::tempdir().unwrap(), tls_dir: None }
    }

    /// `scripts/kafka ARGS` for this broker.
    pub fn script(&self, args: &[&str]) -> Command {
        let mut command = Command::new(root().join("scripts/kafka"));
        command
            .args(args)
            .env_remove("DLPIPE_KAFKA_BROKERS")
            .env_remove("DLPIPE_KAFKA_PROPERTIES")
            .env("DLPIPE_KAFKA_PORT", self.port.to_string())
            .env("DLPIPE_KAFKA_HOME", self.home.path());
        if let (Some(port), Some(tls)) = (self.sasl_ssl_port, &self.tls_dir) {
            command.env("DLPIPE_KAFKA_SASL_SSL_PORT", port.to_string()).env("DLPIPE_KAFKA_TLS_DIR", tls);
        }
        command
    }

    /// Starts the broker and waits until it serves clients.
    pub fn start(&self) {
        let nodes = self.nodes.to_string();
        let status = self
            .script(&["start", "--brokers", &nodes])
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .status()
            .unwrap();
        assert!(status.success(), "scripts/kafka start failed");
    }

    /// Launches the broker and returns at once: it is not serving yet.
    pub fn launch(&self) {
        let status = self.script(&["start", "--no-wait"]).status().unwrap();
        assert!(status.success(), "scripts/kafka start --no-wait failed");
    }

    /// Stops the broker (SIGTERM: it closes its logs and leaves the cluster in order).
    pub fn stop(&self) {
        let output = self.script(&["stop"]).output().unwrap();
        assert!(output.status.success(), "scripts/kafka stop failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// Kills the broker with SIGKILL, as a crash or a lost machine would: nothing is flushed
    /// or handed over, and the next start recovers its logs.
    pub fn kill(&self) {
        assert_eq!(self.nodes, 1, "kill_node kills one node of a cluster");
        self.kill_pidfile(self.home.path().join(format!("broker-{}.pid", self.port)));
    }

    /// Kills node `node` (from 1) of a cluster with SIGKILL.
    pub fn kill_node(&self, node: i32) {
        self.kill_pidfile(self.home.path().join(format!("cluster-{}/broker-{node}.pid", self.port)));
    }

    /// Starts node `node` of a cluster again and waits until every replica is in sync.
    pub fn start_node(&self, node: i32) {
        let output = self.script(&["start", "--node", &node.to_string()]).output().unwrap();
        assert!(
            output.status.success(),
            "scripts/kafka start --node {node}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Restarts every node of a cluster in turn (SIGTERM, start, replicas in sync), as an upgrade does.
    pub fn rolling_restart(&self) {
        let output = self.script(&["restart", "--rolling"]).output().unwrap();
        assert!(
            output.status.success(),
            "scripts/kafka restart --rolling: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn kill_pidfile(&self, pidfile: PathBuf) {
        let pid = std::fs::read_to_string(&pidfile).expect("the broker's pid file").trim().to_owned();
        assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success(), "kill -KILL {pid}");
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::fs::remove_file(pidfile).unwrap();
    }

    /// The bootstrap servers: every node of a cluster.
    pub fn plaintext(&self) -> String {
        let nodes = (0..self.nodes).map(|k| format!("127.0.0.1:{}", self.port + 2 * k));
        nodes.collect::<Vec<_>>().join(",")
    }

    /// A Kafka config section for this broker's plaintext listener.
    pub fn kafka_config(&self) -> dlpipe::config::KafkaConfig {
        super::kafka_config_for(&self.plaintext())
    }
}

/// The first of `n` consecutive ports that are free on loopback.
/// `n` consecutive free ports, below the system's ephemeral range (32768 and up on Linux): a
/// port picked from that range, free when picked, can be taken as the source port of any
/// outgoing connection before the broker binds it (seen once: "Address already in use" at a
/// cluster's start).
fn free_ports(n: u16) -> u16 {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let mut rng = dlpipe::transfer::dataset::SplitMix64(u64::from(seed) ^ u64::from(std::process::id()));
    loop {
        let port = 20_000 + rng.below(12_000) as u16;
        if (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", port + i)).is_ok()) {
            break port;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.script(&["stop"]).output();
    }
}
