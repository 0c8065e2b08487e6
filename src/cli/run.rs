//! `dlpipe run`: the streaming pipeline (see `dlpipe::pipeline`).

use dlpipe::config::Config;
use dlpipe::pipeline::{run as run_pipeline, RunOptions};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Worker threads per process (timely's -w).
    #[arg(short = 'w', long, default_value_t = 1)]
    pub(super) workers: usize,
    /// Number of processes (timely's -n).
    #[arg(short = 'n', long, default_value_t = 1)]
    pub(super) processes: usize,
    /// This process's index, 0..n (timely's -p; default 0, or with --peers-from-dns the
    /// hostname's ordinal, which -p must then agree with).
    #[arg(short = 'p', long)]
    process: Option<usize>,
    /// File of host:port lines, one per process (timely's -h; dlpipe's -h is help).
    #[arg(long, value_name = "HOSTFILE")]
    hostfile: Option<PathBuf>,
    /// The processes are the pods of a Kubernetes StatefulSet behind the headless service whose
    /// domain is NAME (e.g. dlpipe, or dlpipe.NAMESPACE.svc.cluster.local): process i is
    /// <pod>-i.NAME:PORT, with <pod>-<index> this process's hostname (dlpipe-2: index 2). Each
    /// pod serves metrics on metrics.listen's port itself (no + index).
    #[arg(long, value_name = "NAME:PORT", conflicts_with = "hostfile")]
    peers_from_dns: Option<String>,
    /// Start the online classifier from a classifier file or snapshot (instead of the group's
    /// newest checkpoint).
    #[arg(long, value_name = "FILE", conflicts_with = "fresh")]
    init_model: Option<PathBuf>,
    /// Start a new classifier, ignoring the group's checkpoints (reading starts where
    /// pipeline.start_from says: by default the group's committed offsets).
    #[arg(long)]
    fresh: bool,
    /// Read each partition up to its end offset at start-up, publish, commit, and exit.
    #[arg(long)]
    stop_at_end: bool,
}

pub fn run(mut config: Config, args: RunArgs) -> anyhow::Result<()> {
    if args.stop_at_end {
        config.pipeline.stop_at_end = true;
    }
    let (timely, metrics_port_offset) = timely_config(&args, &hostname)?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first signal asks for a graceful stop (publish what is in flight, commit); a
        // second one, while that is under way, exits at once (status 1): an operator's way out
        // when the graceful stop cannot finish. Uncommitted records are read again next time.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&stop))?;
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    let options =
        RunOptions { config, timely, metrics_port_offset, init_model: args.init_model, fresh: args.fresh, stop };
    for s in run_pipeline(options)? {
        tracing::info!(
            worker = s.worker,
            partitions = ?s.partitions,
            updates = s.updates,
            accuracy = ?s.accuracy.map(|a| format!("{a:.4}")),
            "worker finished"
        );
    }
    Ok(())
}

/// Timely's configuration from -w, -n, -p and --hostfile or --peers-from-dns (`hostname` read
/// only for the latter), and what to add to the metrics port: the process index where
/// processes may share a host, 0 where each is a pod of its own.
pub(super) fn timely_config(
    args: &RunArgs,
    hostname: &dyn Fn() -> anyhow::Result<String>,
) -> anyhow::Result<(timely::Config, usize)> {
    let (workers, processes) = (args.workers, args.processes);
    if workers == 0 || processes == 0 {
        anyhow::bail!("-w (workers per process) and -n (processes) must be at least 1");
    }
    let mut timely = dlpipe::pipeline::one_process(workers);
    if let Some(spec) = &args.peers_from_dns {
        let peers = dns_peers(spec, processes, &hostname()?, args.process)?;
        if processes > 1 {
            timely.communication = timely::CommunicationConfig::Cluster {
                threads: workers,
                process: peers.process,
                addresses: peers.addresses,
                report: false,
                zerocopy: false,
            };
        }
        return Ok((timely, 0));
    }
    let process = args.process.unwrap_or(0);
    if process >= processes {
        anyhow::bail!("-p {process} is not a process index of -n {processes} (0 to {})", processes - 1);
    }
    if processes > 1 {
        let Some(hostfile) = &args.hostfile else {
            anyhow::bail!(
                "-n {processes} needs --hostfile FILE with one host:port line per process, or --peers-from-dns \
                 NAME:PORT in a Kubernetes StatefulSet"
            )
        };
        let timely_args = [("-w", workers.to_string()), ("-n", processes.to_string()), ("-p", process.to_string())]
            .into_iter()
            .chain([("-h", hostfile.display().to_string())])
            .flat_map(|(flag, value)| [flag.to_owned(), value]);
        timely = timely::Config::from_args(timely_args).map_err(|e| anyhow::anyhow!("--hostfile: {e}"))?;
    }
    Ok((timely, process))
}

