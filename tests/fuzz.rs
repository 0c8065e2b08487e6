//! Mutation fuzzing of the two places that read what producers send: the record parser
//! (`ImageRecord::parse`) and image decoding with preprocessing (`decode` + `Preprocess::run`).
//!
//! Each target starts from valid seeds (records of every shape, images in every supported
//! format), mutates them at random (flipped and random bytes, insertions, deletions,
//! truncations, splices of two seeds, overwritten header fields) and checks that the code
//! under test returns, never panics, and keeps its limits. Randomness comes from SplitMix64
//! with a printed seed, so a failure is reproduced with `DLPIPE_FUZZ_SEED`.
//!
//! This is the fuzzing that runs in CI: `make test` runs a short pass of each (seconds), and
//! `DLPIPE_FUZZ_SECONDS=N cargo test --release --test fuzz` a longer one. `make fuzz` runs the
//! coverage-guided fuzzer (cargo-fuzz and libFuzzer, `fuzz/`) on the same two places. Both
//! start from the seeds in `fuzz/seeds/`, and every input that ever crashed either one is kept
//! in `fuzz/regressions/` and replayed here first.

use dlpipe::image::{decode, ImageLimits, Preprocess};
use dlpipe::transfer::dataset::SplitMix64;
use dlpipe_operators::records::{ImageRecord, MAX_ID_BYTES, MAX_LABEL_BYTES, MAX_URI_BYTES};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

/// The library's SplitMix64, with a `usize` range for picking bytes and positions.
struct SplitMix(SplitMix64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn below(&mut self, n: usize) -> usize {
        self.0.below(n.max(1) as u64) as usize
    }
}

/// How long, or how many cases: `DLPIPE_FUZZ_SECONDS` for `make fuzz`, else a short pass.
fn budget(short_cases: usize) -> (Option<Instant>, usize) {
    match std::env::var("DLPIPE_FUZZ_SECONDS").ok().and_then(|s| s.parse::<u64>().ok()) {
        Some(seconds) => (Some(Instant::now() + Duration::from_secs(seconds)), usize::MAX),
        None => (None, short_cases),
    }
}

