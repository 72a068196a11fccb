//! The task book without a VM: runs, prompts, answers and deadlines, driven by hand the way
//! a link thread drives it.

use std::collections::BTreeSet;
use std::time::Duration;

use fleet_agent_protocol::{ExitReason, GuestMessage, HostMessage, VERSION};

use super::TaskBook;
use super::runner::Connection;
use crate::resolve::{Desired, DesiredTask, ResolvedPolicy};
use crate::source::Revision;
use crate::spec::OnDeadline;
use crate::status::StatusDir;
use crate::status::tasks::{PromptState, TaskPhase};

pub(super) fn desired(deadline: Duration, on_deadline: OnDeadline) -> Desired {
    let task = DesiredTask {
        name: "ask".into(),
        vm: "vm-1".into(),
        fresh: None,
        argv: vec!["sh".into()],
        agent: None,
        env: Default::default(),
        repository: None,
        git_author: crate::spec::GitIdentity {
            name: "fleet task ask".into(),
            email: "ask@fleet.invalid".into(),
        },
        results_push: None,
        timeout: Duration::from_secs(60),
        artifacts: Vec::new(),
        prompt_patterns: Vec::new(),
        prompt_deadline: deadline,
        on_deadline,
        allow_control: false,
        rerun: 0,
        secrets: Vec::new(),
        egress: None,
        spec_hash: "h1".into(),
        source: "fleet/tasks/ask.yaml".into(),
    };
    Desired {
        fleet: "lab".into(),
        revision: Revision {
            id: "c".repeat(40),
            label: "main".into(),
            signed_by: None,
        },
        providers: Vec::new(),
        approvers: crate::resolve::Approvers::Unverified,
        policy: ResolvedPolicy {
            max_parallel: 1,
            step_timeout: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(1),
            reconcile_interval: Duration::from_secs(1),
            resync_interval: Duration::from_secs(1),
            self_heal: true,
            max_destroys_per_apply: 5,
            approve: Vec::new(),
            allow_rollback: false,
            suspend: false,
            overcommit: crate::resolve::DEFAULT_OVERCOMMIT,
            retention: Default::default(),
        },
        vms: Default::default(),
        tasks: [("ask".to_owned(), task)].into(),
        answers: Default::default(),
        approvals: Default::default(),
        secrets: Default::default(),
        provider_credentials: Vec::new(),
        egress: Default::default(),
        egress_unused: Vec::new(),
        fresh_pools: Default::default(),
        leases: Default::default(),
        idle: Default::default(),
        quotas: Vec::new(),
        workspaces: Default::default(),
        placements: Default::default(),
        unplaced: Default::default(),
    }
}

/// A book with the task started on a greeted connection; returns the guest's name for it.
fn started(
    deadline: Duration,
    on_deadline: OnDeadline,
) -> (tempfile::TempDir, TaskBook, Connection, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let book = TaskBook::open(
        StatusDir::new(dir.path().join("status")),
        dir.path().to_path_buf(),
    );
    book.sync(
        &desired(deadline, on_deadline),
        Default::default(),
        &BTreeSet::from(["vm-1".to_owned()]),
    );
    let mut conn = Connection::new("vm-1");
    assert!(
        book.tick(&mut conn).0.is_empty(),
        "nothing before the agent's hello"
    );
    conn.greeted("boot-1", None);
    let (sent, job) = book.tick(&mut conn);
    assert!(job.is_none());
    let guest_task = match sent.as_slice() {
        [HostMessage::RunTask { task, .. }] => task.clone(),
        other => panic!("expected one RunTask, got {other:?}"),
    };
    assert_eq!(book.records()["ask"].phase, TaskPhase::Running);
    (dir, book, conn, guest_task)
}

#[test]
fn no_run_starts_while_fleet_is_suspended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let book = TaskBook::open(
        StatusDir::new(dir.path().join("status")),
        dir.path().to_path_buf(),
    );
    book.set_suspended(true);
    book.sync(
        &desired(Duration::from_secs(60), OnDeadline::Wait),
        Default::default(),
        &BTreeSet::from(["vm-1".to_owned()]),
    );
    let mut conn = Connection::new("vm-1");
    conn.greeted("boot-1", None);
    let (sent, job) = book.tick(&mut conn);
    assert!(sent.is_empty() && job.is_none(), "{sent:?}");
    book.set_suspended(false);
    let (sent, _) = book.tick(&mut conn);
    assert!(
        matches!(sent.as_slice(), [HostMessage::RunTask { .. }]),
        "{sent:?}"
    );
}

