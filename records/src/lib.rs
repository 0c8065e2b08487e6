//! `dlpipe-records`: the records that flow between dlpipe's operators, their Kafka encodings,
//! and the parsers of what producers send (image records, feedback labels). Pure: no Kafka
//! client, no timely, so fuzzers and other consumers build it alone.
//!
//! Every record keeps the Kafka coordinates (partition, offset) of the input it came from: the
//! learner orders updates by them, the sink commits offsets by them, and users join predictions
//! back to inputs by them.

use serde::{Deserialize, Serialize};

/// Timely timestamps of the pipeline: epochs, closed by wall-clock time or by offset count.
pub type Epoch = u64;

/// Longest record id accepted, in bytes: ids are copied into every output and used as keys.
pub const MAX_ID_BYTES: usize = 1024;
/// Longest URI accepted, in bytes.
pub const MAX_URI_BYTES: usize = 8192;
/// Longest label accepted, in bytes: labels become class names.
pub const MAX_LABEL_BYTES: usize = 256;
/// Most of an input's raw payload a dead letter carries, in bytes.
pub const MAX_RAW_BYTES: usize = 4096;
/// Longest error message a dead letter carries, in bytes.
pub const MAX_ERROR_BYTES: usize = 2048;

/// `text` cut to at most `max` bytes at a character boundary, marked with "…" when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// One image record from the input topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub id: String,
    /// Where the image is fetched from; for a record that carries its image, the producer's
    /// `uri` (a name, never fetched) or [`INLINE_URI`].
    pub uri: String,
    pub label: Option<String>,
    pub partition: i32,
    pub offset: i64,
    /// The Kafka record's timestamp (ms since the Unix epoch), when it has one.
    pub kafka_ts_ms: Option<i64>,
    /// The image's bytes when the record carries them (then `uri` is not fetched). Dropped
    /// once fetched: no output, dead letter or log carries them.
    pub image: Option<InlineImage>,
}

/// The `uri` of a record that carries its image and names no uri of its own.
pub const INLINE_URI: &str = "inline:";

/// Kafka header of a raw image message (`pipeline.input_format = "raw"`) with the record's id.
pub const ID_HEADER: &str = "dlpipe-id";
/// Kafka header of a raw image message with the record's label.
pub const LABEL_HEADER: &str = "dlpipe-label";

/// How the input topic's messages carry images: `json` records (`{"id","uri"|"image","label"?}`
/// or bare URIs), or `raw` image bytes as the value with id and label in headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    #[default]
    Json,
    Raw,
}

/// What parsing an input message needs beyond the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputSpec {
    pub format: InputFormat,
    /// Largest image a record may carry, in (decoded) bytes: larger ones are dead letters
    /// `too_large` before anything is decoded, and never wait in the backlog.
    pub max_image_bytes: u64,
}

impl InputSpec {
    /// JSON records that name their images (bare URIs or `{"id","uri","label"?}`): any record
    /// with an image is refused as too large. For readers of records without images.
    pub const JSON_URIS: InputSpec = InputSpec { format: InputFormat::Json, max_image_bytes: 0 };
}

/// Image bytes carried in the record: base64 text (the JSON `image` field; decoded on a fetch
/// thread, not on the worker's) or the raw message value.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub enum InlineImage {
    Base64(String),
    Raw(Vec<u8>),
}

impl InlineImage {
    /// The image's size in bytes, known before decoding: four base64 characters carry three
    /// bytes, padding none.
    pub fn decoded_len(&self) -> u64 {
        match self {
            InlineImage::Base64(text) => (text.trim_end_matches('=').len() as u64).saturating_mul(3) / 4,
            InlineImage::Raw(bytes) => bytes.len() as u64,
        }
    }
}

/// Its size only: a record's Debug (in logs, panics) never prints an image.
impl std::fmt::Debug for InlineImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InlineImage::Base64(text) => write!(f, "Base64({} chars)", text.len()),
            InlineImage::Raw(bytes) => write!(f, "Raw({} bytes)", bytes.len()),
        }
    }
}

/// The JSON an input record may carry; `id` and `label` are optional, and one of `uri` and
/// `image` is needed.
#[derive(Deserialize)]
struct InputJson {
    id: Option<serde_json::Value>,
    uri: Option<String>,
    label: Option<serde_json::Value>,
    image: Option<String>,
}

/// One message of the input topic, as the parsers see it.
#[derive(Clone, Copy, Debug, Default)]
pub struct InputMessage<'a> {
    pub payload: Option<&'a [u8]>,
    pub key: Option<&'a [u8]>,
    /// The [`ID_HEADER`] and [`LABEL_HEADER`] headers' values (read by the raw format only).
    pub id_header: Option<&'a [u8]>,
    pub label_header: Option<&'a [u8]>,
    pub partition: i32,
    pub offset: i64,
    pub kafka_ts_ms: Option<i64>,
}

