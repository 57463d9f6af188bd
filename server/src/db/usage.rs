//! Usage metering (issue 9): the records agents report over the push channel, stored once,
//! summed per organization, application and hour, and read back as a [`UsageReport`].
//!
//! Storage. Every accepted record is kept in `usage_records`, whose primary key `(device_id,
//! seq)` is the dedupe: an agent sends again whatever was not acknowledged (after a reconnect
//! or a restart), and a record already there is skipped, so nothing is counted twice. In the
//! same transaction its counters are added to `usage_hours` (one row per organization, hour
//! and application) with one atomic `INSERT ... ON CONFLICT DO UPDATE` addition each, so two
//! devices reporting the same application at once lose nothing. The API reads these sums
//! rather than aggregating the raw records at query time: a 93-day report is at most 2232
//! rows per application whatever the traffic, where the records grow with every report
//! interval of every device. The raw records stay for the dedupe and for audits.
//!
//! Hours. A record covering `[start, end)` across hour boundaries is split in proportion to
//! the time it spent in each hour; every counter is split by cumulative rounding, so the parts
//! are whole numbers that add up exactly to the record's ([`split`]).
//!
//! Acceptance. A record is accepted only for an application the device's session gave the
//! device (`usage_placements`, kept by [`Db::note_placed`] whenever the session reads the
//! device's desired state), and it counts for that application's organization, which on a
//! cloud host is not the device's. An agent may report usage after its application moved
//! away (its last report was in flight, or it was offline), so a record is also accepted when
//! the device had the application until `placed_until`, the record started before then, and
//! it arrives less than [`LATE_RECORDS`] after. Malformed records (end before start, longer
//! than [`MAX_RECORD_SPAN`], from the future, more awake time than their period, counters
//! above [`MAX_COUNTER`]) are refused too.
//!
//! Acknowledgement. The ack of a batch is the highest `seq` of a record of it that is stored
//! (now or before). It covers every record of the device at or below it: each one is stored,
//! or was refused, named in an error frame, and would be refused again. So a refused record
//! is never acknowledged by its own `seq` and never holds back the ack of a later valid one;
//! the agent drops it with the next ack above it.

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};
use edgible::model::{ApplicationId, DeviceId, OrganizationId, UsageHour, UsageReport};
use edgible::protocol::v1::UsageRecord;
use sea_orm::sea_query::{Alias, Expr, OnConflict};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set, TransactionTrait};
use uuid::Uuid;

use super::entities::{usage_hour, usage_placement, usage_record};
use super::{Db, StoreError, now};

/// How long after an application left a device its usage from before is still accepted.
pub const LATE_RECORDS: TimeDelta = TimeDelta::days(7);
/// The longest period one record may cover.
pub const MAX_RECORD_SPAN: TimeDelta = TimeDelta::hours(24);
/// How far in the future a record may end (the device's clock may run ahead).
const CLOCK_SKEW: TimeDelta = TimeDelta::minutes(5);
/// How much more awake time than its period a record may claim (clocks measure differently).
const AWAKE_SLACK_MS: u64 = 1000;
/// The largest value of one counter of one record, so that sums stay far below `i64::MAX`.
pub const MAX_COUNTER: u64 = 1 << 48;
/// The most records one `usage` message may carry (agents send 100), so that one message
/// holds the writer for a bounded time. A longer message is refused whole, nothing stored.
pub const MAX_RECORDS_PER_MESSAGE: usize = 1000;
/// How many refusals one error frame names at most.
const REFUSALS_NAMED: usize = 10;

/// The counters of a record or an hour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub awake_ms: u64,
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub wakes: u64,
}

impl Counters {
    fn of(record: &UsageRecord) -> Counters {
        Counters {
            awake_ms: record.awake_ms,
            requests: record.requests,
            bytes_in: record.bytes_in,
            bytes_out: record.bytes_out,
            wakes: record.wakes,
        }
    }

    fn is_zero(&self) -> bool {
        *self == Counters::default()
    }

    /// Each counter times `part / whole`, rounded down (`part <= whole`, `whole > 0`).
    fn scaled(&self, part: u128, whole: u128) -> Counters {
        // The result is at most the counter itself, so it fits.
        let scale = |value: u64| u64::try_from(u128::from(value) * part / whole).unwrap_or(value);
        Counters {
            awake_ms: scale(self.awake_ms),
            requests: scale(self.requests),
            bytes_in: scale(self.bytes_in),
            bytes_out: scale(self.bytes_out),
            wakes: scale(self.wakes),
        }
    }