/// The guest's exit for a run it cancelled.
fn cancelled(task: String, seq: u64) -> GuestMessage {
    GuestMessage::Exit {
        v: VERSION,
        task,
        seq,
        code: None,
        reason: ExitReason::Cancelled,
    }
}

pub(super) fn prompt(task: &str, seq: u64) -> GuestMessage {
    GuestMessage::Prompt {
        v: VERSION,
        task: task.to_owned(),
        seq,
        text: "Continue? (y/n)".into(),
        screen: vec!["Continue? (y/n)".into()],
        options: Vec::new(),
    }
}

#[test]
fn a_repeat_is_dropped_and_a_gap_asks_for_a_resend() {
    let (_dir, book, mut conn, task) = started(Duration::from_secs(60), OnDeadline::Wait);
    let output = |seq: u64, data: &str| GuestMessage::Output {
        v: VERSION,
        task: task.clone(),
        seq,
        data: data.into(),
    };
    let acks = book.receive(
        &mut conn,
        vec![output(1, "one\n"), output(1, "one\n"), output(3, "three\n")],
    );
    assert_eq!(
        acks,
        vec![
            HostMessage::Ack {
                v: VERSION,
                task: task.clone(),
                seq: 1
            },
            HostMessage::Hello { v: VERSION },
        ]
    );
    book.receive(&mut conn, vec![output(2, "two\n"), output(3, "three\n")]);
    let log = std::fs::read_to_string(book.status.task_output_path("ask")).expect("log");
    assert_eq!(log, "one\ntwo\nthree\n");
}

#[test]
fn a_prompt_past_its_deadline_fails_the_task_when_the_policy_says_so() {
    let (_dir, book, mut conn, task) = started(Duration::ZERO, OnDeadline::Fail);
    book.receive(&mut conn, vec![prompt(&task, 1)]);
    let id = format!("{task}-1");
    assert_eq!(book.prompts()[&id].state, PromptState::Pending);
    assert_eq!(book.records()["ask"].phase, TaskPhase::WaitingForInput);
    let (sent, _) = book.tick(&mut conn);
    assert!(
        sent.contains(&HostMessage::Cancel {
            v: VERSION,
            task: task.clone()
        }),
        "{sent:?}"
    );
    assert_eq!(book.prompts()[&id].state, PromptState::Expired);
    book.receive(&mut conn, vec![cancelled(task.clone(), 2)]);
    let record = &book.records()["ask"];
    assert_eq!(record.phase, TaskPhase::Failed);
    assert_eq!(
        record.message.as_deref(),
        Some(format!("prompt {id} got no answer by its deadline").as_str())
    );
}

#[test]
fn a_prompt_past_its_deadline_keeps_waiting_marked_overdue_by_default() {
    let (_dir, book, mut conn, task) = started(Duration::ZERO, OnDeadline::Wait);
    book.receive(&mut conn, vec![prompt(&task, 1)]);
    let (sent, _) = book.tick(&mut conn);
    assert!(sent.is_empty(), "{sent:?}");
    let id = format!("{task}-1");
    assert!(book.prompts()[&id].overdue);
    assert_eq!(book.prompts()[&id].state, PromptState::Pending);
}

#[test]
fn an_answer_with_control_characters_is_refused_and_a_good_one_typed_once() {
    let (_dir, book, mut conn, task) = started(Duration::from_secs(600), OnDeadline::Wait);
    book.receive(&mut conn, vec![prompt(&task, 1)]);
    let id = format!("{task}-1");
    let answer = book.status.answer_path(&id);
    std::fs::write(&answer, "y\u{1b}[A\n").expect("write");
    let (sent, _) = book.tick(&mut conn);
    assert!(sent.is_empty(), "{sent:?}");
    assert!(answer.with_extension("answer.refused").exists());
    assert!(book.prompts()[&id].refused[0].contains("control character"));

    std::fs::write(&answer, "yes\n").expect("write");
    let (sent, _) = book.tick(&mut conn);
    let input = HostMessage::Input {
        v: VERSION,
        task: task.clone(),
        data: "yes\r".into(),
        prompt: Some(id.clone()),
        prompt_seq: Some(1),
    };
    assert_eq!(sent, vec![input.clone()]);
    assert!(!answer.exists(), "the answer file is taken");
    // Not yet known to be delivered: a reconnect sends it again (the guest types it once).
    conn.greeted("boot-1", None);
    let (sent, _) = book.tick(&mut conn);
    assert!(sent.contains(&input), "{sent:?}");
    book.sent(&sent);
    let prompt = &book.prompts()[&id];
    assert_eq!(
        (prompt.state, prompt.delivered),
        (PromptState::Answered, true)
    );
    assert_eq!(prompt.response.as_deref(), Some("yes"));
    let (sent, _) = book.tick(&mut conn);
    assert!(
        !sent.iter().any(|m| matches!(m, HostMessage::Input { .. })),
        "{sent:?}"
    );
}