impl InputMessage<'_> {
    /// The id of a record that names none: the message key, else `"<partition>-<offset>"`.
    fn default_id(&self) -> String {
        self.key
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or(format!("{}-{}", self.partition, self.offset))
    }

    fn dead(&self, kind: &str, error: String, raw: &[u8]) -> DeadLetter {
        DeadLetter::of_message(kind, &error, raw, self.key, self.partition, self.offset)
    }
}

/// A base64 `data:` URI is an image carried in the record, as an `image` field is: its size is
/// judged by `image.max_encoded_bytes` (not the URI limit, which keeps outputs small), and the
/// outputs name it by its media type (`data:image/png;base64`), never copying the bytes.
/// Percent-encoded `data:` URIs stay URIs (fetched as such, within the URI limit).
fn carried_by_data_uri(uri: String) -> (String, Option<InlineImage>) {
    let is_data = uri.get(..5).is_some_and(|s| s.eq_ignore_ascii_case("data:"));
    let Some((media, payload)) = uri.split_once(',').filter(|(media, _)| is_data && media.ends_with(";base64")) else {
        return (uri, None);
    };
    (media.to_owned(), Some(InlineImage::Base64(payload.to_owned())))
}

impl ImageRecord {
    /// Parses a Kafka payload: JSON `{"id": "...", "uri": "...", "label": "..."}` (id and label
    /// optional; numbers are accepted for both; `"image": "<base64>"` in place of or beside
    /// `uri`) or a bare URI string. No limit on an inline image's size: see
    /// [`ImageRecord::parse_message`].
    ///
    /// The error is the dead letter itself (it travels on as data, so boxing it would only
    /// add an allocation). Without an id, the
    /// message key is the id, and without a key `"<partition>-<offset>"`.
    #[allow(clippy::result_large_err)]
    pub fn parse(
        payload: Option<&[u8]>,
        key: Option<&[u8]>,
        partition: i32,
        offset: i64,
        kafka_ts_ms: Option<i64>,
    ) -> Result<ImageRecord, DeadLetter> {
        let message = InputMessage { payload, key, partition, offset, kafka_ts_ms, ..Default::default() };
        Self::parse_json(&message, u64::MAX)
    }

    /// Parses an input message in `spec`'s format. An image carried in the record larger than
    /// `spec.max_image_bytes` is a dead letter `too_large`, judged on its length before any
    /// decoding. Raw messages: the value is the image, the id is the [`ID_HEADER`] header
    /// (else the key, else `"<partition>-<offset>"`, as for JSON), the label the
    /// [`LABEL_HEADER`] header. A dead letter of a record with an image quotes none of it.
    #[allow(clippy::result_large_err)]
    pub fn parse_message(spec: &InputSpec, message: &InputMessage<'_>) -> Result<ImageRecord, DeadLetter> {
        match spec.format {
            InputFormat::Json => Self::parse_json(message, spec.max_image_bytes),
            InputFormat::Raw => Self::parse_raw(message, spec.max_image_bytes),
        }
    }

    #[allow(clippy::result_large_err)]
    fn parse_json(m: &InputMessage<'_>, max_image_bytes: u64) -> Result<ImageRecord, DeadLetter> {
        let (partition, offset) = (m.partition, m.offset);
        let raw = m.payload.unwrap_or_default();
        let dead = |kind: &str, error: String| m.dead(kind, error, raw);
        let text = std::str::from_utf8(raw)
            .map_err(|e| dead("malformed_record", format!("payload at {partition}:{offset} is not UTF-8: {e}")))?
            .trim();
        let (id, uri, label, image) = if text.starts_with('{') {
            let json: InputJson = serde_json::from_str(text).map_err(|e| {
                dead("malformed_json", format!("record at {partition}:{offset} is not valid JSON of the form {{\"id\",\"uri\",\"label\"?}}: {e}"))
            })?;
            let id = json.id.map(value_to_string).unwrap_or_else(|| m.default_id());
            let uri = json.uri.filter(|u| !u.trim().is_empty());
            let label = json.label.map(value_to_string);
            match json.image {
                Some(image) => (id, uri.unwrap_or_else(|| INLINE_URI.into()), label, Some(InlineImage::Base64(image))),
                None => {
                    let uri = uri.ok_or_else(|| {
                        dead("missing_uri", format!("record at {partition}:{offset} has no \"uri\" or \"image\" field"))
                    })?;
                    (id, uri, label, None)
                }
            }
        } else if text.is_empty() {
            return Err(dead("missing_uri", format!("record at {partition}:{offset} is empty")));
        } else if text.chars().any(char::is_whitespace) || text.starts_with('[') || text.starts_with('"') {
            return Err(dead(
                "malformed_record",
                format!("record at {partition}:{offset} is neither a JSON object nor a bare URI"),
            ));
        } else {
            (m.default_id(), text.to_owned(), None, None)
        };
        let (uri, image) = match image {
            None => carried_by_data_uri(uri),
            image => (uri, image),
        };
        Self::checked(
            m,
            ImageRecord { id, uri, label, partition, offset, kafka_ts_ms: m.kafka_ts_ms, image },
            max_image_bytes,
        )
    }