fn seed() -> u64 {
    std::env::var("DLPIPE_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    })
}

/// One random change to `data`, guided by `other` (another seed) for splices.
fn mutate(rng: &mut SplitMix, data: &mut Vec<u8>, other: &[u8]) {
    let interesting = [0u8, 1, 0x7f, 0x80, 0xff, b'{', b'"', b'\\', b'%', b'/', b'.'];
    match rng.below(8) {
        0 if !data.is_empty() => {
            let at = rng.below(data.len());
            data[at] ^= 1 << rng.below(8);
        }
        1 if !data.is_empty() => {
            let at = rng.below(data.len());
            data[at] = rng.next() as u8;
        }
        2 => {
            let at = rng.below(data.len() + 1);
            data.insert(at, interesting[rng.below(interesting.len())]);
        }
        3 if !data.is_empty() => {
            let at = rng.below(data.len());
            let n = rng.below(16).min(data.len() - at);
            data.drain(at..at + n);
        }
        4 => data.truncate(rng.below(data.len() + 1)),
        5 if !other.is_empty() => {
            let cut = rng.below(data.len() + 1);
            let from = rng.below(other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        // Header fields: big-endian and little-endian 16/32-bit values near the start, where
        // formats keep their dimensions and lengths.
        6 if data.len() >= 8 => {
            let at = rng.below(data.len().min(64) - 4);
            let value = [0u32, 1, 0xffff, 0x7fff_ffff, 0xffff_ffff, 20_000, 65_535][rng.below(7)];
            let bytes = if rng.below(2) == 0 { value.to_be_bytes() } else { value.to_le_bytes() };
            data[at..at + 4].copy_from_slice(&bytes);
        }
        _ => {
            let n = rng.below(8);
            for _ in 0..n {
                data.push(rng.next() as u8);
            }
        }
    }
}

/// Decodes and preprocesses as the stream does; returns what `decode` said.
fn decode_and_preprocess(bytes: &[u8], limits: &ImageLimits, preprocess: &Preprocess) -> Result<(), String> {
    let image = decode(bytes, limits).map_err(|e| e.kind().to_owned())?;
    let (w, h) = image.dimensions();
    assert!(u64::from(w) * u64::from(h) <= limits.max_pixels, "{w}x{h} passed the pixel limit");
    let mut out = vec![0f32; preprocess.tensor_len()];
    preprocess.run(&image, &mut fast_image_resize::Resizer::new(), &mut out).map_err(|e| e.kind().to_owned())?;
    assert!(out.iter().all(|v| v.is_finite()), "non-finite pixels");
    Ok(())
}

/// The files of `fuzz/<dir>/<target>`: the coverage-guided fuzzer's seeds, or the inputs that
/// once crashed it (`scripts/fuzz`), which must stay fixed.
fn fuzz_files(dir: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(dir).join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&folder)
        .map(|entries| entries.map(|e| e.unwrap().path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|path| (path.display().to_string(), std::fs::read(&path).unwrap()))
        .collect();
    files.sort();
    files
}

#[test]
fn decoding_and_preprocessing_mutated_images_never_panic() {
    // Tight limits keep each case cheap; the mutations aim at the header fields they check.
    let limits =
        ImageLimits { max_encoded_bytes: 1 << 20, max_pixels: 4_000_000, max_side: 4_000, max_aspect_ratio: 32 };
    let preprocess = Preprocess::new(224, 224, 256, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).unwrap();
    let regressions = fuzz_files("regressions", "image");
    assert!(!regressions.is_empty(), "fuzz/regressions/image holds the 20000x1 PNG");
    for (name, case) in &regressions {
        let result = catch_unwind(AssertUnwindSafe(|| decode_and_preprocess(case, &limits, &preprocess)));
        assert!(matches!(result, Ok(Err(_))), "{name}: {result:?}");
    }
    // The seeds (the coverage-guided fuzzer's: every format) are valid images.
    let mut seeds = fuzz_files("seeds", "image");
    assert!(seeds.len() >= 9, "fuzz/seeds/image holds an image of every format");
    for (name, seed) in &seeds {
        let result = catch_unwind(AssertUnwindSafe(|| decode_and_preprocess(seed, &limits, &preprocess)));
        assert!(matches!(result, Ok(Ok(()))), "seed {name}: {result:?}");
    }
    let coffee = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples/coffee.jpg");
    if let Ok(bytes) = std::fs::read(&coffee) {
        seeds.push((coffee.display().to_string(), bytes));
    }
    let seeds: Vec<Vec<u8>> = seeds.into_iter().map(|(_, bytes)| bytes).collect();
    let seed = seed();
    let mut rng = SplitMix(SplitMix64(seed));
    let (deadline, max_cases) = budget(5_000);
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    let mut cases = 0;
    while cases < max_cases && deadline.is_none_or(|d| Instant::now() < d) {
        cases += 1;
        let base = rng.below(seeds.len());
        let mut data = seeds[base].clone();
        for _ in 0..1 + rng.below(4) {
            let other = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, &mut data, other);
        }
        match catch_unwind(AssertUnwindSafe(|| decode_and_preprocess(&data, &limits, &preprocess))) {
            Ok(result) => *outcomes.entry(result.err().unwrap_or_else(|| "ok".into())).or_default() += 1,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let path = std::env::temp_dir().join(format!("dlpipe-fuzz-crash-{seed}-{cases}.bin"));
                std::fs::write(&path, &data).unwrap();
                panic!("case {cases} (DLPIPE_FUZZ_SEED={seed}) panicked: {message}; input saved to {}", path.display());
            }
        }
    }
    eprintln!("image fuzz: {cases} cases from seed {seed}: {outcomes:?}");
    assert!(outcomes.get("ok").copied().unwrap_or(0) > 0, "no mutated image decoded at all: the seeds are broken");
}

fn record_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"id":"a1","uri":"file:///data/x.png","label":"cat"}"#,
        r#"{"uri":"http://example.com/a.jpg","label":3}"#,
        r#"{"id":7,"uri":"/data/y.jpg"}"#,
        r#"{"id":null,"uri":"s3://b/k","label":null,"extra":[1,2,{"x":"y"}]}"#,
        "/plain/path/image.jpg",
        "https://example.com/%E2%9C%93.png?x=1#frag",
        r#"{"id":"\u00e9\ud83d\ude00","uri":"file:///\u0000","label":"\u200b"}"#,
        "",
        "   ",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Parses `payload` (with `key`) as an input record, checking what comes out: a record with
