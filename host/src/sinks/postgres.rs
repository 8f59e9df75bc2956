//! The PostgreSQL sink: outputs become rows of one table, the seeds' "results and offsets in
//! one transaction" (or idempotent upserts) as configuration instead of user code.
//!
//! Each output's value is a JSON object whose keys are column names. A batch's rows go in with
//! one statement (`jsonb_populate_recordset`, so PostgreSQL converts each value to its column's
//! type and no SQL is built from values). In `transactional` mode the same database transaction
//! also moves the batch's offsets in `sluice_offsets` — from the batch's start offsets to its
//! ends, a compare-and-set, so a concurrent writer or a stale replay aborts instead of writing
//! rows twice — and a restarted job starts from there. In `upsert` mode rows are
//! `INSERT ... ON CONFLICT (key) DO UPDATE`, so a replayed batch leaves the table as it was.
//!
//! The database may come and go: connections have a connect timeout, TCP keepalives and a
//! statement timeout, and a lost connection is re-established (each attempt logged) for
//! `--postgres-timeout` before the job gives up. A row the database refuses (a constraint, a
//! value of the wrong type) is isolated with savepoints and handed to the failure policy; the
//! batch's other rows are written once.

use std::collections::BTreeMap;
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::runtime::Handle;
use tokio_postgres::{Client, NoTls, Transaction};

use crate::config::{PostgresMode, PostgresSettings};
use crate::offsets::{OffsetRange, TopicPartition};
use crate::runtime::OutputRecord;

/// Pause between two attempts to reach the database.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// A row the database refused, by its index in the batch's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRow {
    pub index: usize,
    pub reason: String,
}

/// How a batch's write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Rows (and offsets) committed.
    Committed,
    /// `sluice_offsets` already held the batch's ends: an earlier attempt committed and its
    /// acknowledgement was lost with the connection. Nothing was written again.
    AlreadyCommitted,
}

/// Why a batch was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// `sluice_offsets` is elsewhere than the batch's start: another writer moved it.
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// The table sink.
///
/// The engine's batch work is blocking code on the job's runtime (under `block_in_place`), so
/// the async client is driven with that runtime's handle rather than a runtime of its own.
pub struct PostgresSink {
    runtime: Handle,
    /// `None` after the connection was lost, until the next attempt succeeds.
    client: Option<Client>,
    settings: PostgresSettings,
    /// The job's consumer group: the key of its rows in `sluice_offsets`.
    group: String,
    /// `"table"`, quoted.
    table: String,
}

