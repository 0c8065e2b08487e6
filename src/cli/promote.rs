//! `dlpipe promote`: announce a classifier (from `dlpipe train`, or a snapshot) to a running
//! pipeline's group, to take over from an epoch on, or to run beside it in shadow.

use anyhow::Context;
use dlpipe::config::Config;
use dlpipe::kafka::{client_config, ensure_topic, wait_for_cluster, TopicSpec};
use dlpipe::model::{resolve_precision, Manifest};
use dlpipe::pipeline::{model_topic, promotions};
use dlpipe::transfer::classifier::{classifier_id, Classifier};
use dlpipe_operators::{EpochPolicy, PromotionRole};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct PromoteArgs {
    /// The classifier file (`dlpipe train -o`, or a snapshot of the stream).
    #[arg(value_name = "FILE")]
    classifier: PathBuf,
    /// Run it in shadow: it learns and is scored beside the classifier that predicts, and its
    /// predictions are never published.
    #[arg(long)]
    shadow: bool,
    /// The epoch it takes effect at: the pipeline predicts the records of later epochs with it
    /// and learns this epoch's labels into it. [default: with time epochs, the epoch --in from
    /// now; with offset epochs, as soon as the pipeline reads the announcement]
    #[arg(long, value_name = "EPOCH")]
    at_epoch: Option<u64>,
    /// With time epochs and no --at-epoch: how far ahead (seconds), so that every worker has
    /// read the announcement before the epoch comes.
    #[arg(long = "in", value_name = "SECONDS", default_value_t = 5)]
    in_secs: u64,
}

pub fn run(config: &Config, args: PromoteArgs) -> anyhow::Result<()> {
    let classifier = Classifier::load(&args.classifier)?;
    // The stream's export at its precision; a device this machine lacks still decides "auto".
    let devices: Vec<tch::Device> = config
        .model
        .devices
        .iter()
        .map(|d| if d.trim().starts_with("cuda") { tch::Device::Cuda(0) } else { tch::Device::Cpu })
        .collect();
    let manifest = resolve_precision(&config.model.name, &config.model.dir, config.model.precision, &devices)?;
    let manifest = Manifest::load(&manifest)?;
    classifier.check_featurizer(&manifest)?;
    let bytes = std::fs::read(&args.classifier).with_context(|| format!("reading {}", args.classifier.display()))?;
    let role = if args.shadow { PromotionRole::Shadow } else { PromotionRole::Champion };
    let at_epoch = args.at_epoch.or(match config.pipeline.epochs {
        EpochPolicy::Time { millis } => {
            let now = dlpipe_operators::records::now_ms() as u64;
            Some(now / millis + (args.in_secs * 1000).div_ceil(millis))
        }
        EpochPolicy::Offsets { .. } => None,
    });

    let (kafka, p) = (&config.kafka, &config.pipeline);
    wait_for_cluster(kafka)?;
    let properties = p.topic_properties();
    let shared = properties.iter().map(|(k, v)| (*k, v.as_str()));
    let configs: Vec<(&str, &str)> = model_topic::topic_configs().into_iter().chain(shared).collect();
    let spec = TopicSpec { partitions: 1, replication_factor: p.topic_replication_factor, configs: &configs };
    ensure_topic(kafka, &p.model_topic, spec).with_context(|| format!("creating model topic {}", p.model_topic))?;
    let producer: BaseProducer<Delivered> = client_config(kafka)
        .set("message.max.bytes", (model_topic::MAX_CHECKPOINT_BYTES + (1 << 20)).to_string())
        .set("enable.idempotence", "true")
        .create_with_context(Delivered::default())?;
    let key = promotions::message_key(role, &p.group_id);
    let epoch = at_epoch.map(|e| e.to_string());
    let mut record = BaseRecord::to(&p.model_topic).key(&key).payload(&bytes);
    if let Some(e) = epoch.as_deref() {
        record =
            record.headers(OwnedHeaders::new().insert(Header { key: promotions::HEADER_AT_EPOCH, value: Some(e) }));
    }
    let announcing = || format!("announcing the classifier on model topic {}", p.model_topic);
    producer.send(record).map_err(|(error, _)| error).with_context(announcing)?;
    producer.flush(Duration::from_secs(kafka.retry_timeout_secs)).with_context(announcing)?;
    let delivered = producer.context().0.lock().expect("not poisoned").take();
    let offset = delivered.context("the broker did not acknowledge it in time").with_context(announcing)??;
    let when = match at_epoch {
        Some(e) => format!("at epoch {e}"),
        None => "as soon as the pipeline reads it (offset epochs: --at-epoch E switches at a chosen epoch)".into(),
    };
    println!(
        "{} {} ({} classes, {} updates) {} of group {:?} {when} (model topic {}, offset {})",
        if args.shadow { "shadowing with" } else { "promoted" },
        classifier_id(&bytes),
        classifier.model.num_classes(),
        classifier.model.updates(),
        if args.shadow { "beside the champion" } else { "as the champion" },
        p.group_id,
        p.model_topic,
        offset,
    );
    Ok(())
}

/// The offset the broker gave the announcement, or why it refused it.
#[derive(Default)]
struct Delivered(Mutex<Option<Result<i64, KafkaError>>>);

impl ClientContext for Delivered {}

impl ProducerContext for Delivered {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let offset = result.as_ref().map(|m| m.offset()).map_err(|(e, _)| e.clone());
        *self.0.lock().expect("not poisoned") = Some(offset);
    }
}