#[test]
fn a_new_boot_fails_the_run_and_a_removed_task_is_cancelled() {
    let (_dir, book, mut conn, _task) = started(Duration::from_secs(600), OnDeadline::Wait);
    conn.greeted("boot-2", None);
    book.tick(&mut conn);
    let record = &book.records()["ask"];
    assert_eq!(record.phase, TaskPhase::Failed);
    assert!(
        record
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("restarted"),
        "{record:?}"
    );

    // A rerun (new spec hash) is due at once; removing its file before it starts cancels it.
    let mut next = desired(Duration::from_secs(600), OnDeadline::Wait);
    next.tasks.get_mut("ask").expect("task").spec_hash = "h2".into();
    book.sync(&next, Default::default(), &BTreeSet::new());
    assert_eq!(book.records()["ask"].phase, TaskPhase::Pending);
    assert_eq!(book.records()["ask"].generation, 2);
    next.tasks.clear();
    book.sync(&next, Default::default(), &BTreeSet::new());
    assert_eq!(book.records()["ask"].phase, TaskPhase::Cancelled);
}

/// Moves the run's start back by `ago`, as if it had been going that long.
fn backdate(book: &TaskBook, ago: Duration) {
    let mut state = book.lock();
    let record = state.records.get_mut("ask").expect("record");
    record.started = Some((std::time::SystemTime::now() - ago).into());
}

#[test]
fn a_run_the_agent_lets_overrun_is_cancelled_by_fleet_and_ends_timed_out() {
    let (_dir, book, mut conn, task) = started(Duration::from_secs(60), OnDeadline::Wait);
    // Within the grace past its 60 s timeout: the agent's own timeout is still expected.
    backdate(
        &book,
        Duration::from_secs(60) + super::runner::HOST_TIMEOUT_GRACE / 2,
    );
    assert!(book.tick(&mut conn).0.is_empty());
    backdate(
        &book,
        Duration::from_secs(61) + super::runner::HOST_TIMEOUT_GRACE,
    );
    let (sent, _) = book.tick(&mut conn);
    assert_eq!(
        sent,
        vec![HostMessage::Cancel {
            v: VERSION,
            task: task.clone()
        }]
    );
    assert!(book.tick(&mut conn).0.is_empty(), "one cancel only");
    book.receive(&mut conn, vec![cancelled(task, 1)]);
    let record = &book.records()["ask"];
    assert_eq!(record.phase, TaskPhase::TimedOut);
    assert!(
        record
            .message
            .as_deref()
            .is_some_and(|m| m.contains("fleet cancelled it")),
        "{record:?}"
    );
}

#[test]
fn a_run_nobody_ends_is_given_up_after_a_second_grace() {
    let (_dir, book, mut conn, _task) = started(Duration::from_secs(60), OnDeadline::Wait);
    backdate(
        &book,
        Duration::from_secs(61) + super::runner::HOST_TIMEOUT_GRACE,
    );
    book.tick(&mut conn);
    backdate(
        &book,
        Duration::from_secs(61) + 2 * super::runner::HOST_TIMEOUT_GRACE,
    );
    book.tick(&mut conn);
    assert_eq!(book.records()["ask"].phase, TaskPhase::TimedOut);

    // The same when the agent is not connected at all: the daemon's pass gives up on it.
    let (_dir, book, _conn, _task) = started(Duration::from_secs(60), OnDeadline::Wait);
    backdate(
        &book,
        Duration::from_secs(61) + 2 * super::runner::HOST_TIMEOUT_GRACE,
    );
    book.sync(
        &desired(Duration::from_secs(60), OnDeadline::Wait),
        Default::default(),
        &BTreeSet::from(["vm-1".to_owned()]),
    );
    let record = &book.records()["ask"];
    assert_eq!(record.phase, TaskPhase::TimedOut);
    assert!(
        record
            .message
            .as_deref()
            .is_some_and(|m| m.contains("unreachable"))
    );
}

