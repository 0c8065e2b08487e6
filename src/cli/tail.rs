//! `dlpipe tail`: print predictions (or dead letters) from a topic, for people.

use dlpipe::config::Config;
use dlpipe::kafka::{client_config, is_retriable, topic_partitions, wait_for_cluster};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct TailArgs {
    /// Topic to read [default: pipeline.predictions_topic].
    #[arg(long)]
    topic: Option<String>,
    /// Start at the beginning of the topic instead of its end.
    #[arg(long)]
    from_beginning: bool,
    /// Stop after this many messages.
    #[arg(long)]
    max: Option<usize>,
    /// Stop after this many seconds without a message.
    #[arg(long)]
    idle_timeout: Option<f64>,
    /// Fail (exit 1) unless this many messages arrive before the idle timeout; stop once they have.
    #[arg(long, value_name = "N", conflicts_with = "max")]
    expect: Option<usize>,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(config: &Config, args: TailArgs) -> anyhow::Result<()> {
    let topic = args.topic.unwrap_or_else(|| config.pipeline.predictions_topic.clone());
    wait_for_cluster(&config.kafka)?;
    // Every partition, assigned directly: a reader needs no consumer group (and so no group
    // coordinator, which a broker that just started may still be loading).
    let consumer: BaseConsumer =
        client_config(&config.kafka).set("group.id", "dlpipe-tail").set("enable.auto.commit", "false").create()?;
    let partitions = topic_partitions(&consumer, &config.kafka, &topic, true)?;
    let start = if args.from_beginning { Offset::Beginning } else { Offset::End };
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        assignment.add_partition_offset(&topic, partition, start)?;
    }
    consumer.assign(&assignment)?;
    let max = args.max.or(args.expect);
    let mut seen = 0usize;
    let mut last = Instant::now();
    loop {
        if max.is_some_and(|m| seen >= m) || args.idle_timeout.is_some_and(|t| last.elapsed().as_secs_f64() > t) {
            break;
        }
        let message = match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Ok(message)) => message,
            Some(Err(error)) if is_retriable(&error) => {
                tracing::warn!(topic, %error, "waiting for Kafka (a retriable error; the client retries)");
                continue;
            }
            Some(Err(error)) => return Err(error.into()),
        };
        last = Instant::now();
        seen += 1;
        let text = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        if args.json {
            println!("{text}");
            continue;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            println!("{text}");
            continue;
        };
        let id = v["id"].as_str().unwrap_or("?");
        if let Some(kind) = v["error_kind"].as_str() {
            println!("{id}  DEAD LETTER {kind}: {}", v["error"].as_str().unwrap_or(""));
            continue;
        }
        let classes: Vec<String> = v["top_k"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        format!(
                            "{} {:.1}%",
                            c["class"].as_str().unwrap_or("?"),
                            c["probability"].as_f64().unwrap_or(0.0) * 100.0
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let label = v["label"].as_str().map(|l| format!("  (label {l})")).unwrap_or_default();
        let latency = v["latency_ms"].as_i64().map(|l| format!("  {l} ms")).unwrap_or_default();
        println!(
            "{id}  {}{label}  v{}{latency}",
            if classes.is_empty() { "(no classes yet)".into() } else { classes.join(", ") },
            v["model_version"]
        );
    }
    if let Some(expected) = args.expect {
        if seen < expected {
            anyhow::bail!(
                "expected {expected} messages on topic {topic}, got {seen} before {:.0} s without a new one",
                args.idle_timeout.unwrap_or(f64::INFINITY)
            );
        }
        eprintln!("tail: {seen} of {expected} expected messages on {topic}");
    }
    Ok(())
}
