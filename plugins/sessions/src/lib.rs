//! User sessions with an idle timeout: the seeds' `mapWithState` with `StateSpec.timeout`
//! (seed 003, 5.4) as a stateful plugin, run with `--state-timeout`.
//!
//! Input lines are `user action`. Each user's state counts the events of the open session;
//! nothing is emitted while it is open. When the user has been idle for the job's timeout the
//! session closes with one summary, keyed by the user:
//! `user=<user> events=<n> first=<batch ms> last=<batch ms>`.

use serde::{Deserialize, Serialize};
use sluice_sdk::{BatchContext, Emit, Json, Output, Outputs, PluginError, Record, Reject, Stateful};

/// The sessions plugin. No configuration.
pub struct Sessions;

/// An open session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub events: u64,
    /// Batch time of the session's first and latest events, in ms.
    pub first_seen: i64,
    pub last_seen: i64,
}

impl Stateful for Sessions {
    type Config = ();
    type Key = String;
    /// The batch time of one event (`update` sees values, not the batch context).
    type Value = i64;
    type State = Json<Session>;

    fn init((): ()) -> Result<Self, PluginError> {
        Ok(Sessions)
    }

    fn process(&mut self, ctx: &BatchContext, record: Record, out: &mut Emit<String, i64>) -> Result<(), Reject> {
        let fields: Vec<&str> = record.value_str()?.split_whitespace().collect();
        let [user, _action] = fields[..] else {
            return Err(Reject::new(format!("expected 2 fields `user action`, found {}", fields.len())));
        };
        out.emit(user.to_string(), ctx.batch_time);
        Ok(())
    }

    fn update(
        &mut self,
        _user: &String,
        events: Vec<i64>,
        session: Option<Self::State>,
        _out: &mut Outputs,
    ) -> Option<Self::State> {
        let first = events.iter().copied().min()?;
        let last = events.iter().copied().max()?;
        let Json(mut session) = session.unwrap_or(Json(Session { events: 0, first_seen: first, last_seen: last }));
        session.events += events.len() as u64;
        session.last_seen = session.last_seen.max(last);
        Some(Json(session))
    }

    fn timeout(&mut self, user: &String, Json(session): Self::State, out: &mut Outputs) {
        let summary =
            format!("user={user} events={} first={} last={}", session.events, session.first_seen, session.last_seen);
        out.push(Output::new(summary).with_key(user.as_str()));
    }
}

sluice_sdk::export_stateful!(Sessions);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sluice_sdk::testing::{record, run_stateful};

    use super::*;

    #[test]
    fn sessions_accumulate_silently_and_summarise_on_timeout() {
        let mut state = BTreeMap::new();
        let outputs =
            run_stateful(&mut Sessions, &mut state, vec![record(0, "ann view"), record(1, "ann buy")]).unwrap();
        assert!(outputs.is_empty(), "an open session emits nothing");
        let Json(session) = state.remove("ann").unwrap();
        assert_eq!(session.events, 2);
        let mut out = Outputs::default();
        Sessions.timeout(&"ann".to_string(), Json(session), &mut out);
        let summary = out.as_slice()[0].value.clone().unwrap();
        assert!(String::from_utf8(summary).unwrap().starts_with("user=ann events=2 first="));
    }
}
