//! The operating knobs through the built binary: `run -h`, the environment over the config
//! file, `config show` / `config check`, JSON logs.

mod common;

use dlpipe::config::Config;
use std::process::{Command, Output};

/// The dlpipe binary in the repository root, with no config or dlpipe variables inherited.
fn dlpipe(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dlpipe"));
    command.args(args).current_dir(common::root());
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("DLPIPE")) {
        command.env_remove(name);
    }
    command.envs(env.iter().copied()).output().expect("run dlpipe")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_dash_h_prints_help_and_the_hostfile_has_its_long_flag() {
    for flag in ["-h", "--help"] {
        let out = dlpipe(&["run", flag], &[]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "run {flag}: {}", text(&out.stderr));
        assert!(stdout.contains("Usage: dlpipe run") && stdout.contains("--hostfile <HOSTFILE>"), "{stdout}");
    }
    let out = dlpipe(&["run", "-n", "2"], &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("-n 2 needs --hostfile FILE"), "{}", text(&out.stderr));
}

#[test]
fn config_show_prints_each_value_with_its_source_and_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dlpipe.toml");
    std::fs::write(
        &file,
        "[pipeline]\ntop_k = 5\n[kafka.properties]\n\"sasl.password\" = \"hunter2\"\n\"sasl.mechanism\" = \"PLAIN\"\n",
    )
    .unwrap();
    let env = [
        ("DLPIPE__PIPELINE__INPUT_TOPIC", "env-images"),
        ("DLPIPE__LEARNER__REPLAY__CAPACITY", "77"),
        ("DLPIPE_KAFKA__SASL_USERNAME", "alice"),
        ("DLPIPE_KAFKA__SSL_KEY_PASSWORD", "k3y"),
    ];
    let out = dlpipe(&["-c", file.to_str().unwrap(), "config", "show"], &env);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for line in [
        "input_topic = \"env-images\"  # env DLPIPE__PIPELINE__INPUT_TOPIC",
        "top_k = 5  # file",
        "max_backlog = 1024  # default",
        "capacity = 77  # env DLPIPE__LEARNER__REPLAY__CAPACITY",
        "\"sasl.password\" = \"<redacted>\"  # file",
        "\"sasl.username\" = \"<redacted>\"  # env DLPIPE_KAFKA__SASL_USERNAME",
        "\"ssl.key.password\" = \"<redacted>\"  # env DLPIPE_KAFKA__SSL_KEY_PASSWORD",
        "\"sasl.mechanism\" = \"PLAIN\"  # file",
    ] {
        assert!(shown.lines().any(|l| l == line), "no line {line:?} in:\n{shown}");
    }
    assert!(!shown.contains("hunter2") && !shown.contains("alice") && !shown.contains("k3y"), "{shown}");
    // The output is the configuration itself: read back, it is what the process runs with,
    // secrets aside.
    let mut expected = Config::from_toml(&std::fs::read_to_string(&file).unwrap()).unwrap();
    expected.pipeline.input_topic = "env-images".into();
    expected.learner.replay.capacity = 77;
    for property in ["sasl.password", "sasl.username", "ssl.key.password"] {
        expected.kafka.properties.insert(property.into(), "<redacted>".into());
    }
    assert_eq!(Config::from_toml(&shown).unwrap(), expected);
}

/// `dlpipe` arguments, environment variables, and what the error must say.
type CheckCase<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn config_check_names_the_key_and_the_reason_or_summarises() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dlpipe.toml");
    let path = file.to_str().unwrap();
    std::fs::write(&file, "[pipeline]\ntop_k = 0\n").unwrap();
    let cases: [CheckCase; 4] = [
        (&["-c", path, "config", "check"], &[], "pipeline.top_k must be at least 1"),
        (&["config", "check"], &[("DLPIPE__PIPELINE__TOP_K", "0")], "pipeline.top_k must be at least 1"),
        (&["config", "check"], &[("DLPIPE__PIPELINE__TOPK", "3")], "environment variable DLPIPE__PIPELINE__TOPK"),
        (
            &["config", "check"],
            &[
                ("DLPIPE__PIPELINE__FEEDBACK_TOPIC", "fb"),
                ("DLPIPE__PIPELINE__EPOCHS", "{ by = \"offsets\", records = 4 }"),
                ("DLPIPE__PIPELINE__FEEDBACK_RETENTION", "{ epochs = 5 }"),
            ],
            "would stall whenever the feedback topic is idle",
        ),
    ];
    for (args, env, reason) in cases {
        let out = dlpipe(args, env);
        assert!(!out.status.success(), "{args:?} {env:?} passed");
        assert!(text(&out.stderr).contains(reason), "{args:?} {env:?}: {}", text(&out.stderr));
    }
    let env = [
        ("DLPIPE__PIPELINE__FEEDBACK_TOPIC", "fb"),
        ("DLPIPE__PIPELINE__EPOCHS", "{ by = \"offsets\", records = 4 }"),
        ("DLPIPE__PIPELINE__FEEDBACK_RETENTION", "{ epochs = 5 }"),
    ];
    assert!(dlpipe(&["config", "check", "--stop-at-end"], &env).status.success());

    std::fs::write(&file, "[pipeline]\ntop_k = 4\n").unwrap();
    let out = dlpipe(&["-c", path, "config", "check"], &[("DLPIPE__PIPELINE__INPUT_TOPIC", "cameras")]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with(&format!("configuration OK ({path}, environment DLPIPE__PIPELINE__INPUT_TOPIC)"))
            && stdout.contains("cameras -> predictions"),
        "{stdout}"
    );
}