    #[allow(clippy::result_large_err)]
    fn parse_raw(m: &InputMessage<'_>, max_image_bytes: u64) -> Result<ImageRecord, DeadLetter> {
        let at = format!("record at {}:{}", m.partition, m.offset);
        let header = |value: &[u8], name: &str| {
            String::from_utf8(value.to_vec()).map_err(|_| {
                // Quoting the summary, never the value: that is the image.
                let summary = inline_summary(None, None, None, m.payload.map_or(0, |p| p.len() as u64));
                m.dead("malformed_record", format!("{at}: header {name} is not UTF-8"), summary.as_bytes())
            })
        };
        let id = m.id_header.map(|h| header(h, ID_HEADER)).transpose()?.unwrap_or_else(|| m.default_id());
        let label = m.label_header.map(|h| header(h, LABEL_HEADER)).transpose()?;
        let image = Some(InlineImage::Raw(m.payload.unwrap_or_default().to_vec()));
        let record = ImageRecord {
            id,
            uri: INLINE_URI.into(),
            label,
            partition: m.partition,
            offset: m.offset,
            kafka_ts_ms: m.kafka_ts_ms,
            image,
        };
        Self::checked(m, record, max_image_bytes)
    }

    /// `record` if every field fits its limit, else its dead letter (quoting the message, or
    /// for a record with an image a summary of it).
    #[allow(clippy::result_large_err)]
    fn checked(m: &InputMessage<'_>, record: ImageRecord, max_image_bytes: u64) -> Result<ImageRecord, DeadLetter> {
        let ImageRecord { id, uri, label, image, .. } = &record;
        let at = format!("record at {}:{}", m.partition, m.offset);
        let dead = |kind: &str, error: String| match image {
            Some(image) => {
                let summary = inline_summary(Some(id), Some(uri), label.as_deref(), image.decoded_len());
                // Named by its id, as the dead letters of later stages are (a raw message's id
                // is in a header, not the key).
                let (id, uri) = (Some(truncate(id, MAX_ID_BYTES)), Some(truncate(uri, MAX_URI_BYTES)));
                DeadLetter { id, uri, ..m.dead(kind, error, summary.as_bytes()) }
            }
            None => m.dead(kind, error, m.payload.unwrap_or_default()),
        };
        // Every field is copied into the outputs: one that could make them larger than the
        // broker accepts would stop the pipeline on this record again after every restart.
        if id.len() > MAX_ID_BYTES {
            return Err(dead("id_too_long", format!("{at}: id is {} bytes, over {MAX_ID_BYTES}", id.len())));
        }
        if uri.len() > MAX_URI_BYTES {
            return Err(dead("uri_too_long", format!("{at}: uri is {} bytes, over {MAX_URI_BYTES}", uri.len())));
        }
        match label {
            Some(l) if l.len() > MAX_LABEL_BYTES => {
                return Err(dead("invalid_label", format!("{at}: label is {} bytes, over {MAX_LABEL_BYTES}", l.len())))
            }
            Some(l) if l.trim().is_empty() => {
                return Err(dead(
                    "invalid_label",
                    format!("{at}: label is empty; leave it out for an unlabelled record"),
                ))
            }
            _ => {}
        }
        match image.as_ref().map(InlineImage::decoded_len) {
            Some(0) => Err(dead("missing_image", format!("{at}: its image is empty"))),
            // Refused here, so an oversized image never waits in the backlog.
            Some(size) if size > max_image_bytes => Err(dead(
                "too_large",
                format!(
                    "{at}: its image is {size} bytes, over the limit of {max_image_bytes} (image.max_encoded_bytes)"
                ),
            )),
            _ => Ok(record),
        }
    }

    /// A dead letter for this record.
    pub fn dead_letter(&self, error_kind: &str, error: String) -> DeadLetter {
        DeadLetter {
            id: Some(self.id.clone()),
            uri: Some(self.uri.clone()),
            raw: truncate(
                &serde_json::json!({"id": self.id, "uri": self.uri, "label": self.label}).to_string(),
                MAX_RAW_BYTES,
            ),
            error_kind: error_kind.into(),
            error: truncate(&error, MAX_ERROR_BYTES),
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// What a dead letter quotes of a record that carries its image: its fields and the image's
/// size, never its bytes.
fn inline_summary(id: Option<&str>, uri: Option<&str>, label: Option<&str>, image_bytes: u64) -> String {
    serde_json::json!({"id": id, "uri": uri, "label": label, "image_bytes": image_bytes}).to_string()
}

/// A JSON string's text, or any other JSON value as written (ids and labels may be numbers).
pub(crate) fn value_to_string(v: serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }
}

/// A record with its image's pixels, ready for the model's device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Decoded {
    pub record: ImageRecord,
    pub pixels: Pixels,
}

/// A decoded image's RGB bytes, interleaved (HWC). Bytes, not normalised f32: a quarter of the
/// memory in the backlog, and of what crosses to the device; the model's device normalises them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pixels {
    /// Resized and centre-cropped to the model's input size by the host.
    Crop(Vec<u8>),
    /// As decoded, `width` x `height`: the model's device resizes and crops it (for small
    /// images, fewer bytes than their crop, and the upscaling off the host's CPU).
    Image { width: u32, height: u32, rgb: Vec<u8> },
}