/// The peers of one pod of a StatefulSet, in process order.
#[derive(Debug, PartialEq, Eq)]
pub struct DnsPeers {
    /// This pod's ordinal: its timely process index.
    pub process: usize,
    /// `host:port` of every process; this pod's own entry is the address it listens on.
    pub addresses: Vec<String>,
}

/// The peer list of `--peers-from-dns NAME:PORT -n processes` for the pod whose hostname is
/// `hostname` (`<statefulset>-<ordinal>`, or that followed by its domain), `-p` if given.
pub fn dns_peers(spec: &str, processes: usize, hostname: &str, process: Option<usize>) -> anyhow::Result<DnsPeers> {
    let (domain, port) = spec
        .rsplit_once(':')
        .filter(|(domain, _)| !domain.is_empty() && !domain.starts_with('.') && !domain.contains(['/', ':']))
        .ok_or_else(|| {
            anyhow::anyhow!("--peers-from-dns {spec:?} is not NAME:PORT (NAME the headless service's domain)")
        })?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| anyhow::anyhow!("--peers-from-dns {spec:?}: {port:?} is not a port (1 to 65535)"))?;
    let pod = hostname.split('.').next().unwrap_or_default();
    let (statefulset, ordinal) = pod
        .rsplit_once('-')
        .and_then(|(name, ordinal)| Some((name, ordinal.parse::<usize>().ok()?)))
        .filter(|(name, _)| !name.is_empty())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--peers-from-dns: the hostname {hostname:?} has no ordinal (a StatefulSet's pods are \
                 <name>-<ordinal>, e.g. dlpipe-2); run it as a StatefulSet's pod, or use --hostfile"
            )
        })?;
    if let Some(p) = process.filter(|&p| p != ordinal) {
        anyhow::bail!("-p {p} disagrees with the ordinal {ordinal} of the hostname {hostname:?} (--peers-from-dns)");
    }
    if ordinal >= processes {
        anyhow::bail!(
            "the hostname {hostname:?} is pod {ordinal}, not a process of -n {processes} (0 to {}): the \
             StatefulSet's replicas and --processes must be the same number",
            processes - 1
        );
    }
    // Its own address is only listened on: all of the pod's interfaces, so that it need not
    // wait for its own DNS record (a peer's record is waited for: timely retries connecting).
    let addresses = (0..processes)
        .map(|i| if i == ordinal { format!("0.0.0.0:{port}") } else { format!("{statefulset}-{i}.{domain}:{port}") })
        .collect();
    Ok(DnsPeers { process: ordinal, addresses })
}

