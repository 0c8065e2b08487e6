//! The processes of a cluster (`-n`): their TCP connections for timely, and noticing a lost peer.
//!
//! Timely's own start-up connects plain sockets. A peer that dies shows there as a closed
//! socket, but a peer whose host or network goes away sends nothing, and the others would wait
//! for its progress forever. So dlpipe makes the connections itself, with timely's rendezvous
//! (process `p` listens at its address, connects to every lower index and says who it is), plus
//! TCP keepalive and `TCP_USER_TIMEOUT` of `cluster.peer_timeout_ms` on each socket: an
//! unanswered peer fails its connection within that bound whether the link is idle or busy.
//! The sockets go to timely wrapped in [`PeerStream`], which tells [`PeerWatch`] the first
//! connection to fail or close.
//!
//! Failure: a connection that errors makes timely's receive or send thread panic, which poisons
//! the local workers' queues, so every worker of the process stops at its next step. A peer that
//! leaves cleanly before the dataflow is done (it stopped on an error of its own) leaves no
//! panic: the step loop sees [`PeerWatch::lost_for`] pass the timeout and stops. Either way the
//! process reports [`super::PipelineError::PeerLost`], naming the peer, `/readyz` answers 503
//! from the moment of the loss, and the process exits non-zero; the orchestrator restarts the
//! whole cluster, which continues from the newest checkpoint (timely does not repair a cluster).

use crate::metrics::Readiness;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use timely::communication::allocator::zero_copy::initialize::{initialize_networking_from_sockets, CommsGuard};
use timely::communication::allocator::zero_copy::stream::Stream;
use timely::communication::allocator::{AllocatorBuilder, ProcessBuilder};
use timely::communication::Hooks;

/// What a connecting process sends first: this tag, its index and the cluster's process count,
/// so that a peer started with another `-n` or hostfile is refused with an error naming it.
const HELLO: &[u8; 8] = b"dlpipe\x00\x01";

/// How one peer's connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Loss {
    /// The peer closed it: the process exited (or stopped), or its host shut it down.
    Closed,
    /// No answer within the peer timeout: the host is down or the network between is cut.
    Unanswered,
    /// Another error of the connection (e.g. reset by the peer).
    Failed(String),
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loss::Closed => {
                f.write_str("it closed the connection (it was killed, or stopped on an error its log names)")
            }
            Loss::Unanswered => f.write_str("no answer within cluster.peer_timeout_ms (its host is down or cut off)"),
            Loss::Failed(error) => write!(f, "the connection failed: {error}"),
        }
    }
}

/// The first peer lost, when, and how.
#[derive(Clone, Debug)]
pub struct PeerLoss {
    pub process: usize,
    pub address: String,
    pub loss: Loss,
    pub at: Instant,
}

/// Which peer connection of this process failed or closed first.
pub struct PeerWatch {
    addresses: Vec<String>,
    first: Mutex<Option<PeerLoss>>,
    readiness: Arc<Readiness>,
}

impl PeerWatch {
    pub fn new(addresses: Vec<String>, readiness: Arc<Readiness>) -> PeerWatch {
        PeerWatch { addresses, first: Mutex::new(None), readiness }
    }

    /// Records that the connection to `process` ended; the first such record is kept. A
    /// failed connection makes the process unready at once; a closed one may be a peer that
    /// finished with the dataflow, so only [`lost_for`](Self::lost_for) acts on it.
    fn record(&self, process: usize, loss: Loss) {
        let mut first = self.first.lock().expect("not poisoned");
        if first.is_none() {
            let address = self.addresses[process].clone();
            if loss != Loss::Closed {
                self.readiness.fail();
                tracing::error!(process, address, "lost process {process} of the cluster: {loss}");
            }
            *first = Some(PeerLoss { process, address, loss, at: Instant::now() });
        }
    }

    /// The first peer lost, if any.
    pub fn first(&self) -> Option<PeerLoss> {
        self.first.lock().expect("not poisoned").clone()
    }

    /// The first peer lost, once its loss is at least `grace` old (a peer that closes because
    /// the dataflow is done is followed by this process's end well within it).
    pub fn lost_for(&self, grace: Duration) -> Option<PeerLoss> {
        self.first().filter(|l| l.at.elapsed() >= grace)
    }
}

/// Whether a panic message is timely's, from a failed connection or the queues it poisoned:
/// the consequence of a lost peer, which [`PeerWatch`] names.
pub fn is_poisoned(message: &str) -> bool {
    message.starts_with("timely communication error") || message.starts_with("MergeQueue poisoned")
}