#[test]
fn json_logs_are_one_json_object_per_line() {
    let sample = common::sample("coffee.jpg");
    for (args, env) in [
        (vec!["--log-format", "json", "-v", "predict", sample.to_str().unwrap()], vec![]),
        (vec!["-v", "predict", sample.to_str().unwrap()], vec![("DLPIPE_LOG_FORMAT", "json")]),
        // The final error of a failing command is a log line too.
        (vec!["--log-format", "json", "-c", "/nonexistent/dlpipe.toml", "config", "check"], vec![]),
    ] {
        let out = dlpipe(&args, &env);
        let stderr = text(&out.stderr);
        assert!(!stderr.trim().is_empty(), "{args:?}: no logs");
        for line in stderr.lines() {
            let log: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {line}"));
            assert!(log["level"].is_string() && log["target"].is_string() && log["fields"].is_object(), "{line}");
        }
        if !out.status.success() {
            assert!(stderr.contains("\"level\":\"ERROR\"") && stderr.contains("cannot read config file"), "{stderr}");
        }
    }
}

#[test]
fn json_logs_of_a_bad_record_name_the_worker_partition_offset_and_id() {
    let input = common::unique("knobs-json-images");
    let good = common::fashion(1, 0);
    let missing = common::root().join("data/no-such-image.png");
    let messages = vec![
        (0, "good0".to_owned(), common::run::record("good0", &good[0].0, None)),
        (1, "bad1".to_owned(), common::run::record("bad1", &missing, None)),
    ];
    common::produce(&input, 2, &messages);
    let run = common::run::Run::new("knobs-json", &input, "");
    // Two workers: partition 1 is worker 1's.
    let stderr = run.to_end(&["--log-format", "json", "-w", "2"]);
    let logs: Vec<serde_json::Value> =
        stderr.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let (line, dead) = stderr
        .lines()
        .zip(&logs)
        .find(|(_, l)| l["fields"]["message"] == "dead letter")
        .unwrap_or_else(|| panic!("no dead letter logged:\n{stderr}"));
    println!("the dead letter's log line: {line}");
    let fields = &dead["fields"];
    assert_eq!(
        (&fields["id"], &fields["partition"], &fields["offset"]),
        (&"bad1".into(), &1.into(), &0.into()),
        "{dead}"
    );
    assert_eq!(fields["error_kind"], "not_found", "{dead}");
    assert_eq!(dead["span"]["worker"], 1, "the worker's span: {dead}");
    // Every line a worker logs carries its index, the same as the one it says it is.
    let assigned: Vec<&serde_json::Value> =
        logs.iter().filter(|l| l["fields"]["message"] == "assigned partitions").collect();
    assert_eq!(assigned.len(), 2, "{stderr}");
    for line in assigned {
        assert_eq!(line["span"]["worker"], line["fields"]["worker"], "{line}");
    }
    // model.intra_op_threads = 0: the two workers' models share the cores, not one team each of
    // every core.
    let threads = logs
        .iter()
        .find(|l| l["fields"]["message"] == "libtorch intra-op threads per model")
        .unwrap_or_else(|| panic!("libtorch's threads not logged:\n{stderr}"));
    let fields = &threads["fields"];
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let default = fields["libtorch_default"].as_u64().unwrap_or_else(|| panic!("{threads}"));
    assert!((1..=cores).contains(&default), "{threads}");
    assert_eq!((&fields["instances"], &fields["configured"]), (&2.into(), &0.into()), "{threads}");
    assert_eq!(fields["threads"].as_u64(), Some((default / 2).max(1)), "{threads}");
}
