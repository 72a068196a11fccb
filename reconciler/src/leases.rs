//! `fleet lease renew VM [--for 4h]`: a renewal of a VM's lease from the host. It writes
//! the renewal to its own file in the status directory (`StatusDir::write_host_renewal`),
//! which the next pass counts (`lease::advance`); fleet serve is told to run one at once.

use std::time::{Duration, SystemTime};

use crate::lease::Renewal;
use crate::status::StatusDir;
use crate::time::Timestamp;

/// Why a renewal was refused.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("fleet has no status for VM {0:?}: it is not in the revision fleet applied")]
    UnknownVm(String),
    #[error("VM {0:?} has no lease: set lease: {{ttl: 8h}} in its file (or its pool's template)")]
    NoLease(String),
    #[error("--for {0}: a renewal lasts from 10s to 8784h (a year)")]
    OutOfRange(String),
    #[error("cannot write the renewal: {0}")]
    Write(#[from] std::io::Error),
}

/// Renews `vm`'s lease for `length` (default: its `ttl`) from now, as `by`. Returns when it
/// ends now.
pub fn renew(
    status: &StatusDir,
    vm: &str,
    length: Option<Duration>,
    by: &str,
    now: SystemTime,
) -> Result<Timestamp, RenewError> {
    let vms = status.read_vms();
    let lease = vms
        .get(vm)
        .ok_or_else(|| RenewError::UnknownVm(vm.to_owned()))?
        .lease
        .as_ref()
        .ok_or_else(|| RenewError::NoLease(vm.to_owned()))?;
    let length = length.unwrap_or(Duration::from_secs(lease.ttl_seconds));
    if length < crate::lease::MIN_TTL || length > crate::load::A_YEAR {
        return Err(RenewError::OutOfRange(
            humantime::format_duration(length).to_string(),
        ));
    }
    let renewal = Renewal {
        at: Timestamp::from(now),
        until: Timestamp::from(now + length),
        by: by.to_owned(),
    };
    // One file per VM: keep whichever host renewal of this lease lasts longer, as the pass
    // would (one given before the lease began is not this lease's).
    let kept = match status.read_host_renewal(vm) {
        Some(earlier) if earlier.until > renewal.until && earlier.at >= lease.started => earlier,
        _ => renewal,
    };
    status.write_host_renewal(vm, &kept)?;
    Ok(kept.until.max(lease.ends))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{LeaseStatus, Phase, VmStatus};

    fn status_with(lease: Option<LeaseStatus>) -> (tempfile::TempDir, StatusDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = StatusDir::new(dir.path().join("status"));
        let vm = VmStatus {
            name: "web-1".into(),
            provider: "local".into(),
            phase: Phase::Running,
            desired_state: crate::spec::PowerState::Running,
            observed: None,
            spec_hash: "h".into(),
            applied_revision: None,
            source: "fleet/vms/web-1.yaml".into(),
            agent: None,
            conditions: Vec::new(),
            lease,
            started: None,
            last_error: None,
            updated: None,
        };
        status
            .write_vms(&[("web-1".to_owned(), vm)].into())
            .expect("write");
        (dir, status)
    }

    #[test]
    fn a_renewal_is_written_for_the_pass_and_refused_without_a_lease() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let lease = LeaseStatus {
            started: Timestamp::from(now - Duration::from_secs(100)),
            ends: Timestamp::from(now + Duration::from_secs(20)),
            on_expiry: crate::lease::LeaseExpiry::Stop,
            ttl_seconds: 120,
        };
        let (_dir, status) = status_with(Some(lease));
        let ends = renew(&status, "web-1", None, "alice", now).expect("renewed");
        assert_eq!(ends, Timestamp::from(now + Duration::from_secs(120)));
        let written = status.read_host_renewal("web-1").expect("written");
        assert_eq!(written.by, "alice");
        // A shorter renewal later keeps the longer one.
        let later = now + Duration::from_secs(5);
        renew(
            &status,
            "web-1",
            Some(Duration::from_secs(30)),
            "bob",
            later,
        )
        .expect("ok");
        assert_eq!(status.read_host_renewal("web-1").expect("kept").by, "alice");
        // A longer renewal given before this lease began is not kept over a new one.
        let stale = crate::lease::Renewal {
            at: Timestamp::from(now - Duration::from_secs(500)),
            until: Timestamp::from(now + Duration::from_secs(9000)),
            by: "old".into(),
        };
        status.write_host_renewal("web-1", &stale).expect("write");
        renew(
            &status,
            "web-1",
            Some(Duration::from_secs(30)),
            "carol",
            now,
        )
        .expect("ok");
        assert_eq!(status.read_host_renewal("web-1").expect("new").by, "carol");
        assert!(matches!(
            renew(&status, "web-1", Some(Duration::from_secs(1)), "x", now),
            Err(RenewError::OutOfRange(_))
        ));
        assert!(matches!(
            renew(&status, "db-1", None, "x", now),
            Err(RenewError::UnknownVm(_))
        ));
        let (_dir, bare) = status_with(None);
        assert!(matches!(
            renew(&bare, "web-1", None, "x", now),
            Err(RenewError::NoLease(_))
        ));
    }
}