#[test]
fn secrets_are_delivered_once_and_confirmed_before_the_task_starts() {
    use secrecy::ExposeSecret;
    let (_keys, keyring) = crate::secrets::test_keyring();
    let armored =
        crate::secrets::encrypt(b"v4lue-for-the-guest", &keyring.recipients()).expect("encrypt");
    let desired = crate::resolve::tests_support::desired_with_task_secret(armored);
    let vault = crate::secrets::Vault::open(&desired.secrets, Ok(&keyring));
    let value = vault
        .value("s", "k")
        .expect("opened")
        .expose_secret()
        .to_vec();

    let dir = tempfile::tempdir().expect("tempdir");
    let book = TaskBook::open(
        StatusDir::new(dir.path().join("status")),
        dir.path().to_path_buf(),
    );
    book.sync(
        &desired,
        std::sync::Arc::new(vault),
        &BTreeSet::from(["a".to_owned()]),
    );
    let mut conn = Connection::new("a");
    conn.greeted("boot-1", None);
    let (sent, _) = book.tick(&mut conn);
    let digest = match sent.as_slice() {
        [HostMessage::Secrets { digest, files, .. }] => {
            assert_eq!(files.len(), 1);
            assert_eq!(files[0].path, ".env/s/k");
            use base64::Engine;
            let data = base64::engine::general_purpose::STANDARD
                .decode(&files[0].data)
                .expect("base64");
            assert_eq!(data, value);
            assert!(
                !format!("{sent:?}").contains(&files[0].data),
                "Debug never shows a value"
            );
            digest.clone()
        }
        other => panic!("expected only the secret set, got {other:?}"),
    };
    assert!(
        book.tick(&mut conn).0.is_empty(),
        "sent once; the task waits"
    );
    book.receive(
        &mut conn,
        vec![GuestMessage::SecretsStored {
            v: VERSION,
            digest: digest.clone(),
            error: None,
        }],
    );
    let (sent, _) = book.tick(&mut conn);
    match sent.as_slice() {
        [
            HostMessage::RunTask {
                env, secret_env, ..
            },
        ] => {
            assert_eq!(
                secret_env.get("TOKEN").map(String::as_str),
                Some(".env/s/k")
            );
            assert!(!env.contains_key("TOKEN"), "values never travel in RunTask");
        }
        other => panic!("expected the task to start, got {other:?}"),
    }

    // A guest that already holds the set (an agent restart, same boot) is not sent it again.
    let mut again = Connection::new("a");
    again.greeted("boot-1", Some(&digest));
    assert!(
        !book
            .tick(&mut again)
            .0
            .iter()
            .any(|m| matches!(m, HostMessage::Secrets { .. }))
    );
}

#[test]
fn committed_answers_for_unknown_or_answered_prompts_are_reported_not_delivered() {
    let (dir, book, mut conn, task) = started(Duration::from_secs(600), OnDeadline::Wait);
    book.receive(&mut conn, vec![prompt(&task, 1)]);
    let id = format!("{task}-1");
    std::fs::write(book.status.answer_path(&id), "yes\n").expect("write");
    assert_eq!(book.tick(&mut conn).0.len(), 1, "the host answer is typed");

    let mut desired = desired(Duration::from_secs(600), OnDeadline::Wait);
    for (to, source) in [
        (&id, "fleet/hitl/late.yaml"),
        (&"ask-00000000-9".to_owned(), "fleet/hitl/ghost.yaml"),
    ] {
        desired.answers.insert(
            to.clone(),
            crate::resolve::CommittedAnswer {
                response: "no".into(),
                source: source.into(),
                signer: None,
            },
        );
    }
    book.sync(
        &desired,
        Default::default(),
        &BTreeSet::from(["vm-1".to_owned()]),
    );
    book.sync(
        &desired,
        Default::default(),
        &BTreeSet::from(["vm-1".to_owned()]),
    );
    let refused = &book.prompts()[&id].refused;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(
        refused[0].contains("fleet/hitl/late.yaml answers")
            && refused[0].contains("already answered by host file")
    );
    let events = std::fs::read_to_string(dir.path().join("status/events.jsonl")).expect("events");
    assert_eq!(
        events.matches("hitl.answer_ignored").count(),
        2,
        "reported once each"
    );
    assert!(events.contains("no prompt fleet knows"));
    assert!(
        !book
            .tick(&mut conn)
            .0
            .iter()
            .any(|m| matches!(m, HostMessage::Input { data, .. } if data == "no\r")),
        "never delivered"
    );
}

