//! Promotions: classifiers that `dlpipe promote` announces on the model topic, read by worker 0
//! and broadcast into `learn_predict`, which applies each at its epoch.
//!
//! A promotion is a message of the model topic keyed `promote/<group id>` (the champion) or
//! `shadow/<group id>` (a challenger), whose payload is the classifier file and whose header
//! `dlpipe-at-epoch` names the epoch it is announced for (none: as soon as it is read).
//!
//! **Progress:** worker 0's [`promotions`] operator holds a capability at the epoch its next
//! promotion will be stamped with. Each time it has read to the topic's end, it moves it up to
//! the frontier of the labelled examples: the learner cannot pass that frontier anyway, so
//! promotions hold nothing back, and a promotion announced for an epoch the stream has not
//! reached takes effect exactly there. The other workers hold no capability. Once the
//! labelled examples are done, so are promotions.
//!
//! **Failure:** a message that is not a promotion of this group (another key, a tombstone, a
//! bad header) is skipped with a warning; an error reading the topic is retried at the next
//! poll. Promotions are taken or refused by the head at every worker alike.

use super::PipelineError;
use crate::config::KafkaConfig;
use crate::kafka::{client_config, ReadsToEnd};
use crate::transfer::classifier::classifier_id;
use dlpipe_operators::{Epoch, LabelledExample, Promotion, PromotionRole};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::time::Duration;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::StreamVec;

/// The header naming the epoch a promotion is announced for (decimal).
pub const HEADER_AT_EPOCH: &str = "dlpipe-at-epoch";

/// The key of a group's promotions of `role` in the model topic.
pub fn message_key(role: PromotionRole, group_id: &str) -> String {
    match role {
        PromotionRole::Champion => format!("promote/{group_id}"),
        PromotionRole::Shadow => format!("shadow/{group_id}"),
    }
}

/// How often worker 0 looks for new promotions while nothing else wakes its operator.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// Worker 0's reader of its group's promotions.
pub struct PromotionReader {
    consumer: BaseConsumer<ReadsToEnd>,
    group_id: String,
    /// Whether everything in the topic has been read (until a message comes).
    at_end: bool,
}

impl PromotionReader {
    /// A reader of `group_id`'s promotions in the model `topic`, from `from`.
    pub fn new(kafka: &KafkaConfig, topic: &str, group_id: &str, from: Offset) -> Result<Self, PipelineError> {
        let max = (super::model_topic::MAX_CHECKPOINT_BYTES * 2).to_string();
        let consumer: BaseConsumer<ReadsToEnd> = client_config(kafka)
            .set("group.id", "dlpipe-promotion-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("receive.message.max.bytes", &max)
            .create_with_context(ReadsToEnd)?;
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, 0, from)?;
        consumer.assign(&assignment)?;
        tracing::info!(topic, group = group_id, ?from, "reading promotions");
        Ok(PromotionReader { consumer, group_id: group_id.to_owned(), at_end: false })
    }

    /// The promotions that have arrived; then whether the topic has been read to its end.
    fn poll(&mut self) -> (Vec<Promotion>, bool) {
        let mut read = Vec::new();
        while let Some(result) = self.consumer.poll(Duration::ZERO) {
            match result {
                Ok(message) => {
                    self.at_end = false;
                    read.extend(self.promotion(&message));
                }
                Err(KafkaError::PartitionEOF(_)) => self.at_end = true,
                Err(error) => {
                    tracing::warn!(%error, "reading promotions; trying again");
                    break;
                }
            }
        }
        (read, self.at_end)
    }

    /// The promotion a message of the model topic is, if it is one of this group.
    fn promotion(&self, message: &rdkafka::message::BorrowedMessage) -> Option<Promotion> {
        let key = message.key()?;
        let role = [PromotionRole::Champion, PromotionRole::Shadow]
            .into_iter()
            .find(|role| key == message_key(*role, &self.group_id).as_bytes())?;
        let offset = message.offset();
        let Some(classifier) = message.payload().filter(|p| !p.is_empty()) else {
            tracing::warn!(offset, ?role, "an empty promotion message is skipped");
            return None;
        };
        let header = message.headers().and_then(|h| h.iter().find(|h| h.key == HEADER_AT_EPOCH));
        let at_epoch = match header.and_then(|h| h.value) {
            None => None,
            Some(value) => match std::str::from_utf8(value).ok().and_then(|v| v.trim().parse::<Epoch>().ok()) {
                Some(epoch) => Some(epoch),
                None => {
                    let value = String::from_utf8_lossy(value);
                    tracing::warn!(offset, %value, "a promotion whose {HEADER_AT_EPOCH} is not an epoch is skipped");
                    return None;
                }
            },
        };
        let id = classifier_id(classifier);
        tracing::info!(offset, %id, ?role, ?at_epoch, "promotion read");
        Some(Promotion { role, id, at_epoch, offset, classifier: classifier.to_vec() })
    }
}

/// The promotions `reader` reads (worker 0; `None` on the others), stamped so that their
/// frontier follows that of `labelled` (see the module's doc). Not yet broadcast.
pub(super) fn promotions<'scope>(
    labelled: &StreamVec<'scope, Epoch, LabelledExample>,
    reader: Option<PromotionReader>,
) -> StreamVec<'scope, Epoch, Promotion> {
    let scope = labelled.scope();
    let mut builder = OperatorBuilder::new("Promotions".to_owned(), scope);
    let mut input = builder.new_input(labelled.clone(), Pipeline);
    let (output, promotions) = builder.new_output();
    let mut output = OutputBuilder::<_, CapacityContainerBuilder<Vec<Promotion>>>::from(output);
    let activator = scope.activator_for(builder.operator_info().address);
    builder.build(move |mut capabilities| {
        let mut reading = reader.and_then(|reader| Some((reader, capabilities.pop()?)));
        move |frontiers| {
            input.for_each(|_, _| {});
            let Some((reader, capability)) = &mut reading else { return };
            let (read, at_end) = reader.poll();
            if !read.is_empty() {
                output.activate().session(&*capability).give_iterator(read.into_iter());
            }
            let labelled = frontiers[0].frontier().first().copied();
            match labelled {
                // Past the labelled examples' end no promotion can matter.
                None => reading = None,
                Some(epoch) if at_end && epoch > *capability.time() => capability.downgrade(&epoch),
                Some(_) => {}
            }
            if reading.is_some() {
                activator.activate_after(POLL_EVERY);
            }
        }
    });
    promotions
}
