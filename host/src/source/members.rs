//! The group as its committed offsets describe it: which member committed which partition last,
//! with which plugin build and batch, and how far behind the log end each partition is — what
//! `host status --group` prints. Two sources, because brokers differ: the group's live
//! membership (DescribeGroups: each member's client, host and assigned partitions; librdkafka's
//! mock cluster does not answer it), and every Sluice commit's metadata (`sluice:{...}`, see
//! [`super::CommitMetadata`]: member, plugin build, batch; Tansu drops it).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, Result};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

use super::CommitMetadata;
use crate::offsets::TopicPartition;

const TIMEOUT: Duration = Duration::from_secs(10);

/// One partition of the job's topics.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionView {
    pub partition: String,
    /// The group's committed offset, if any.
    pub committed: Option<i64>,
    /// The log end (high watermark).
    pub end: i64,
    pub lag: Option<i64>,
    /// Who committed it last, with what, from the commit's metadata.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_commit: Option<CommitMetadata>,
}

/// One member, as its commits show it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    pub member: String,
    /// The plugin builds (SHA-256 prefixes) of its latest commits.
    pub builds: Vec<String>,
    pub partitions: Vec<String>,
    /// The batch time of its latest commit.
    pub last_batch: i64,
    pub lag: i64,
}

/// One member of the group as the coordinator knows it now.
#[derive(Debug, Clone, Serialize)]
pub struct LiveMember {
    /// The host's `--instance-id` (its client id is `sluice-<instance>`), when the broker
    /// reports client ids (Tansu does not).
    pub member: String,
    /// The coordinator's id of the member.
    pub member_id: String,
    pub client_host: String,
    /// The partitions the coordinator assigned to it.
    pub partitions: Vec<String>,
}

/// The group of a job over `topics`.
#[derive(Debug, Clone, Serialize)]
pub struct GroupView {
    pub group: String,
    /// The coordinator's group state (`Stable`, `PreparingRebalance`, ...), when it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// The live membership, when the coordinator answers DescribeGroups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live: Option<Vec<LiveMember>>,
    /// The members as their latest commits show them (with their plugin builds).
    pub members: Vec<MemberView>,
    pub partitions: Vec<PartitionView>,
}

/// Reads the committed offsets of `group` for every partition of `topics`, and their log
/// ends, without joining the group.
pub fn group_view(config: &ClientConfig, group: &str, topics: &[String]) -> Result<GroupView> {
    let consumer: BaseConsumer =
        config.clone().set("group.id", group).create().context("cannot create a Kafka client")?;
    let mut partitions = Vec::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), TIMEOUT)
            .with_context(|| format!("cannot read the metadata of topic {topic}"))?;
        for found in metadata.topics() {
            if let Some(error) = found.error() {
                anyhow::bail!("topic {topic}: {error:?}");
            }
            partitions.extend(found.partitions().iter().map(|p| TopicPartition::new(found.name(), p.id())));
        }
    }
    let mut query = TopicPartitionList::new();
    for partition in &partitions {
        query.add_partition(&partition.topic, partition.partition);
    }
    let committed = consumer.committed_offsets(query, TIMEOUT).context("cannot read the group's committed offsets")?;
    let mut views = Vec::new();
    for element in committed.elements() {
        let (_, end) = consumer
            .fetch_watermarks(element.topic(), element.partition(), TIMEOUT)
            .with_context(|| format!("cannot read the log end of {}:{}", element.topic(), element.partition()))?;
        let committed = match element.offset() {
            Offset::Offset(offset) => Some(offset),
            _ => None,
        };
        views.push(PartitionView {
            partition: TopicPartition::new(element.topic(), element.partition()).to_string(),
            committed,
            end,
            lag: committed.map(|offset| (end - offset).max(0)),
            last_commit: CommitMetadata::decode(element.metadata()),
        });
    }
    let (state, live) = match consumer.fetch_group_list(Some(group), TIMEOUT) {
        Ok(list) => match list.groups().first() {
            Some(info) => (Some(info.state().to_string()), Some(info.members().iter().map(live_member).collect())),
            None => (None, None),
        },
        Err(error) => {
            tracing::debug!("the coordinator does not describe group {group}: {error}");
            (None, None)
        }
    };
    Ok(GroupView { group: group.to_string(), state, live, members: members(&views), partitions: views })
}