#[test]
fn a_committed_answer_is_typed_only_when_an_approver_signed_it() {
    let (_dir, book, mut conn, task) = started(Duration::from_secs(600), OnDeadline::Wait);
    book.receive(&mut conn, vec![prompt(&task, 1)]);
    let id = format!("{task}-1");
    let mut desired = desired(Duration::from_secs(600), OnDeadline::Wait);
    desired.approvers = crate::resolve::Approvers::Signers(vec!["alice@example.org".into()]);
    let answer = |signer: Option<&str>| crate::resolve::CommittedAnswer {
        response: "yes".into(),
        source: "fleet/hitl/ask.yaml".into(),
        signer: signer.map(str::to_owned),
    };
    let running = BTreeSet::from(["vm-1".to_owned()]);
    // Unsigned, then signed by someone who is no approver: noted, never typed.
    for (signer, why) in [
        (None, "no trusted signature is on the commit"),
        (
            Some("bob@example.org"),
            "bob@example.org, who is not an approver",
        ),
    ] {
        desired.answers.insert(id.clone(), answer(signer));
        book.sync(&desired, Default::default(), &running);
        let (sent, _) = book.tick(&mut conn);
        assert!(
            !sent.iter().any(|m| matches!(m, HostMessage::Input { .. })),
            "{sent:?}"
        );
        let prompt = &book.prompts()[&id];
        assert_eq!(prompt.state, PromptState::Pending);
        assert!(
            prompt.refused.iter().any(|r| r.contains(why)),
            "{:?}",
            prompt.refused
        );
    }
    // Signed by an approver: typed, and the record names her.
    desired
        .answers
        .insert(id.clone(), answer(Some("alice@example.org")));
    book.sync(&desired, Default::default(), &running);
    let (sent, _) = book.tick(&mut conn);
    assert!(
        sent.iter()
            .any(|m| matches!(m, HostMessage::Input { data, .. } if data == "yes\r")),
        "{sent:?}"
    );
    let prompt = &book.prompts()[&id];
    assert_eq!(prompt.state, PromptState::Answered);
    assert!(
        prompt
            .answered_by
            .as_deref()
            .is_some_and(|by| by.starts_with("alice@example.org (commit ")),
        "{:?}",
        prompt.answered_by
    );
}

#[test]
fn a_guest_cannot_touch_another_vms_run_even_knowing_its_name() {
    let (_dir, book, mut victim, task) = started(Duration::from_secs(60), OnDeadline::Wait);
    // Another VM's link, whose guest learned the victim's run name and sequence.
    let mut hostile = Connection::new("vm-2");
    hostile.greeted("boot-9", None);
    let forged = vec![
        GuestMessage::Output {
            v: VERSION,
            task: task.clone(),
            seq: 1,
            data: "all tests passed\n".into(),
        },
        prompt(&task, 2),
        GuestMessage::Exit {
            v: VERSION,
            task: task.clone(),
            seq: 3,
            code: Some(0),
            reason: ExitReason::Completed,
        },
    ];
    let replies = book.receive(&mut hostile, forged);
    // Each is acknowledged as sent, as for any name the host does not know here: no gap
    // greeting that would tell a known name from an unknown one.
    assert!(
        replies.iter().all(|m| matches!(m, HostMessage::Ack { .. })),
        "{replies:?}"
    );
    let record = &book.records()["ask"];
    assert_eq!(record.phase, TaskPhase::Running, "the victim's run goes on");
    assert_eq!(record.seq, 0, "nothing was recorded for it");
    assert!(
        std::fs::read_to_string(book.status.task_output_path("ask"))
            .unwrap_or_default()
            .is_empty()
    );
    // The victim's own messages still count, from 1.
    let acks = book.receive(
        &mut victim,
        vec![GuestMessage::Output {
            v: VERSION,
            task: task.clone(),
            seq: 1,
            data: "real\n".into(),
        }],
    );
    assert_eq!(
        acks,
        vec![HostMessage::Ack {
            v: VERSION,
            task,
            seq: 1
        }]
    );
    assert_eq!(
        std::fs::read_to_string(book.status.task_output_path("ask")).expect("log"),
        "real\n"
    );
}

