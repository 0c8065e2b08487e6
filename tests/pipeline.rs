//! The streaming pipeline end to end against the real broker: `dlpipe run` reads image records
//! from a topic, and predictions and dead letters are read back from the output topics.

mod common;

use common::run::{messages, predictions_by_id, read_topic, record, succeeds, with_uris, Run};

use common::{fashion, free_port, produce, tarpit_server, KillOnDrop, FASHION_CLASSES as CLASSES};
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A one-request-at-a-time HTTP server on loopback that answers 404 to everything.
fn http_404_server() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(16) {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ =
                stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found");
        }
    });
    format!("http://{address}/missing.jpg")
}

/// An unlabelled record behind a server that does not answer holds back its own prediction
/// only: every other record of every worker is predicted and published meanwhile, and the
/// late record, once fetched, is predicted by the classifier of its own epoch, as if it had
/// come in time.
#[test]
fn a_slow_unlabelled_uri_delays_only_its_own_prediction() {
    let input = common::unique("slow-images");
    let images = fashion(48, 300);
    let mut messages = messages(&images, "r", 2, |i| i % 4 != 3);
    let release = Arc::new((Mutex::new(false), Condvar::new()));
    let server = tarpit_server(std::fs::read(&images[0].0).unwrap(), Arc::clone(&release));
    // Partition 0, offset 9: epoch 2 of offset epochs of 4 records.
    let slow = serde_json::json!({"id": "slow", "uri": format!("{server}/slow.png")}).to_string();
    messages[18] = (0, "slow".into(), slow);
    produce(&input, 2, &messages);
    let run = Run::new("slow", &input, "epochs = { by = \"offsets\", records = 4 }\n");
    // The fetch is held far longer than the test waits for the other predictions.
    let config = std::fs::read_to_string(run.config()).unwrap();
    let config = config.replace("[fetch]\n", "[fetch]\ntimeout_ms = 300000\ntotal_timeout_ms = 300000\n");
    std::fs::write(run.config(), config).unwrap();
    let (mut child, log) = run.spawn(&["--stop-at-end", "-w", "2"]);

    let others = read_topic(&run.predictions, images.len() - 1, Duration::from_secs(60));
    let ids: BTreeSet<&str> = others.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids.len(),
        images.len() - 1,
        "while one fetch hangs, every other record is predicted; got {} of {}:\n{}",
        ids.len(),
        images.len() - 1,
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(!ids.contains("slow"));

    common::release(&release);
    succeeds(&mut child, &log, Duration::from_secs(120));

    let all = read_topic(&run.predictions, images.len(), Duration::from_secs(10));
    assert_eq!(all.len(), images.len());
    let epoch = |p: &Value| p["offset"].as_i64().unwrap() / 4;
    let late = all.iter().find(|p| p["id"] == "slow").expect("the late record's prediction");
    assert_eq!(epoch(late), 2);
    let versions: BTreeSet<u64> =
        all.iter().filter(|p| epoch(p) == 2).map(|p| p["model_version"].as_u64().unwrap()).collect();
    assert_eq!(versions.len(), 1, "one classifier for every record of epoch 2, the late one too: {versions:?}");
    let late_version = late["model_version"].as_u64().unwrap();
    let newest = all.iter().map(|p| p["model_version"].as_u64().unwrap()).max().unwrap();
    assert!(late_version > 0 && late_version < newest, "the late record's classifier is its epoch's: {late_version}");
    assert!(!late["top_k"].as_array().unwrap().is_empty());
}

#[test]
fn one_prediction_per_good_record_and_one_dead_letter_per_bad_input() {
    let input = common::unique("dl-images");
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.png");
    std::fs::write(&text, b"SECRET-token-91c2, named like an image").unwrap();
    let coffee = std::fs::read(common::sample("coffee.jpg")).unwrap();
    let truncated = dir.path().join("truncated.jpg");
    std::fs::write(&truncated, &coffee[..coffee.len() / 3]).unwrap();
    let oversized = dir.path().join("oversized.png");
    image::RgbImage::new(1300, 1000).save(&oversized).unwrap();

    let good = fashion(12, 0);
    // Every third good record is unlabelled: it is predicted, not learned from.
    let mut messages = messages(&good, "good-", 2, |i| i % 3 != 0);
    let bad = [
        ("missing", record("missing", &dir.path().join("missing.png"), None), "not_found"),
        // Outside fetch.file_roots: refused unread, so the dead letter cannot quote it.
        ("passwd", record("passwd", Path::new("/etc/passwd"), None), "forbidden_local_file"),
        ("text", record("text", &text, None), "unsupported_format"),
        ("truncated", record("truncated", &truncated, None), "undecodable"),
        ("badjson", "{\"id\": \"badjson\", \"uri\": ".to_string(), "malformed_json"),
        (
            "scheme",
            serde_json::json!({"id": "scheme", "uri": "hdfs://bucket/cat.jpg"}).to_string(),
            "unsupported_scheme",
        ),
        ("oversized", record("oversized", &oversized, None), "too_large"),
        ("http404", serde_json::json!({"id": "http404", "uri": http_404_server()}).to_string(), "not_found"),
        // Server-side request forgery: the cloud metadata address is refused, not fetched.
        (
            "metadata",
            serde_json::json!({"id": "metadata", "uri": "http://169.254.169.254/latest/meta-data/iam"}).to_string(),
            "forbidden_address",
        ),
        ("proc", record("proc", Path::new("/proc/self/environ"), None), "forbidden_local_file"),
    ];
    for (i, (id, payload, _)) in bad.iter().enumerate() {
        let at = (2 * i + 1).min(messages.len());
        messages.insert(at, ((i % 2) as i32, id.to_string(), payload.clone()));
    }
    produce(&input, 2, &messages);

    let run = Run::new("dl", &input, "[image]\nmax_pixels = 1000000\n");
    run.to_end(&[]);

    let predictions = read_topic(&run.predictions, good.len() + 1, Duration::from_secs(5));
    let ids: Vec<&str> = predictions.iter().map(|p| p["id"].as_str().unwrap()).collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), good.len(), "exactly one prediction per good record: {ids:?}");
    assert_eq!(
        unique,
        (0..good.len()).map(|i| format!("good-{i}")).collect::<BTreeSet<_>>().iter().map(String::as_str).collect()
    );
    for p in &predictions {
        assert!(p["partition"].is_i64() && p["offset"].is_i64() && p["model_version"].is_u64(), "{p}");
    }
    let dead = read_topic(&run.dead, bad.len() + 1, Duration::from_secs(5));
    let kinds: BTreeMap<&str, &str> =
        dead.iter().map(|d| (d["id"].as_str().unwrap_or("?"), d["error_kind"].as_str().unwrap())).collect();
    assert_eq!(dead.len(), bad.len(), "one dead letter per bad input: {dead:?}");
    for (id, _, kind) in &bad {
        assert_eq!(kinds.get(id), Some(kind), "{id}: {dead:?}");
    }
    let scheme = dead.iter().find(|d| d["id"] == "scheme").unwrap();
    assert!(scheme["error"].as_str().unwrap().contains("hdfs://bucket/cat.jpg"), "the error names the input: {scheme}");
    // Any producer may name any file: the dead letter says what it is, never what it says.
    let text = dead.iter().find(|d| d["id"] == "text").unwrap();
    assert!(text["error"].as_str().unwrap().contains("bytes of text"), "{text}");
    assert!(!text.to_string().contains("SECRET"), "the dead letter quotes the file: {text}");
    let passwd = dead.iter().find(|d| d["id"] == "passwd").unwrap();
    assert!(passwd["error"].as_str().unwrap().contains("outside fetch.file_roots"), "{passwd}");
    assert!(!passwd.to_string().contains("root:"), "{passwd}");
    assert!(dead.iter().all(|d| d["raw"].is_string() && d["error"].is_string()));
}

