//! The task book's decisions alone: `BookState` driven with messages, host files and the
//! time it is given. No directory, no clock, no sleep: a deadline passes because the test
//! says it is later, and what would be written is read off the queued effects.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use fleet_agent_protocol::{ExitReason, GuestMessage, HostMessage, VERSION};

use super::runner::Connection;
use super::tests::{desired, prompt};
use super::{BookState, DecidedAt, HostFiles};
use crate::spec::OnDeadline;
use crate::status::EventKind;
use crate::status::tasks::{PromptState, TaskPhase};

const T0: Duration = Duration::from_secs(1_800_000_000);

/// `seconds` after the start, on both clocks.
fn at(seconds: u64) -> DecidedAt {
    let start = DecidedAt::default();
    DecidedAt {
        wall: SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(seconds),
        mono: start.mono + Duration::from_secs(seconds),
    }
}

/// A state with task `ask` started on a greeted connection at time 0; the guest's name
/// for the run.
fn started(deadline: Duration, on_deadline: OnDeadline) -> (BookState, Connection, String) {
    started_with(&desired(deadline, on_deadline))
}

/// The same with the desired state `wanted` (task `ask` on `vm-1`).
fn started_with(wanted: &crate::resolve::Desired) -> (BookState, Connection, String) {
    let mut state = BookState {
        now: at(0),
        ..BookState::default()
    };
    state.sync(wanted, &BTreeSet::from(["vm-1".to_owned()]));
    assert!(
        state.take_effects()["ask"].reset,
        "a new run empties its files first"
    );
    let mut conn = Connection::new("vm-1");
    conn.greeted("boot-1", None);
    let (sent, _) = state.tick(&mut conn, &HostFiles::default());
    let Some(HostMessage::RunTask { task, .. }) = sent.first() else {
        panic!("expected a RunTask, got {sent:?}");
    };
    let task = task.clone();
    state.take_effects();
    (state, conn, task)
}

#[test]
fn output_is_decided_under_the_lock_and_written_in_the_holds_turn() {
    let (mut state, mut conn, task) = started(Duration::from_secs(60), OnDeadline::Wait);
    let output = |seq, data: &str| GuestMessage::Output {
        v: VERSION,
        task: task.clone(),
        seq,
        data: data.into(),
    };
    let acks = state.receive(&mut conn, vec![output(1, "one\n"), output(2, "two\n")]);
    assert_eq!(
        acks,
        [HostMessage::Ack {
            v: VERSION,
            task: task.clone(),
            seq: 2
        }]
    );
    // Each chunk at the offset the record accounted for when it was decided, written before
    // the record that counts it, in the task's next turn; nothing for any other task.
    let effects = state.take_effects();
    assert_eq!(effects.keys().collect::<Vec<_>>(), ["ask"]);
    let ask = &effects["ask"];
    assert!(ask.record.is_some());
    assert!(ask.turn > 0);
    assert_eq!(ask.output, [(0, b"one\n".to_vec()), (4, b"two\n".to_vec())]);
    assert_eq!(state.records["ask"].output_bytes, 8);
    assert_eq!(state.records["ask"].seq, 2);

    let exit = GuestMessage::Exit {
        v: VERSION,
        task: task.clone(),
        seq: 3,
        code: Some(0),
        reason: ExitReason::Completed,
    };
    state.now = at(5);
    state.receive(&mut conn, vec![exit]);
    let record = &state.records["ask"];
    assert_eq!(record.phase, TaskPhase::Succeeded);
    assert_eq!(record.finished, Some(at(5).wall.into()));
    let effects = state.take_effects();
    assert!(
        effects["ask"]
            .events
            .iter()
            .any(|e| e.kind == EventKind::TaskFinished)
    );
}