#[test]
fn a_flooding_guest_is_bounded_on_the_host() {
    use crate::tasks::limits;
    let (_dir, book, mut conn, task) = started(Duration::from_secs(60), OnDeadline::Wait);
    let seq = std::cell::Cell::new(0u64);
    let next = || {
        seq.set(seq.get() + 1);
        seq.get()
    };
    // Output: 4 MiB chunks until past the cap; the log stops at it, and the status says so.
    let chunk = "x".repeat(4 * 1024 * 1024);
    let chunks = limits::OUTPUT_BYTES / chunk.len() as u64 + 2;
    for _ in 0..chunks {
        let s = next();
        book.receive(
            &mut conn,
            vec![GuestMessage::Output {
                v: VERSION,
                task: task.clone(),
                seq: s,
                data: chunk.clone(),
            }],
        );
    }
    let log = book.status.task_output_path("ask");
    assert_eq!(
        std::fs::metadata(&log).expect("log").len(),
        limits::OUTPUT_BYTES
    );
    let record = &book.records()["ask"];
    assert!(record.output_truncated);
    assert_eq!(record.seq, seq.get(), "everything was acknowledged");

    // An artifact part far past the end (a sparse 8 TiB file) is refused.
    let part = |seq: u64, path: &str, offset: u64| GuestMessage::Artifact {
        v: VERSION,
        task: task.clone(),
        seq,
        path: path.into(),
        offset,
        data: "aGVsbG8=".into(),
        last: false,
    };
    let s = next();
    book.receive(&mut conn, vec![part(s, "sparse.bin", 1 << 43)]);
    let artifacts = book
        .status
        .task_output_path("ask")
        .with_file_name("artifacts");
    assert!(
        std::fs::metadata(artifacts.join("sparse.bin")).map_or(0, |m| m.len()) < 1024,
        "no sparse file"
    );
    // More artifacts than allowed, some never finished (no `last` part): the rest are
    // dropped and the status says so.
    for i in 0..limits::ARTIFACTS + 5 {
        let s = next();
        book.receive(
            &mut conn,
            vec![GuestMessage::Artifact {
                v: VERSION,
                task: task.clone(),
                seq: s,
                path: format!("a/{i}"),
                offset: 0,
                data: "aGk=".into(),
                last: i % 2 == 0,
            }],
        );
    }
    let record = &book.records()["ask"];
    assert_eq!(record.artifact_files as usize, limits::ARTIFACTS);
    let on_disk = std::fs::read_dir(artifacts.join("a"))
        .expect("artifacts")
        .count();
    assert_eq!(on_disk, limits::ARTIFACTS, "no file past the limit");
    assert!(
        record
            .refused
            .iter()
            .any(|r| r.starts_with("artifacts: more than")),
        "{:?}",
        record.refused
    );

    // Prompts: the text is cut to its bound; past the count, prompts are dropped.
    let s = next();
    book.receive(
        &mut conn,
        vec![GuestMessage::Prompt {
            v: VERSION,
            task: task.clone(),
            seq: s,
            text: "?".repeat(1024 * 1024),
            screen: vec!["line".repeat(1000); 500],
            options: Vec::new(),
        }],
    );
    let prompts = book.prompts();
    let prompt = prompts.values().next().expect("one prompt");
    assert_eq!(prompt.text.len(), limits::PROMPT_TEXT_BYTES);
    assert_eq!(prompt.context.len(), limits::PROMPT_SCREEN_LINES);
    assert!(
        prompt
            .context
            .iter()
            .all(|l| l.len() <= limits::PROMPT_LINE_BYTES)
    );
}

