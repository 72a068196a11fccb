//! The intent journal (DESIGN §3): before each mutating driver call apply appends an intent
//! record and fsyncs it; after the call, its outcome. An intent without an outcome means
//! fleet stopped mid-step (a crash, a kill -9, a power cut); `apply::recover` resolves such
//! intents against what the hypervisor really has before anything new is planned.
//!
//! Format: JSON lines in `<status dir>/journal.jsonl`. Compaction rewrites the file
//! atomically with only the records still open.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::atomic_file::write_atomic;
use crate::plan::Action;
use crate::time::timestamp;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "record", rename_all = "lowercase")]
pub enum Record {
    Intent(Intent),
    Outcome {
        op: u64,
        ok: bool,
        message: String,
        time: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Intent {
    pub op: u64,
    pub provider: String,
    pub vm: String,
    /// The driver operation: create, start, stop, update or destroy (a replace journals
    /// a destroy and a create).
    pub action: Action,
    pub revision: String,
    /// For people reading the journal. Kept as text: recovery reads every intent back, and
    /// a time that does not parse must never make an intent unreadable.
    pub time: String,
}

pub struct Journal {
    path: PathBuf,
    state: Mutex<JournalState>,
}

struct JournalState {
    next_op: u64,
}

impl Journal {
    pub fn open(path: &Path) -> std::io::Result<Journal> {
        let records = read_records(path)?;
        let next_op = records
            .iter()
            .map(|r| match r {
                Record::Intent(i) => i.op,
                Record::Outcome { op, .. } => *op,
            })
            .max()
            .map_or(1, |m| m + 1);
        Ok(Journal {
            path: path.to_owned(),
            state: Mutex::new(JournalState { next_op }),
        })
    }

    /// Intents that have no outcome yet.
    pub fn unfinished(&self) -> std::io::Result<Vec<Intent>> {
        let _guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(open_intents(&read_records(&self.path)?))
    }

    /// Records an intent durably and returns its operation id.
    pub fn intent(
        &self,
        provider: &str,
        vm: &str,
        action: Action,
        revision: &str,
    ) -> std::io::Result<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let op = state.next_op;
        state.next_op += 1;
        self.append(&Record::Intent(Intent {
            op,
            provider: provider.to_owned(),
            vm: vm.to_owned(),
            action,
            revision: revision.to_owned(),
            time: timestamp(SystemTime::now()),
        }))?;
        Ok(op)
    }

    pub fn outcome(&self, op: u64, ok: bool, message: &str) -> std::io::Result<()> {
        let _guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.append(&Record::Outcome {
            op,
            ok,
            message: message.to_owned(),
            time: timestamp(SystemTime::now()),
        })
    }

    /// Rewrites the journal with only the open intents (none, when all are resolved).
    pub fn compact(&self) -> std::io::Result<()> {
        let _guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let open = open_intents(&read_records(&self.path)?);
        let mut bytes = Vec::new();
        for intent in open {
            serde_json::to_writer(&mut bytes, &Record::Intent(intent))
                .expect("journal record is JSON");
            bytes.push(b'\n');
        }
        write_atomic(&self.path, &bytes)
    }

    fn append(&self, record: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).expect("journal record is JSON");
        line.push(b'\n');
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // In the status directory's root: private to fleet and its operators, and never
        // written through a link planted in its place.
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(crate::fsguard::FILE_MODE)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()
    }
}

fn read_records(path: &Path) -> std::io::Result<Vec<Record>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        // A torn last line (killed mid-write) is skipped: its intent was never durable,
        // so the call after it never ran.
        if let Ok(record) = serde_json::from_str::<Record>(&line) {
            out.push(record);
        }
    }
    Ok(out)
}

fn open_intents(records: &[Record]) -> Vec<Intent> {
    let closed: std::collections::BTreeSet<u64> = records
        .iter()
        .filter_map(|r| match r {
            Record::Outcome { op, .. } => Some(*op),
            Record::Intent(_) => None,
        })
        .collect();
    records
        .iter()
        .filter_map(|r| match r {
            Record::Intent(i) if !closed.contains(&i.op) => Some(i.clone()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intents_without_outcomes_survive_reopen_and_compaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.jsonl");
        let j = Journal::open(&path).expect("open");
        let a = j
            .intent("local", "a", Action::Create, "rev")
            .expect("intent");
        let b = j
            .intent("local", "b", Action::Destroy, "rev")
            .expect("intent");
        j.outcome(a, true, "created").expect("outcome");
        drop(j);
        // A torn line from a crash mid-append is ignored.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"record\":\"intent\",\"op\":9"))
            .expect("append");

        let j = Journal::open(&path).expect("reopen");
        let open = j.unfinished().expect("read");
        assert_eq!(open.len(), 1);
        assert_eq!((open[0].op, open[0].vm.as_str()), (b, "b"));
        j.compact().expect("compact");
        assert_eq!(j.unfinished().expect("read").len(), 1);
        j.outcome(b, true, "recovered").expect("outcome");
        j.compact().expect("compact");
        assert!(j.unfinished().expect("read").is_empty());
        assert_eq!(
            std::fs::read(&path).expect("read").len(),
            0,
            "a clean journal is empty"
        );
        // Operation ids keep increasing after a reopen.
        assert!(
            j.intent("local", "c", Action::Start, "rev")
                .expect("intent")
                > b
        );
    }
}