#[test]
fn a_deadline_passes_when_the_time_given_says_so() {
    let (mut state, mut conn, task) = started(Duration::from_secs(60), OnDeadline::Fail);
    state.receive(&mut conn, vec![prompt(&task, 1)]);
    let id = state.records["ask"]
        .pending_prompt
        .clone()
        .expect("a prompt");

    state.now = at(59);
    let (sent, _) = state.tick(&mut conn, &HostFiles::default());
    assert!(sent.is_empty(), "not yet: {sent:?}");
    assert_eq!(state.prompts[&id].state, PromptState::Pending);

    state.now = at(61);
    let (sent, _) = state.tick(&mut conn, &HostFiles::default());
    assert_eq!(sent, [HostMessage::Cancel { v: VERSION, task }]);
    assert_eq!(state.prompts[&id].state, PromptState::Expired);
}

#[test]
fn a_host_answer_file_is_an_input_and_its_removal_an_effect() {
    let (mut state, mut conn, task) = started(Duration::from_secs(60), OnDeadline::Wait);
    state.receive(&mut conn, vec![prompt(&task, 1)]);
    let id = state.records["ask"]
        .pending_prompt
        .clone()
        .expect("a prompt");
    state.take_effects();

    let refused = HostFiles {
        answers: BTreeMap::from([(id.clone(), Ok("y\u{1b}[A\n".to_owned()))]),
        ..HostFiles::default()
    };
    let (sent, _) = state.tick(&mut conn, &refused);
    assert!(sent.is_empty(), "{sent:?}");
    // Moved in the task's turn, after the prompt record that says why.
    let effects = state.take_effects();
    assert_eq!(
        effects["ask"].moves,
        [(format!("{id}.answer"), Some(format!("{id}.answer.refused")))]
    );
    assert_eq!(state.prompts[&id].state, PromptState::Pending);

    let good = HostFiles {
        answers: BTreeMap::from([(id.clone(), Ok("yes\n".to_owned()))]),
        ..HostFiles::default()
    };
    let (sent, _) = state.tick(&mut conn, &good);
    assert_eq!(
        sent,
        [HostMessage::Input {
            v: VERSION,
            task,
            data: "yes\r".into(),
            prompt: Some(id.clone()),
            prompt_seq: Some(1),
        }]
    );
    assert_eq!(
        state.take_effects()["ask"].moves,
        [(format!("{id}.answer"), None)]
    );
    assert_eq!(state.prompts[&id].state, PromptState::Answered);
}

#[test]
fn a_menus_answer_is_a_choice_sent_as_its_digit_and_anything_else_is_refused() {
    let (mut state, mut conn, task) = started(Duration::from_secs(60), OnDeadline::Wait);
    let menu = GuestMessage::Prompt {
        v: VERSION,
        task: task.clone(),
        seq: 1,
        text: "Do you want to proceed?".into(),
        screen: vec!["Do you want to proceed?".into(), "❯ 1. Yes".into()],
        options: vec![
            "Yes".into(),
            "Yes, and don't ask again".into(),
            "No, and tell Claude what to do differently (esc)".into(),
        ],
    };
    state.receive(&mut conn, vec![menu]);
    let id = state.records["ask"]
        .pending_prompt
        .clone()
        .expect("a prompt");
    assert_eq!(state.prompts[&id].options.len(), 3);
    state.take_effects();
    let answer = |text: &str| HostFiles {
        answers: BTreeMap::from([(id.clone(), Ok(format!("{text}\n")))]),
        ..HostFiles::default()
    };
    // Not one of the options: refused, saying which are.
    let (sent, _) = state.tick(&mut conn, &answer("maybe"));
    assert!(sent.is_empty(), "{sent:?}");
    let refused = &state.prompts[&id].refused;
    assert!(
        refused
            .iter()
            .any(|r| r.contains("answer with one of 1 (Yes), 2 (Yes, and don't ask again)")),
        "{refused:?}"
    );
    state.take_effects();
    // A label names its option (the first it begins, any case): its digit, no Enter.
    let (sent, _) = state.tick(&mut conn, &answer("no"));
    assert_eq!(
        sent,
        [HostMessage::Input {
            v: VERSION,
            task,
            data: "3".into(),
            prompt: Some(id.clone()),
            prompt_seq: Some(1),
        }]
    );
    assert_eq!(state.prompts[&id].response.as_deref(), Some("no"));
}