#[test]
fn a_secret_value_a_task_prints_is_blanked_before_it_is_stored() {
    let (_dir, book, mut conn, task) = started(Duration::from_secs(60), OnDeadline::Wait);
    crate::secrets::redact::register(b"opened-secret-value-4711");
    book.receive(
        &mut conn,
        vec![
            GuestMessage::Output {
                v: VERSION,
                task: task.clone(),
                seq: 1,
                data: "token=opened-secret-value-4711\n".into(),
            },
            GuestMessage::Prompt {
                v: VERSION,
                task: task.clone(),
                seq: 2,
                text: "use opened-secret-value-4711? (y/n)".into(),
                screen: vec!["opened-secret-value-4711".into()],
                options: Vec::new(),
            },
        ],
    );
    let log = std::fs::read_to_string(book.status.task_output_path("ask")).expect("log");
    assert_eq!(log, "token=[REDACTED]\n");
    let prompts = book.prompts();
    let prompt = prompts.values().next().expect("a prompt");
    assert!(!prompt.text.contains("4711"), "{}", prompt.text);
    assert!(!prompt.context.concat().contains("4711"));
}

/// What the book decides under its lock is written after the lock is released: another
/// holder gets the lock while a write is still to be made, and an older copy of a record
/// written late never lands over a newer one.
#[test]
fn writes_are_made_without_the_lock_and_never_go_back_in_time() {
    let (dir, book, _conn, _guest_task) = started(Duration::from_secs(60), OnDeadline::Wait);
    let book = std::sync::Arc::new(book);
    let file =
        move || std::fs::read_to_string(dir.path().join("status/tasks/ask.yaml")).expect("record");
    // A change, decided and taken out of the lock but not yet written (a slow disk)...
    let older = {
        let mut state = book.lock();
        state.update("ask", |r| r.message = Some("older".into()));
        state.take_effects()
    };
    // ...does not keep anyone out: the next holder decides a newer change, and its write
    // waits for its turn, after the older one.
    let newer = std::thread::spawn({
        let book = book.clone();
        move || {
            let mut state = book.lock();
            state.update("ask", |r| r.message = Some("newer".into()));
        }
    });
    assert!(
        book.lock().records["ask"].message.is_some(),
        "the lock is free"
    );
    assert!(!file().contains("newer"), "{}", file());
    book.flush(older);
    newer.join().expect("the newer holder");
    assert!(file().contains("message: newer"), "{}", file());
}

#[test]
fn one_tasks_unmade_writes_hold_up_no_other_task() {
    let (dir, book, _conn, _guest_task) = started(Duration::from_secs(60), OnDeadline::Wait);
    // A change of `ask`, decided and not yet made (a slow disk)...
    let older = {
        let mut state = book.lock();
        state.update("ask", |r| r.message = Some("older".into()));
        state.take_effects()
    };
    // ...does not hold up another task's writes: they are made at once, in this thread.
    {
        let mut state = book.lock();
        let mut other = state.records["ask"].clone();
        other.name = "other".into();
        state.records.insert("other".into(), other);
        state.record_changed("other");
    }
    let written = dir.path().join("status/tasks/other.yaml");
    assert!(written.exists(), "{} is written", written.display());
    book.flush(older);
}

/// A run that ended with a bundle a killed fleet never checked is checked at the first
/// sync after a restart, once, and only for that run.
#[test]
fn results_a_killed_fleet_left_unchecked_are_checked_after_a_restart() {
    let (_dir, book, _conn, _) = started(Duration::from_secs(60), OnDeadline::Wait);
    let mut record = book.records()["ask"].clone();
    record.phase = TaskPhase::Failed;
    record.repository = Some(crate::status::tasks::RepositoryAt {
        url: "app".into(),
        commit: "a".repeat(40),
    });
    record.artifacts = vec![fleet_agent_protocol::RESULTS_ARTIFACT.to_owned()];
    record.results = None;

    let dir = tempfile::tempdir().expect("tempdir");
    let status = StatusDir::new(dir.path().join("status"));
    status.write_task_record(&record).expect("record");
    status
        .write_artifact_part(
            "ask",
            fleet_agent_protocol::RESULTS_ARTIFACT,
            0,
            b"# v2 git bundle\n",
        )
        .expect("artifact");
    let book = TaskBook::open(status, dir.path().to_path_buf());
    assert_eq!(
        book.records()["ask"].results,
        None,
        "checked at the sync, not before"
    );
    book.sync(
        &desired(Duration::from_secs(60), OnDeadline::Wait),
        Default::default(),
        &BTreeSet::new(),
    );
    // Its repository was never fetched here, so the check says why it could not be made.
    let results = book.records()["ask"].results.clone().expect("checked");
    let why = results.refused.expect("refused");
    assert!(why.contains("app"), "{why}");
    assert_eq!(results.head, None);
}