/// The image bytes in the record (a `data:` URI) are the same input as the file they came from:
/// the same stream sent both ways learns and predicts the same, bit for bit.
#[test]
fn data_uris_predict_exactly_as_the_files_they_carry() {
    use base64::Engine;
    let images = fashion(30, 300);
    let by_file = messages(&images, "r", 2, |i| i % 3 != 2);
    let data_uri = |path: &PathBuf| {
        let text = base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).unwrap());
        format!("data:image/png;base64,{text}")
    };
    let inline = with_uris(&by_file, images.iter().map(|(path, _)| data_uri(path)));
    let extra = "epochs = { by = \"offsets\", records = 4 }\n";
    let runs: Vec<Run> = [("datafile", &by_file), ("datainline", &inline)]
        .iter()
        .map(|(name, messages)| {
            let input = common::unique(name);
            produce(&input, 2, messages);
            let run = Run::new(name, &input, extra);
            run.to_end(&[]);
            run
        })
        .collect();
    let reference = predictions_by_id(&runs[0].predictions, images.len());
    assert_eq!(reference.len(), images.len());
    assert!(reference.values().any(|(_, v)| *v > 0), "later records are predicted by a model that has learned");
    assert_eq!(predictions_by_id(&runs[1].predictions, images.len()), reference);
}

/// `dlpipe produce` of the same files three ways: file:// URIs, base64 `image` fields
/// (`--inline`) and raw values with id and label headers (`--raw`, read with
/// `pipeline.input_format = "raw"`). Each is the same input: the same predictions, bit for bit.
#[test]
fn inline_and_raw_images_predict_exactly_as_the_files_they_carry() {
    let folder = common::root().join("data/fashion-mnist/test");
    let folder = folder.to_str().unwrap();
    let extra = "epochs = { by = \"offsets\", records = 4 }\n";
    let runs: Vec<Run> = [
        ("bytesfile", None, ""),
        ("bytesinline", Some("--inline"), ""),
        ("bytesraw", Some("--raw"), "input_format = \"raw\"\n"),
    ]
    .iter()
    .map(|(name, how, format)| {
        let input = common::unique(name);
        let run = Run::new(name, &input, &format!("{extra}{format}"));
        let config = run.config();
        let mut args = vec!["-c", config.to_str().unwrap(), "produce", "--topic", &input, "--partitions", "2"];
        args.extend(["--labels-from-dirs", "--shuffle", "7", "--limit", "30"]);
        args.extend(how.iter().copied().chain([folder]));
        let out = common::dlpipe(&args);
        assert!(out.status.success(), "produce {how:?}: {}", String::from_utf8_lossy(&out.stderr));
        run.to_end(&[]);
        run
    })
    .collect();
    let reference = predictions_by_id(&runs[0].predictions, 30);
    assert_eq!(reference.len(), 30);
    assert!(reference.values().any(|(_, v)| *v > 0), "later records are predicted by a model that has learned");
    for run in &runs[1..] {
        assert_eq!(predictions_by_id(&run.predictions, 30), reference, "{}", run.predictions);
        let predictions = read_topic(&run.predictions, 30, Duration::from_secs(5));
        assert!(predictions.iter().all(|p| p["uri"] == "inline:"), "{}", predictions[0]);
    }
}

/// A raw input message: its key, value and headers.
type RawMessage<'a> = (Option<&'a str>, Vec<u8>, Vec<(&'a str, &'a str)>);

