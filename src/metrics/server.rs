//! The metrics endpoint: a small HTTP/1.1 server on a std thread (no async runtime) that
//! answers `GET /metrics` (Prometheus text format), `GET /healthz` (the process is up) and
//! `GET /readyz` (every local worker has built its dataflow and is consuming, none is stalled,
//! and no stop was requested; otherwise 503 with the reason).
//!
//! Each connection gets a short-lived thread, reads one request and closes: Prometheus scrapes
//! and probes are a handful per second at most, so nothing more elaborate is needed. The port
//! may be reachable by anyone on the network, so what a client can hold is bounded: at most
//! [`MAX_CONNECTIONS`] at once (more are closed at once), a request head of at most
//! [`MAX_REQUEST_BYTES`] (431 past it), and [`REQUEST_DEADLINE`] to send it, however slowly
//! the bytes trickle in (then the connection is dropped).

use super::Metrics;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("metrics.listen {0:?} is not a host:port address: {1}")]
    Address(String, String),
    #[error(
        "cannot listen for metrics on {0}: {1} (set [metrics] listen to a free address, \"127.0.0.1:0\" for any \
         port, or \"\" to serve no metrics)"
    )]
    Bind(SocketAddr, std::io::Error),
}

/// Why `/readyz` answers 503; the message is the body after "not ready: ". A state the
/// process passes through, not a failure of a call, so no [`crate::Error`] holds it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("a worker failed; the process is stopping")]
    Failed,
    #[error("stopping")]
    Stopping,
    #[error("{ready} of {workers} workers started")]
    Starting { ready: usize, workers: usize },
    /// What the first stalled worker waits for, as "worker W waits for ...".
    #[error("stalled: {0}")]
    Stalled(String),
}

/// When `/readyz` says ready: once `workers` local workers have called [`worker_ready`], while
/// none is stalled, until a stop is requested.
///
/// [`worker_ready`]: Readiness::worker_ready
pub struct Readiness {
    ready: AtomicUsize,
    workers: usize,
    stop: Arc<AtomicBool>,
    failed: AtomicBool,
    /// What each stalled worker waits for, by worker index.
    stalled: Mutex<BTreeMap<usize, String>>,
}

impl Readiness {
    pub fn new(workers: usize, stop: Arc<AtomicBool>) -> Readiness {
        Readiness {
            ready: AtomicUsize::new(0),
            workers,
            stop,
            failed: AtomicBool::new(false),
            stalled: Mutex::new(BTreeMap::new()),
        }
    }

    /// One local worker has built its dataflow and assigned its partitions.
    pub fn worker_ready(&self) {
        self.ready.fetch_add(1, Ordering::SeqCst);
    }

    /// A worker hit a fatal error: not ready from now on, while the process winds down.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    /// Worker `worker` is stalled, waiting for `waiting` (`None`: it makes progress again).
    pub fn set_stalled(&self, worker: usize, waiting: Option<String>) {
        let mut stalled = self.stalled.lock().expect("not poisoned");
        match waiting {
            Some(waiting) => stalled.insert(worker, waiting),
            None => stalled.remove(&worker),
        };
    }

    /// What worker `worker` waits for, while it is stalled.
    pub fn stalled(&self, worker: usize) -> Option<String> {
        self.stalled.lock().expect("not poisoned").get(&worker).cloned()
    }

    /// What the first stalled worker waits for, as "worker W waits for ...".
    pub fn first_stalled(&self) -> Option<String> {
        let stalled = self.stalled.lock().expect("not poisoned");
        stalled.iter().next().map(|(worker, waiting)| format!("worker {worker} waits for {waiting}"))
    }

    pub fn is_ready(&self) -> bool {
        self.status().is_ok()
    }

    /// Ready, or why not.
    pub fn status(&self) -> Result<(), NotReady> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(NotReady::Failed);
        }
        if self.stop.load(Ordering::Relaxed) {
            return Err(NotReady::Stopping);
        }
        let ready = self.ready.load(Ordering::SeqCst);
        if ready < self.workers {
            return Err(NotReady::Starting { ready, workers: self.workers });
        }
        match self.first_stalled() {
            Some(stalled) => Err(NotReady::Stalled(stalled)),
            None => Ok(()),
        }
    }
}

