//! The delivery step: a batch's outputs and dead letters go to the sinks, and every output a
//! sink refuses — too large for the brokers, a topic the job may not write, a row the database
//! rejects — goes through the job's failure policy on its own: dead-lettered with where it
//! came from, skipped and counted, or the reason the job halts. The rest of the batch is
//! delivered once either way.

use anyhow::{Context as _, Result, bail};

use super::failure::{OnFailure, Provenance, by_policy, output_dead_letter, without_value};
use crate::config::JobConfig;
use crate::runtime::{OutputRecord, PluginIdentity};
use crate::sinks::{DeadLetter, KafkaSink, PrintSink, RejectedRow, Undelivered};

/// Which outputs came from where: `(end index, provenance)` runs over the batch's outputs.
#[derive(Debug, Default)]
pub struct Provenances {
    runs: Vec<(usize, Provenance)>,
}

impl Provenances {
    /// The outputs up to `end` (exclusive) not yet covered came from `provenance`.
    pub fn push(&mut self, end: usize, provenance: Provenance) {
        if self.runs.last().is_none_or(|(last, _)| *last < end) {
            self.runs.push((end, provenance));
        }
    }

    /// Where output `index` came from.
    pub fn of(&self, index: usize) -> Option<&Provenance> {
        let run = self.runs.partition_point(|(end, _)| *end <= index);
        self.runs.get(run).map(|(_, provenance)| provenance)
    }
}

/// What delivery did besides delivering.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Dead letters sent (those of failed tasks and undeliverable outputs).
    pub dead_letters: usize,
    /// Undeliverable outputs skipped under `--on-failure skip`.
    pub skipped: usize,
}

/// The delivery step of one batch.
pub struct Delivery<'a> {
    pub kafka: &'a mut KafkaSink,
    pub print: Option<&'a mut PrintSink>,
    pub job: &'a JobConfig,
    pub plugin: &'a PluginIdentity,
    pub batch_time: i64,
    /// The policy for undeliverable outputs (a new version on probation halts, to roll back).
    pub policy: OnFailure,
}