    fn minus(&self, other: &Counters) -> Counters {
        Counters {
            awake_ms: self.awake_ms - other.awake_ms,
            requests: self.requests - other.requests,
            bytes_in: self.bytes_in - other.bytes_in,
            bytes_out: self.bytes_out - other.bytes_out,
            wakes: self.wakes - other.wakes,
        }
    }

    /// The largest counter.
    fn max(&self) -> u64 {
        [self.awake_ms, self.requests, self.bytes_in, self.bytes_out, self.wakes].into_iter().max().unwrap_or(0)
    }
}

/// What became of a batch of usage records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageOutcome {
    /// The `seq` to acknowledge; `None` when no record of the batch is stored.
    pub ack: Option<u64>,
    /// Records stored now.
    pub stored: usize,
    /// Records that were stored before (sent again).
    pub duplicates: usize,
    /// Records not stored, with why, in the order they came.
    pub refused: Vec<RefusedRecord>,
}

impl UsageOutcome {
    /// The text of the error frame that names the refused records; `None` if there are none.
    pub fn refusal_message(&self) -> Option<String> {
        if self.refused.is_empty() {
            return None;
        }
        let mut message = format!("{} usage record(s) refused, not stored:", self.refused.len());
        for refused in self.refused.iter().take(REFUSALS_NAMED) {
            message.push_str(&format!(
                " seq {} (application {}): {};",
                refused.seq, refused.application_id, refused.reason
            ));
        }
        if self.refused.len() > REFUSALS_NAMED {
            message.push_str(&format!(" and {} more", self.refused.len() - REFUSALS_NAMED));
        } else {
            message.pop();
        }
        Some(message)
    }
}

/// A record that was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRecord {
    pub seq: u64,
    pub application_id: ApplicationId,
    pub reason: String,
}

/// The start of the hour `at` falls in.
pub fn hour_start(at: DateTime<Utc>) -> DateTime<Utc> {
    let seconds = at.timestamp().div_euclid(3600) * 3600;
    // A whole hour of a valid time is a valid time.
    DateTime::from_timestamp(seconds, 0).unwrap_or(at)
}

/// `counters`, counted over `[start, end)`, split over the hours of that period in proportion
/// to the time spent in each (all of it in the first hour when `start == end`). The parts add
/// up exactly to `counters`; hours whose part is all zeros are left out. `end >= start`.
pub fn split(start: DateTime<Utc>, end: DateTime<Utc>, counters: Counters) -> Vec<(DateTime<Utc>, Counters)> {
    let micros = |delta: TimeDelta| u128::try_from(delta.num_microseconds().unwrap_or(0)).unwrap_or(0);
    let total = micros(end - start);
    let mut hour = hour_start(start);
    if total == 0 {
        return if counters.is_zero() { Vec::new() } else { vec![(hour, counters)] };
    }
    let mut parts = Vec::new();
    let mut covered = 0;
    let mut given = Counters::default();
    while hour < end {
        let next = hour + TimeDelta::hours(1);
        covered += micros(end.min(next) - start.max(hour));
        let upto = counters.scaled(covered.min(total), total);
        let part = upto.minus(&given);
        if !part.is_zero() {
            parts.push((hour, part));
        }
        given = upto;
        hour = next;
    }
    parts
}

/// Why `record` cannot be stored whoever sent it, or `Ok` if it can.
fn check(record: &UsageRecord, now: DateTime<Utc>) -> Result<(), String> {
    if i64::try_from(record.seq).is_err() {
        return Err(format!("seq must be at most {}", i64::MAX));
    }
    if record.end < record.start {
        return Err(format!("end ({}) is before start ({})", record.end, record.start));
    }
    if record.end - record.start > MAX_RECORD_SPAN {
        return Err(format!("end - start is longer than {} hours", MAX_RECORD_SPAN.num_hours()));
    }
    if record.end > now + CLOCK_SKEW {
        return Err(format!("end ({}) is in the future", record.end));
    }
    let period_ms = u64::try_from((record.end - record.start).num_milliseconds()).unwrap_or(0);
    if record.awake_ms > period_ms + AWAKE_SLACK_MS {
        return Err(format!("awake_ms ({}) is longer than the period ({period_ms} ms)", record.awake_ms));
    }
    if Counters::of(record).max() > MAX_COUNTER {
        return Err(format!("a counter is above {MAX_COUNTER}"));
    }
    Ok(())
}

fn stored(value: u64) -> i64 {
    // Counters are checked to be at most MAX_COUNTER, seqs at most i64::MAX.
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn counter(what: &str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("negative usage counter {what}: {value}")))
}