impl Pixels {
    /// The RGB bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Pixels::Crop(bytes) | Pixels::Image { rgb: bytes, .. } => bytes,
        }
    }
}

/// A record with the model's outputs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Featured {
    pub record: ImageRecord,
    pub features: Vec<f32>,
    pub logits: Option<Vec<f32>>,
}

/// What the learner needs of a labelled record; broadcast to every worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelledExample {
    pub partition: i32,
    pub offset: i64,
    pub label: String,
    pub features: Vec<f32>,
}

impl LabelledExample {
    pub fn of(featured: &Featured) -> Option<LabelledExample> {
        let label = featured.record.label.clone()?;
        Some(LabelledExample {
            partition: featured.record.partition,
            offset: featured.record.offset,
            label,
            features: featured.features.clone(),
        })
    }
}

/// One class of a prediction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    /// The class's name (the label for online classes, the ImageNet name for the imagenet head).
    pub class: String,
    pub probability: f32,
}

/// A prediction for one record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Prediction {
    pub record: ImageRecord,
    pub top_k: Vec<ClassScore>,
    /// The classifier that predicted this record: where it started (see [`ClassifierId`]).
    pub classifier: ClassifierId,
    /// Updates the classifier had applied when it predicted this record.
    pub model_version: u64,
    /// When the prediction was made (ms since the Unix epoch).
    pub predicted_at_ms: i64,
    /// The record's features (moved from its `Featured`, not copied), for the features topic.
    pub features: Vec<f32>,
}

impl Prediction {
    /// The output topic's JSON: `{"id","uri","label"?,"top_k":[{"class","probability"}],
    /// "model","model_sha256","classifier","model_version","latency_ms","partition","offset"}`:
    /// `model` is the CNN that featurized the record; `classifier` and `model_version` name the
    /// classifier that predicted it (where it started, and the updates it had learned since).
    /// Latency runs from the input record's Kafka timestamp to the prediction.
    pub fn to_json(&self, model: &ModelId) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            id: &'a str,
            uri: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            label: Option<&'a str>,
            top_k: &'a [ClassScore],
            model: &'a str,
            model_sha256: &'a str,
            classifier: &'a str,
            model_version: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            latency_ms: Option<i64>,
            partition: i32,
            offset: i64,
        }
        let r = &self.record;
        serde_json::to_string(&Out {
            id: &r.id,
            uri: &r.uri,
            label: r.label.as_deref(),
            top_k: &self.top_k,
            model: &model.name,
            model_sha256: &model.sha256,
            classifier: &self.classifier.0,
            model_version: self.model_version,
            latency_ms: r.kafka_ts_ms.map(|ts| (self.predicted_at_ms - ts).max(0)),
            partition: r.partition,
            offset: r.offset,
        })
        .expect("serialisable")
    }
}

/// Where a classifier started, as predictions name it: `new` for an online learner that
/// started from nothing, else `sha256:` and the first 16 hex digits of the classifier file it
/// started from (an `--init-model`, or a file `dlpipe promote` announced; dlpipe's
/// `transfer::classifier::classifier_id`). With the updates it has learned since
/// (`model_version`), it names the classifier exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClassifierId(pub String);

impl ClassifierId {
    /// The id of a learner that started from nothing.
    pub fn new_learner() -> ClassifierId {
        ClassifierId("new".into())
    }
}

impl std::fmt::Display for ClassifierId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a promoted classifier becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromotionRole {
    /// It replaces the classifier that predicts (the champion), keeping on learning.
    Champion,
    /// It learns and is scored beside the champion, prequentially, on the same labelled
    /// records; its predictions are never published.
    Shadow,
}

/// A classifier announced on the model topic (`dlpipe promote`) to take over, or to shadow,
/// the running one from an epoch on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Promotion {
    pub role: PromotionRole,
    /// The classifier file's id.
    pub id: ClassifierId,
    /// The epoch announced; `None`: as soon as the pipeline reads it.
    pub at_epoch: Option<Epoch>,
    /// Its offset in the model topic: promotions apply in this order.
    pub offset: i64,
    /// The classifier file's bytes.
    pub classifier: Vec<u8>,
}

/// The CNN that featurized the records, as every prediction and features message names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelId {
    pub name: String,
    /// The TorchScript file's sha256 ("" when the manifest has none).
    pub sha256: String,
}