/// The kernel's hostname (a pod's name in Kubernetes), else `$HOSTNAME`.
fn hostname() -> anyhow::Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| anyhow::anyhow!("--peers-from-dns: cannot read this machine's hostname"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(line: &[&str]) -> RunArgs {
        let cli = crate::cli::Cli::try_parse_from(["dlpipe", "run"].iter().chain(line)).unwrap();
        match cli.command {
            crate::cli::Command::Run(args) => args,
            other => panic!("not run: {other:?}"),
        }
    }

    fn error_of<T: std::fmt::Debug>(result: anyhow::Result<T>) -> String {
        format!("{:#}", result.unwrap_err())
    }

    #[test]
    fn each_pod_of_a_statefulset_connects_to_the_others_by_their_dns_names() {
        let spec = "dlpipe.ml.svc.cluster.local:2101";
        let peers = dns_peers(spec, 3, "dlpipe-1", None).unwrap();
        assert_eq!(
            peers,
            DnsPeers {
                process: 1,
                addresses: vec![
                    "dlpipe-0.dlpipe.ml.svc.cluster.local:2101".into(),
                    "0.0.0.0:2101".into(),
                    "dlpipe-2.dlpipe.ml.svc.cluster.local:2101".into(),
                ],
            }
        );
        // A hyphenated StatefulSet name, a fully qualified hostname, an agreeing -p.
        let peers = dns_peers("img-learn:7000", 2, "img-learn-0.img-learn.ml.svc.cluster.local", Some(0)).unwrap();
        assert_eq!(peers.addresses, ["0.0.0.0:7000", "img-learn-1.img-learn:7000"]);
    }

    #[test]
    fn dns_peers_refuse_what_cannot_be_a_statefulsets_pod() {
        for (spec, n, host, p, says) in [
            ("dlpipe:2101", 3, "worker", None, "has no ordinal"),
            ("dlpipe:2101", 3, "dlpipe-x", None, "has no ordinal"),
            ("dlpipe:2101", 3, "-2", None, "has no ordinal"),
            ("dlpipe:2101", 3, "dlpipe-3", None, "replicas and --processes must be the same"),
            ("dlpipe:2101", 3, "dlpipe-1", Some(2), "-p 2 disagrees with the ordinal 1"),
            ("dlpipe", 3, "dlpipe-1", None, "is not NAME:PORT"),
            (":2101", 3, "dlpipe-1", None, "is not NAME:PORT"),
            ("dlpipe:0", 3, "dlpipe-1", None, "is not a port"),
            ("dlpipe:http", 3, "dlpipe-1", None, "is not a port"),
        ] {
            let error = error_of(dns_peers(spec, n, host, p));
            assert!(error.contains(says), "{spec} -n {n} on {host}: {error}");
        }
    }

    #[test]
    fn the_cli_builds_timelys_cluster_from_dns_or_a_hostfile_and_refuses_both() {
        let pod = || Ok("dlpipe-2".to_owned());
        let (timely, offset) =
            timely_config(&args(&["-w", "2", "-n", "3", "--peers-from-dns", "dlpipe:2101"]), &pod).unwrap();
        let timely::CommunicationConfig::Cluster { threads, process, addresses, .. } = timely.communication else {
            panic!("not a cluster: {:?}", timely.communication)
        };
        assert_eq!((threads, process, offset), (2, 2, 0));
        assert_eq!(addresses, ["dlpipe-0.dlpipe:2101", "dlpipe-1.dlpipe:2101", "0.0.0.0:2101"]);

        let dir = tempfile::tempdir().unwrap();
        let hostfile = dir.path().join("hosts");
        std::fs::write(&hostfile, "a:1\nb:2\n").unwrap();
        let line = ["-n", "2", "-p", "1", "--hostfile", hostfile.to_str().unwrap()];
        let no_hostname = || anyhow::bail!("not read with a hostfile");
        let (timely, offset) = timely_config(&args(&line), &no_hostname).unwrap();
        let timely::CommunicationConfig::Cluster { process, addresses, .. } = timely.communication else {
            panic!("not a cluster: {:?}", timely.communication)
        };
        assert_eq!((process, addresses, offset), (1, vec!["a:1".to_owned(), "b:2".to_owned()], 1));

        let both = ["-n", "2", "--hostfile", "hosts", "--peers-from-dns", "dlpipe:2101"];
        let both = crate::cli::Cli::try_parse_from(["dlpipe", "run"].iter().chain(&both)).unwrap_err().to_string();
        assert!(both.contains("cannot be used with"), "{both}");
        let error = error_of(timely_config(&args(&["-n", "2"]), &no_hostname));
        assert!(error.contains("-n 2 needs --hostfile FILE") && error.contains("--peers-from-dns"), "{error}");
        let error = error_of(timely_config(&args(&["-n", "3", "--peers-from-dns", "dlpipe:2101"]), &|| {
            Ok("dlpipe-3".to_owned())
        }));
        assert!(error.contains("pod 3, not a process of -n 3"), "{error}");
    }
}