impl PostgresSink {
    /// Connects (retrying until `--postgres-timeout`, each failure logged) and prepares the
    /// offsets table.
    pub fn connect(settings: PostgresSettings, group: &str) -> Result<PostgresSink> {
        let table = quote(&settings.table);
        let mut sink =
            PostgresSink { runtime: Handle::current(), client: None, settings, group: group.to_string(), table };
        sink.with_connection("prepare the sluice_offsets table", |client| {
            Box::pin(async move {
                client
                    .batch_execute(
                        "CREATE TABLE IF NOT EXISTS sluice_offsets (
                            job text NOT NULL, topic text NOT NULL, partition integer NOT NULL,
                            until_offset bigint NOT NULL, PRIMARY KEY (job, topic, partition))",
                    )
                    .await
                    .map_err(Into::into)
            })
        })?;
        Ok(sink)
    }

    /// Where each partition continues, as the offsets table has it (transactional mode).
    pub fn offsets(&mut self) -> Result<BTreeMap<TopicPartition, i64>> {
        if self.settings.mode != PostgresMode::Transactional {
            return Ok(BTreeMap::new());
        }
        let group = self.group.clone();
        let rows = self.with_connection("read sluice_offsets", |client| {
            let group = group.clone();
            Box::pin(async move {
                let sql = "SELECT topic, partition, until_offset FROM sluice_offsets WHERE job = $1";
                client.query(sql, &[&group]).await.map_err(Into::into)
            })
        })?;
        Ok(rows.iter().map(|row| (TopicPartition::new(row.get::<_, String>(0), row.get(1)), row.get(2))).collect())
    }

    /// Writes a batch's rows, and in transactional mode moves its offsets, in one transaction.
    /// Only outputs without a topic of their own are rows. Rows the database refuses are
    /// passed to `rejected` before the transaction commits; if it fails, nothing is written.
    pub fn write_batch(
        &mut self,
        outputs: &[&OutputRecord],
        ranges: &[OffsetRange],
        rejected: &mut dyn FnMut(&[RejectedRow]) -> Result<()>,
    ) -> Result<Written, WriteError> {
        let mut rows = Vec::with_capacity(outputs.len());
        let mut refused = Vec::new();
        for (index, output) in outputs.iter().enumerate() {
            let value = output.value.as_deref().unwrap_or_default();
            match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(value) {
                Ok(row) => rows.push((index, row)),
                Err(error) => refused.push(RejectedRow {
                    index,
                    reason: format!("not a JSON object of columns for table {}: {error}", self.settings.table),
                }),
            }
        }
        let deadline = Instant::now() + self.settings.timeout;
        let mut attempt = 1;
        loop {
            if let Err(error) = self.client() {
                if Instant::now() >= deadline {
                    return Err(self.gave_up(error, attempt).into());
                }
                self.retrying("reach the database", attempt, &error);
                attempt += 1;
                continue;
            }
            let mut client = self.client.take().expect("connected above");
            let write = Write { sink: self, rows: &rows, ranges };
            let outcome = self.runtime.block_on(write.run(&mut client, &mut refused, rejected));
            match outcome {
                Err(WriteError::Failed(error)) if is_connection_lost(&error) => {
                    if Instant::now() >= deadline {
                        return Err(self.gave_up(error, attempt).into());
                    }
                    self.retrying("write the batch", attempt, &error);
                    attempt += 1;
                    // Rows refused on the lost connection are tried again with the rest.
                    refused.retain(|row| row.reason.starts_with("not a JSON object"));
                }
                outcome => {
                    self.client = Some(client);
                    return outcome;
                }
            }
        }
    }

    /// The live connection, connecting first if there is none.
    fn client(&mut self) -> Result<&mut Client> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(self.open()?);
        }
        Ok(self.client.as_mut().expect("just connected"))
    }

    /// One connection attempt, with the timeouts that keep a vanished server from hanging the
    /// job: connect timeout, TCP keepalives, and a statement timeout.
    fn open(&self) -> Result<Client> {
        let mut config = tokio_postgres::Config::from_str(&self.settings.url).context("invalid --postgres URL")?;
        let timeout = self.settings.timeout;
        config
            .application_name("sluice")
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3)
            .tcp_user_timeout(timeout)
            .options(format!("-c statement_timeout={}", timeout.as_millis()));
        let (client, connection) = self
            .runtime
            .block_on(config.connect(NoTls))
            .map_err(Unreachable)
            .context("cannot connect to PostgreSQL")?;
        self.runtime.spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!("PostgreSQL connection lost: {error}");
            }
        });
        Ok(client)
    }

    /// Runs `request` on a connection, reconnecting and retrying while the database cannot be
    /// reached, for `--postgres-timeout`.
    fn with_connection<T>(
        &mut self,
        what: &str,
        mut request: impl FnMut(&Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>> + Send + '_>>,
    ) -> Result<T> {
        let deadline = Instant::now() + self.settings.timeout;
        let mut attempt = 1;
        loop {
            let runtime = self.runtime.clone();
            let result = match self.client() {
                Ok(client) => runtime.block_on(request(client)),
                Err(error) => Err(error),
            };
            match result {
                Ok(value) => return Ok(value),
                Err(error) if is_connection_lost(&error) && Instant::now() < deadline => {
                    self.client = None;
                    self.retrying(what, attempt, &error);
                    attempt += 1;
                }
                Err(error) if is_connection_lost(&error) => return Err(self.gave_up(error, attempt)),
                Err(error) => return Err(error.context(format!("cannot {what}"))),
            }
        }
    }

    fn retrying(&self, what: &str, attempt: u32, error: &anyhow::Error) {
        tracing::warn!("cannot {what} (PostgreSQL, attempt {attempt}): {error:#}; retrying");
        std::thread::sleep(RETRY_BACKOFF);
    }

    fn gave_up(&self, error: anyhow::Error, attempts: u32) -> anyhow::Error {
        error.context(format!(
            "PostgreSQL unreachable: gave up after {} and {attempts} attempts (--postgres-timeout)",
            humantime::format_duration(self.settings.timeout)
        ))
    }
}