impl Db {
    /// Records that `device_id` has exactly the applications `placed` (each with its
    /// organization) as of now: new ones open, ones no longer there are marked as left now.
    /// Writes only what changed.
    pub async fn note_placed(
        &self,
        device_id: DeviceId,
        placed: &[(ApplicationId, OrganizationId)],
    ) -> Result<(), StoreError> {
        let rows = usage_placement::Entity::find()
            .filter(usage_placement::Column::DeviceId.eq(device_id.0))
            .all(&self.conn)
            .await?;
        let known: HashMap<Uuid, &usage_placement::Model> = rows.iter().map(|row| (row.application_id, row)).collect();
        let open: Vec<_> = placed
            .iter()
            .filter(|(application, organization)| {
                known
                    .get(&application.0)
                    .is_none_or(|row| row.placed_until.is_some() || row.organization_id != organization.0)
            })
            .collect();
        let left: Vec<Uuid> = rows
            .iter()
            .filter(|row| row.placed_until.is_none())
            .map(|row| row.application_id)
            .filter(|application| !placed.iter().any(|(placed, _)| placed.0 == *application))
            .collect();
        if open.is_empty() && left.is_empty() {
            return Ok(());
        }
        let _guard = self.status_write_lock().await;
        let txn = self.conn.begin().await?;
        for (application, organization) in open {
            let row = usage_placement::ActiveModel {
                device_id: Set(device_id.0),
                application_id: Set(application.0),
                organization_id: Set(organization.0),
                placed_until: Set(None),
            };
            usage_placement::Entity::insert(row)
                .on_conflict(
                    OnConflict::columns([usage_placement::Column::DeviceId, usage_placement::Column::ApplicationId])
                        .update_columns([usage_placement::Column::OrganizationId, usage_placement::Column::PlacedUntil])
                        .to_owned(),
                )
                .exec_without_returning(&txn)
                .await?;
        }
        if !left.is_empty() {
            usage_placement::Entity::update_many()
                .col_expr(usage_placement::Column::PlacedUntil, Expr::value(now()))
                .filter(usage_placement::Column::DeviceId.eq(device_id.0))
                .filter(usage_placement::Column::ApplicationId.is_in(left))
                .filter(usage_placement::Column::PlacedUntil.is_null())
                .exec(&txn)
                .await?;
        }
        txn.commit().await?;
        Ok(())
    }

    /// Stores what `device_id` reported (see the module doc for what is accepted and what the
    /// ack covers). Either every accepted record of the batch is stored or, on an error, none.
    pub async fn record_usage(&self, device_id: DeviceId, records: &[UsageRecord]) -> Result<UsageOutcome, StoreError> {
        let now = now();
        let placements: HashMap<Uuid, usage_placement::Model> = usage_placement::Entity::find()
            .filter(usage_placement::Column::DeviceId.eq(device_id.0))
            .all(&self.conn)
            .await?
            .into_iter()
            .map(|row| (row.application_id, row))
            .collect();
        let mut outcome = UsageOutcome::default();
        let mut accepted = Vec::new();
        for record in records {
            let verdict = check(record, now).and_then(|()| match placements.get(&record.application_id.0) {
                None => Err("the application was never placed on this device".to_owned()),
                Some(row) => match row.placed_until {
                    None => Ok(OrganizationId(row.organization_id)),
                    Some(until) if record.start < until && now - until <= LATE_RECORDS => {
                        Ok(OrganizationId(row.organization_id))
                    }
                    Some(until) => Err(format!(
                        "the application left this device at {until}; only usage that started before then and \
                         arrives within {} days is accepted",
                        LATE_RECORDS.num_days()
                    )),
                },
            });
            match verdict {
                Ok(organization) => accepted.push((record, organization)),
                Err(reason) => outcome.refused.push(RefusedRecord {
                    seq: record.seq,
                    application_id: record.application_id,
                    reason,
                }),
            }
        }
        if accepted.is_empty() {
            return Ok(outcome);
        }
        let _guard = self.status_write_lock().await;
        let txn = self.conn.begin().await?;
        for (record, organization) in accepted {
            let counters = Counters::of(record);
            let row = usage_record::ActiveModel {
                device_id: Set(device_id.0),
                seq: Set(stored(record.seq)),
                organization_id: Set(organization.0),
                application_id: Set(record.application_id.0),
                start_at: Set(record.start),
                end_at: Set(record.end),
                received_at: Set(now),
                awake_ms: Set(stored(counters.awake_ms)),
                requests: Set(stored(counters.requests)),
                bytes_in: Set(stored(counters.bytes_in)),
                bytes_out: Set(stored(counters.bytes_out)),
                wakes: Set(stored(counters.wakes)),
            };
            let inserted = usage_record::Entity::insert(row)
                .on_conflict(
                    OnConflict::columns([usage_record::Column::DeviceId, usage_record::Column::Seq])
                        .do_nothing()
                        .to_owned(),
                )
                .exec_without_returning(&txn)
                .await?;
            outcome.ack = outcome.ack.max(Some(record.seq));
            if inserted == 0 {
                outcome.duplicates += 1;
                continue;
            }
            outcome.stored += 1;
            for (hour, part) in split(record.start, record.end, counters) {
                add_hour(&txn, organization, record.application_id, hour, &part).await?;
            }
        }
        txn.commit().await?;
        Ok(outcome)
    }

