//! The relocatable release (`make dist`, scripts/dist) away from the clone: unpacked into a
//! temporary folder and run from another one, with an environment that names neither the clone
//! nor libtorch, it loads only its own libraries and the system's, names the cat in a photo and
//! runs a stream against the local broker. And the container image made from it (`make image`,
//! the Dockerfile built by buildah): its entry point does the same as the image's user, and its
//! health check reports a live run ready.

mod common;

use common::run::{messages, read_topic, succeeds};
use common::{fashion, produce, unique, KillOnDrop};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The release tarball of the binary cargo built for the tests: scripts/dist makes it, or
/// finds it up to date (same binary, models, configs, docs and script) and leaves it.
fn tarball() -> &'static Path {
    static TARBALL: OnceLock<PathBuf> = OnceLock::new();
    TARBALL.get_or_init(|| {
        let started = Instant::now();
        let out = Command::new(common::root().join("scripts/dist"))
            .args(["--binary", env!("CARGO_BIN_EXE_dlpipe")])
            .current_dir(common::root())
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/dist");
        assert!(out.status.success(), "scripts/dist failed (its log is above)");
        let path = common::root().join(String::from_utf8(out.stdout).unwrap().trim());
        eprintln!("scripts/dist: {} in {:.1} s", path.display(), started.elapsed().as_secs_f64());
        path
    })
}

/// The release unpacked into a fresh temporary folder: (the folder, the release's root in it).
fn unpack() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("tar").arg("-xzf").arg(tarball()).arg("-C").arg(dir.path()).status().unwrap();
    assert!(status.success(), "tar -xzf {}", tarball().display());
    let name = tarball().file_name().unwrap().to_str().unwrap().strip_suffix(".tar.gz").unwrap().to_owned();
    let root = dir.path().join(name);
    assert!(root.join("bin/dlpipe").is_file(), "{} has no bin/dlpipe", root.display());
    (dir, root)
}

