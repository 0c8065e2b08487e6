//! The S3-compatible server of the tests: moto, started (or reused) by `scripts/s3`.

use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// An S3 server's endpoint and its access key id and secret.
pub struct Server {
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
}

/// Starts (or reuses) the server `scripts/s3` runs on `port` (its default when None).
pub fn start(port: Option<&str>, auth: bool) -> Server {
    let script = super::root().join("scripts/s3");
    let command = |arg: &str| {
        let mut command = Command::new(&script);
        command.arg(arg).env("DLPIPE_S3_AUTH", if auth { "on" } else { "off" });
        if let Some(port) = port {
            command.env("DLPIPE_S3_PORT", port);
        }
        command
    };
    let status = command("start").status().expect("run scripts/s3");
    assert!(status.success(), "scripts/s3 start failed; see its output above");
    let text = |arg: &str| String::from_utf8(command(arg).output().unwrap().stdout).unwrap();
    let env = std::fs::read_to_string(text("env").trim()).unwrap();
    let value = |name: &str| {
        env.lines().find_map(|l| l.strip_prefix(&format!("{name}="))).unwrap_or_else(|| panic!("{name}")).to_owned()
    };
    Server {
        endpoint: text("url").trim().to_owned(),
        key_id: value("AWS_ACCESS_KEY_ID"),
        secret: value("AWS_SECRET_ACCESS_KEY"),
    }
}

/// The server `scripts/s3 start` runs, which checks every request's signature.
pub fn signed() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start(None, true))
}

/// A second server that accepts unsigned requests too: moto 5 miscomputes the signature of any
/// request whose query holds a `/`, as a listing under a prefix does (`prefix=photos/`), and
/// refuses it. dlpipe signs them as AWS does; listings of a whole bucket (no prefix) are
/// tested on the signed server.
pub fn unsigned() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| start(Some("9421"), false))
}

/// A new bucket holding each file under its key, uploaded through the server's own API (boto3).
pub fn bucket_with(s: &Server, name: &str, objects: &[(String, PathBuf)]) -> String {
    let unique = super::unique(name).to_ascii_lowercase();
    let bucket = unique[..unique.len().min(63)].to_owned();
    let list: Vec<Value> = objects.iter().map(|(k, p)| json!([k, p])).collect();
    let script = "import sys, json, boto3\n\
        url, key, secret, bucket, objects = sys.argv[1:6]\n\
        s3 = boto3.client('s3', endpoint_url=url, region_name='us-east-1', aws_access_key_id=key, aws_secret_access_key=secret)\n\
        s3.create_bucket(Bucket=bucket)\n\
        for k, p in json.loads(objects): s3.upload_file(p, bucket, k)\n";
    let status = Command::new(super::python())
        .args(["-c", script, &s.endpoint, &s.key_id, &s.secret, &bucket])
        .arg(serde_json::to_string(&list).unwrap())
        .status()
        .unwrap();
    assert!(status.success(), "uploading to {bucket} failed");
    bucket
}
