//! `scripts/gpu-check --dry-run`: the GPU check's steps on the CPU with tiny sizes, so that the
//! command a GPU machine runs is known to work before one is available.

mod common;

use std::process::Command;
use std::time::Instant;

#[test]
fn gpu_check_dry_run_prints_every_table_per_precision() {
    let started = Instant::now();
    let out = Command::new(common::root().join("scripts/gpu-check"))
        .arg("--dry-run")
        .env("DLPIPE_BIN", env!("CARGO_BIN_EXE_dlpipe"))
        .env_remove("DLPIPE_CONFIG")
        .current_dir(common::root())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}\n({:.1} s)", started.elapsed().as_secs_f64());
    assert!(out.status.success(), "gpu-check --dry-run failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    // The forward table has a row per precision, each with an images/s figure per batch size.
    for (model, precision) in [("efficientnet_lite0", "f32"), ("efficientnet_lite0_bf16", "bf16")] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {model} | {precision} | Cpu |")))
            .unwrap_or_else(|| panic!("no forward row of {model} at {precision}:\n{stdout}"));
        let rates: Vec<f64> = row.split('|').skip(4).filter_map(|c| c.trim().parse().ok()).collect();
        assert!(rates.len() == 2 && rates.iter().all(|r| *r > 0.0), "{row}");
    }
    // The pipeline's table per precision, each with its model-alone rate and the stream's.
    for (model, precision) in [("efficientnet_lite0", "f32"), ("efficientnet_lite0_bf16", "bf16")] {
        let header =
            format!("## end to end through Kafka ({model}, precision {precision}, resize on host, 1 worker(s)");
        assert!(stdout.contains(&header), "no pipeline table for {precision}:\n{stdout}");
    }
    // The small images' runs, resized on the host and then on the device (the CPU here).
    for resize in ["host", "device"] {
        let header = format!("## end to end through Kafka (efficientnet_lite0, precision f32, resize on {resize}, 1");
        assert!(stdout.contains(&header), "no pipeline table resizing on the {resize}:\n{stdout}");
    }
    // Per table, one backlog run (the model alone, the stream and their ratio) and one paced run.
    let backlogs: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| file | at_least_once | ")).collect();
    assert_eq!(backlogs.len(), 4, "{stdout}");
    for row in backlogs {
        let figures: Vec<f64> = row
            .split('|')
            .skip(3)
            .filter_map(|c| c.split_whitespace().next()?.trim_end_matches('%').parse().ok())
            .collect();
        assert!(figures.len() == 4 && figures.iter().all(|f| *f > 0.0), "{row}");
    }
    assert_eq!(stdout.matches(" ms | at_least_once | ").count(), 4, "{stdout}");
    assert!(stdout.contains("| resize + crop on cpu |"), "the decode table times the device's resize: {stdout}");
    assert!(stdout.contains("no GPU measured (dry run)") && stdout.contains("gpu-check done"), "{stdout}");
}
