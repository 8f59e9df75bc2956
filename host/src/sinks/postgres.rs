//! The PostgreSQL sink: outputs become rows of one table, the seeds' "results and offsets in
//! one transaction" (or idempotent upserts) as configuration instead of user code.
//!
//! Each output's value is a JSON object whose keys are column names. A batch's rows go in with
//! one statement (`jsonb_populate_recordset`, so PostgreSQL converts each value to its column's
//! type and no SQL is built from values). In `transactional` mode the same database transaction
//! also records the batch's until-offsets in `sluice_offsets`, and a restarted job starts from
//! there; in `upsert` mode rows are `INSERT ... ON CONFLICT (key) DO UPDATE`, so a replayed
//! batch leaves the table as it was.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::runtime::Handle;
use tokio_postgres::{Client, NoTls};

use crate::config::{PostgresMode, PostgresSettings};
use crate::runtime::OutputRecord;
use crate::source::{OffsetRange, TopicPartition};

/// Pause between two attempts to reach the database.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// Rows waiting for their batch's commit.
///
/// The engine's batch work is blocking code on the job's runtime (under `block_in_place`), so
/// the async client is driven with that runtime's handle rather than a runtime of its own.
pub struct PostgresSink {
    runtime: Handle,
    client: Client,
    settings: PostgresSettings,
    /// The job's consumer group: the key of its rows in `sluice_offsets`.
    group: String,
    /// `"table"`, quoted.
    table: String,
}

impl PostgresSink {
    /// Connects (retrying until `timeout`, each failure logged) and prepares the offsets table.
    pub fn connect(settings: PostgresSettings, group: &str, timeout: Duration) -> Result<PostgresSink> {
        let runtime = Handle::current();
        let deadline = Instant::now() + timeout;
        let mut attempt = 1;
        let client = loop {
            match runtime.block_on(tokio_postgres::connect(&settings.url, NoTls)) {
                Ok((client, connection)) => {
                    runtime.spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::error!("PostgreSQL connection lost: {error}");
                        }
                    });
                    break client;
                }
                Err(error) if Instant::now() < deadline => {
                    tracing::warn!("cannot connect to PostgreSQL (attempt {attempt}): {error}; retrying");
                    attempt += 1;
                    std::thread::sleep(RETRY_BACKOFF);
                }
                Err(error) => {
                    return Err(error).with_context(|| {
                        format!(
                            "cannot connect to PostgreSQL: gave up after {} and {attempt} attempts",
                            humantime::format_duration(timeout)
                        )
                    });
                }
            }
        };
        runtime
            .block_on(client.batch_execute(
                "CREATE TABLE IF NOT EXISTS sluice_offsets (
                    job text NOT NULL, topic text NOT NULL, partition integer NOT NULL,
                    until_offset bigint NOT NULL, PRIMARY KEY (job, topic, partition))",
            ))
            .context("cannot create the sluice_offsets table")?;
        let table = quote(&settings.table);
        Ok(PostgresSink { runtime, client, settings, group: group.to_string(), table })
    }

    /// Where each partition continues, as the offsets table has it (transactional mode).
    pub fn offsets(&mut self) -> Result<BTreeMap<TopicPartition, i64>> {
        if self.settings.mode != PostgresMode::Transactional {
            return Ok(BTreeMap::new());
        }
        let sql = "SELECT topic, partition, until_offset FROM sluice_offsets WHERE job = $1";
        let rows =
            self.runtime.block_on(self.client.query(sql, &[&self.group])).context("cannot read sluice_offsets")?;
        Ok(rows.iter().map(|row| (TopicPartition::new(row.get::<_, String>(0), row.get(1)), row.get(2))).collect())
    }

    /// Writes a batch's rows, and in transactional mode its offsets, in one transaction. Only
    /// outputs without a topic of their own are rows; the caller sends the others to Kafka.
    pub fn write_batch(&mut self, outputs: &[&OutputRecord], ranges: &[OffsetRange]) -> Result<()> {
        let mut rows = Vec::with_capacity(outputs.len());
        let mut columns: Vec<String> = Vec::new();
        for output in outputs {
            let value = output.value.as_deref().unwrap_or_default();
            let row: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(value).with_context(|| {
                format!(
                    "an output for table {} is not a JSON object: {}",
                    self.settings.table,
                    String::from_utf8_lossy(value)
                )
            })?;
            for column in row.keys() {
                if !columns.contains(column) {
                    columns.push(column.clone());
                }
            }
            rows.push(row);
        }
        if self.settings.mode == PostgresMode::Upsert {
            rows = last_row_per_key(rows, &self.settings.keys);
        }
        let statement = (!rows.is_empty()).then(|| insert_statement(&self.table, &columns, &self.settings));
        let rows = serde_json::Value::Array(rows.into_iter().map(serde_json::Value::Object).collect());
        let (settings, group, client) = (&self.settings, &self.group, &mut self.client);
        self.runtime.block_on(async move {
            let txn = client.transaction().await.context("cannot begin a PostgreSQL transaction")?;
            if let Some(statement) = &statement {
                txn.execute(statement, &[&rows])
                    .await
                    .map_err(describe_db_error)
                    .with_context(|| format!("cannot write {} rows to table {}", outputs.len(), settings.table))?;
            }
            if settings.mode == PostgresMode::Transactional {
                for range in ranges {
                    txn.execute(
                        "INSERT INTO sluice_offsets (job, topic, partition, until_offset) VALUES ($1, $2, $3, $4)
                         ON CONFLICT (job, topic, partition) DO UPDATE SET until_offset = EXCLUDED.until_offset",
                        &[group, &range.partition.topic, &range.partition.partition, &range.until],
                    )
                    .await
                    .context("cannot record the batch's offsets in sluice_offsets")?;
                }
            }
            txn.commit().await.map_err(describe_db_error).context("cannot commit the batch's PostgreSQL transaction")
        })
    }
}