#[test]
fn a_stray_answer_file_is_refused_from_the_names_given() {
    let (mut state, mut conn, _task) = started(Duration::from_secs(60), OnDeadline::Wait);
    let files = HostFiles {
        strays: Some(vec!["nobody-0000000-1.answer".into(), "notes.txt".into()]),
        ..HostFiles::default()
    };
    state.tick(&mut conn, &files);
    // No prompt, so no task: the fleet-wide turn ("").
    let effects = state.take_effects();
    assert_eq!(
        effects[""].moves,
        [(
            "nobody-0000000-1.answer".to_owned(),
            Some("nobody-0000000-1.answer.refused".to_owned())
        )]
    );
    assert!(
        effects[""]
            .events
            .iter()
            .any(|e| e.kind == EventKind::HitlAnswerRefused)
    );
}

#[test]
fn a_repeat_is_acknowledged_only_in_its_turn() {
    let (mut state, mut conn, task) = started(Duration::from_secs(60), OnDeadline::Wait);
    let output = GuestMessage::Output {
        v: VERSION,
        task,
        seq: 1,
        data: "one\n".into(),
    };
    state.receive(&mut conn, vec![output.clone()]);
    let first = state.take_effects();
    // Nothing new to write, yet the acknowledgement waits its turn: the first hold's bytes
    // may still be on their way to the disk.
    let acks = state.receive(&mut conn, vec![output]);
    assert_eq!(acks.len(), 1);
    let second = state.take_effects();
    assert!(second["ask"].output.is_empty() && second["ask"].record.is_none());
    assert_eq!(second["ask"].turn, first["ask"].turn + 1);
}

#[test]
fn an_unconfirmed_repository_is_shipped_again_on_the_monotonic_clock() {
    let mut desired = desired(Duration::from_secs(60), OnDeadline::Wait);
    if let Some(task) = desired.tasks.get_mut("ask") {
        task.repository = Some(crate::spec::Repository {
            url: "app".into(),
            branch: None,
            rev: None,
            credentials: None,
        });
    }
    let mut state = BookState {
        now: at(0),
        ..BookState::default()
    };
    state.sync(&desired, &BTreeSet::from(["vm-1".to_owned()]));
    let mut conn = Connection::new("vm-1");
    conn.greeted("boot-1", None);
    let (_, job) = state.tick(&mut conn, &HostFiles::default());
    assert!(job.is_some(), "the repository is to be shipped");
    assert_eq!(state.records["ask"].phase, TaskPhase::Staging);

    // The wall clock stepped back a day, then forward three: the wait is not measured by it.
    for wall in [-86_400i64, 3 * 86_400] {
        let mut later = at(1);
        later.wall = if wall < 0 {
            later.wall - Duration::from_secs(wall.unsigned_abs())
        } else {
            later.wall + Duration::from_secs(wall.unsigned_abs())
        };
        state.now = later;
        state.tick(&mut conn, &HostFiles::default());
        assert_eq!(state.records["ask"].phase, TaskPhase::Staging);
    }
    // Past the stage timeout on the monotonic clock: shipped again.
    state.now = at(121);
    state.tick(&mut conn, &HostFiles::default());
    assert_eq!(state.records["ask"].phase, TaskPhase::Pending);
}

