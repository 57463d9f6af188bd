//! Moving applications off cloud hosts that went away: a background task that, every few
//! seconds, finds `cloud` placements on hosts offline for longer than
//! `--cloud-reschedule-after` and asks the scheduler for another host for each stateless one
//! (no volumes: its data would stay behind). Each outcome is an event on the application: moved
//! (to which host), or why it stays (no other host fits, or it has volumes). An outcome that
//! keeps the placement where it is is reported once per stranding, not at every pass.

use std::collections::BTreeSet;
use std::time::Duration;

use edgible::model::{ApplicationId, DeviceId};
use tokio::sync::watch;

use crate::db::{Db, Rescheduled, StoreError};

/// What one pass did to one application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub application_id: ApplicationId,
    pub from: DeviceId,
    pub result: Rescheduled,
}

/// The rescheduler's memory between passes: which stranded applications were already
/// reported as staying put.
#[derive(Debug, Default)]
pub struct Rescheduler {
    reported: BTreeSet<(ApplicationId, DeviceId)>,
}

/// How often to look: a quarter of the period, between 100 ms and 30 s.
pub fn interval(after: Duration) -> Duration {
    (after / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
}

impl Rescheduler {
    /// One pass over the stranded placements.
    pub async fn pass(&mut self, db: &Db, after: Duration) -> Result<Vec<Outcome>, StoreError> {
        let after = chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX);
        let offline_before = chrono::Utc::now() - after;
        let stranded = db.stranded_placements(offline_before).await?;
        // Forget reports about placements that are no longer stranded, so a later stranding
        // is reported again.
        self.reported.retain(|key| stranded.iter().any(|s| (s.application_id, s.host) == *key));
        let mut outcomes = Vec::new();
        for placement in stranded {
            let key = (placement.application_id, placement.host);
            if self.reported.contains(&key) {
                continue;
            }
            let since = placement.offline_since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let result = if placement.stateful {
                Rescheduled::NoFit("it has volumes, whose data stays on the host".to_owned())
            } else {
                db.reschedule(placement.application_id, placement.host).await?
            };
            let (device, message) = match &result {
                Rescheduled::Moved { to } => (
                    *to,
                    format!(
                        "cloud host {} has been offline since {since}; the application was moved to cloud host {to}",
                        placement.host
                    ),
                ),
                Rescheduled::NoFit(why) => {
                    self.reported.insert(key);
                    (
                        placement.host,
                        format!(
                            "cloud host {} has been offline since {since}; the application stays there: {why}",
                            placement.host
                        ),
                    )
                }
                Rescheduled::Unchanged => continue,
            };
            tracing::info!(application = %placement.application_id, %message, "rescheduling");
            db.record_platform_event(placement.organization_id, device, placement.application_id, &message).await?;
            outcomes.push(Outcome { application_id: placement.application_id, from: placement.host, result });
        }
        Ok(outcomes)
    }
}

/// Runs passes until `stop` turns true.
pub async fn run(db: Db, after: Duration, mut stop: watch::Receiver<bool>) {
    let mut rescheduler = Rescheduler::default();
    let every = interval(after);
    loop {
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            changed = stop.changed() => {
                // The sender is gone: the server is stopping.
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep(every) => {
                if let Err(error) = rescheduler.pass(&db, after).await {
                    tracing::warn!(%error, "rescheduling applications of offline cloud hosts failed; retrying");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_a_quarter_of_the_period_within_bounds() {
        assert_eq!(interval(Duration::from_secs(300)), Duration::from_secs(30));
        assert_eq!(interval(Duration::from_secs(20)), Duration::from_secs(5));
        assert_eq!(interval(Duration::from_millis(100)), Duration::from_millis(100));
        assert_eq!(interval(Duration::from_secs(86_400)), Duration::from_secs(30));
    }
}