/// A command with an environment that hides the clone: no LD_LIBRARY_PATH, LIBTORCH or
/// DLPIPE_* variables, only the system's PATH, and `cwd` (outside the clone) as working directory.
fn hidden(program: impl AsRef<std::ffi::OsStr>, cwd: &Path) -> Command {
    let mut command = Command::new(program);
    command.env_clear().env("PATH", "/usr/local/bin:/usr/bin:/bin").env("HOME", cwd).current_dir(cwd);
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Folders of the system's own libraries, where a release may find libc, libstdc++, libgcc_s.
const SYSTEM_LIBS: [&str; 4] = ["/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/"];

/// Asserts that the release's binary and libraries name no build folder in their rpaths and that
/// the loader resolves every library into the release or the system's folders.
fn assert_loads_only_its_own_and_system_libraries(release: &Path, cwd: &Path) {
    let clone = common::root().to_str().unwrap();
    let dynamic = |file: &Path| {
        let out = Command::new("readelf").arg("-d").arg(file).output().expect("run readelf");
        text(&out.stdout).lines().filter(|l| l.contains("RPATH") || l.contains("RUNPATH")).collect::<String>()
    };
    let binary = release.join("bin/dlpipe");
    assert!(dynamic(&binary).contains("Library runpath: [$ORIGIN/../lib]"), "{}", dynamic(&binary));
    for lib in std::fs::read_dir(release.join("lib")).unwrap() {
        let lib = lib.unwrap().path();
        let paths = dynamic(&lib);
        assert!(!paths.contains(clone) && !paths.contains(".venv") && !paths.contains(".."), "{lib:?}: {paths}");
    }
    let out = hidden("ldd", cwd).arg(&binary).output().unwrap();
    let listing = text(&out.stdout);
    assert!(out.status.success() && !listing.contains("not found"), "ldd {binary:?}:\n{listing}{}", text(&out.stderr));
    let resolved: Vec<&str> = listing.lines().filter_map(|l| l.split_once(" => ")).map(|(_, p)| p).collect();
    assert!(resolved.len() >= 5, "{listing}");
    for path in resolved {
        let path = path.split(" (").next().unwrap();
        let real = std::fs::canonicalize(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            real.starts_with(release.canonicalize().unwrap()) || SYSTEM_LIBS.iter().any(|s| path.starts_with(s)),
            "{path} is neither the release's nor the system's:\n{listing}"
        );
        assert!(!real.starts_with(common::root()), "{path} is in the clone");
    }
}

#[test]
fn the_release_predicts_and_streams_away_from_the_clone() {
    let (dir, release) = unpack();
    let work = dir.path().join("elsewhere");
    std::fs::create_dir(&work).unwrap();
    assert_loads_only_its_own_and_system_libraries(&release, &work);
    let dlpipe = release.join("bin/dlpipe");
    let config = release.join("configs/local.toml");

    // `predict` on a photo, with the release's config: its model.dir, "../models", is the
    // release's models/ whatever the working directory.
    std::fs::copy(common::sample("chelsea_cat.jpg"), work.join("cat.jpg")).unwrap();
    let out = hidden(&dlpipe, &work).arg("-c").arg(&config).args(["predict", "--json", "cat.jpg"]).output().unwrap();
    assert!(out.status.success(), "predict from the release: {}", text(&out.stderr));
    let prediction: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let top = prediction["top_k"][0]["class"].as_u64().unwrap();
    assert!((281..=285).contains(&top), "a cat class (281-285): {prediction}");

    // `run --stop-at-end` on a fresh topic of labelled images, configured as a container is:
    // the release's file, then DLPIPE__* variables.
    let images: Vec<(PathBuf, &str)> = fashion(8, 20000)
        .into_iter()
        .enumerate()
        .map(|(i, (path, label))| {
            let copy = work.join(format!("{i}.png"));
            std::fs::copy(path, &copy).unwrap();
            (copy, label)
        })
        .collect();
    let input = unique("dist-images");
    produce(&input, 2, &messages(&images, "d", 2, |_| true));
    let (predictions, mut env) = stream_env(&input, "127.0.0.1:0");
    // A relative path given in the environment: relative to the working directory.
    env.push(("DLPIPE__PIPELINE__SNAPSHOT_DIR".into(), "snapshots".into()));
    // The images are not in the release's data/, the default root of records' files: name theirs.
    env.push(("DLPIPE__FETCH__FILE_ROOTS".into(), format!("[{:?}]", work.display().to_string())));
    let log = dir.path().join("run.log");
    let child = hidden(&dlpipe, &work)
        .arg("-c")
        .arg(&config)
        .args(["run", "--stop-at-end"])
        .envs(env)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    succeeds(&mut KillOnDrop(child), &log, Duration::from_secs(120));
    let published = read_topic(&predictions, images.len(), Duration::from_secs(10));
    let mut ids: Vec<&str> = published.iter().map(|p| p["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, (0..8).map(|i| format!("d{i}")).collect::<Vec<_>>(), "one prediction per record");
    assert!(work.join("snapshots/latest.safetensors").is_file(), "the learner's snapshot in the working directory");
}

/// `buildah` with the storage scripts/image builds into.
fn buildah() -> Command {
    let mut command = Command::new("buildah");
    command.args(["--storage-driver", "vfs"]);
    command
}

/// A working container of an image, removed when dropped.
struct Container(String);

impl Container {
    fn of(image: &str) -> Container {
        let out = buildah().args(["from", "--pull=never", "--quiet", image]).output().expect("run buildah");
        assert!(out.status.success(), "buildah from {image}: {}", text(&out.stderr));
        Container(text(&out.stdout).trim().to_owned())
    }

    /// `buildah run` of `command` in the container as the image configures it (user, working
    /// directory, environment), with `env` added and `mounts` (host:container[:ro]) bound.
    fn run(&self, env: &[(String, String)], mounts: &[String], command: &[String]) -> Output {
        let mut run = buildah();
        run.args(["run", "--isolation", "chroot"]);
        for (name, value) in env {
            run.arg("--env").arg(format!("{name}={value}"));
        }
        for mount in mounts {
            run.arg("--volume").arg(mount);
        }
        run.arg(&self.0).arg("--").args(command).output().expect("run buildah")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = buildah().args(["rm", &self.0]).output();
    }
}

/// The image's Docker config (`Entrypoint`, `Healthcheck`, `User`, `Env`, ...).
fn image_config(image: &str) -> serde_json::Value {
    let out = buildah().args(["inspect", "--type", "image", image]).output().unwrap();
    assert!(out.status.success(), "buildah inspect {image}: {}", text(&out.stderr));
    let inspected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    inspected["Docker"]["config"].clone()
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value.as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
}

/// The image scripts/image builds from the release tarball (or finds up to date).
fn image() -> String {
    let started = Instant::now();
    let out = Command::new(common::root().join("scripts/image"))
        .arg("--tarball")
        .arg(tarball())
        .current_dir(common::root())
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/image");
    assert!(out.status.success(), "scripts/image failed (its log is above; make setup installs buildah)");
    let image = text(&out.stdout).trim().to_owned();
    eprintln!("scripts/image: {image} in {:.1} s", started.elapsed().as_secs_f64());
    image
}

/// The container image (Dockerfile, built by buildah) runs its entry point as its non-root user:
/// `predict` on a photo mounted into it, a short `run --stop-at-end` against the local broker
/// configured by the environment, and a `run` whose readiness the image's HEALTHCHECK reports.
#[test]
fn the_container_image_predicts_streams_and_reports_ready() {
    let image = image();
    let config = image_config(&image);
    let entrypoint = strings(&config["Entrypoint"]);
    let healthcheck = strings(&config["Healthcheck"]["Test"]);
    assert_eq!(healthcheck[..3], ["CMD", "/bin/bash", "-c"], "{healthcheck:?}");
    let container = Container::of(&image);
    let id = container.run(&[], &[], &["id".into(), "-u".into()]);
    assert_eq!(text(&id.stdout).trim(), "10001", "the image's user");

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(common::sample("chelsea_cat.jpg"), dir.path().join("cat.jpg")).unwrap();
    let images: Vec<(PathBuf, &str)> = fashion(6, 20100)
        .into_iter()
        .enumerate()
        .map(|(i, (path, label))| {
            std::fs::copy(path, dir.path().join(format!("{i}.png"))).unwrap();
            (PathBuf::from(format!("/opt/dlpipe/data/{i}.png")), label)
        })
        .collect();
    // Images go in the release's data/, the default root of the files records may name.
    let mounts = [format!("{}:/opt/dlpipe/data:ro", dir.path().display())];
    let command = |args: &[&str]| [entrypoint.clone(), args.iter().map(|a| a.to_string()).collect()].concat();

    let out = container.run(&[], &mounts, &command(&["predict", "--json", "/opt/dlpipe/data/cat.jpg"]));
    assert!(out.status.success(), "predict in the image: {}", text(&out.stderr));
    let prediction: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let top = prediction["top_k"][0]["class"].as_u64().unwrap();
    assert!((281..=285).contains(&top), "a cat class (281-285): {prediction}");

    let input = unique("image-images");
    produce(&input, 2, &messages(&images, "c", 2, |_| true));
    // The configuration as a deployment gives it: a file mounted read-only and named by
    // DLPIPE_CONFIG (it leaves model.dir out: the default, relative to the image's working
    // directory, is the release's models/), and the environment, which wins over the file.
    let (predictions, env) = stream_env(&input, "127.0.0.1:0");
    let etc = dir.path().join("etc");
    let mut env = pipeline_keys_to_file(env, &etc.join("dlpipe.toml"));
    env.push(("DLPIPE_CONFIG".into(), "/etc/dlpipe/dlpipe.toml".into()));
    let mounts = [mounts[0].clone(), format!("{}:/etc/dlpipe:ro", etc.display())];
    let out = container.run(&env, &mounts, &command(&["run", "--stop-at-end"]));
    assert!(out.status.success(), "run in the image: {}", text(&out.stderr));
    let published = read_topic(&predictions, images.len(), Duration::from_secs(10));
    assert_eq!(published.len(), images.len(), "one prediction per record:\n{}", text(&out.stderr));
    let snapshot = ["test".into(), "-s".into(), "/var/lib/dlpipe/snapshots/latest.safetensors".into()];
    assert!(container.run(&[], &[], &snapshot).status.success(), "the snapshot in the image's volume");

    // A live run (no --stop-at-end) until the image's health check passes, then SIGTERM.
    let (_, env) = stream_env(&unique("image-live"), &format!("127.0.0.1:{}", common::free_port()));
    let script = "hc=$1; shift; \"$@\" run & pid=$!; for _ in $(seq 240); do \
                  if /bin/bash -c \"$hc\"; then echo healthy; kill -TERM $pid; wait $pid; exit; fi; sleep 0.25; done; \
                  kill -KILL $pid; exit 1";
    let probe = [
        vec!["/bin/bash".into(), "-c".into(), script.into(), "probe".into(), healthcheck[3].clone()],
        entrypoint.clone(),
    ]
    .concat();
    let out = container.run(&env, &[], &probe);
    assert!(
        out.status.success() && text(&out.stdout).contains("healthy"),
        "the health check never passed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `DLPIPE__*` variables for a stream from `input` on the local broker, with fresh output
/// topics and group and metrics on `listen`; and the predictions topic.
fn stream_env(input: &str, listen: &str) -> (String, Vec<(String, String)>) {
    let predictions = unique("dist-predictions");
    let env = [
        ("KAFKA__BROKERS", common::kafka_brokers()),
        ("PIPELINE__INPUT_TOPIC", input.to_owned()),
        ("PIPELINE__PREDICTIONS_TOPIC", predictions.clone()),
        ("PIPELINE__DEAD_LETTER_TOPIC", unique("dist-dead")),
        ("PIPELINE__MODEL_TOPIC", unique("dist-models")),
        ("PIPELINE__GROUP_ID", unique("dist-group")),
        ("PIPELINE__TOPIC_PARTITIONS", "2".to_owned()),
        ("PIPELINE__EPOCHS", "{ by = \"offsets\", records = 3 }".to_owned()),
        ("METRICS__LISTEN", listen.to_owned()),
    ];
    (predictions, env.into_iter().map(|(k, v)| (format!("DLPIPE__{k}"), v)).collect())
}

/// Writes the `DLPIPE__PIPELINE__*` variables of `env` as the `[pipeline]` section of a config
/// file at `path` (its folder created), and returns the other variables.
fn pipeline_keys_to_file(env: Vec<(String, String)>, path: &Path) -> Vec<(String, String)> {
    let prefix = "DLPIPE__PIPELINE__";
    let (pipeline, rest): (Vec<_>, Vec<_>) = env.into_iter().partition(|(name, _)| name.starts_with(prefix));
    let lines: String = pipeline
        .iter()
        .map(|(name, value)| {
            let key = name[prefix.len()..].to_ascii_lowercase();
            // Tables and numbers as they are, the rest (topic names) as TOML strings.
            let value = if value.starts_with('{') || value.parse::<i64>().is_ok() {
                value.clone()
            } else {
                format!("{value:?}")
            };
            format!("{key} = {value}\n")
        })
        .collect();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("[pipeline]\n{lines}")).unwrap();
    rest
}