fn live_member(info: &rdkafka::groups::GroupMemberInfo) -> LiveMember {
    let client = info.client_id();
    LiveMember {
        member: client.strip_prefix("sluice-").unwrap_or(client).to_string(),
        member_id: info.id().to_string(),
        client_host: info.client_host().trim_start_matches('/').to_string(),
        partitions: info.assignment().map(assigned_partitions).unwrap_or_default(),
    }
}

/// The partitions of a consumer protocol assignment (Kafka's `ConsumerProtocolAssignment`:
/// version, then `[topic, [partition]]`, big-endian, strings with an i16 length); what does
/// not parse yields what was read up to there.
fn assigned_partitions(bytes: &[u8]) -> Vec<String> {
    let mut reader = Reader(bytes);
    let mut partitions = Vec::new();
    let Some(_version) = reader.int(2) else { return partitions };
    let Some(topics) = reader.int(4) else { return partitions };
    for _ in 0..topics {
        let Some(topic) = reader.string() else { break };
        let Some(count) = reader.int(4) else { break };
        for _ in 0..count {
            let Some(partition) = reader.int(4) else { break };
            partitions.push(format!("{topic}:{partition}"));
        }
    }
    partitions.sort();
    partitions
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    /// A big-endian signed integer of `width` bytes.
    fn int(&mut self, width: usize) -> Option<i64> {
        let (head, rest) = self.0.split_at_checked(width)?;
        self.0 = rest;
        let value = head.iter().fold(0i64, |value, byte| (value << 8) | i64::from(*byte));
        let shift = 64 - 8 * width as u32;
        Some((value << shift) >> shift)
    }

    fn string(&mut self) -> Option<String> {
        let length = usize::try_from(self.int(2)?).ok()?;
        let (head, rest) = self.0.split_at_checked(length)?;
        self.0 = rest;
        Some(String::from_utf8_lossy(head).into_owned())
    }
}

/// The members that committed `partitions` last.
fn members(partitions: &[PartitionView]) -> Vec<MemberView> {
    let mut members: BTreeMap<&str, MemberView> = BTreeMap::new();
    for view in partitions {
        let Some(commit) = view.last_commit.as_ref().filter(|commit| !commit.member.is_empty()) else { continue };
        let member = members.entry(&commit.member).or_insert_with(|| MemberView {
            member: commit.member.clone(),
            builds: Vec::new(),
            partitions: Vec::new(),
            last_batch: commit.batch,
            lag: 0,
        });
        if !member.builds.contains(&commit.build) {
            member.builds.push(commit.build.clone());
        }
        member.partitions.push(view.partition.clone());
        member.last_batch = member.last_batch.max(commit.batch);
        member.lag += view.lag.unwrap_or(0);
    }
    members.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_assignment_reads_as_its_partitions() {
        let mut bytes = vec![0, 1, 0, 0, 0, 2];
        for (topic, partitions) in [("lines", &[3i32, 1][..]), ("b", &[0][..])] {
            bytes.extend((topic.len() as i16).to_be_bytes());
            bytes.extend(topic.as_bytes());
            bytes.extend((partitions.len() as i32).to_be_bytes());
            for p in partitions {
                bytes.extend(p.to_be_bytes());
            }
        }
        bytes.extend((-1i32).to_be_bytes()); // user data: none
        assert_eq!(assigned_partitions(&bytes), ["b:0", "lines:1", "lines:3"]);
        assert_eq!(assigned_partitions(&bytes[..21]), ["lines:3"], "a cut assignment yields what it holds");
    }
}