/// One attempt at writing a batch.
struct Write<'a> {
    sink: &'a PostgresSink,
    /// `(index among the batch's outputs, columns)`.
    rows: &'a [(usize, serde_json::Map<String, serde_json::Value>)],
    ranges: &'a [OffsetRange],
}

impl Write<'_> {
    async fn run(
        self,
        client: &mut Client,
        refused: &mut Vec<RejectedRow>,
        rejected: &mut dyn FnMut(&[RejectedRow]) -> Result<()>,
    ) -> Result<Written, WriteError> {
        let settings = &self.sink.settings;
        let txn = client.transaction().await.map_err(describe_db_error).context("cannot begin a transaction")?;
        self.insert(&txn, self.rows, refused).await?;
        if settings.mode == PostgresMode::Transactional {
            for range in self.ranges {
                if !self.move_offset(&txn, range).await? {
                    // An earlier attempt committed this very batch.
                    txn.rollback().await.ok();
                    return Ok(Written::AlreadyCommitted);
                }
            }
        }
        if !refused.is_empty() {
            refused.sort_by_key(|row| row.index);
            rejected(refused)?;
        }
        txn.commit().await.map_err(describe_db_error).context("cannot commit the batch's PostgreSQL transaction")?;
        Ok(Written::Committed)
    }

    /// Inserts `rows`; if the database refuses the statement because of a row (a constraint, a
    /// type), splits them in halves under savepoints until each refused row stands alone.
    async fn insert(
        &self,
        txn: &Transaction<'_>,
        rows: &[(usize, serde_json::Map<String, serde_json::Value>)],
        refused: &mut Vec<RejectedRow>,
    ) -> Result<(), WriteError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut pending = vec![rows];
        while let Some(rows) = pending.pop() {
            let statement = self.statement(rows);
            let values =
                serde_json::Value::Array(rows.iter().map(|(_, row)| serde_json::Value::Object(row.clone())).collect());
            txn.batch_execute("SAVEPOINT sluice_rows").await.map_err(anyhow::Error::new)?;
            match txn.execute(&statement, &[&values]).await {
                Ok(_) => {
                    txn.batch_execute("RELEASE SAVEPOINT sluice_rows").await.map_err(anyhow::Error::new)?;
                }
                Err(error) if is_row_level(&error) => {
                    txn.batch_execute("ROLLBACK TO SAVEPOINT sluice_rows").await.map_err(anyhow::Error::new)?;
                    if let [(index, _)] = rows {
                        refused.push(RejectedRow { index: *index, reason: describe_db_error(error).to_string() });
                    } else {
                        let (first, second) = rows.split_at(rows.len() / 2);
                        pending.push(second);
                        pending.push(first);
                    }
                }
                Err(error) => {
                    return Err(describe_db_error(error)
                        .context(format!("cannot write {} rows to table {}", rows.len(), self.sink.settings.table))
                        .into());
                }
            }
        }
        Ok(())
    }

    /// Moves a partition's offset from the range's start to its end. `false`: the table already
    /// holds the end (this batch committed before). Anything else is another writer's doing.
    async fn move_offset(&self, txn: &Transaction<'_>, range: &OffsetRange) -> Result<bool, WriteError> {
        let group = &self.sink.group;
        let (topic, partition) = (&range.partition.topic, &range.partition.partition);
        let moved = txn
            .execute(
                "INSERT INTO sluice_offsets (job, topic, partition, until_offset) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (job, topic, partition) DO UPDATE SET until_offset = EXCLUDED.until_offset
                 WHERE sluice_offsets.until_offset = $5",
                &[group, topic, partition, &range.until, &range.from],
            )
            .await
            .map_err(describe_db_error)
            .context("cannot record the batch's offsets in sluice_offsets")?;
        if moved == 1 {
            return Ok(true);
        }
        let row = txn
            .query_one(
                "SELECT until_offset FROM sluice_offsets WHERE job = $1 AND topic = $2 AND partition = $3",
                &[group, topic, partition],
            )
            .await
            .map_err(describe_db_error)
            .context("cannot read sluice_offsets")?;
        let current: i64 = row.get(0);
        if current == range.until && range.until != range.from {
            return Ok(false);
        }
        Err(WriteError::Conflict(format!(
            "sluice_offsets has {} at {current}, not at this batch's start {}: another instance of job {group} (or a \
             stale replay) wrote it; nothing of this batch was written",
            range.partition, range.from
        )))
    }

    /// One statement for a set of rows: PostgreSQL turns the JSON array into typed rows. An
    /// upsert keeps each key's last row, keys compared after PostgreSQL's own conversion (so
    /// `1` and `"1"` for an integer key are one key), as row-by-row upserts would.
    fn statement(&self, rows: &[(usize, serde_json::Map<String, serde_json::Value>)]) -> String {
        let settings = &self.sink.settings;
        let table = &self.sink.table;
        let mut columns: Vec<&String> = Vec::new();
        for (_, row) in rows {
            for column in row.keys() {
                if !columns.contains(&column) {
                    columns.push(column);
                }
            }
        }
        let list = columns.iter().map(|c| quote(c)).collect::<Vec<_>>().join(", ");
        let source = format!("jsonb_populate_recordset(NULL::{table}, $1::jsonb)");
        if settings.mode != PostgresMode::Upsert {
            return format!("INSERT INTO {table} ({list}) SELECT {list} FROM {source}");
        }
        let keys = settings.keys.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", ");
        let updates: Vec<String> = columns
            .iter()
            .filter(|c| !settings.keys.contains(c))
            .map(|c| format!("{0} = EXCLUDED.{0}", quote(c)))
            .collect();
        let conflict = if updates.is_empty() {
            format!("ON CONFLICT ({keys}) DO NOTHING")
        } else {
            format!("ON CONFLICT ({keys}) DO UPDATE SET {}", updates.join(", "))
        };
        format!(
            "INSERT INTO {table} ({list}) SELECT {list} FROM (SELECT DISTINCT ON ({keys}) * FROM {source} \
             WITH ORDINALITY AS batch ORDER BY {keys}, ordinality DESC) AS latest {conflict}"
        )
    }
}

