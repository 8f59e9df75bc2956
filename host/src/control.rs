//! What a running job shares with those who watch or steer it: its status, and the messages of
//! a hot upgrade. Plain types, below both the engine (which fills them) and the admin endpoint
//! (which serves them).

use std::path::PathBuf;

use serde::Serialize;

use crate::runtime::{PluginIdentity, PluginKind};

/// What a running job reports on its admin endpoint.
#[derive(Debug, Clone)]
pub struct Status {
    pub plugin: PluginIdentity,
    pub kind: PluginKind,
    /// This host's name in the consumer group.
    pub member: String,
    /// The partitions the group assigned to this host.
    pub partitions: Vec<String>,
    pub last_batch: Option<i64>,
    /// Records between the last batch's ends and the high watermarks it saw.
    pub lag: Option<i64>,
    /// A new build on probation, if one is.
    pub probation: Option<PluginIdentity>,
    /// Records per second read by the last batches (at most ten).
    pub input_rate: Option<f64>,
}

impl Status {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "plugin": {
                "name": self.plugin.info.name,
                "version": self.plugin.info.version,
                "state_schema_version": self.plugin.info.state_schema_version,
                "digest": self.plugin.digest,
                "kind": self.kind.to_string(),
            },
            "member": self.member,
            "partitions": self.partitions,
            "last_batch": self.last_batch,
            "lag": self.lag,
            "probation": self.probation.as_ref().map(ToString::to_string),
            "input_rate": self.input_rate,
        })
    }
}

/// An upgrade asked for through the admin endpoint.
pub struct UpgradeRequest {
    pub plugin: PathBuf,
    /// Allow a plugin with another name.
    pub force: bool,
    /// Where the outcome goes, once known.
    pub reply: tokio::sync::oneshot::Sender<UpgradeOutcome>,
}

/// How an upgrade ended, as the admin endpoint reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum UpgradeOutcome {
    /// The new version completed its probation batches and they are committed.
    Upgraded { from: String, to: String, first_batch: i64 },
    /// The new version failed one of its probation batches: nothing of it was committed, and
    /// the old version processed those batches again.
    RolledBack { from: String, to: String, batch: i64, reason: String },
    /// The new version was not switched in.
    Refused { reason: String },
    /// The job stopped before the upgrade's outcome was known; the next start runs the build
    /// the checkpoint names as active.
    Stopped { reason: String },
}

impl UpgradeOutcome {
    /// Its name, as the admin endpoint's `outcome` field gives it (metrics and the page too).
    pub fn name(&self) -> &'static str {
        match self {
            UpgradeOutcome::Upgraded { .. } => "upgraded",
            UpgradeOutcome::RolledBack { .. } => "rolled-back",
            UpgradeOutcome::Refused { .. } => "refused",
            UpgradeOutcome::Stopped { .. } => "stopped",
        }
    }

    /// The answer to every upgrade still waiting when the job stops.
    pub fn job_stopping() -> UpgradeOutcome {
        UpgradeOutcome::Stopped {
            reason: "the job is stopping; nothing of the new version was committed (ask again after the restart)"
                .into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_is_named_as_the_admin_endpoint_tags_it() {
        let reason = String::from("r");
        for outcome in [
            UpgradeOutcome::Upgraded { from: "a".into(), to: "b".into(), first_batch: 1 },
            UpgradeOutcome::RolledBack { from: "a".into(), to: "b".into(), batch: 1, reason: reason.clone() },
            UpgradeOutcome::Refused { reason: reason.clone() },
            UpgradeOutcome::Stopped { reason },
        ] {
            assert_eq!(serde_json::to_value(&outcome).unwrap()["outcome"], outcome.name());
        }
    }
}
