//! `dlpipe tail`: print predictions (or dead letters) from a topic, for people.

use dlpipe::config::Config;
use dlpipe::kafka::client_config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::Message;
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
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(config: &Config, args: TailArgs) -> anyhow::Result<()> {
    let topic = args.topic.unwrap_or_else(|| config.pipeline.predictions_topic.clone());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let consumer: BaseConsumer = client_config(&config.kafka)
        .set("group.id", format!("dlpipe-tail-{}-{nanos}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", if args.from_beginning { "earliest" } else { "latest" })
        .create()?;
    consumer.subscribe(&[&topic])?;
    let mut seen = 0usize;
    let mut last = Instant::now();
    loop {
        if args.max.is_some_and(|m| seen >= m) || args.idle_timeout.is_some_and(|t| last.elapsed().as_secs_f64() > t) {
            return Ok(());
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else { continue };
        let message = message?;
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
}
