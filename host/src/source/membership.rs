//! Group membership: every job is a member of its consumer group, and the group coordinator
//! decides which partitions this host owns (Kafka's own distributed machinery, as Kafka
//! Streams and Quix Streams use it; no coordinator of our own).
//!
//! librdkafka announces assignment changes from inside `poll`. They are only *recorded* here;
//! the source applies them at the next batch boundary. Until then a revoked partition stays
//! assigned (the cooperative protocol waits for us), so the batch in flight finishes and
//! commits with the partitions it started with. A partition the coordinator took away because
//! this member timed out is different: it is *lost*, and the batch in flight must not commit
//! it, because another member may already be processing it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};

use crate::offsets::TopicPartition;

/// One assignment change announced by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// These partitions are this member's from now on (possibly none: the cooperative
    /// protocol announces empty increments too, and each must be acknowledged).
    Assigned(Vec<TopicPartition>),
    /// These partitions go to another member. `lost`: the coordinator already gave them away
    /// (this member's session expired), so nothing of them may be committed any more.
    Revoked { partitions: Vec<TopicPartition>, lost: bool },
}

/// The consumer's context: records assignment changes for the batch loop.
#[derive(Default)]
pub struct Membership {
    changes: Mutex<Vec<Change>>,
    /// Partitions lost since the last boundary: the commit step checks this before
    /// committing, so a fenced member does not even try.
    lost: Mutex<Vec<TopicPartition>>,
    /// Set when the consumer closes: changes are then applied at once, because closing waits
    /// for the final revocation to be acknowledged and no batch boundary will come.
    closing: AtomicBool,
}

impl Membership {
    /// The changes recorded since the last call, oldest first.
    pub fn take_changes(&self) -> Vec<Change> {
        std::mem::take(&mut *self.changes.lock().expect("not poisoned"))
    }

    /// Whether any change is waiting for the next boundary.
    pub fn has_changes(&self) -> bool {
        !self.changes.lock().expect("not poisoned").is_empty()
    }

    /// The partitions among `partitions` that were lost since the last boundary.
    pub fn lost_among<'a>(&self, partitions: impl IntoIterator<Item = &'a TopicPartition>) -> Vec<TopicPartition> {
        let lost = self.lost.lock().expect("not poisoned");
        partitions.into_iter().filter(|p| lost.contains(p)).cloned().collect()
    }

    /// From now on, assignment changes are applied as they come (the consumer is closing).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    /// Forgets lost partitions once the boundary has dealt with them.
    pub fn clear_lost(&self) {
        self.lost.lock().expect("not poisoned").clear();
    }
}

impl ClientContext for Membership {}

impl ConsumerContext for Membership {
    /// Records the change instead of applying it (rdkafka's default assigns at once).
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        if self.closing.load(Ordering::Relaxed) {
            let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
            let applied = match (err, cooperative) {
                (RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, true) => consumer.incremental_assign(tpl),
                (RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, false) => consumer.assign(tpl),
                (_, true) => consumer.incremental_unassign(tpl),
                (_, false) => consumer.unassign(),
            };
            if let Err(error) = applied {
                tracing::debug!("while leaving the group: {error}");
            }
            return;
        }
        let partitions = partitions_of(tpl);
        let change = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => Change::Assigned(partitions),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                if lost {
                    self.lost.lock().expect("not poisoned").extend(partitions.iter().cloned());
                }
                Change::Revoked { partitions, lost }
            }
            other => {
                tracing::warn!("group rebalance error: {}", RDKafkaErrorCode::from(other));
                return;
            }
        };
        self.changes.lock().expect("not poisoned").push(change);
    }
}

/// The partitions of a librdkafka list, in order.
pub fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    let mut partitions: Vec<TopicPartition> =
        tpl.elements().iter().map(|e| TopicPartition::new(e.topic(), e.partition())).collect();
    partitions.sort();
    partitions
}

/// Whether a failed commit was refused because the group's generation moved on: the group
/// rebalanced since this member last joined. That is fencing only if the rebalance took the
/// partitions away (librdkafka then reports them lost); a member that kept them retries once
/// it has rejoined (the cooperative protocol moves nothing before the old owner lets go).
pub fn is_generation_change(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::StaleMemberEpoch
                | RDKafkaErrorCode::FencedMemberEpoch
                | RDKafkaErrorCode::AssignmentLost
        )
    )
}

/// Whether a failed commit means another instance with this member's static identity
/// (`group.instance.id`) replaced it.
pub fn is_replaced(error: &KafkaError) -> bool {
    error.rdkafka_error_code() == Some(RDKafkaErrorCode::FencedInstanceId)
}

/// Whether a broker error is one librdkafka recovers from by itself (reconnecting, finding the
/// new leader, retrying): logged and waited out, never a reason to stop by itself.
pub fn is_transient(error: &KafkaError) -> bool {
    match error {
        KafkaError::MessageConsumptionFatal(_) => false,
        _ => !matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::OffsetOutOfRange
                    | RDKafkaErrorCode::AutoOffsetReset
                    | RDKafkaErrorCode::Fatal
                    | RDKafkaErrorCode::TopicAuthorizationFailed
                    | RDKafkaErrorCode::GroupAuthorizationFailed
                    | RDKafkaErrorCode::ClusterAuthorizationFailed
                    | RDKafkaErrorCode::SaslAuthenticationFailed
                    | RDKafkaErrorCode::Authentication
                    | RDKafkaErrorCode::InvalidConfig
                    | RDKafkaErrorCode::UnsupportedFeature
            )
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_blips_are_transient_and_data_loss_is_not() {
        let consumption = |code| KafkaError::MessageConsumption(code);
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::LeaderNotAvailable,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::NetworkException,
        ] {
            assert!(is_transient(&consumption(code)), "{code:?}");
        }
        assert!(!is_transient(&consumption(RDKafkaErrorCode::OffsetOutOfRange)));
        assert!(!is_transient(&KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::BrokerTransportFailure)));
    }

    #[test]
    fn a_moved_generation_is_told_apart_from_broker_trouble() {
        let commit = KafkaError::ConsumerCommit;
        assert!(is_generation_change(&commit(RDKafkaErrorCode::IllegalGeneration)));
        assert!(is_generation_change(&commit(RDKafkaErrorCode::UnknownMemberId)));
        assert!(is_generation_change(&commit(RDKafkaErrorCode::RebalanceInProgress)));
        assert!(!is_generation_change(&commit(RDKafkaErrorCode::RequestTimedOut)));
        assert!(is_replaced(&commit(RDKafkaErrorCode::FencedInstanceId)));
    }
}