/// A fresh run's member is carried into the next run's record (a rerun, an edit, a move to
/// another pool or to a named VM), held until its `keepFor` is over and never warm again;
/// a pending run keeps its member only within the same pool.
#[test]
fn a_new_run_carries_the_previous_runs_member_until_its_keep_for_is_over() {
    use crate::status::tasks::TaskRecord;
    let record = |phase: &str, extra: &str| -> TaskRecord {
        serde_saphyr::from_str(&format!(
            "name: t\nvm: sandbox-f3\ngeneration: 1\nrun: 0123abcd\nspecHash: h\nrerun: 0\nphase: {phase}\nsource: fleet/tasks/t.yaml\nfresh: {{pool: sandbox, keepForSecs: 3600}}\n{extra}"
        ))
        .expect("a record")
    };
    let now = std::time::UNIX_EPOCH + Duration::from_secs(10_000);
    let ended = record("Succeeded", "finished: 1970-01-01T02:00:00Z\n");
    let earlier = super::earlier_members(Some(&ended), false, now);
    assert_eq!(earlier.len(), 1);
    assert_eq!(earlier[0].name, "sandbox-f3");
    assert_eq!(
        earlier[0].until.to_string(),
        "1970-01-01T03:00:00Z",
        "its end plus keepFor"
    );
    // Kept by the new run (pending, same pool): not an earlier member.
    assert!(super::earlier_members(Some(&record("Pending", "")), true, now).is_empty());
    // Carried on, and dropped a day past its time.
    let mut next = record("Succeeded", "finished: 1970-01-01T02:30:00Z\n");
    next.vm = "sandbox-f4".into();
    next.earlier_members = earlier;
    let carried = super::earlier_members(Some(&next), false, now);
    let names: Vec<&str> = carried.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["sandbox-f4", "sandbox-f3"]);
    let later = now + Duration::from_secs(2 * 24 * 3600);
    let names: Vec<String> = super::earlier_members(Some(&next), false, later)
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, ["sandbox-f4"]);
    // The record's runs, as lifecycle reads them: this one's and the earlier one's.
    let runs: Vec<_> = next.fresh_runs().collect();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].member.as_deref(), Some("sandbox-f3"));
}

/// `policy.retention`: a finished run of a task gone from the revision is pruned (record,
/// output, prompts) once past the count or age, never in its first 10 s; a task still in
/// the revision keeps its record whatever its age.
#[test]
fn finished_runs_of_removed_tasks_are_pruned_per_the_retention_policy() {
    let (dir, book, mut conn, task) = started(Duration::from_secs(600), OnDeadline::Wait);
    book.receive(
        &mut conn,
        vec![prompt(&task, 1), cancelled(task.clone(), 2)],
    );
    let record = book.records()["ask"].clone();
    assert!(record.phase.is_finished(), "{record:?}");
    let status = dir.path().join("status");
    assert!(status.join("tasks/ask.yaml").exists());
    assert!(status.join("tasks/ask/output.log").exists());
    let ended = record.finished.expect("finished").system_time();
    let none_kept = crate::resolve::ResolvedRetention {
        finished_tasks: 0,
        ..Default::default()
    };
    // Still in the revision: kept, whatever the policy.
    assert!(
        book.prune(none_kept, ended + Duration::from_secs(3600))
            .is_empty()
    );

    let mut gone = desired(Duration::from_secs(600), OnDeadline::Wait);
    gone.tasks.clear();
    book.sync(
        &gone,
        Default::default(),
        &BTreeSet::from(["vm-1".to_owned()]),
    );
    // Within the default count and age: kept.
    let defaults = crate::resolve::ResolvedRetention::default();
    assert!(
        book.prune(defaults, ended + Duration::from_secs(3600))
            .is_empty()
    );
    // Its first seconds: kept whatever the policy.
    assert!(
        book.prune(none_kept, ended + Duration::from_secs(5))
            .is_empty()
    );
    // Over the count: pruned, files and all.
    assert_eq!(
        book.prune(none_kept, ended + Duration::from_secs(120)),
        ["ask"]
    );
    assert!(!book.records().contains_key("ask"));
    assert!(!status.join("tasks/ask.yaml").exists());
    assert!(!status.join("tasks/ask").exists());
    let prompts: Vec<_> = std::fs::read_dir(status.join("hitl"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(prompts.is_empty(), "{prompts:?}");
}