#[test]
fn a_connection_counts_for_the_run_the_guest_named_only_on_its_own_vm() {
    let (mut state, _conn, task) = started(Duration::from_secs(60), OnDeadline::Wait);
    let used = |vm: &str, task: Option<&str>, rule: Option<&str>, status| {
        (
            vm.to_owned(),
            crate::broker::Used {
                task: task.map(str::to_owned),
                destination: "CONNECT api.example.com:443".into(),
                rule: rule.map(str::to_owned),
                status: Some(status),
                bytes_up: 100,
                bytes_down: 2000,
                tokens: (status == 200).then_some(crate::tokens::Metered {
                    tokens: crate::tokens::Tokens {
                        input: 10,
                        output: 5,
                    },
                    unreadable: None,
                }),
                admitted: false,
                started: SystemTime::UNIX_EPOCH + T0,
                duration: Duration::from_millis(1500),
            },
        )
    };
    for (vm, u) in [
        used(
            "vm-1",
            Some(&task),
            Some("loadout agent egress.allow[0]"),
            200,
        ),
        used("vm-1", Some(&task), None, 403),
        // Another VM's guest naming this run, and a connection naming none: neither counts.
        used(
            "vm-2",
            Some(&task),
            Some("loadout agent egress.allow[0]"),
            200,
        ),
        used("vm-1", None, Some("loadout agent egress.allow[0]"), 200),
    ] {
        state.egress_used(&vm, u);
    }
    let sums = state.records["ask"].egress.clone().expect("counted");
    assert_eq!(
        (
            sums.connections,
            sums.refused,
            sums.bytes_up,
            sums.bytes_down
        ),
        // The refused connection moved only the broker's answer: counted, not its bytes.
        (2, 1, 100, 2000)
    );
    assert_eq!((sums.tokens_in, sums.tokens_out), (10, 5));
    let effects = state.take_effects();
    let lines = String::from_utf8(effects["ask"].egress.clone()).expect("text");
    assert_eq!(lines.lines().count(), 2, "{lines}");
    let first: crate::status::tasks::EgressLine =
        serde_json::from_str(lines.lines().next().expect("a line")).expect("JSON");
    assert_eq!(first.rule.as_deref(), Some("loadout agent egress.allow[0]"));
    assert_eq!((first.status, first.millis), (Some(200), 1500));
    assert!(
        effects["ask"].record.is_some(),
        "the record with its totals"
    );
}