    /// `organization_id`'s usage in every hour that overlaps `[from, to)`, oldest first (then
    /// by application). `from < to`.
    pub async fn usage_report(
        &self,
        organization_id: OrganizationId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<UsageReport, StoreError> {
        let first = hour_start(from);
        let last = hour_start(to - TimeDelta::microseconds(1));
        let rows = usage_hour::Entity::find()
            .filter(usage_hour::Column::OrganizationId.eq(organization_id.0))
            .filter(usage_hour::Column::Hour.gte(first))
            .filter(usage_hour::Column::Hour.lte(last))
            .order_by_asc(usage_hour::Column::Hour)
            .order_by_asc(usage_hour::Column::ApplicationId)
            .all(&self.conn)
            .await?;
        let hours = rows
            .into_iter()
            .map(|row| {
                Ok(UsageHour {
                    application_id: ApplicationId(row.application_id),
                    hour: row.hour,
                    awake_ms: counter("awake_ms", row.awake_ms)?,
                    requests: counter("requests", row.requests)?,
                    bytes_in: counter("bytes_in", row.bytes_in)?,
                    bytes_out: counter("bytes_out", row.bytes_out)?,
                    wakes: counter("wakes", row.wakes)?,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        Ok(UsageReport { organization_id, from, to, hours })
    }
}

/// Adds `part` to the application's row of `hour`, creating it if needed, in one statement.
async fn add_hour(
    txn: &sea_orm::DatabaseTransaction,
    organization: OrganizationId,
    application: ApplicationId,
    hour: DateTime<Utc>,
    part: &Counters,
) -> Result<(), StoreError> {
    use usage_hour::Column;
    let row = usage_hour::ActiveModel {
        organization_id: Set(organization.0),
        hour: Set(hour),
        application_id: Set(application.0),
        awake_ms: Set(stored(part.awake_ms)),
        requests: Set(stored(part.requests)),
        bytes_in: Set(stored(part.bytes_in)),
        bytes_out: Set(stored(part.bytes_out)),
        wakes: Set(stored(part.wakes)),
    };
    let mut on_conflict = OnConflict::columns([Column::OrganizationId, Column::Hour, Column::ApplicationId]);
    for column in [Column::AwakeMs, Column::Requests, Column::BytesIn, Column::BytesOut, Column::Wakes] {
        // `excluded` is the row that was to be inserted, in PostgreSQL and SQLite alike.
        let sum = Expr::col((usage_hour::Entity, column)).add(Expr::col((Alias::new("excluded"), column)));
        on_conflict.value(column, sum);
    }
    usage_hour::Entity::insert(row).on_conflict(on_conflict).exec_without_returning(txn).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("a test time")
    }

    fn counters(awake_ms: u64, requests: u64, bytes_in: u64, bytes_out: u64, wakes: u64) -> Counters {
        Counters { awake_ms, requests, bytes_in, bytes_out, wakes }
    }

    fn record(seq: u64, start: &str, end: &str) -> UsageRecord {
        UsageRecord {
            seq,
            application_id: ApplicationId::new(),
            start: at(start),
            end: at(end),
            awake_ms: 1000,
            requests: 1,
            bytes_in: 10,
            bytes_out: 20,
            wakes: 0,
        }
    }

    #[test]
    fn a_record_within_an_hour_stays_whole() {
        let parts = split(at("2026-01-01T10:05:00Z"), at("2026-01-01T10:06:00Z"), counters(60_000, 7, 100, 200, 1));
        assert_eq!(parts, [(at("2026-01-01T10:00:00Z"), counters(60_000, 7, 100, 200, 1))]);
        let instant = split(at("2026-01-01T10:05:00Z"), at("2026-01-01T10:05:00Z"), counters(0, 1, 5, 5, 0));
        assert_eq!(instant, [(at("2026-01-01T10:00:00Z"), counters(0, 1, 5, 5, 0))]);
        assert!(split(at("2026-01-01T10:05:00Z"), at("2026-01-01T10:06:00Z"), Counters::default()).is_empty());
    }

    #[test]
    fn a_record_across_hours_is_split_in_proportion_and_adds_up() {
        // A quarter before 11:00, three quarters after.
        let parts = split(at("2026-01-01T10:59:00Z"), at("2026-01-01T11:03:00Z"), counters(240_000, 4, 1001, 3, 1));
        assert_eq!(
            parts,
            [
                (at("2026-01-01T10:00:00Z"), counters(60_000, 1, 250, 0, 0)),
                (at("2026-01-01T11:00:00Z"), counters(180_000, 3, 751, 3, 1)),
            ]
        );
        // Over three hours, uneven values still add up exactly.
        let total = counters(7_200_000, 1_000_003, u64::from(u32::MAX), 17, 2);
        let parts = split(at("2026-01-01T10:30:00Z"), at("2026-01-01T12:30:00Z"), total);
        assert_eq!(
            parts.iter().map(|(hour, _)| *hour).collect::<Vec<_>>(),
            [at("2026-01-01T10:00:00Z"), at("2026-01-01T11:00:00Z"), at("2026-01-01T12:00:00Z"),]
        );
        assert_eq!(parts[1].1.awake_ms, 3_600_000, "the middle hour is half the period");
        let sum = parts.iter().fold(Counters::default(), |sum, (_, part)| Counters {
            awake_ms: sum.awake_ms + part.awake_ms,
            requests: sum.requests + part.requests,
            bytes_in: sum.bytes_in + part.bytes_in,
            bytes_out: sum.bytes_out + part.bytes_out,
            wakes: sum.wakes + part.wakes,
        });
        assert_eq!(sum, total);
        // Ending exactly on the hour does not touch the next one.
        let parts = split(at("2026-01-01T10:30:00Z"), at("2026-01-01T11:00:00Z"), counters(1, 1, 1, 1, 1));
        assert_eq!(parts.len(), 1);
    }

    #[test]
    fn malformed_records_are_refused_naming_the_field() {
        let now = at("2026-01-01T12:00:00Z");
        assert_eq!(check(&record(1, "2026-01-01T10:00:00Z", "2026-01-01T10:01:00Z"), now), Ok(()));
        let backwards = check(&record(1, "2026-01-01T10:01:00Z", "2026-01-01T10:00:00Z"), now);
        assert!(backwards.is_err_and(|reason| reason.starts_with("end (")));
        let long = check(&record(1, "2025-12-30T10:00:00Z", "2026-01-01T10:00:00Z"), now);
        assert!(long.is_err_and(|reason| reason.contains("longer than 24 hours")));
        let future = check(&record(1, "2026-01-01T12:00:00Z", "2026-01-01T12:10:00Z"), now);
        assert!(future.is_err_and(|reason| reason.contains("in the future")));
        let mut awake = record(1, "2026-01-01T10:00:00Z", "2026-01-01T10:00:10Z");
        awake.awake_ms = 11_001;
        assert!(check(&awake, now).is_err_and(|reason| reason.starts_with("awake_ms")));
        awake.awake_ms = 11_000;
        assert_eq!(check(&awake, now), Ok(()), "a second of slack");
        let mut huge = record(1, "2026-01-01T10:00:00Z", "2026-01-01T10:01:00Z");
        huge.bytes_out = MAX_COUNTER + 1;
        assert!(check(&huge, now).is_err_and(|reason| reason.contains("counter")));
        assert!(check(&record(u64::MAX, "2026-01-01T10:00:00Z", "2026-01-01T10:01:00Z"), now).is_err());
    }

    #[test]
    fn refusals_are_named_and_bounded() {
        let refused = |seq| RefusedRecord { seq, application_id: ApplicationId::new(), reason: "nope".into() };
        assert_eq!(UsageOutcome::default().refusal_message(), None);
        let one = UsageOutcome { refused: vec![refused(4)], ..UsageOutcome::default() };
        let message = one.refusal_message().expect("a message");
        assert!(message.starts_with("1 usage record(s) refused, not stored: seq 4 (application "), "{message}");
        assert!(message.ends_with("): nope"), "{message}");
        let many = UsageOutcome { refused: (0..15).map(refused).collect(), ..UsageOutcome::default() };
        let message = many.refusal_message().expect("a message");
        assert!(message.contains("seq 9 ") && !message.contains("seq 10 "), "{message}");
        assert!(message.ends_with("and 5 more"), "{message}");
    }
}
