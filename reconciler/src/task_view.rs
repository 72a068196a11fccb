//! `fleet task list | logs`: the task records and output logs of the status directory, read
//! back for the shell. A task's output is a guest's bytes, so it is printed with its escape
//! sequences removed (`terminal::strip_codes`): a guest must not rewrite the operator's
//! screen. `--follow` reads on as the log grows until the run finishes.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::status::StatusDir;

/// One line per task: name, VM, phase, run, when it started, and its exit or message.
/// `fleet task cancel NAME`: asks fleet serve to stop the task's run under way (or not
/// yet started), as `by`. Returns the run. The committed task file still decides what runs
/// next: a change of it or of its `rerun` starts a new run.
pub fn cancel(
    status: &StatusDir,
    name: &str,
    by: &str,
    now: std::time::SystemTime,
) -> anyhow::Result<String> {
    let record = status.read_task_records().remove(name).ok_or_else(|| {
        anyhow::anyhow!("task {name:?} has no run (`fleet task list` shows those that do)")
    })?;
    if record.phase.is_finished() {
        anyhow::bail!(
            "run {} of task {name} already ended ({}): nothing to cancel",
            record.run,
            record.phase.as_str()
        );
    }
    status.write_task_cancel(
        name,
        &crate::status::tasks::HostCancel {
            run: record.run.clone(),
            by: by.to_owned(),
            at: now.into(),
        },
    )?;
    Ok(record.run)
}

pub fn list(status: &StatusDir) -> String {
    let records = status.read_task_records();
    if records.is_empty() {
        return "no task has run yet\n".into();
    }
    let width = records.keys().map(String::len).max().unwrap_or(4).max(4);
    let vm_width = records
        .values()
        .map(|r| r.vm.len())
        .max()
        .unwrap_or(2)
        .max(2);
    let mut out = format!(
        "{:<width$}  {:<vm_width$}  {:<15}  {:<8}  {:<20}  RESULT\n",
        "TASK", "VM", "PHASE", "RUN", "STARTED"
    );
    for r in records.values() {
        let result = match (r.exit_code, &r.message) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(message)) => crate::terminal::one_line(message, 60),
            (None, None) => String::new(),
        };
        out.push_str(&format!(
            "{:<width$}  {:<vm_width$}  {:<15}  {:<8}  {:<20}  {result}\n",
            r.name,
            r.vm,
            format!("{:?}", r.phase),
            &r.run[..r.run.len().min(8)],
            crate::time::shown(r.started),
        ));
    }
    out
}

/// Prints task `name`'s output, made safe; with `follow`, keeps printing until its run
/// finishes.
pub fn logs(status: &StatusDir, name: &str, follow: bool, stdout: &mut impl Write) -> Result<()> {
    let records = status.read_task_records();
    let record = records.get(name).with_context(|| {
        format!("no task {name:?} has run; `fleet task list` shows the ones that have")
    })?;
    let path = status.task_output_path(name);
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut pending = Vec::new();
    let mut run = record.run.clone();
    let mut last = !follow;
    loop {
        if file.is_none() {
            file = std::fs::File::open(&path).ok();
        }
        if let Some(f) = file.as_mut() {
            let mut chunk = Vec::new();
            f.read_to_end(&mut chunk)
                .with_context(|| format!("reading {}", path.display()))?;
            pending.extend_from_slice(&chunk);
            // Whole characters only; a partial one waits for the rest.
            let valid = match std::str::from_utf8(&pending) {
                Ok(s) => s.len(),
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                Err(_) => pending.len(),
            };
            if valid > 0 {
                let text = String::from_utf8_lossy(&pending[..valid]).into_owned();
                stdout.write_all(crate::terminal::strip_codes(&text).as_bytes())?;
                stdout.flush()?;
                pending.drain(..valid);
            }
        }
        if last {
            // A last partial character is shown as what it is.
            if !pending.is_empty() {
                stdout.write_all(String::from_utf8_lossy(&pending).as_bytes())?;
            }
            return Ok(());
        }
        let now = status.read_task_records();
        let Some(current) = now.get(name) else {
            return Ok(());
        };
        // A new run starts a new log: read it from its start.
        if current.run != run {
            run = current.run.clone();
            file = None;
            continue;
        }
        // Finished: what it wrote before its record said so is read once more.
        last = current.phase.is_finished();
        if !last {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tasks::{TaskPhase, TaskRecord};

    #[test]
    fn a_tasks_output_is_printed_without_the_guests_escape_sequences() {
        let dir = tempfile::tempdir().expect("tempdir");
        let status = StatusDir::new(dir.path().join("status"));
        status.ensure().expect("ensure");
        let record: TaskRecord = serde_saphyr::from_str(
            "name: build\nvm: web-1\ngeneration: 1\nrun: 0123abcd\nspecHash: h\nrerun: 0\nphase: Succeeded\nsource: fleet/tasks/build.yaml\nexitCode: 0\n",
        )
        .expect("a record");
        status.write_task_record(&record).expect("record");
        let log = status.task_output_path("build");
        std::fs::create_dir_all(log.parent().expect("dir")).expect("mkdir");
        std::fs::write(
            &log,
            "compiling\r\n\u{1b}]52;c;cGF3bmVk\u{7}done \u{1b}[31mred\u{1b}[0m\r\n\u{1b}]0;no end\nafter\n",
        )
        .expect("log");
        let listed = list(&status);
        assert!(
            listed.contains("build")
                && listed.contains("web-1")
                && listed.contains("Succeeded")
                && listed.contains("exit 0"),
            "{listed}"
        );
        let mut out = Vec::new();
        logs(&status, "build", true, &mut out).expect("logs");
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(text, "compiling\ndone red\n\nafter\n");
        assert!(matches!(record.phase, TaskPhase::Succeeded));
        assert!(logs(&status, "nope", false, &mut Vec::new()).is_err());
    }
}