/// Keeps the panics of [`is_poisoned`] out of stderr (the lost peer is logged and returned as
/// the error); every other panic is printed as before.
fn quiet_poison_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let message =
                payload.downcast_ref::<&str>().copied().or(payload.downcast_ref::<String>().map(String::as_str));
            match message {
                Some(message) if is_poisoned(message) => tracing::debug!("{message}"),
                _ => previous(info),
            }
        }));
    });
}

/// One peer's socket as timely's communication threads use it, telling [`PeerWatch`] when it
/// closes or fails.
pub struct PeerStream {
    stream: TcpStream,
    process: usize,
    watch: Arc<PeerWatch>,
}

impl PeerStream {
    fn observe<T>(&self, result: io::Result<T>, closed: impl Fn(&T) -> bool) -> io::Result<T> {
        match &result {
            Ok(value) if closed(value) => self.watch.record(self.process, Loss::Closed),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => self.watch.record(self.process, Loss::Unanswered),
            Err(e) => self.watch.record(self.process, Loss::Failed(e.to_string())),
            Ok(_) => {}
        }
        result
    }
}

impl Read for PeerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let result = self.stream.read(buf);
        self.observe(result, |&n| n == 0 && !buf.is_empty())
    }
}

impl Write for PeerStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let result = self.stream.write(buf);
        self.observe(result, |_| false)
    }

    fn flush(&mut self) -> io::Result<()> {
        let result = self.stream.flush();
        self.observe(result, |_| false)
    }
}

impl Stream for PeerStream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(PeerStream { stream: self.stream.try_clone()?, process: self.process, watch: Arc::clone(&self.watch) })
    }

    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.stream.set_nonblocking(nonblocking)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.stream.shutdown(how)
    }
}

/// Why the cluster's connections could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot listen at {address} (this process's line of the hostfile): {source}")]
    Listen {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("connection from {from}: {reason}")]
    Handshake { from: String, reason: String },
    #[error("socket options for the connection to process {process} ({address}): {source}")]
    Socket {
        process: usize,
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("timely's communication threads: {0}")]
    Threads(#[source] io::Error),
}

/// The connections of one process of a cluster, handed to timely.
pub struct Connected {
    pub builders: Vec<AllocatorBuilder>,
    /// Timely's send and receive threads. Dropping it joins them, which waits on live peers
    /// and panics on failed ones: forget it when the run failed.
    pub threads: CommsGuard,
    pub watch: Arc<PeerWatch>,
}

/// Connects process `process` of `addresses` to every other (waiting for those not yet up) and
/// starts timely's communication for `threads` local workers.
pub fn connect(
    addresses: Vec<String>,
    process: usize,
    threads: usize,
    peer_timeout: Duration,
    readiness: Arc<Readiness>,
) -> Result<Connected, ClusterError> {
    let watch = Arc::new(PeerWatch::new(addresses.clone(), readiness));
    quiet_poison_panics();
    let mut sockets = sockets(&addresses, process)?;
    for (peer, socket) in sockets.iter_mut().enumerate() {
        if let Some(socket) = socket {
            detect_silence(socket, peer_timeout).map_err(|source| ClusterError::Socket {
                process: peer,
                address: addresses[peer].clone(),
                source,
            })?;
        }
    }
    let streams = sockets
        .into_iter()
        .enumerate()
        .map(|(peer, s)| s.map(|stream| PeerStream { stream, process: peer, watch: Arc::clone(&watch) }))
        .collect();
    let hooks = Hooks::default();
    let local = ProcessBuilder::new_typed_vector(threads, hooks.refill.clone(), hooks.spill.clone());
    let (builders, threads) =
        initialize_networking_from_sockets(local, streams, process, threads, hooks).map_err(ClusterError::Threads)?;
    tracing::info!(process, peers = addresses.len() - 1, "connected to every process of the cluster");
    Ok(Connected { builders: builders.into_iter().map(AllocatorBuilder::Tcp).collect(), threads, watch })
}

/// Keepalive probes after a second of silence, and `TCP_USER_TIMEOUT`: a connection whose
/// peer does not acknowledge data or probes for `timeout` fails with `TimedOut`.
fn detect_silence(socket: &TcpStream, timeout: Duration) -> io::Result<()> {
    let socket = socket2::SockRef::from(socket);
    let second = Duration::from_secs(1);
    let keepalive = socket2::TcpKeepalive::new().with_time(second).with_interval(second).with_retries(
        // Enough probes to outlast the user timeout, which then decides.
        timeout.as_secs().clamp(1, 1000) as u32 + 1,
    );
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(timeout))?;
    socket.set_tcp_nodelay(true)
}