/// every field within its limit (true), or a small dead letter that is valid JSON (false).
#[allow(clippy::result_large_err)]
fn parse_checked(payload: &[u8], key: Option<&[u8]>, offset: i64) -> bool {
    match ImageRecord::parse(Some(payload), key, 1, offset, None) {
        Ok(record) => {
            assert!(record.id.len() <= MAX_ID_BYTES && record.uri.len() <= MAX_URI_BYTES);
            assert!(record.label.as_ref().is_none_or(|l| l.len() <= MAX_LABEL_BYTES && !l.trim().is_empty()));
            assert!(!record.uri.trim().is_empty());
            true
        }
        Err(letter) => {
            let json = letter.to_json();
            assert!(json.len() < 16 * 1024, "a dead letter of {} bytes", json.len());
            assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok(), "dead letter is not JSON: {json}");
            false
        }
    }
}

/// A file of the `record` fuzz target: its first byte is the key's length (0: no key), then
/// the key, then the payload.
fn key_and_payload(file: &[u8]) -> (Option<&[u8]>, &[u8]) {
    let Some((&key_len, rest)) = file.split_first() else { return (None, file) };
    let (key, payload) = rest.split_at((key_len as usize).min(rest.len()));
    ((key_len > 0).then_some(key), payload)
}

#[test]
fn parsing_mutated_records_never_panics_and_keeps_every_field_within_its_limit() {
    for (name, file) in fuzz_files("regressions", "record") {
        let (key, payload) = key_and_payload(&file);
        assert!(catch_unwind(AssertUnwindSafe(|| parse_checked(payload, key, 0))).is_ok(), "{name}");
    }
    let mut seeds = record_seeds();
    let fuzz_seeds = fuzz_files("seeds", "record");
    assert!(!fuzz_seeds.is_empty());
    seeds.extend(fuzz_seeds.iter().map(|(_, file)| key_and_payload(file).1.to_vec()));
    let seed = seed();
    let mut rng = SplitMix(SplitMix64(seed));
    let (deadline, max_cases) = budget(50_000);
    let mut cases = 0;
    let (mut ok, mut dead) = (0, 0);
    while cases < max_cases && deadline.is_none_or(|d| Instant::now() < d) {
        cases += 1;
        let mut payload = seeds[rng.below(seeds.len())].clone();
        for _ in 0..1 + rng.below(6) {
            let other = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, &mut payload, other);
        }
        // Now and then a field blown up past its limit.
        if rng.below(50) == 0 {
            let big = "x".repeat(1 + rng.below(3 * MAX_URI_BYTES));
            payload = format!(r#"{{"id":"{big}","uri":"{big}","label":"{big}"}}"#).into_bytes();
        }
        let key = (rng.below(3) == 0).then(|| payload.iter().rev().copied().take(rng.below(2000)).collect::<Vec<u8>>());
        match catch_unwind(AssertUnwindSafe(|| parse_checked(&payload, key.as_deref(), cases as i64))) {
            Ok(true) => ok += 1,
            Ok(false) => dead += 1,
            Err(_) => panic!(
                "case {cases} (DLPIPE_FUZZ_SEED={seed}) panicked on payload {:?}",
                String::from_utf8_lossy(&payload)
            ),
        }
    }
    eprintln!("record fuzz: {cases} cases from seed {seed}: {ok} records, {dead} dead letters");
    assert!(ok > 0 && dead > 0);
}
