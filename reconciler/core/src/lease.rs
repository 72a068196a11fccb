//! Leases: how long a VM may live (`lease: {ttl, onExpiry, renewals}` on a VM or a pool's
//! template). A lease starts when its VM is created (the stamp's `created`, so it survives
//! restarts of fleet and edits of the file) and ends `ttl` later, or later still when it was
//! renewed: by a commit that changes `lease.renewals` (a counter, like a task's `rerun`) or
//! from the host (`fleet lease renew VM [--for 4h]`). At its end the plan stops the VM
//! (`onExpiry: stop`) or destroys it (`destroy`, held like any destroy), with
//! `Reason::LeaseEnded`; a VM whose lease ended is not started or made again until a renewal.
//!
//! What fleet remembers between passes is a `LeaseRecord` per VM (the status directory's
//! `leases.yaml`, kept by `advance`); a renewal from the host is a `Renewal` of its own
//! (written by the command, read by the pass), so neither writer overwrites the other. The
//! record decides once it exists: a VM replaced, or made again after a renewal, keeps its
//! lease (only renewals extend it); the stamp's `created` is where a record starts, so a
//! lost status directory, or `fleet plan` with none, still counts from the VM's creation.
//!
//! Architecture invariant: pure. The clock is an argument.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::spec::LeaseExpiry;
use crate::time::Timestamp;

/// The shortest `ttl` (and `--for`) accepted: a lease shorter than a pass or two would stop
/// a VM before it did anything.
pub const MIN_TTL: Duration = Duration::from_secs(10);

/// A VM's lease as a revision sets it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    #[serde(with = "secs")]
    pub ttl: Duration,
    pub on_expiry: LeaseExpiry,
    pub renewals: u32,
}

impl From<&crate::spec::Lease> for Lease {
    fn from(spec: &crate::spec::Lease) -> Lease {
        Lease {
            ttl: spec.ttl.to_std(),
            on_expiry: spec.on_expiry,
            renewals: spec.renewals,
        }
    }
}

/// A renewal: given at `at`, the lease lasts at least until `until`. `by` says who gave it
/// (`commit`, or the host user), for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Renewal {
    pub at: Timestamp,
    pub until: Timestamp,
    #[serde(default)]
    pub by: String,
}

/// What fleet remembers of one VM's lease between passes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRecord {
    /// When the lease began: the VM's creation as its stamp records it, or when fleet first
    /// saw the VM under a lease (a VM made before stamps recorded creation).
    pub started: Timestamp,
    /// `lease.renewals` as last counted: a change is a renewal.
    pub renewals: u32,
    /// The renewal given since `started` that lasts longest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed: Option<Renewal>,
}

/// Whether the VM is on its provider, and the creation time its stamp records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Absent,
    Present { created: Option<Timestamp> },
}

/// A lease now: when it began and when it ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseState {
    pub started: Timestamp,
    pub ends: Timestamp,
    pub on_expiry: LeaseExpiry,
}

impl LeaseState {
    pub fn ended(&self, now: Timestamp) -> bool {
        now >= self.ends
    }

    /// How long is left at `now` (zero once it ended).
    pub fn left(&self, now: Timestamp) -> Duration {
        self.ends
            .system_time()
            .duration_since(now.system_time())
            .unwrap_or_default()
    }
}

fn after(t: Timestamp, d: Duration) -> Timestamp {
    Timestamp::from(t.system_time() + d)
}

/// The lease of a VM whose stamp records `created` (`None`: not on its provider, or made
/// before stamps recorded it), given what fleet remembers (which decides when there is a
/// record). `None`: it has not started (a VM not made yet).
pub fn state(
    lease: &Lease,
    record: Option<&LeaseRecord>,
    created: Option<Timestamp>,
) -> Option<LeaseState> {
    let started = record.map(|r| r.started).or(created)?;
    let renewed = record
        .and_then(|r| r.renewed.as_ref())
        .filter(|r| r.at >= started)
        .map(|r| r.until);
    let ends = after(started, lease.ttl).max(renewed.unwrap_or(started));
    Some(LeaseState {
        started,
        ends,
        on_expiry: lease.on_expiry,
    })
}