/// Publishes raw messages, all to partition 0.
fn produce_raw(topic: &str, messages: &[RawMessage<'_>]) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let kafka = common::kafka_config();
    dlpipe::kafka::ensure_topic(
        &kafka,
        topic,
        dlpipe::kafka::TopicSpec { partitions: 1, replication_factor: 1, configs: &[] },
    )
    .unwrap();
    let producer: BaseProducer = dlpipe::kafka::client_config(&kafka).create().unwrap();
    for (key, value, headers) in messages {
        let headers = headers
            .iter()
            .fold(OwnedHeaders::new(), |all, (key, value)| all.insert(Header { key, value: Some(*value) }));
        let mut record = BaseRecord::to(topic).partition(0).payload(value).headers(headers);
        if let Some(key) = key {
            record = record.key(*key);
        }
        producer.send(record).map_err(|(e, _)| e).unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// Images in the record over `image.max_encoded_bytes` are dead-lettered `too_large` by the
/// source, before any decoding (an oversized image that is not even valid base64 is too large,
/// not invalid), and no dead letter quotes an image; a raw message without the id header takes
/// its key as id, or without a key `<partition>-<offset>`, as a JSON record without an id does.
#[test]
fn oversized_inline_images_are_dead_letters_before_decoding_and_raw_messages_without_an_id_get_one() {
    use base64::Engine;
    let images = fashion(2, 500);
    let (small, large) = (std::fs::read(&images[0].0).unwrap(), std::fs::read(&images[1].0).unwrap());
    let limit = small.len().max(large.len()) - 1;
    let (small, large) = if small.len() < large.len() { (small, large) } else { (large, small) };
    let encode = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let extra = format!("[image]\nmax_encoded_bytes = {limit}\n");
    let json_input = common::unique("bytes-json");
    let json_messages: Vec<(i32, String, String)> = [
        ("fits", encode(&small)),
        ("large", encode(&large)),
        ("large-junk", "!".repeat(4 * limit)),
        ("junk", "!!!!".into()),
    ]
    .into_iter()
    .map(|(id, image)| (0, id.to_owned(), serde_json::json!({"id": id, "image": image}).to_string()))
    .collect();
    produce(&json_input, 1, &json_messages);
    let json = Run::new("bytesjson", &json_input, "");
    std::fs::write(json.config(), std::fs::read_to_string(json.config()).unwrap() + &extra).unwrap();
    json.to_end(&[]);
    let raw_input = common::unique("bytes-raw");
    produce_raw(
        &raw_input,
        &[
            (None, small.clone(), vec![]),
            (Some("keyed"), small.clone(), vec![]),
            (Some("key"), small.clone(), vec![("dlpipe-id", "named"), ("dlpipe-label", "shirt")]),
            (None, large.clone(), vec![("dlpipe-id", "raw-large")]),
        ],
    );
    let raw = Run::new("bytesraw2", &raw_input, "input_format = \"raw\"\n");
    std::fs::write(raw.config(), std::fs::read_to_string(raw.config()).unwrap() + &extra).unwrap();
    raw.to_end(&[]);

    let dead: Vec<Value> = [&json, &raw].iter().flat_map(|r| read_topic(&r.dead, 10, Duration::from_secs(5))).collect();
    let kinds: BTreeMap<String, String> = dead
        .iter()
        .map(|d| (d["id"].as_str().unwrap().to_owned(), d["error_kind"].as_str().unwrap().to_owned()))
        .collect();
    let want: BTreeMap<String, String> =
        [("large", "too_large"), ("large-junk", "too_large"), ("junk", "invalid_image"), ("raw-large", "too_large")]
            .into_iter()
            .map(|(id, kind)| (id.to_owned(), kind.to_owned()))
            .collect();
    assert_eq!(kinds, want, "{dead:?}");
    for d in &dead {
        assert!(d["raw"].as_str().unwrap().len() < 200, "a dead letter quotes no image: {d}");
        assert!(!d.to_string().contains(&encode(&large)[..40]), "{d}");
    }
    let large_dead = dead.iter().find(|d| d["id"] == "large").unwrap();
    assert!(
        large_dead["error"].as_str().unwrap().contains(&format!("{} bytes, over the limit of {limit}", large.len())),
        "{large_dead}"
    );
    let predicted: BTreeSet<String> = [&json, &raw]
        .iter()
        .flat_map(|r| read_topic(&r.predictions, 4, Duration::from_secs(5)))
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    let want: BTreeSet<String> = ["fits", "0-0", "keyed", "named"].into_iter().map(String::from).collect();
    assert_eq!(predicted, want);
}

#[test]
fn one_worker_two_workers_two_processes_and_resizing_on_the_device_learn_and_predict_the_same() {
    let input = common::unique("det-images");
    let images = fashion(60, 100);
    let messages = messages(&images, "r", 4, |i| i % 5 != 4);
    produce(&input, 4, &messages);
    let extra = "epochs = { by = \"offsets\", records = 3 }\nsnapshot_every_epochs = 1\n";

    let one = Run::new("det1", &input, extra);
    one.to_end(&["-w", "1"]);
    let two = Run::new("det2", &input, extra);
    two.to_end(&["-w", "2"]);
    // The 28x28 images resized by the model's device (here the CPU's libtorch): its crops are
    // the host's, byte for byte, so nothing downstream may differ either.
    let device = Run::new("detd", &input, extra).with_model("resize_on = \"device\"");
    let log = device.to_end(&["-w", "2"]);
    assert!(log.contains("resize_on=device (images up to 65536 pixels)"), "the images went to the device:\n{log}");

    let procs = Run::new("detp", &input, extra);
    let hostfile = procs.dir.path().join("hosts");
    std::fs::write(&hostfile, format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port())).unwrap();
    let hosts = hostfile.to_str().unwrap();
    let mut children: Vec<KillOnDrop> = (0..2)
        .map(|p| {
            KillOnDrop(
                procs
                    .command(&["--stop-at-end", "-w", "1", "-n", "2", "-p", &p.to_string(), "--hostfile", hosts])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    for child in &mut children {
        let mut stderr = String::new();
        child.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        let status = child.0.wait().unwrap();
        let out = std::process::Output { status, stdout: Vec::new(), stderr: stderr.into_bytes() };
        assert!(out.status.success(), "process failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }

    let reference = predictions_by_id(&one.predictions, images.len());
    assert_eq!(reference.len(), images.len());
    assert!(reference.values().any(|(_, v)| *v > 0), "later records are predicted by a model that has learned");
    for run in [&two, &device, &procs] {
        assert_eq!(
            predictions_by_id(&run.predictions, images.len()),
            reference,
            "{}: same predictions",
            run.predictions
        );
    }
    let (model, _) = dlpipe::learn::SoftmaxRegression::load(&one.latest_snapshot()).unwrap();
    assert_eq!(model.updates(), 48, "every labelled record learned once");
    for run in [&two, &device, &procs] {
        let (other, _) = dlpipe::learn::SoftmaxRegression::load(&run.latest_snapshot()).unwrap();
        assert_eq!(other.classes(), model.classes());
        assert_eq!(other.updates(), model.updates());
        assert!(other.weights() == model.weights() && other.bias() == model.bias(), "bit-identical final model");
    }
}

#[test]
fn online_accuracy_on_fashion_mnist_is_far_above_chance() {
    const N: usize = 1000;
    let input = common::unique("fm-images");
    let images = fashion(N, 1000);
    let messages = messages(&images, "f", 2, |_| true);
    produce(&input, 2, &messages);
    let run = Run::new("fm", &input, "epochs = { by = \"offsets\", records = 10 }\n");
    run.to_end(&["-w", "2"]);
    let predictions = read_topic(&run.predictions, N, Duration::from_secs(5));
    assert_eq!(predictions.len(), N);
    let mut late: Vec<&Value> =
        predictions.iter().filter(|p| p["offset"].as_i64().unwrap() >= (N / 2 - N / 5) as i64).collect();
    late.sort_by_key(|p| (p["offset"].as_i64(), p["partition"].as_i64()));
    let correct = late.iter().filter(|p| p["top_k"][0]["class"] == p["label"]).count();
    let accuracy = correct as f64 / late.len() as f64;
    println!("online accuracy on the last {} of {N} Fashion-MNIST records: {accuracy:.3} (chance 0.1)", late.len());
    assert!(accuracy > 0.6, "online accuracy {accuracy:.3} on the later records");
}

#[test]
fn an_abruptly_stopped_pipeline_restarts_and_leaves_no_record_without_a_prediction() {
    const N: usize = 300;
    let input = common::unique("kill-images");
    let images = fashion(N, 3000);
    let messages = messages(&images, "k", 2, |_| true);
    produce(&input, 2, &messages);
    let run = Run::new("kill", &input, "epochs = { by = \"time\", millis = 100 }\n");
    let mut child = KillOnDrop(run.command(&[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let child = &mut child.0;
    // Stop it abruptly once some predictions are out and some are not: two SIGTERMs, the
    // second of which exits at once (status 1) while the graceful stop the first asked for is
    // still publishing: for the records, the same as a crash.
    let started = Instant::now();
    loop {
        let seen = read_topic(&run.predictions, 30, Duration::from_millis(500)).len();
        if seen >= 30 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no predictions within 120 s");
        assert!(child.try_wait().unwrap().is_none(), "the pipeline exited on its own");
    }
    let pid = child.id().to_string();
    for _ in 0..2 {
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        std::thread::sleep(Duration::from_millis(50));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "a second SIGTERM did not end the pipeline within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1), "the second signal exits with status 1");
    let before = read_topic(&run.predictions, N, Duration::from_secs(2)).len();
    assert!(before < N, "the pipeline was killed mid-stream ({before} of {N} predicted)");

    run.to_end(&[]);
    let ids: BTreeSet<String> = read_topic(&run.predictions, 2 * N, Duration::from_secs(5))
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    let missing: Vec<String> = (0..N).map(|i| format!("k{i}")).filter(|id| !ids.contains(id)).collect();
    assert!(missing.is_empty(), "records without a prediction after the restart: {missing:?}");
    println!("stopped abruptly after {before} of {N} predictions; after the restart all {N} have one");
}

#[test]
fn init_model_warm_starts_the_classifier_from_a_snapshot() {
    let input = common::unique("warm-a");
    let images = fashion(30, 5000);
    let labelled = messages(&images, "w", 1, |_| true);
    produce(&input, 1, &labelled);
    let first = Run::new("warm1", &input, "epochs = { by = \"offsets\", records = 10 }\nsnapshot_every_epochs = 1\n");
    first.to_end(&[]);
    let snapshot = first.latest_snapshot();
    let (learned, _) = dlpipe::learn::SoftmaxRegression::load(&snapshot).unwrap();
    assert_eq!(learned.updates(), 30);

    // `dlpipe evaluate` reads the stream's snapshot: it records its featurizer.
    let list = first.dir.path().join("eval.csv");
    let rows: Vec<String> = fashion(20, 7000).iter().map(|(p, label)| format!("{},{label}", p.display())).collect();
    std::fs::write(&list, format!("uri,label\n{}\n", rows.join("\n"))).unwrap();
    let json = first.dir.path().join("eval.json");
    let out = common::dlpipe(&[
        "evaluate",
        "--data",
        list.to_str().unwrap(),
        "--classifier",
        snapshot.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--no-cache",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let evaluation: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(evaluation["examples"], 20);
    // Three examples a class so far; chance is 0.1.
    assert!(evaluation["accuracy"].as_f64().unwrap() > 0.25, "{evaluation}");

    // A new stream of unlabelled records: without a warm start nothing could be predicted.
    let fresh = common::unique("warm-b");
    let unlabelled = messages(&fashion(5, 6000), "u", 1, |_| false);
    produce(&fresh, 1, &unlabelled);
    let second = Run::new("warm2", &fresh, "");
    second.to_end(&["--init-model", snapshot.to_str().unwrap()]);
    let predictions = read_topic(&second.predictions, 5, Duration::from_secs(5));
    assert_eq!(predictions.len(), 5);
    for p in &predictions {
        assert_eq!(p["model_version"], 30, "predicted by the warm-started classifier: {p}");
        assert!(CLASSES.contains(&p["top_k"][0]["class"].as_str().unwrap()), "{p}");
    }
}

/// Creates `topic` with a broker-side limit on message size, as a cluster's administrator might.
fn topic_with_max_message_bytes(topic: &str, bytes: &str) {
    let configs = [("max.message.bytes", bytes)];
    let spec = dlpipe::kafka::TopicSpec { partitions: 2, replication_factor: 1, configs: &configs };
    dlpipe::kafka::ensure_topic(&common::kafka_config(), topic, spec).unwrap();
}

/// One record per message batch: the broker's size limit then applies to each output alone
/// (it applies to whole batches, which small outputs could otherwise exceed together).
const ONE_MESSAGE_PER_BATCH: &str = "[kafka.properties]\n\"batch.num.messages\" = \"1\"\n";

#[test]
fn outputs_the_broker_refuses_as_too_large_become_small_dead_letters_and_crafted_fields_are_refused() {
    let input = common::unique("big-images");
    let good = fashion(8, 40);
    let mut messages = messages(&good, "good-", 2, |_| true);
    // Ids of ~1000 bytes (within the 1024-byte limit): key and prediction together are over
    // the predictions topic's 1200-byte limit, so the broker refuses each of these outputs.
    let long_id = |i: usize| format!("{}-{i}", "x".repeat(995));
    for (i, (path, label)) in good.iter().take(3).enumerate() {
        messages.push(((i % 2) as i32, long_id(i), record(&long_id(i), path, Some(label))));
    }
    let image = good[0].0.display().to_string();
    let crafted = [
        ("huge-id", serde_json::json!({"id": "i".repeat(600_000), "uri": image}).to_string(), "id_too_long"),
        (
            "long-label",
            serde_json::json!({"id": "long-label", "uri": image, "label": "l".repeat(300)}).to_string(),
            "invalid_label",
        ),
        (
            "empty-label",
            serde_json::json!({"id": "empty-label", "uri": image, "label": ""}).to_string(),
            "invalid_label",
        ),
    ];
    for (key, payload, _) in &crafted {
        messages.push((1, key.to_string(), payload.clone()));
    }
    let run = Run::new("big", &input, ONE_MESSAGE_PER_BATCH);
    topic_with_max_message_bytes(&run.predictions, "1200");
    produce(&input, 2, &messages);
    run.to_end(&[]);

    let predictions = read_topic(&run.predictions, good.len() + 1, Duration::from_secs(5));
    assert_eq!(predictions.len(), good.len(), "{predictions:?}");
    let dead = read_topic(&run.dead, 7, Duration::from_secs(5));
    let mut kinds: Vec<&str> = dead.iter().map(|d| d["error_kind"].as_str().unwrap()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["id_too_long", "invalid_label", "invalid_label", "output_too_large", "output_too_large", "output_too_large"]
    );
    for d in &dead {
        let bytes = d.to_string().len();
        // raw (4 KiB at most) and the other capped fields: far below any broker's limit.
        assert!(bytes < 16 * 1024, "a dead letter of {bytes} bytes: {}", &d.to_string()[..200]);
        if d["error_kind"] == "output_too_large" {
            assert!(
                d["id"].as_str().unwrap().starts_with("xxxx") && d["error"].as_str().unwrap().contains("too large"),
                "{d}"
            );
        }
    }
}

#[test]
fn a_refused_output_stops_the_process_promptly_and_nothing_past_it_is_committed() {
    let input = common::unique("refused-images");
    let good = fashion(10, 60);
    // The first record of partition 0 has an output the predictions topic refuses, and the
    // dead-letter topic refuses even the small dead letter that would replace it.
    let long_id = format!("{}-refused", "x".repeat(995));
    let mut messages = vec![(0, long_id.clone(), record(&long_id, &good[0].0, None))];
    messages.extend(self::messages(&good[1..], "good-", 2, |_| true));
    let run = Run::new("refused", &input, ONE_MESSAGE_PER_BATCH);
    topic_with_max_message_bytes(&run.predictions, "1200");
    topic_with_max_message_bytes(&run.dead, "300");
    produce(&input, 2, &messages);

    let log = run.dir.path().join("run.log");
    let mut child = run
        .command(&["--stop-at-end", "-w", "2"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("dlpipe run kept running after an output was refused:\n{}", std::fs::read_to_string(&log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "a refused output must fail the run:\n{stderr}");
    assert!(stderr.contains("was not delivered") && stderr.contains("0:0"), "{stderr}");
    assert!(!stderr.contains("another worker of this process failed\n"), "the first error is reported:\n{stderr}");

    // Nothing at or past the refused record was committed for partition 0.
    let consumer: BaseConsumer =
        dlpipe::kafka::client_config(&common::kafka_config()).set("group.id", &run.group).create().unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    list.add_partition(&input, 0);
    let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
    let offset = committed.find_partition(&input, 0).unwrap().offset();
    assert!(
        matches!(offset, rdkafka::Offset::Invalid | rdkafka::Offset::Offset(0)),
        "partition 0 committed at {offset:?}, past the refused record at offset 0"
    );
}

/// The resident memory of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Per partition of `topic`: (the group's committed offset, the high watermark).
fn committed_and_end(topic: &str, group: &str, partitions: i32) -> Vec<(i64, i64)> {
    let consumer: BaseConsumer =
        dlpipe::kafka::client_config(&common::kafka_config()).set("group.id", group).create().unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
    (0..partitions)
        .map(|p| {
            let c = match committed.find_partition(topic, p).unwrap().offset() {
                rdkafka::Offset::Offset(o) => o,
                _ => 0,
            };
            (c, consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1)
        })
        .collect()
}

/// Memory stays bounded however far the input runs ahead: the source stops reading at
/// `max_backlog`, so an overload becomes consumer lag, not memory.
const OVERLOAD_RSS_BOUND: u64 = 1536 << 20;

#[test]
fn ten_times_the_sustainable_rate_for_a_minute_bounds_memory_grows_lag_and_loses_nothing() {
    // EfficientNet-Lite0 on this machine's 2 shared cores sustains ~30 images/s end to end;
    // the producer sends 300 a second for a minute.
    const RATE: u64 = 300;
    const SECONDS: u64 = 60;
    let n = (RATE * SECONDS) as usize;
    let input = common::unique("overload-images");
    let images = fashion(n, 0);
    let spec = dlpipe::kafka::TopicSpec { partitions: 2, replication_factor: 1, configs: &[] };
    dlpipe::kafka::ensure_topic(&common::kafka_config(), &input, spec).unwrap();
    let run = Run::new("overload", &input, "max_backlog = 256\nepochs = { by = \"time\", millis = 500 }\n");
    let (mut child, log) = run.spawn(&[]);
    let pid = child.0.id();

    let started = Instant::now();
    let producer = {
        let (input, images) = (input.clone(), images.clone());
        std::thread::spawn(move || {
            use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
            let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
                dlpipe::kafka::client_config(&common::kafka_config()).set("linger.ms", "5").create().unwrap();
            let started = Instant::now();
            for (i, (path, label)) in images.iter().enumerate() {
                let id = format!("o{i}");
                let payload = record(&id, path, Some(label));
                let mut message = BaseRecord::to(&input).partition(i as i32 % 2).key(&id).payload(&payload);
                while let Err((_, m)) = producer.send(message) {
                    message = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
                let due = started + Duration::from_secs_f64((i + 1) as f64 / RATE as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            producer.flush(Duration::from_secs(30)).unwrap();
            started.elapsed()
        })
    };
    let (mut peak_rss, mut lags) = (0u64, Vec::new());
    while !producer.is_finished() {
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the pipeline exited:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        peak_rss = peak_rss.max(rss_bytes(pid).unwrap_or(0));
        // The lag (records produced and not yet committed) after 20 s and after 55 s.
        let due = [20, 55].get(lags.len()).copied().unwrap_or(u64::MAX);
        if started.elapsed().as_secs() >= due {
            let offsets = committed_and_end(&input, &run.group, 2);
            lags.push(offsets.iter().map(|(c, end)| end - c).sum::<i64>());
        }
    }
    let produced_in = producer.join().unwrap();

    // A graceful stop: what is in flight is published and committed.
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        peak_rss = peak_rss.max(rss_bytes(pid).unwrap_or(0));
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the graceful stop took over 120 s");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success(), "dlpipe run failed:\n{}", std::fs::read_to_string(&log).unwrap());
    let elapsed = started.elapsed().as_secs_f64();

    // Nothing lost: every offset below the committed one has its output.
    let offsets = committed_and_end(&input, &run.group, 2);
    let done: i64 = offsets.iter().map(|(c, _)| c).sum();
    let outputs: Vec<Value> = read_topic(&run.predictions, done as usize + 1, Duration::from_secs(5))
        .into_iter()
        .chain(read_topic(&run.dead, done as usize + 1, Duration::from_secs(3)))
        .collect();
    let covered: BTreeSet<(i64, i64)> =
        outputs.iter().map(|o| (o["partition"].as_i64().unwrap(), o["offset"].as_i64().unwrap())).collect();
    for (p, (committed, _)) in offsets.iter().enumerate() {
        let missing: Vec<i64> = (0..*committed).filter(|o| !covered.contains(&(p as i64, *o))).collect();
        assert!(missing.is_empty(), "partition {p}: committed {committed} but offsets {missing:?} have no output");
    }
    let throughput = done as f64 / elapsed;
    println!(
        "overload: {n} records in {:.0} s ({RATE}/s); processed {done} ({throughput:.1}/s), left {} as lag; \
         lag at 20 s and 55 s: {lags:?}; peak RSS {} MiB (bound {} MiB)",
        produced_in.as_secs_f64(),
        n as i64 - done,
        peak_rss >> 20,
        OVERLOAD_RSS_BOUND >> 20
    );
    // Several times what it sustains (about 6x on the 2-core machine, whose speed varies).
    assert!(throughput * 3.0 < RATE as f64, "not an overload: the pipeline kept up at {throughput:.1}/s");
    assert!(lags.len() == 2 && lags[1] > lags[0], "lag did not grow: {lags:?}");
    assert!(peak_rss > 0 && peak_rss < OVERLOAD_RSS_BOUND, "peak RSS {} MiB", peak_rss >> 20);
}

#[test]
fn stop_at_end_finishes_on_a_transactional_input_whose_last_offsets_are_commit_markers() {
    // A transactional producer writes a commit marker after its records: the partition's end
    // offset is one past the marker, which is never delivered as a message.
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let input = common::unique("txn-images");
    let spec = dlpipe::kafka::TopicSpec { partitions: 2, replication_factor: 1, configs: &[] };
    dlpipe::kafka::ensure_topic(&common::kafka_config(), &input, spec).unwrap();
    let images = fashion(10, 200);
    let producer: BaseProducer = dlpipe::kafka::client_config(&common::kafka_config())
        .set("transactional.id", common::unique("txn-producer"))
        .create()
        .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    producer.begin_transaction().unwrap();
    for (partition, key, payload) in messages(&images, "t", 2, |_| true) {
        producer.send(BaseRecord::to(&input).partition(partition).key(&key).payload(&payload)).unwrap();
    }
    producer.commit_transaction(Duration::from_secs(30)).unwrap();
    let run = Run::new("txn", &input, "");
    run.to_end(&[]);
    let ids: BTreeSet<String> = read_topic(&run.predictions, 11, Duration::from_secs(5))
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, (0..10).map(|i| format!("t{i}")).collect());
}

#[test]
fn the_features_topic_carries_each_predicted_records_features_as_dlpipe_featurize_computes_them() {
    // Photos (resized and cropped) and 28x28 greyscale PNGs, some labelled, and one record
    // whose image is missing: it gets a dead letter and no features.
    let mut images: Vec<(std::path::PathBuf, &str)> = fashion(8, 7700);
    images.push((common::sample("chelsea_cat.jpg"), "cat"));
    images.push((common::sample("coffee.jpg"), "coffee"));
    let mut records = messages(&images, "v", 2, |i| i % 2 == 0);
    records.push((0, "gone".into(), record("gone", Path::new("/nonexistent/gone.png"), None)));
    let input = common::unique("feat-images");
    produce(&input, 2, &records);
    let features_topic = common::unique("feat-features");
    let run = Run::new("feat", &input, &format!("features_topic = \"{features_topic}\"\n"));
    run.to_end(&["-w", "2"]);

    let got = read_topic(&features_topic, images.len() + 1, Duration::from_secs(5));
    assert_eq!(got.len(), images.len(), "one features message per predicted record, none for the dead letter");
    // model.precision = "auto": the bf16 export where this CPU computes bf16 natively.
    let auto = if dlpipe::model::CpuFeatures::detect().native_bf16() {
        "efficientnet_lite0_bf16"
    } else {
        "efficientnet_lite0"
    };
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(common::model_manifest(auto)).unwrap()).unwrap();
    let by_uri: BTreeMap<String, Vec<f32>> = got
        .iter()
        .map(|m| {
            assert_eq!(m["model"], auto);
            assert_eq!(m["model_sha256"], manifest["sha256"], "{}", m["id"]);
            let features: Vec<f32> =
                m["features"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            assert_eq!((m["dim"].as_u64(), features.len()), (Some(1280), 1280));
            (m["uri"].as_str().unwrap().trim_start_matches("file://").to_owned(), features)
        })
        .collect();
    let dead = read_topic(&run.dead, 2, Duration::from_secs(3));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["id"], "gone");

    // The batch command on the same files, with no cache: the same vectors.
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("features.npy");
    let paths: Vec<String> = images.iter().map(|(p, _)| p.display().to_string()).collect();
    let args: Vec<&str> = ["featurize", "--no-cache", "-o", npy.to_str().unwrap()]
        .into_iter()
        .chain(paths.iter().map(String::as_str))
        .collect();
    let out = common::dlpipe(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (rows, cols, values) = dlpipe::npy::read_f32(&npy).unwrap();
    assert_eq!((rows, cols), (images.len(), 1280));
    let index = std::fs::read_to_string(npy.with_extension("rows.jsonl")).unwrap();
    let mut worst = (1.0f64, 0.0f32);
    for line in index.lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        let path = row["path"].as_str().unwrap().trim_start_matches("file://");
        let batch = &values[row["row"].as_u64().unwrap() as usize * cols..][..cols];
        let stream = by_uri.get(path).unwrap_or_else(|| panic!("no features message for {path}"));
        let dot: f64 = stream.iter().zip(batch).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
        let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let cosine = dot / (norm(stream) * norm(batch));
        let max_diff = stream.iter().zip(batch).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(cosine > 0.999_999, "{path}: cosine {cosine} between the stream's and dlpipe featurize's features");
        worst = (worst.0.min(cosine), worst.1.max(max_diff));
    }
    println!(
        "features topic: {} vectors; against dlpipe featurize, lowest cosine {:.9}, largest difference {:.3e}",
        by_uri.len(),
        worst.0,
        worst.1
    );
}

/// tools/bearer_http_server.py serving the Fashion-MNIST images to `token` only, each response
/// held `delay_ms`; its base URL.
fn bearer_server(token: &str, delay_ms: u32) -> (KillOnDrop, String) {
    let mut child = Command::new(common::python())
        .arg(common::root().join("tools/bearer_http_server.py"))
        .args(["--root", "data/fashion-mnist", "--delay-ms", &delay_ms.to_string()])
        .env("BEARER_TOKEN", token)
        .current_dir(common::root())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first_line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut first_line).unwrap();
    let port = first_line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{first_line:?}")).to_owned();
    (KillOnDrop(child), format!("http://127.0.0.1:{port}"))
}

/// The body of `GET path` on `address`, HTTP/1.0 so the server closes when done.
fn http_get(address: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body).to_owned()
}

/// `dlpipe run` on `run`'s config plus `fetch` (TOML for `[fetch]`) and `tail` (appended),
/// `env` set, debug logging on, metrics on a known port; waits for `want` predictions and dead
/// letters together, then returns them, the `/metrics` text and the log.
fn run_http_auth(
    run: &Run,
    fetch: &str,
    tail: &str,
    env: &[(&str, &str)],
    want: usize,
) -> (Vec<Value>, Vec<Value>, String, String) {
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let config = std::fs::read_to_string(run.config()).unwrap();
    let config = config
        .replace("[fetch]\n", &format!("[fetch]\n{fetch}"))
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{metrics}\""));
    std::fs::write(run.config(), format!("{config}\n{tail}")).unwrap();
    let log = run.dir.path().join(format!("{}.log", common::unique("auth-run")));
    let mut command = run.command(&[]);
    command.envs(env.iter().copied()).env("DLPIPE_LOG", "debug");
    let child = command.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
    let _child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(240);
    let (mut predictions, mut dead) = (Vec::new(), Vec::new());
    while predictions.len() + dead.len() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        predictions = read_topic(&run.predictions, want, Duration::from_millis(500));
        dead = read_topic(&run.dead, want, Duration::from_millis(500));
    }
    let scraped = http_get(&metrics, "/metrics");
    (predictions, dead, scraped, std::fs::read_to_string(&log).unwrap())
}

/// Images behind a server that requires a bearer token: with the token configured every record
/// is predicted (and a path the token may not read is `unauthorized`), at most `max_per_host`
/// requests at once; without it each record is dead-lettered `unauthorized`. The token is in no
/// log line (at debug level, ureq's included), no dead letter and no metric.
#[test]
fn http_auth_sends_the_token_to_its_host_only_and_never_shows_it() {
    let token = format!("tok-{}", common::unique("secret"));
    let (_server, url) = bearer_server(&token, 50);
    let images = fashion(24, 600);
    let data = common::root().join("data/fashion-mnist");
    let mut messages: Vec<(i32, String, String)> = images
        .iter()
        .enumerate()
        .map(|(i, (path, label))| {
            let uri = format!("{url}/{}", path.strip_prefix(&data).unwrap().display());
            let record = serde_json::json!({"id": format!("a{i}"), "uri": uri, "label": label});
            (i as i32 % 2, format!("a{i}"), record.to_string())
        })
        .collect();
    let forbidden = serde_json::json!({"id": "forbidden", "uri": format!("{url}/forbidden/x.png")}).to_string();
    messages.insert(5, (1, "forbidden".into(), forbidden));
    let input = common::unique("auth-images");
    produce(&input, 2, &messages);

    let with = Run::new("auth", &input, "");
    let rule = "[[fetch.http_auth]]\nhost = \"127.0.0.1\"\nkind = \"bearer\"\nsecret_env = \"IMAGES_TOKEN\"\n";
    let (predictions, dead, metrics, log) =
        run_http_auth(&with, "max_per_host = 2\n", rule, &[("IMAGES_TOKEN", &token)], messages.len());
    assert_eq!(predictions.len(), images.len(), "every record with the token is predicted; dead: {dead:?}\n{log}");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!((dead[0]["id"].as_str(), dead[0]["error_kind"].as_str()), (Some("forbidden"), Some("unauthorized")));
    let error = dead[0]["error"].as_str().unwrap();
    assert!(error.contains("HTTP 403 Forbidden") && error.contains("rule for 127.0.0.1"), "{error}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("dlpipe_records_dead_lettered_total") && l.contains("reason=\"unauthorized\"")),
        "{metrics}"
    );
    assert!(log.contains("DEBUG"), "the run logged at debug level, where ureq logs its requests");
    for (what, text) in [("log", &log), ("dead letter", &serde_json::to_string(&dead).unwrap()), ("metrics", &metrics)]
    {
        assert!(!text.contains(&token), "the token appears in the {what}:\n{text}");
    }
    let peak: usize = http_get(url.trim_start_matches("http://"), "/_peak").trim().parse().unwrap();
    assert_eq!(peak, 2, "fetch.max_per_host = 2 caps the requests in progress at once at 2");

    let without = Run::new("noauth", &input, "");
    let (predictions, dead, _, log) = run_http_auth(&without, "", "", &[], messages.len());
    assert!(predictions.is_empty(), "{predictions:?}");
    assert_eq!(dead.len(), messages.len(), "{log}");
    for d in &dead {
        assert_eq!(d["error_kind"], "unauthorized", "{d}");
        let error = d["error"].as_str().unwrap();
        assert!(error.contains("no fetch.http_auth rule matches host 127.0.0.1"), "{error}");
    }
}

#[test]
fn decoding_threads_run_at_pipeline_decode_nice_below_the_model() {
    let input = common::unique("nice-images");
    produce(&input, 2, &messages(&fashion(4, 0), "n", 2, |_| true));
    let run = Run::new("nice", &input, "");
    let (child, log) = run.spawn(&[]);
    let tasks = PathBuf::from(format!("/proc/{}/task", child.0.id()));
    // Each thread's name and niceness (field 19 of its stat, the 17th after the name).
    let threads = || -> Vec<(String, i32)> {
        let Ok(entries) = std::fs::read_dir(&tasks) else { return Vec::new() };
        entries
            .filter_map(|e| {
                let path = e.ok()?.path();
                let name = std::fs::read_to_string(path.join("comm")).ok()?.trim().to_owned();
                let stat = std::fs::read_to_string(path.join("stat")).ok()?;
                let nice = stat.rsplit_once(')')?.1.split_whitespace().nth(16)?.parse().ok()?;
                Some((name, nice))
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = threads();
    while !seen.iter().any(|(name, _)| name.starts_with("dlpipe-decode")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        seen = threads();
    }
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let decoding: Vec<i32> = seen.iter().filter(|(n, _)| n.starts_with("dlpipe-decode")).map(|(_, v)| *v).collect();
    assert!(!decoding.is_empty() && decoding.iter().all(|n| *n == 10), "decoding threads at nice 10: {seen:?}\n{log}");
    assert!(seen.iter().any(|(n, nice)| n == "dlpipe" && *nice == 0), "the main thread stays at 0: {seen:?}");
}