/// A failed connection attempt: the database could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("the database is unreachable: {0}")]
struct Unreachable(#[source] tokio_postgres::Error);

/// Whether an error means the connection is gone (retry on a new one) rather than that the
/// database refused something.
fn is_connection_lost(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.is::<Unreachable>()
            || cause.is::<std::io::Error>()
            || cause.downcast_ref::<tokio_postgres::Error>().is_some_and(|e| {
                // Class 08 is "connection exception"; 57P01-57P03 are the server shutting down.
                e.is_closed()
                    || e.code().is_some_and(|code| code.code().starts_with("08") || code.code().starts_with("57P"))
            })
    })
}

/// Whether the database refused a statement because of the rows' contents: data exceptions
/// (class 22: a value of the wrong type or out of range) and integrity constraints (class 23).
fn is_row_level(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        code.starts_with("22") || code.starts_with("23")
    })
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
            let message = format!("{}{constraint}", db.message());
            anyhow::Error::new(error).context(message)
        }
        None => anyhow::Error::new(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upserts_deduplicate_in_the_database_after_type_conversion() {
        let settings = PostgresSettings {
            url: String::new(),
            table: "orders".into(),
            mode: PostgresMode::Upsert,
            keys: vec!["orderid".into()],
            timeout: Duration::from_secs(1),
        };
        let sink = PostgresSink {
            runtime: tokio::runtime::Builder::new_current_thread().build().unwrap().handle().clone(),
            client: None,
            settings,
            group: "g".into(),
            table: quote("orders"),
        };
        let row = serde_json::json!({"name": "a", "orderid": 1}).as_object().unwrap().clone();
        let write = Write { sink: &sink, rows: &[(0, row)], ranges: &[] };
        let statement = write.statement(write.rows);
        assert!(statement.contains("SELECT DISTINCT ON (\"orderid\")"), "{statement}");
        assert!(
            statement.ends_with("ON CONFLICT (\"orderid\") DO UPDATE SET \"name\" = EXCLUDED.\"name\""),
            "{statement}"
        );
    }
}