#[test]
fn a_spent_budget_refuses_connections_and_asks_a_human_once() {
    let mut wanted = desired(Duration::from_secs(60), OnDeadline::Wait);
    wanted.egress.insert(
        "vm-1".into(),
        crate::egress::Policy {
            budget: Some(crate::egress::Budget {
                tokens: Some(100),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let (mut state, mut conn, task) = started_with(&wanted);
    let spend = |state: &mut BookState, tokens: u64| {
        state.egress_used(
            "vm-1",
            crate::broker::Used {
                task: Some(task.clone()),
                destination: "POST https://api.anthropic.com/v1/messages".into(),
                rule: Some("loadout agent egress.credentials[0]".into()),
                status: Some(200),
                bytes_up: 10,
                bytes_down: 10,
                tokens: Some(crate::tokens::Metered {
                    tokens: crate::tokens::Tokens {
                        input: tokens,
                        output: 0,
                    },
                    unreadable: None,
                }),
                admitted: true,
                started: SystemTime::UNIX_EPOCH + T0,
                duration: Duration::from_millis(5),
            },
        );
    };
    assert_eq!(
        state.egress_admit("vm-1", Some(&task)),
        Ok(Default::default())
    );
    // Connections that name no run of this VM are refused while a budget applies.
    assert!(state.egress_admit("vm-1", None).is_err());
    assert!(state.egress_admit("vm-1", Some("other-0000")).is_err());

    spend(&mut state, 120);
    let refused = state.egress_admit("vm-1", Some(&task)).expect_err("spent");
    assert!(
        refused
            .starts_with("task ask has used 120 tokens of its budget of 100; answer prompt ask-"),
        "{refused}"
    );
    // One prompt, however many connections are refused meanwhile.
    assert_eq!(
        state.egress_admit("vm-1", Some(&task)),
        Err(refused.clone())
    );
    let budget_prompts: Vec<_> = state
        .prompts
        .values()
        .filter(|p| p.kind == crate::status::tasks::PromptKind::Budget)
        .cloned()
        .collect();
    assert_eq!(budget_prompts.len(), 1);
    let id = budget_prompts[0].id.clone();
    assert!(
        budget_prompts[0]
            .text
            .ends_with("allow 100 more tokens? (yes/no)")
    );

    // A host answer of yes allows as much again; nothing is typed into the task.
    let answered = HostFiles {
        answers: BTreeMap::from([(id.clone(), Ok("yes\n".to_owned()))]),
        ..HostFiles::default()
    };
    let (sent, _) = state.tick(&mut conn, &answered);
    assert!(
        !sent.iter().any(|m| matches!(m, HostMessage::Input { .. })),
        "{sent:?}"
    );
    assert_eq!(state.prompts[&id].state, PromptState::Answered);
    assert_eq!(
        state.egress_admit("vm-1", Some(&task)),
        Ok(Default::default())
    );

    // Spent again: a new prompt; a no keeps the connections refused, with no more prompts.
    spend(&mut state, 100);
    let refused = state.egress_admit("vm-1", Some(&task)).expect_err("spent");
    // The yes moved the limit to what was used (120) plus the budget once more.
    assert!(
        refused.contains("has used 220 tokens of its budget of 220"),
        "{refused}"
    );
    let second = state.records["ask"]
        .egress
        .as_ref()
        .and_then(|e| e.budget_prompt.clone())
        .expect("a second prompt");
    assert_ne!(second, id);
    let declined = HostFiles {
        answers: BTreeMap::from([(second.clone(), Ok("no".to_owned()))]),
        ..HostFiles::default()
    };
    state.tick(&mut conn, &declined);
    let refused = state
        .egress_admit("vm-1", Some(&task))
        .expect_err("declined");
    assert!(
        refused.ends_with("a human declined to allow more"),
        "{refused}"
    );
    assert_eq!(
        state
            .prompts
            .values()
            .filter(|p| p.state == PromptState::Pending)
            .count(),
        0
    );
}

#[test]
fn open_connections_count_unread_answers_fail_closed_and_finished_runs_take_none() {
    let mut wanted = desired(Duration::from_secs(60), OnDeadline::Wait);
    wanted.egress.insert(
        "vm-1".into(),
        crate::egress::Policy {
            budget: Some(crate::egress::Budget {
                connections: Some(2),
                tokens: Some(1000),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let (mut state, _conn, task) = started_with(&wanted);
    // Two connections open at once use up a budget of two: a third waits for neither.
    assert_eq!(
        state.egress_admit("vm-1", Some(&task)),
        Ok(Default::default())
    );
    assert_eq!(
        state.egress_admit("vm-1", Some(&task)),
        Ok(Default::default())
    );
    let refused = state
        .egress_admit("vm-1", Some(&task))
        .expect_err("two open");
    assert!(
        refused.contains("has used 2 connections of its budget of 2"),
        "{refused}"
    );
    // An answer whose usage could not be read counts as the token budget reached.
    let ended = |unread: Option<&'static str>| crate::broker::Used {
        task: Some(task.clone()),
        destination: "POST https://api.anthropic.com/v1/messages".into(),
        rule: Some("loadout agent egress.credentials[0]".into()),
        status: Some(200),
        bytes_up: 1,
        bytes_down: 1,
        tokens: Some(crate::tokens::Metered {
            tokens: crate::tokens::Tokens {
                input: 5,
                output: 0,
            },
            unreadable: unread,
        }),
        admitted: true,
        started: SystemTime::UNIX_EPOCH + T0,
        duration: Duration::from_millis(1),
    };
    state.egress_used("vm-1", ended(Some("a compressed body")));
    let refused = state.egress_admit("vm-1", Some(&task)).expect_err("unread");
    assert!(
        refused.contains("did not say how many tokens they used"),
        "{refused}"
    );
    assert_eq!(
        state.records["ask"].egress.as_ref().map(|e| e.tokens_in),
        Some(5)
    );

    // Once the run has ended, nothing names it: no admission, no prompt, no counting.
    state.egress_used("vm-1", ended(None));
    state.finish(
        "ask",
        crate::status::tasks::TaskPhase::Succeeded,
        Some(0),
        "done",
    );
    let prompts = state.prompts.len();
    assert!(state.egress_admit("vm-1", Some(&task)).is_err());
    assert_eq!(state.prompts.len(), prompts);
    let before = state.records["ask"].egress.clone();
    state.egress_used(
        "vm-1",
        crate::broker::Used {
            admitted: false,
            ..ended(None)
        },
    );
    assert_eq!(state.records["ask"].egress, before);
    assert!(
        state
            .prompts
            .values()
            .all(|p| p.state != PromptState::Pending),
        "the run's end withdrew its budget prompt"
    );
}

#[test]
fn a_task_narrows_its_loadouts_rules_and_budget_for_its_own_runs() {
    let mut wanted = desired(Duration::from_secs(60), OnDeadline::Wait);
    wanted.egress.insert(
        "vm-1".into(),
        crate::egress::Policy {
            budget: Some(crate::egress::Budget {
                connections: Some(10),
                tokens: Some(1000),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let rule = crate::egress::Rule {
        host: crate::egress::HostPattern::parse("api.example.com").expect("pattern"),
        ports: vec![443],
        path_prefixes: Vec::new(),
        source: "task ask egress.allow[0]".into(),
    };
    wanted.tasks.get_mut("ask").expect("ask").egress = Some(crate::egress::Narrowing {
        rules: vec![rule.clone()],
        budget: Some(crate::egress::Budget {
            connections: Some(1),
            ..Default::default()
        }),
    });
    let (mut state, _conn, task) = started_with(&wanted);
    // The task's rules come with the admission; its budget of one connection is the
    // smaller, and the loadout's token limit still applies.
    let admitted = state.egress_admit("vm-1", Some(&task)).expect("admitted");
    assert_eq!(admitted.narrowed, [rule]);
    let refused = state
        .egress_admit("vm-1", Some(&task))
        .expect_err("one open");
    assert!(
        refused.contains("1 connections of its budget of 1"),
        "{refused}"
    );
    assert_eq!(
        state.budget_of("vm-1", "ask").and_then(|b| b.tokens),
        Some(1000)
    );
}

#[test]
fn a_vm_that_resets_gets_one_run_a_reset_even_of_the_same_task_again() {
    let mut wanted = desired(Duration::from_secs(60), OnDeadline::Wait);
    let mut state = BookState {
        now: at(0),
        ..BookState::default()
    };
    state.used_since_reset = BTreeMap::from([("vm-1".to_owned(), false)]);
    state.sync(&wanted, &BTreeSet::from(["vm-1".to_owned()]));
    state.take_effects();
    let mut conn = Connection::new("vm-1");
    conn.greeted("boot-1", None);
    // Clean: the run goes, and the VM is marked used before the guest hears of it.
    let (sent, _) = state.tick(&mut conn, &HostFiles::default());
    let Some(HostMessage::RunTask { task, .. }) = sent.first() else {
        panic!("expected a RunTask, got {sent:?}");
    };
    assert_eq!(std::mem::take(&mut state.effects.used), ["vm-1"]);
    let exit = GuestMessage::Exit {
        v: VERSION,
        task: task.clone(),
        seq: 1,
        code: Some(0),
        reason: ExitReason::Completed,
    };
    state.now = at(5);
    state.receive(&mut conn, vec![exit]);
    assert!(
        state.effects.plan_again,
        "a run ended on it: plan (its reset) now"
    );
    state.take_effects();
    // The same task runs again: its new record holds no sign the VM was used, the mark
    // does, so the run waits for the reset.
    wanted.tasks.get_mut("ask").expect("task").spec_hash = "h2".into();
    state.sync(&wanted, &BTreeSet::from(["vm-1".to_owned()]));
    assert_eq!(state.records["ask"].phase, TaskPhase::Pending);
    let (sent, _) = state.tick(&mut conn, &HostFiles::default());
    assert!(
        !sent
            .iter()
            .any(|m| matches!(m, HostMessage::RunTask { .. })),
        "{sent:?}"
    );
    // Reset (apply cleared the mark; the next sync reads it): on the new boot, it goes.
    state.used_since_reset.insert("vm-1".into(), false);
    let mut conn = Connection::new("vm-1");
    conn.greeted("boot-2", None);
    let (sent, _) = state.tick(&mut conn, &HostFiles::default());
    assert!(
        sent.iter()
            .any(|m| matches!(m, HostMessage::RunTask { .. })),
        "{sent:?}"
    );
}

/// `fleet task cancel`: the run it names is stopped and ends Cancelled saying who; a cancel
/// naming another run (an earlier one) changes nothing.
#[test]
fn a_host_cancel_stops_the_run_it_names_and_no_other() {
    let (mut state, mut conn, task) = started(Duration::from_secs(60), OnDeadline::Wait);
    let run = state.records["ask"].run.clone();
    let cancel = |run: &str| HostFiles {
        cancels: BTreeMap::from([(
            "ask".to_owned(),
            crate::status::tasks::HostCancel {
                run: run.to_owned(),
                by: "alice".into(),
                at: at(3).wall.into(),
            },
        )]),
        ..HostFiles::default()
    };
    let (sent, _) = state.tick(&mut conn, &cancel("0badc0de"));
    assert!(sent.is_empty(), "another run's cancel: {sent:?}");
    assert_eq!(state.records["ask"].cancelled_by, None);

    let (sent, _) = state.tick(&mut conn, &cancel(&run));
    assert_eq!(
        sent,
        [HostMessage::Cancel {
            v: VERSION,
            task: task.clone()
        }]
    );
    // Sent once, however often the cancel is read again.
    let (sent, _) = state.tick(&mut conn, &cancel(&run));
    assert!(sent.is_empty(), "{sent:?}");
    state.receive(
        &mut conn,
        vec![GuestMessage::Exit {
            v: VERSION,
            task,
            seq: 1,
            code: None,
            reason: ExitReason::Cancelled,
        }],
    );
    let record = &state.records["ask"];
    assert_eq!(record.phase, TaskPhase::Cancelled);
    let message = record.message.as_deref().unwrap_or_default();
    assert!(
        message.contains("cancelled from the host by alice"),
        "{message}"
    );
    // The same task file starts no new run: it already ran for this spec.
    let (sent, _) = state.tick(&mut conn, &HostFiles::default());
    assert!(sent.is_empty(), "{sent:?}");
}

/// A run that has not started ends at once, without reaching any guest.
#[test]
fn a_host_cancel_of_a_pending_run_ends_it_at_once() {
    let mut state = BookState {
        now: at(0),
        ..BookState::default()
    };
    // The VM is not running: the run waits.
    state.sync(
        &desired(Duration::from_secs(60), OnDeadline::Wait),
        &BTreeSet::new(),
    );
    assert_eq!(state.records["ask"].phase, TaskPhase::Pending);
    let run = state.records["ask"].run.clone();
    state.apply_host_cancels(&BTreeMap::from([(
        "ask".to_owned(),
        crate::status::tasks::HostCancel {
            run,
            by: "bob".into(),
            at: at(1).wall.into(),
        },
    )]));
    assert_eq!(state.records["ask"].phase, TaskPhase::Cancelled);
    let mut conn = Connection::new("vm-1");
    conn.greeted("boot-1", None);
    let (sent, _) = state.tick(&mut conn, &HostFiles::default());
    assert!(
        sent.is_empty(),
        "a cancelled run is never dispatched: {sent:?}"
    );
}