impl Delivery<'_> {
    /// Prints and sends `outputs` and `dead_letters` and waits for every acknowledgement.
    pub fn deliver(
        &mut self,
        outputs: &[OutputRecord],
        provenance: &Provenances,
        dead_letters: Vec<DeadLetter>,
    ) -> Result<Delivered> {
        if let Some(print) = &mut self.print {
            print.print(self.batch_time, outputs)?;
        }
        // Outputs for topics the job may not write never reach the producer.
        let mut undelivered: Vec<Undelivered> = Vec::new();
        let mut allowed = vec![true; outputs.len()];
        for (index, output) in outputs.iter().enumerate() {
            if let Some(topic) = output.topic.as_deref()
                && !self.job.output_topics.allows(topic)
            {
                allowed[index] = false;
                undelivered.push(Undelivered {
                    index,
                    topic: topic.to_string(),
                    reason: format!(
                        "topic `{topic}` is not one the job may write (--allow-output-topic: {})",
                        self.job.output_topics.describe()
                    ),
                });
            }
        }
        undelivered.extend(self.send_outputs(outputs, &allowed)?);
        let mut delivered = Delivered::default();
        let mut letters = dead_letters;
        for failed in undelivered {
            let output = &outputs[failed.index];
            let from = provenance.of(failed.index).cloned().unwrap_or(Provenance::State { partition: -1 });
            let letter = by_policy(
                self.policy,
                || {
                    format!(
                        "batch {} ms: an output of {from} for topic `{}` cannot be delivered: {}",
                        self.batch_time, failed.topic, failed.reason
                    )
                },
                || self.dead_letter(output, &from, &failed.topic, &failed.reason),
            )?;
            match letter {
                Some(letter) => letters.push(letter),
                None => delivered.skipped += 1,
            }
            allowed[failed.index] = false;
        }
        delivered.dead_letters = self.send_dead_letters(letters, Some((outputs, &allowed)))?;
        Ok(delivered)
    }

    /// Sends the `allowed` outputs and returns those the brokers refused. In a transaction a
    /// refused record makes the whole transaction abortable, so it is aborted and the rest sent
    /// again in a fresh one, until a round has no new refusal.
    fn send_outputs(&mut self, outputs: &[OutputRecord], allowed: &[bool]) -> Result<Vec<Undelivered>> {
        let mut refused: Vec<Undelivered> = Vec::new();
        let mut sending = allowed.to_vec();
        for round in 1.. {
            let fresh = self.kafka.send_all(outputs, |index| sending[index])?;
            for failed in &fresh {
                sending[failed.index] = false;
            }
            let again = self.kafka.transactional() && !fresh.is_empty();
            refused.extend(fresh);
            if !again {
                break;
            }
            if round == MAX_TRANSACTION_ROUNDS {
                bail!("outputs are still refused after {round} transactions; the batch is not committed");
            }
            tracing::warn!(
                "batch {} ms: {} output(s) refused; aborting the transaction and sending the others again",
                self.batch_time,
                refused.len()
            );
            self.kafka.abort()?;
            self.kafka.begin()?;
        }
        refused.sort_by_key(|u| u.index);
        Ok(refused)
    }

    /// Handles rows the database refused (by index among `rows`): dead-lettered, skipped or
    /// halting, as for outputs. Runs before the database transaction commits.
    pub fn refused_rows(
        &mut self,
        rows: &[&OutputRecord],
        refused: &[RejectedRow],
        provenance: &dyn Fn(usize) -> Provenance,
    ) -> Result<Delivered> {
        let table = self.job.postgres.as_ref().map_or("", |settings| settings.table.as_str()).to_string();
        let mut delivered = Delivered::default();
        let mut letters = Vec::new();
        for row in refused {
            let output = rows[row.index];
            let from = provenance(row.index);
            let target = format!("table {table}");
            let letter = by_policy(
                self.policy,
                || format!("batch {} ms: a row of {from} for {target} was refused: {}", self.batch_time, row.reason),
                || self.dead_letter(output, &from, &target, &row.reason),
            )?;
            match letter {
                Some(letter) => letters.push(letter),
                None => delivered.skipped += 1,
            }
        }
        delivered.dead_letters = self.send_dead_letters(letters, None)?;
        Ok(delivered)
    }

    fn dead_letter(&self, output: &OutputRecord, from: &Provenance, target: &str, reason: &str) -> Option<DeadLetter> {
        let topic = self.job.failure.dead_letter_topic.as_deref()?;
        Some(output_dead_letter(topic, self.plugin, output, from, target, reason))
    }

    /// Sends dead letters; one the brokers refuse is sent again without its value (which is
    /// what they refused, normally), and one refused even so stops the job. In a transaction
    /// the refusal aborts it: the batch's outputs (`resend`: the `allowed` of the outputs) and
    /// letters go again in a fresh one.
    fn send_dead_letters(
        &mut self,
        letters: Vec<DeadLetter>,
        resend: Option<(&[OutputRecord], &[bool])>,
    ) -> Result<usize> {
        if letters.is_empty() {
            return Ok(0);
        }
        let count = letters.len();
        let mut letters = letters;
        let mut stripped = vec![false; count];
        // The letters this round sends: all at first. Without a transaction what was delivered
        // stays delivered, so a later round sends only the letters just stripped.
        let mut sending = vec![true; count];
        loop {
            let refused = self.kafka.send_all(&letters, |index| sending[index]).context("cannot send dead letters")?;
            if refused.is_empty() {
                return Ok(count);
            }
            for failed in &refused {
                if stripped[failed.index] {
                    bail!(
                        "batch {} ms: cannot deliver a dead letter to `{}` even without its value: {}",
                        self.batch_time,
                        failed.topic,
                        failed.reason
                    );
                }
                tracing::warn!(
                    "a dead letter for `{}` was refused ({}); sending it without its value",
                    failed.topic,
                    failed.reason
                );
                letters[failed.index] = without_value(letters[failed.index].clone(), &failed.reason);
                stripped[failed.index] = true;
            }
            if !self.kafka.transactional() {
                sending = vec![false; count];
                for failed in &refused {
                    sending[failed.index] = true;
                }
                continue;
            }
            // The refusal made the transaction abortable: everything goes again in a new one.
            let Some((outputs, allowed)) = resend else {
                bail!(
                    "batch {} ms: a dead letter was refused inside the batch's Kafka transaction, after its outputs \
                     went out; the batch is not committed",
                    self.batch_time
                );
            };
            self.kafka.abort()?;
            self.kafka.begin()?;
            if let Some(failed) = self.kafka.send_all(outputs, |index| allowed[index])?.first() {
                bail!(
                    "batch {} ms: an output for `{}` was refused when sent again: {}",
                    self.batch_time,
                    failed.topic,
                    failed.reason
                );
            }
        }
    }
}

/// Transactions a batch's delivery may abort and start again because brokers refused records.
const MAX_TRANSACTION_ROUNDS: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provenance_is_found_by_output_index() {
        let mut provenances = Provenances::default();
        let task = |partition| Provenance::Task { topic: "in".into(), partition, from: 0, until: 5 };
        provenances.push(3, task(0));
        provenances.push(3, task(1)); // a task without outputs
        provenances.push(7, task(2));
        assert_eq!(provenances.of(0), Some(&task(0)));
        assert_eq!(provenances.of(2), Some(&task(0)));
        assert_eq!(provenances.of(3), Some(&task(2)));
        assert_eq!(provenances.of(6), Some(&task(2)));
        assert_eq!(provenances.of(7), None);
    }
}