/// The address to listen on for process `process` of a run: `listen` with its port raised by
/// the process index (port 0 stays 0: any free port).
pub fn address_for(listen: &str, process: usize) -> Result<SocketAddr, ServeError> {
    let mut address = listen
        .to_socket_addrs()
        .map_err(|e| ServeError::Address(listen.into(), e.to_string()))?
        .next()
        .ok_or_else(|| ServeError::Address(listen.into(), "it resolves to no address".into()))?;
    if address.port() != 0 {
        let port = u16::try_from(address.port() as usize + process)
            .map_err(|_| ServeError::Address(listen.into(), format!("port + process index {process} exceeds 65535")))?;
        address.set_port(port);
    }
    Ok(address)
}

/// Connections served at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 32;
/// Largest request head (request line and headers) read, in bytes.
pub const MAX_REQUEST_BYTES: u64 = 8 * 1024;
/// Time a client has to send its whole request head.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Starts serving on `address`; returns the bound address (the real port when it was 0).
pub fn serve(address: SocketAddr, metrics: Arc<Metrics>, readiness: Arc<Readiness>) -> Result<SocketAddr, ServeError> {
    let listener = TcpListener::bind(address).map_err(|e| ServeError::Bind(address, e))?;
    let bound = listener.local_addr().map_err(|e| ServeError::Bind(address, e))?;
    let open = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    open.fetch_sub(1, Ordering::SeqCst);
                    tracing::debug!("metrics endpoint: too many connections; closing a new one");
                    continue; // dropped: closed
                }
                let (metrics, readiness, open) = (Arc::clone(&metrics), Arc::clone(&readiness), Arc::clone(&open));
                let spawned = std::thread::Builder::new().name("metrics-conn".into()).spawn(move || {
                    if let Err(error) = answer(stream, &metrics, &readiness) {
                        tracing::debug!(%error, "metrics request failed");
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
                if spawned.is_err() {
                    // The closure (and its decrement) never runs.
                    tracing::warn!("metrics endpoint: cannot start a connection thread");
                }
            }
        })
        .map_err(|e| ServeError::Bind(address, e))?;
    Ok(bound)
}

/// Reads one line of the request head, within the deadline and what is left of the size limit.
fn read_head_line(
    reader: &mut impl BufRead,
    stream: &TcpStream,
    deadline: Instant,
    line: &mut String,
) -> std::io::Result<usize> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "request head not sent in time"));
    }
    stream.set_read_timeout(Some(left))?;
    reader.read_line(line)
}

fn answer(stream: TcpStream, metrics: &Metrics, readiness: &Readiness) -> std::io::Result<()> {
    stream.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let deadline = Instant::now() + REQUEST_DEADLINE;
    // `take` caps what the whole head may cost; a line cut by it has no newline.
    let mut reader = BufReader::new(stream.try_clone()?.take(MAX_REQUEST_BYTES));
    let mut request_line = String::new();
    read_head_line(&mut reader, &stream, deadline, &mut request_line)?;
    // Read (and ignore) the headers, up to the blank line.
    let mut header = String::new();
    let mut complete = request_line.ends_with('\n');
    while complete && read_head_line(&mut reader, &stream, deadline, &mut header)? > 2 {
        complete = header.ends_with('\n');
        header.clear();
    }
    if !complete {
        let mut stream = stream;
        let body = "request head too large\n";
        write!(
            stream,
            "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return stream.flush();
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", metrics.encode()),
        ("GET" | "HEAD", "/healthz") => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_owned()),
        ("GET" | "HEAD", "/readyz") => match readiness.status() {
            Ok(()) => ("200 OK", "text/plain; charset=utf-8", "ready\n".to_owned()),
            Err(why) => ("503 Service Unavailable", "text/plain; charset=utf-8", format!("not ready: {why}\n")),
        },
        ("GET" | "HEAD", _) => {
            ("404 Not Found", "text/plain; charset=utf-8", "dlpipe serves /metrics, /healthz and /readyz\n".to_owned())
        }
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "GET only\n".to_owned()),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}
