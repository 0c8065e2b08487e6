//! libtorch's intra-op threads when several model instances forward at once in one process.
//!
//! libtorch's thread count is process-wide, and each thread that runs a model gets an OpenMP
//! team of that many threads. Left at libtorch's default (one per core) with `W` workers, `W`
//! teams contend for the cores: on 2 cores at bf16, 2 workers of 2 threads each streamed
//! 115-126 Fashion-MNIST images/s, of 1 thread each 132-138 (three interleaved pairs; README,
//! Benchmarks). So `model.intra_op_threads = 0` divides the default among the instances.

use std::sync::OnceLock;

/// libtorch's own default (one thread per core of the machine, or `OMP_NUM_THREADS`), but no
/// more than the cores this process may use (its CPU affinity and cgroup quota: a container's
/// limit, which libtorch does not read). Read before dlpipe first changes it, so that dividing
/// it again later starts from the same number.
fn libtorch_default() -> usize {
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (tch::get_num_threads().max(1) as usize).min(cores)
    })
}

/// Threads per instance: `configured` when set, else `default` shared by `instances` (at least
/// one each).
fn intra_op_threads_for(configured: usize, default: usize, instances: usize) -> usize {
    match configured {
        0 => (default / instances.max(1)).max(1),
        n => n,
    }
}

/// Sets libtorch's intra-op threads for `instances` models forwarding at once, from
/// `model.intra_op_threads` (`configured`; 0 = libtorch's default divided among them), logs it
/// and returns it.
pub fn set_intra_op_threads(configured: usize, instances: usize) -> usize {
    let default = libtorch_default();
    let threads = intra_op_threads_for(configured, default, instances);
    tch::set_num_threads(threads as i32);
    tracing::info!(threads, instances, configured, libtorch_default = default, "libtorch intra-op threads per model");
    threads
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_divides_the_default_among_instances() {
        assert_eq!(intra_op_threads_for(0, 16, 1), 16);
        assert_eq!(intra_op_threads_for(0, 16, 4), 4);
        assert_eq!(intra_op_threads_for(0, 16, 5), 3);
        assert_eq!(intra_op_threads_for(0, 2, 4), 1, "never fewer than one");
        assert_eq!(intra_op_threads_for(0, 2, 0), 2);
    }

    #[test]
    fn a_configured_number_wins() {
        assert_eq!(intra_op_threads_for(3, 16, 4), 3);
        assert_eq!(intra_op_threads_for(1, 2, 1), 1);
    }

    #[test]
    fn setting_it_reaches_libtorch_and_the_default_is_kept() {
        let default = libtorch_default();
        let threads = set_intra_op_threads(0, 2);
        assert_eq!(tch::get_num_threads() as usize, threads);
        assert_eq!(threads, (default / 2).max(1));
        // Divided again from libtorch's default, not from what was set before.
        assert_eq!(set_intra_op_threads(0, 1), default);
        assert_eq!(tch::get_num_threads() as usize, default);
    }
}