/// The record after a pass at `now`: it starts at the VM's creation (or now, for a VM made
/// before stamps recorded it) and keeps that start whatever becomes of the VM; a changed
/// `renewals` counter renews it for `ttl` from now, and a host renewal given since the lease
/// began counts. `None`: nothing to remember (no VM was made under it yet).
pub fn advance(
    lease: &Lease,
    previous: Option<&LeaseRecord>,
    seen: Seen,
    host: Option<&Renewal>,
    now: Timestamp,
) -> Option<LeaseRecord> {
    let started = match (previous, seen) {
        (Some(previous), _) => previous.started,
        (None, Seen::Present { created }) => created.unwrap_or(now),
        (None, Seen::Absent) => return None,
    };
    let mut record = LeaseRecord {
        started,
        renewals: lease.renewals,
        renewed: previous
            .and_then(|p| p.renewed.clone())
            .filter(|r| r.at >= started),
    };
    if previous.is_some_and(|p| p.renewals != lease.renewals) {
        offer(
            &mut record.renewed,
            Renewal {
                at: now,
                until: after(now, lease.ttl),
                by: "commit".into(),
            },
        );
    }
    if let Some(host) = host.filter(|h| h.at >= started) {
        offer(&mut record.renewed, host.clone());
    }
    Some(record)
}

/// Every leased VM's lease as `plan` judges it: from `records` and the creation time the
/// VM's stamp records (`None` for a VM whose lease has not started).
pub fn states(
    desired: &crate::resolve::Desired,
    observed: &crate::observe::Observed,
    records: &std::collections::BTreeMap<String, LeaseRecord>,
) -> std::collections::BTreeMap<String, LeaseState> {
    desired
        .leases
        .iter()
        .filter_map(|(name, lease)| {
            let vm = desired.vms.get(name)?;
            let created = observed
                .find(&vm.config.provider, name)
                .filter(|f| f.owned_by(&desired.fleet))
                .and_then(|f| f.stamp.as_ref()?.created);
            Some((name.clone(), state(lease, records.get(name), created)?))
        })
        .collect()
}

/// The soonest end, after `now`, of the leases in `states`: when a pass must run next.
pub fn next_end<'a>(
    states: impl IntoIterator<Item = &'a LeaseState>,
    now: Timestamp,
) -> Option<Timestamp> {
    states
        .into_iter()
        .map(|s| s.ends)
        .filter(|end| *end > now)
        .min()
}

/// Keeps the renewal that lasts longest: a short renewal never cuts a longer one short.
fn offer(kept: &mut Option<Renewal>, renewal: Renewal) {
    if kept.as_ref().is_none_or(|k| renewal.until > k.until) {
        *kept = Some(renewal);
    }
}

