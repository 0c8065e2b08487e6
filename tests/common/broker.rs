//! A broker of a test's own: `scripts/kafka` with its own ports and storage, for tests that
//! start, stop or secure it without disturbing the shared broker other tests use.

use super::{free_port, root};
use std::path::PathBuf;
use std::process::{Command, Stdio};

pub struct Broker {
    pub port: u16,
    pub sasl_ssl_port: Option<u16>,
    pub home: tempfile::TempDir,
    pub tls_dir: Option<PathBuf>,
}

impl Broker {
    /// A broker not yet started; with `tls_dir`, it also listens with SASL_SSL.
    pub fn new(tls_dir: Option<PathBuf>) -> Broker {
        // The controller listens on port + 1: find a pair that is free.
        let port = loop {
            let port = free_port();
            if port < u16::MAX - 1 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
                break port;
            }
        };
        let sasl_ssl_port = tls_dir.as_ref().map(|_| free_port());
        Broker { port, sasl_ssl_port, home: tempfile::tempdir().unwrap(), tls_dir }
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
        let status = self.script(&["start"]).stdout(Stdio::inherit()).stderr(Stdio::inherit()).status().unwrap();
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
        let pidfile = self.home.path().join(format!("broker-{}.pid", self.port));
        let pid = std::fs::read_to_string(&pidfile).expect("the broker's pid file").trim().to_owned();
        assert!(Command::new("kill").args(["-KILL", &pid]).status().unwrap().success(), "kill -KILL {pid}");
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::fs::remove_file(pidfile).unwrap();
    }

    pub fn plaintext(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A Kafka config section for this broker's plaintext listener.
    pub fn kafka_config(&self) -> dlpipe::config::KafkaConfig {
        super::kafka_config_for(&self.plaintext())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.script(&["stop"]).output();
    }
}