impl Prediction {
    /// The features topic's JSON: `{"id","uri","model","model_sha256","dim","features":[...],
    /// "model_version","partition","offset"}`. Each f32 is written in its shortest form that
    /// reads back as the same f32, so a reader parsing the numbers as f32 gets the exact vector
    /// (a non-finite value, which a broken model could give, is written as `null`).
    pub fn features_json(&self, model: &ModelId) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            id: &'a str,
            uri: &'a str,
            model: &'a str,
            model_sha256: &'a str,
            dim: usize,
            features: &'a [f32],
            model_version: u64,
            partition: i32,
            offset: i64,
        }
        let r = &self.record;
        serde_json::to_string(&Out {
            id: &r.id,
            uri: &r.uri,
            model: &model.name,
            model_sha256: &model.sha256,
            dim: self.features.len(),
            features: &self.features,
            model_version: self.model_version,
            partition: r.partition,
            offset: r.offset,
        })
        .expect("serialisable")
    }
}

/// An input that could not be processed, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: Option<String>,
    pub uri: Option<String>,
    /// The input as received (truncated to 4 KiB), or the record re-encoded.
    pub raw: String,
    /// A short cause: `malformed_json`, `not_found`, `undecodable`, `too_large`, ...
    pub error_kind: String,
    pub error: String,
    pub partition: i32,
    pub offset: i64,
}

impl DeadLetter {
    /// The dead letter of a Kafka message that could not be parsed: its key (cut short) as the
    /// id, its payload (cut short) as the raw input.
    pub fn of_message(
        error_kind: &str,
        error: &str,
        payload: &[u8],
        key: Option<&[u8]>,
        partition: i32,
        offset: i64,
    ) -> DeadLetter {
        DeadLetter {
            id: key.map(|k| truncate(&String::from_utf8_lossy(k), MAX_ID_BYTES)),
            uri: None,
            raw: truncate(&String::from_utf8_lossy(&payload[..payload.len().min(MAX_RAW_BYTES + 4)]), MAX_RAW_BYTES),
            error_kind: error_kind.into(),
            error: truncate(error, MAX_ERROR_BYTES),
            partition,
            offset,
        }
    }

    /// The dead-letter topic's JSON: `{"id"?,"uri"?,"raw","error_kind","error","partition","offset"}`.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("serialisable")
    }

    /// The smallest dead letter for an output (`what`: "output" or "features") the broker
    /// refused as too large: the record's coordinates, its id cut short, no raw input.
    pub fn output_too_large(id: &str, partition: i32, offset: i64, what: &str, error: &str) -> DeadLetter {
        DeadLetter {
            id: Some(truncate(id, 256)),
            uri: None,
            raw: String::new(),
            error_kind: "output_too_large".into(),
            error: truncate(&format!("the {what} for this record was refused by the broker: {error}"), 512),
            partition,
            offset,
        }
    }
}

/// What the sink publishes: exactly one `Predicted` or `Dead` per input record, and a
/// `FeedbackDead` per feedback record that labels nothing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Outcome {
    Predicted(Prediction),
    Dead(DeadLetter),
    /// A dead letter of the feedback topic (its partition and offset are the feedback
    /// record's): published, but no input offset and no backlog slot is its.
    FeedbackDead(DeadLetter),
}

impl Outcome {
    /// The input record this outcome answers, as (partition, offset); `None` for feedback.
    pub fn input_position(&self) -> Option<(i32, i64)> {
        match self {
            Outcome::Predicted(p) => Some((p.record.partition, p.record.offset)),
            Outcome::Dead(d) => Some((d.partition, d.offset)),
            Outcome::FeedbackDead(_) => None,
        }
    }
}

/// How far one input partition is done: its records before `learned` have been learned (or
/// need not be), its records before `published` have their outputs acknowledged. The sink
/// reports positions as epochs retire; the checkpoint stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub partition: i32,
    pub learned: i64,
    pub published: i64,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A label for a record id, from the feedback topic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Feedback {
    pub id: String,
    pub label: String,
    /// When the label was given (the record's `ts`, else its Kafka timestamp), in ms: later
    /// labels for the same id replace earlier ones.
    pub ts_ms: i64,
    pub partition: i32,
    pub offset: i64,
}

/// The JSON a feedback record carries.
#[derive(Deserialize)]
struct FeedbackJson {
    id: Option<serde_json::Value>,
    label: Option<serde_json::Value>,
    /// Milliseconds; any JSON number (a float is truncated), else ignored for the Kafka timestamp.
    ts: Option<serde_json::Value>,
}