/// `ttl` and other durations as whole seconds in JSON.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Timestamp {
        Timestamp::from(std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs))
    }

    fn lease(ttl: u64) -> Lease {
        Lease {
            ttl: Duration::from_secs(ttl),
            on_expiry: LeaseExpiry::Stop,
            renewals: 0,
        }
    }

    fn present(created: u64) -> Seen {
        Seen::Present {
            created: Some(t(created)),
        }
    }

    #[test]
    fn a_lease_runs_from_the_vms_creation_for_its_ttl() {
        let l = lease(60);
        let record = advance(&l, None, present(100), None, t(130)).expect("a record");
        assert_eq!(record.started, t(100));
        let s = state(&l, Some(&record), Some(t(100))).expect("started");
        assert_eq!(s.ends, t(160));
        assert!(!s.ended(t(159)));
        assert!(s.ended(t(160)));
        assert_eq!(s.left(t(130)), Duration::from_secs(30));
        assert_eq!(s.left(t(200)), Duration::ZERO);
        // A VM not made yet has no lease, and nothing to remember.
        assert_eq!(advance(&l, None, Seen::Absent, None, t(130)), None);
        assert_eq!(state(&l, None, None), None);
    }

    #[test]
    fn a_changed_counter_renews_for_ttl_from_when_fleet_sees_it() {
        let mut l = lease(60);
        let first = advance(&l, None, present(100), None, t(110)).expect("record");
        // First sight counts the counter, it renews nothing.
        l.renewals = 3;
        let fresh = advance(&l, None, present(100), None, t(110)).expect("record");
        assert_eq!(fresh.renewed, None);
        let renewed = advance(&l, Some(&first), present(100), None, t(150)).expect("record");
        assert_eq!(renewed.renewals, 3);
        let s = state(&l, Some(&renewed), Some(t(100))).expect("started");
        assert_eq!(s.ends, t(210));
        // The next pass sees the same counter: no second renewal.
        let again = advance(&l, Some(&renewed), present(100), None, t(200)).expect("record");
        assert_eq!(again.renewed, renewed.renewed);
    }

    #[test]
    fn a_host_renewal_counts_from_when_it_was_given_and_never_shortens() {
        let l = lease(60);
        let record = advance(&l, None, present(100), None, t(110)).expect("record");
        let long = Renewal {
            at: t(120),
            until: t(1000),
            by: "alice".into(),
        };
        let record = advance(&l, Some(&record), present(100), Some(&long), t(121)).expect("r");
        assert_eq!(
            state(&l, Some(&record), Some(t(100))).expect("s").ends,
            t(1000)
        );
        let short = Renewal {
            at: t(130),
            until: t(200),
            by: "bob".into(),
        };
        let record = advance(&l, Some(&record), present(100), Some(&short), t(131)).expect("r");
        assert_eq!(
            record.renewed.as_ref().map(|r| r.by.as_str()),
            Some("alice")
        );
        // A renewal given before this VM was made is not this VM's.
        let stale = Renewal {
            at: t(50),
            until: t(5000),
            by: "carol".into(),
        };
        let fresh = advance(&l, None, present(100), Some(&stale), t(101)).expect("r");
        assert_eq!(fresh.renewed, None);
    }

    #[test]
    fn a_vm_made_again_keeps_its_lease_and_its_renewal() {
        let l = lease(60);
        let old = LeaseRecord {
            started: t(100),
            renewals: 0,
            renewed: Some(Renewal {
                at: t(150),
                until: t(400),
                by: "commit".into(),
            }),
        };
        // Replaced (an image change) or made again: only a renewal extends a lease.
        let new = advance(&l, Some(&old), present(300), None, t(301)).expect("r");
        assert_eq!(new, old);
        assert_eq!(state(&l, Some(&new), Some(t(300))).expect("s").ends, t(400));
        // With no record (a lost status directory), the stamp's creation counts.
        assert_eq!(state(&l, None, Some(t(300))).expect("s").ends, t(360));
    }

    #[test]
    fn an_ended_lease_of_a_vm_gone_stays_ended_until_a_renewal() {
        let mut l = lease(60);
        l.on_expiry = LeaseExpiry::Destroy;
        let record = advance(&l, None, present(100), None, t(110)).expect("r");
        // Destroyed at its end: the record keeps the lease, which has ended.
        let gone = advance(&l, Some(&record), Seen::Absent, None, t(200)).expect("r");
        let s = state(&l, Some(&gone), None).expect("s");
        assert!(s.ended(t(200)));
        // A commit renews it: it lasts again, so the plan makes the VM again, and the VM
        // made lasts as long as the renewal said, not ttl from its creation.
        l.renewals = 1;
        let renewed = advance(&l, Some(&gone), Seen::Absent, None, t(300)).expect("r");
        let s = state(&l, Some(&renewed), None).expect("s");
        assert!(!s.ended(t(300)));
        assert_eq!(s.ends, t(360));
        let made = advance(&l, Some(&renewed), present(330), None, t(331)).expect("r");
        assert_eq!(
            state(&l, Some(&made), Some(t(330))).expect("s").ends,
            t(360)
        );
    }

    #[test]
    fn a_vm_made_before_stamps_recorded_creation_starts_when_first_seen() {
        let l = lease(60);
        let seen = Seen::Present { created: None };
        let first = advance(&l, None, seen, None, t(100)).expect("r");
        assert_eq!(first.started, t(100));
        let later = advance(&l, Some(&first), seen, None, t(150)).expect("r");
        assert_eq!(later.started, t(100));
    }
}