/// One statement for a whole batch: PostgreSQL turns the JSON array into typed rows.
fn insert_statement(table: &str, columns: &[String], settings: &PostgresSettings) -> String {
    let list = columns.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
    let mut statement =
        format!("INSERT INTO {table} ({list}) SELECT {list} FROM jsonb_populate_recordset(NULL::{table}, $1::jsonb)");
    if settings.mode == PostgresMode::Upsert {
        let keys = settings.keys.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
        let updates: Vec<String> = columns
            .iter()
            .filter(|c| !settings.keys.contains(c))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote(c)))
            .collect();
        if updates.is_empty() {
            statement.push_str(&format!(" ON CONFLICT ({keys}) DO NOTHING"));
        } else {
            statement.push_str(&format!(" ON CONFLICT ({keys}) DO UPDATE SET {}", updates.join(", ")));
        }
    }
    statement
}

/// In one statement a key may be updated once: within a batch the last row per key wins, as
/// it would have one row after the other.
fn last_row_per_key(
    rows: Vec<serde_json::Map<String, serde_json::Value>>,
    keys: &[String],
) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut latest: BTreeMap<String, usize> = BTreeMap::new();
    for (index, row) in rows.iter().enumerate() {
        let key: Vec<String> = keys.iter().map(|k| row.get(k).map(ToString::to_string).unwrap_or_default()).collect();
        latest.insert(key.join("\u{1f}"), index);
    }
    let keep: std::collections::BTreeSet<usize> = latest.into_values().collect();
    rows.into_iter().enumerate().filter(|(index, _)| keep.contains(index)).map(|(_, row)| row).collect()
}

/// An identifier, double-quoted (identifiers cannot be bound as parameters).
fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// PostgreSQL's own message, with the constraint it names, rather than "db error".
fn describe_db_error(error: tokio_postgres::Error) -> anyhow::Error {
    match error.as_db_error() {
        Some(db) => {
            let constraint = db.constraint().map(|c| format!(" (constraint {c})")).unwrap_or_default();
            anyhow::anyhow!("{}{constraint}", db.message())
        }
        None => anyhow::Error::new(error),
    }
}