impl Feedback {
    /// Parses a feedback topic's payload, `{"id": "...", "label": "...", "ts": 1733200000000}`
    /// (`ts` in ms, optional: the Kafka timestamp, else 0; numbers are accepted for id and
    /// label; without an id, the message key). The error is the dead letter itself.
    #[allow(clippy::result_large_err)]
    pub fn parse(
        payload: Option<&[u8]>,
        key: Option<&[u8]>,
        partition: i32,
        offset: i64,
        kafka_ts_ms: Option<i64>,
    ) -> Result<Feedback, DeadLetter> {
        let raw = payload.unwrap_or_default();
        let at = format!("feedback at {partition}:{offset}");
        let dead = |kind: &str, error: String| DeadLetter::of_message(kind, &error, raw, key, partition, offset);
        let json: FeedbackJson = serde_json::from_slice(raw).map_err(|e| {
            dead("malformed_json", format!("{at} is not JSON of the form {{\"id\",\"label\",\"ts\"?}}: {e}"))
        })?;
        let id = json
            .id
            .map(value_to_string)
            .or_else(|| key.map(|k| String::from_utf8_lossy(k).into_owned()))
            .filter(|id| !id.trim().is_empty())
            .ok_or_else(|| dead("missing_id", format!("{at} has no \"id\" (nor a message key): it labels nothing")))?;
        if id.len() > MAX_ID_BYTES {
            return Err(dead("id_too_long", format!("{at}: id is {} bytes, over {MAX_ID_BYTES}", id.len())));
        }
        let label = json.label.map(value_to_string).unwrap_or_default();
        if label.trim().is_empty() || label.len() > MAX_LABEL_BYTES {
            return Err(dead(
                "invalid_label",
                format!("{at}: the label must be 1 to {MAX_LABEL_BYTES} bytes, not blank (got {} bytes)", label.len()),
            ));
        }
        let ts = json.ts.and_then(|v| v.as_i64().or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64)));
        let ts_ms = ts.or(kafka_ts_ms).unwrap_or(0);
        Ok(Feedback { id, label, ts_ms, partition, offset })
    }

    /// A dead letter for this feedback record.
    pub fn dead_letter(&self, error_kind: &str, error: String) -> DeadLetter {
        DeadLetter {
            id: Some(self.id.clone()),
            uri: None,
            raw: truncate(
                &serde_json::json!({"id": self.id, "label": self.label, "ts": self.ts_ms}).to_string(),
                MAX_RAW_BYTES,
            ),
            error_kind: error_kind.into(),
            error: truncate(&error, MAX_ERROR_BYTES),
            partition: self.partition,
            offset: self.offset,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(format: InputFormat, max_image_bytes: u64) -> InputSpec {
        InputSpec { format, max_image_bytes }
    }

    #[test]
    fn json_records_may_carry_a_base64_image_judged_on_its_length_before_decoding() {
        let json = spec(InputFormat::Json, 6);
        // 8 base64 characters are 6 bytes: within the limit; the text is kept, not decoded.
        let m = InputMessage { payload: Some(br#"{"id":"a","image":"iVBORw0K","label":"cat"}"#), ..Default::default() };
        let r = ImageRecord::parse_message(&json, &m).unwrap();
        assert_eq!((r.id.as_str(), r.uri.as_str(), r.label.as_deref()), ("a", INLINE_URI, Some("cat")));
        assert_eq!(r.image, Some(InlineImage::Base64("iVBORw0K".into())));
        assert_eq!(format!("{:?}", r.image.unwrap()), "Base64(8 chars)", "Debug prints no bytes");
        // A uri beside the image is kept as its name.
        let m = InputMessage {
            payload: Some(br#"{"uri":"cam/1.png","image":"iVBORw=="}"#),
            offset: 3,
            ..Default::default()
        };
        let r = ImageRecord::parse_message(&json, &m).unwrap();
        assert_eq!((r.id.as_str(), r.uri.as_str()), ("0-3", "cam/1.png"));
        // 12 characters, 9 bytes: too large, whatever the characters are (never decoded here).
        let payload = br#"{"id":"b","image":"!!!!!!!!!!!!"}"#;
        let d = ImageRecord::parse_message(&json, &InputMessage { payload: Some(payload), ..Default::default() })
            .unwrap_err();
        assert_eq!(d.error_kind, "too_large");
        assert!(d.error.contains("9 bytes, over the limit of 6"), "{}", d.error);
        assert!(!d.raw.contains("!!!!") && d.raw.contains(r#""image_bytes":9"#), "quotes no image: {}", d.raw);
        let d = ImageRecord::parse_message(
            &json,
            &InputMessage { payload: Some(br#"{"image":""}"#), ..Default::default() },
        )
        .unwrap_err();
        assert_eq!(d.error_kind, "missing_image");
        // Other limits still apply, and their dead letters quote no image either.
        let payload = format!(r#"{{"id":"c","image":"QUFB","label":"{}"}}"#, "x".repeat(MAX_LABEL_BYTES + 1));
        let d = ImageRecord::parse_message(
            &json,
            &InputMessage { payload: Some(payload.as_bytes()), ..Default::default() },
        )
        .unwrap_err();
        assert_eq!(d.error_kind, "invalid_label");
        assert!(!d.raw.contains("QUFB"), "{}", d.raw);
        // Records without an image parse as before.
        let r =
            ImageRecord::parse_message(&json, &InputMessage { payload: Some(b"a.png"), ..Default::default() }).unwrap();
        assert_eq!((r.uri.as_str(), r.image), ("a.png", None));
    }

    #[test]
    fn raw_messages_are_the_image_with_id_and_label_in_headers() {
        let raw = spec(InputFormat::Raw, 4);
        let m = InputMessage {
            payload: Some(&[1, 2, 3, 4]),
            key: Some(b"k"),
            id_header: Some(b"img-1"),
            label_header: Some(b"cat"),
            partition: 2,
            offset: 9,
            kafka_ts_ms: Some(5),
        };
        let r = ImageRecord::parse_message(&raw, &m).unwrap();
        assert_eq!((r.id.as_str(), r.uri.as_str(), r.label.as_deref()), ("img-1", INLINE_URI, Some("cat")));
        assert_eq!(
            (r.image, r.partition, r.offset, r.kafka_ts_ms),
            (Some(InlineImage::Raw(vec![1, 2, 3, 4])), 2, 9, Some(5))
        );
        // Without the id header: the key, else partition-offset.
        let r = ImageRecord::parse_message(&raw, &InputMessage { id_header: None, ..m }).unwrap();
        assert_eq!((r.id.as_str(), r.label.as_deref()), ("k", Some("cat")));
        let r = ImageRecord::parse_message(&raw, &InputMessage { id_header: None, key: None, label_header: None, ..m })
            .unwrap();
        assert_eq!((r.id.as_str(), r.label), ("2-9", None));
        // A JSON-looking value is an image too (raw format reads no JSON).
        let r = ImageRecord::parse_message(&raw, &InputMessage { payload: Some(b"{}"), ..m }).unwrap();
        assert_eq!(r.image, Some(InlineImage::Raw(b"{}".to_vec())));
        let d = ImageRecord::parse_message(&raw, &InputMessage { payload: Some(&[7; 5]), ..m }).unwrap_err();
        assert_eq!((d.error_kind.as_str(), d.id.as_deref()), ("too_large", Some("img-1")));
        assert!(d.raw.contains(r#""image_bytes":5"#) && d.raw.contains("img-1"), "{}", d.raw);
        assert_eq!(
            ImageRecord::parse_message(&raw, &InputMessage { payload: None, ..m }).unwrap_err().error_kind,
            "missing_image"
        );
        let d = ImageRecord::parse_message(&raw, &InputMessage { label_header: Some(&[0xff]), ..m }).unwrap_err();
        assert_eq!(d.error_kind, "malformed_record");
        assert_eq!(
            ImageRecord::parse_message(&raw, &InputMessage { label_header: Some(b" "), ..m }).unwrap_err().error_kind,
            "invalid_label"
        );
        // Readers of records that name their images refuse any image.
        let d = ImageRecord::parse_message(
            &InputSpec::JSON_URIS,
            &InputMessage { payload: Some(br#"{"image":"QUFB"}"#), ..m },
        )
        .unwrap_err();
        assert_eq!(d.error_kind, "too_large");
    }

    /// A photo as a base64 `data:` URI is far over the URI limit; it is an image the record
    /// carries, limited by the image limit instead, and outputs name only its media type.
    #[test]
    fn base64_data_uris_are_images_carried_in_the_record() {
        let spec = |max_image_bytes| InputSpec { format: InputFormat::Json, max_image_bytes };
        let photo = "QUJD".repeat(10_000); // 40,000 characters, 30,000 bytes
        let payload = format!(r#"{{"id":"p","uri":"data:image/jpeg;base64,{photo}"}}"#);
        let m = InputMessage { payload: Some(payload.as_bytes()), ..Default::default() };
        let r = ImageRecord::parse_message(&spec(1 << 20), &m).unwrap();
        assert_eq!(
            (r.uri.as_str(), r.image.as_ref().map(InlineImage::decoded_len)),
            ("data:image/jpeg;base64", Some(30_000))
        );
        let dead = ImageRecord::parse_message(&spec(10_000), &m).unwrap_err();
        assert_eq!(dead.error_kind, "too_large", "{dead:?}");
        assert!(!dead.raw.contains("QUJD"), "the dead letter quotes the image: {}", dead.raw);
        // Percent-encoded data: URIs, and bare ones, stay URIs.
        for uri in ["data:,text", "data:image/png,%89PNG", "DATA:image/png;base64"] {
            let payload = format!(r#"{{"uri":"{uri}"}}"#);
            let m = InputMessage { payload: Some(payload.as_bytes()), ..Default::default() };
            let r = ImageRecord::parse_message(&spec(1 << 20), &m).unwrap();
            assert_eq!((r.uri.as_str(), r.image), (uri, None));
        }
    }

    #[test]
    fn parses_json_bare_uris_and_rejects_the_rest() {
        let r = ImageRecord::parse(Some(br#"{"id":"a1","uri":"file:///x.png","label":"cat"}"#), None, 2, 7, Some(5))
            .unwrap();
        assert_eq!((r.id.as_str(), r.uri.as_str(), r.label.as_deref()), ("a1", "file:///x.png", Some("cat")));
        let r = ImageRecord::parse(Some(br#"{"uri":"/img/1.png","label":3}"#), Some(b"k9"), 0, 1, None).unwrap();
        assert_eq!((r.id.as_str(), r.label.as_deref()), ("k9", Some("3")));
        let r = ImageRecord::parse(Some(b"  /data/a.jpg\n"), None, 1, 4, None).unwrap();
        assert_eq!((r.id.as_str(), r.uri.as_str(), r.label), ("1-4", "/data/a.jpg", None));
        let d = ImageRecord::parse(Some(b"{\"uri\": "), None, 0, 3, None).unwrap_err();
        assert_eq!(d.error_kind, "malformed_json");
        assert!(d.error.contains("0:3"), "{}", d.error);
        assert_eq!(ImageRecord::parse(Some(br#"{"id":"x"}"#), None, 0, 0, None).unwrap_err().error_kind, "missing_uri");
        assert_eq!(
            ImageRecord::parse(Some(b"two words"), None, 0, 0, None).unwrap_err().error_kind,
            "malformed_record"
        );
        assert_eq!(
            ImageRecord::parse(Some(&[0xff, 0xfe]), None, 0, 0, None).unwrap_err().error_kind,
            "malformed_record"
        );
        assert_eq!(ImageRecord::parse(None, None, 0, 0, None).unwrap_err().error_kind, "missing_uri");
    }

    #[test]
    fn oversized_fields_are_refused_and_what_a_dead_letter_copies_is_capped() {
        let long_id = "i".repeat(600_000);
        let payload = format!(r#"{{"id":"{long_id}","uri":"file:///x.png"}}"#);
        let d = ImageRecord::parse(Some(payload.as_bytes()), None, 0, 9, None).unwrap_err();
        assert_eq!(d.error_kind, "id_too_long");
        assert!(d.to_json().len() < 8 * 1024, "dead letter of {} bytes", d.to_json().len());
        let payload = format!(r#"{{"uri":"file:///{}"}}"#, "u".repeat(600_000));
        let d = ImageRecord::parse(Some(payload.as_bytes()), Some(b"k"), 0, 10, None).unwrap_err();
        assert_eq!(d.error_kind, "uri_too_long");
        assert!(d.to_json().len() < 8 * 1024, "dead letter of {} bytes", d.to_json().len());
        // A key used as the id counts as the id; the dead letter copies only its start.
        let d = ImageRecord::parse(Some(b"a.png"), Some(long_id.as_bytes()), 0, 11, None).unwrap_err();
        assert_eq!(d.error_kind, "id_too_long");
        assert!(d.to_json().len() < 8 * 1024, "dead letter of {} bytes", d.to_json().len());
        let payload = format!(r#"{{"uri":"a.png","label":"{}"}}"#, "l".repeat(300));
        assert_eq!(
            ImageRecord::parse(Some(payload.as_bytes()), None, 0, 11, None).unwrap_err().error_kind,
            "invalid_label"
        );
        let d = ImageRecord::parse(Some(br#"{"uri":"a.png","label":"  "}"#), None, 0, 12, None).unwrap_err();
        assert_eq!(d.error_kind, "invalid_label");
        // At the limits, accepted.
        let payload = format!(r#"{{"id":"{}","uri":"a.png","label":"{}"}}"#, "i".repeat(MAX_ID_BYTES), "é".repeat(128));
        assert!(ImageRecord::parse(Some(payload.as_bytes()), None, 0, 13, None).is_ok());
        // Multi-byte text is cut at a character boundary.
        assert_eq!(truncate("ééé", 5), "é…");
        assert_eq!(truncate("ééé", 6), "ééé");
        assert_eq!(truncate("éééé", 7), "éé…");
    }

    #[test]
    fn prediction_json_has_the_documented_fields() {
        let record =
            ImageRecord::parse(Some(br#"{"id":"a","uri":"u","label":"cat"}"#), None, 1, 2, Some(1000)).unwrap();
        let p = Prediction {
            record,
            top_k: vec![ClassScore { class: "cat".into(), probability: 0.75 }],
            classifier: ClassifierId("sha256:9a129038d9a00aed".into()),
            model_version: 9,
            predicted_at_ms: 1250,
            features: vec![0.1, -2.5e-8, 3.0],
        };
        let model = ModelId { name: "m".into(), sha256: "abc".into() };
        let v: serde_json::Value = serde_json::from_str(&p.to_json(&model)).unwrap();
        assert_eq!(v["id"], "a");
        assert_eq!((v["model"].as_str(), v["model_sha256"].as_str()), (Some("m"), Some("abc")));
        assert_eq!(v["label"], "cat");
        assert_eq!(v["top_k"][0]["class"], "cat");
        assert_eq!(v["model_version"], 9);
        assert_eq!(v["classifier"], "sha256:9a129038d9a00aed");
        assert_eq!(v["latency_ms"], 250);
        assert_eq!((v["partition"].as_i64(), v["offset"].as_i64()), (Some(1), Some(2)));
        assert!(v.get("features").is_none(), "predictions do not carry the features");

        let v: serde_json::Value = serde_json::from_str(&p.features_json(&model)).unwrap();
        assert_eq!(
            (v["id"].as_str(), v["model"].as_str(), v["model_sha256"].as_str()),
            (Some("a"), Some("m"), Some("abc"))
        );
        assert_eq!((v["dim"].as_u64(), v["model_version"].as_u64()), (Some(3), Some(9)));
        // Read back as f32, every value is the one sent, bit for bit.
        let back: Vec<f32> = v["features"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            p.features.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
}