/// One socket per other process, in process order (`None` at `process`).
fn sockets(addresses: &[String], process: usize) -> Result<Vec<Option<TcpStream>>, ClusterError> {
    let own = addresses[process].clone();
    let listener = TcpListener::bind(&own).map_err(|source| ClusterError::Listen { address: own.clone(), source })?;
    let higher = addresses.len() - process - 1;
    let processes = addresses.len();
    let accepting = std::thread::spawn(move || accept(listener, process, processes, higher));
    let mut sockets: Vec<Option<TcpStream>> = addresses[..process]
        .iter()
        .enumerate()
        .map(|(peer, address)| Some(dial(address, &own, peer, process, processes)))
        .collect();
    sockets.push(None);
    sockets.extend(accepting.join().expect("the accepting thread does not panic")?.into_iter().map(Some));
    Ok(sockets)
}

/// Connects to `peer` at `address` from this host's own address (where it is one of this
/// machine's), retrying each second until it listens, and says who this process is.
fn dial(address: &str, own: &str, peer: usize, process: usize, processes: usize) -> TcpStream {
    let started = Instant::now();
    let mut logged = Instant::now();
    loop {
        match connect_from(address, own).and_then(|mut s| hello(&mut s, process, processes).map(|_| s)) {
            Ok(stream) => return stream,
            Err(error) => {
                if logged.elapsed() >= Duration::from_secs(10) {
                    logged = Instant::now();
                    tracing::info!(
                        peer,
                        address,
                        waited_secs = started.elapsed().as_secs(),
                        "waiting for process {peer} of the cluster: {error}"
                    );
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// A connection to `address` whose local end is `own`'s host (port chosen by the system), so
/// that the peer sees this process's hostfile address; from any local address where that host
/// is not this machine's.
fn connect_from(address: &str, own: &str) -> io::Result<TcpStream> {
    let target = address
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{address} resolves to nothing")))?;
    let local = own.to_socket_addrs().ok().and_then(|mut a| a.next()).map(|a| SocketAddr::new(a.ip(), 0));
    let socket = socket2::Socket::new(socket2::Domain::for_address(target), socket2::Type::STREAM, None)?;
    if let Some(local) = local.filter(|l| l.is_ipv4() == target.is_ipv4()) {
        if let Err(error) = socket.bind(&local.into()) {
            tracing::debug!(%local, "connecting from any address: {error}");
        }
    }
    socket.connect_timeout(&target.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

fn hello(stream: &mut TcpStream, process: usize, processes: usize) -> io::Result<()> {
    let mut message = HELLO.to_vec();
    message.extend((process as u64).to_le_bytes());
    message.extend((processes as u64).to_le_bytes());
    stream.write_all(&message)
}

/// Accepts the connections of the `higher` processes after `process`, each placed by the index
/// it says; refuses one that is not of this cluster.
fn accept(
    listener: TcpListener,
    process: usize,
    processes: usize,
    higher: usize,
) -> Result<Vec<TcpStream>, ClusterError> {
    let mut accepted: Vec<Option<TcpStream>> = (0..higher).map(|_| None).collect();
    while accepted.iter().any(Option::is_none) {
        let (mut stream, from) = match listener.accept() {
            Ok(connection) => connection,
            Err(error) => {
                tracing::warn!("accepting a peer's connection: {error}");
                continue;
            }
        };
        let from = from.to_string();
        let handshake = |reason: String| ClusterError::Handshake { from: from.clone(), reason };
        stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| handshake(e.to_string()))?;
        let mut message = [0u8; 24];
        if let Err(error) = stream.read_exact(&mut message) {
            // A port scan or health check, not a peer: keep waiting for the peers.
            tracing::warn!(from, "a connection that is not a dlpipe peer: {error}");
            continue;
        }
        if &message[..8] != HELLO {
            // Not a peer (or one of another dlpipe version, whose log says it got no answer).
            tracing::warn!(from, "a connection that is not a dlpipe peer of this version: ignored");
            continue;
        }
        let word = |at: usize| u64::from_le_bytes(message[at..at + 8].try_into().expect("8 bytes")) as usize;
        let (peer, peer_processes) = (word(8), word(16));
        if peer_processes != processes || peer <= process || peer >= processes {
            return Err(handshake(format!(
                "it says it is process {peer} of {peer_processes}, and this is process {process} of {processes}: \
                 start every process with the same -n and hostfile"
            )));
        }
        if accepted[peer - process - 1].is_some() {
            return Err(handshake(format!(
                "a second process says it is process {peer}: give each process its own -p (or pod ordinal)"
            )));
        }
        stream.set_read_timeout(None).map_err(|e| handshake(e.to_string()))?;
        accepted[peer - process - 1] = Some(stream);
    }
    Ok(accepted.into_iter().map(|s| s.expect("every slot filled")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    fn free_addresses(n: usize) -> Vec<String> {
        (0..n)
            .map(|h| {
                let listener = TcpListener::bind(format!("127.0.0.{}:0", h + 2)).unwrap();
                listener.local_addr().unwrap().to_string()
            })
            .collect()
    }

    #[test]
    fn three_processes_connect_in_order_and_a_closed_peer_is_named() {
        let addresses = free_addresses(3);
        let readiness = Arc::new(Readiness::new(1, Arc::new(AtomicBool::new(false))));
        readiness.worker_ready();
        let handles: Vec<_> = (0..3)
            .map(|p| {
                let (addresses, readiness) = (addresses.clone(), Arc::clone(&readiness));
                std::thread::spawn(move || {
                    let watch = Arc::new(PeerWatch::new(addresses.clone(), readiness));
                    let sockets = sockets(&addresses, p).unwrap();
                    (p, sockets, watch)
                })
            })
            .collect();
        let mut all: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (p, sockets, _) in &all {
            assert!(sockets[*p].is_none());
            for (peer, socket) in sockets.iter().enumerate().filter(|(peer, _)| peer != p) {
                // Each process sees its peer at the peer's own host: a dialling process
                // connects from its hostfile address, not from the machine's default one.
                let host = addresses[peer].parse::<SocketAddr>().unwrap().ip();
                assert_eq!(socket.as_ref().unwrap().peer_addr().unwrap().ip(), host, "{p} -> {peer}");
            }
        }
        // Process 2 goes away: process 0's reads of it end, and the watch names process 2.
        let (_, gone, _) = all.pop().unwrap();
        drop(gone);
        let (_, sockets, watch) = &all[0];
        let mut stream = PeerStream {
            stream: sockets[2].as_ref().unwrap().try_clone().unwrap(),
            process: 2,
            watch: Arc::clone(watch),
        };
        assert_eq!(stream.read(&mut [0u8; 16]).unwrap(), 0);
        let loss = watch.first().unwrap();
        assert_eq!((loss.process, loss.address.as_str(), loss.loss), (2, addresses[2].as_str(), Loss::Closed));
        assert!(readiness.is_ready(), "a close alone decides nothing yet: the dataflow may be done");
        assert!(watch.lost_for(Duration::from_secs(3600)).is_none());
        assert!(watch.lost_for(Duration::ZERO).is_some());
    }

    #[test]
    fn a_failed_connection_makes_the_process_unready_at_once() {
        let readiness = Arc::new(Readiness::new(1, Arc::new(AtomicBool::new(false))));
        readiness.worker_ready();
        assert!(readiness.is_ready());
        let watch = PeerWatch::new(vec!["a:1".into(), "b:2".into()], Arc::clone(&readiness));
        watch.record(1, Loss::Unanswered);
        watch.record(0, Loss::Closed);
        assert!(!readiness.is_ready());
        assert_eq!(watch.first().unwrap().process, 1, "the first loss is the one reported");
    }

    #[test]
    fn a_stray_connection_is_ignored_and_the_peer_after_it_accepted() {
        let addresses = free_addresses(2);
        let listener = TcpListener::bind(&addresses[0]).unwrap();
        let address = addresses[0].clone();
        let clients = std::thread::spawn(move || {
            let mut stray = TcpStream::connect(&address).unwrap();
            stray.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut peer = TcpStream::connect(&address).unwrap();
            hello(&mut peer, 1, 2).unwrap();
            (stray, peer)
        });
        let accepted = accept(listener, 0, 2, 1).unwrap();
        let (_stray, peer) = clients.join().unwrap();
        assert_eq!(accepted[0].peer_addr().unwrap(), peer.local_addr().unwrap());
    }

    #[test]
    fn a_peer_of_another_cluster_shape_is_refused_with_both_shapes() {
        let addresses = free_addresses(2);
        let listener = TcpListener::bind(&addresses[0]).unwrap();
        let client = std::thread::spawn({
            let address = addresses[0].clone();
            move || {
                let mut stream = TcpStream::connect(address).unwrap();
                hello(&mut stream, 1, 3).unwrap();
                stream
            }
        });
        let error = accept(listener, 0, 2, 1).unwrap_err().to_string();
        assert!(error.contains("process 1 of 3") && error.contains("process 0 of 2"), "{error}");
        drop(client.join());
    }
}
