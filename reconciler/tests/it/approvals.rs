//! Destroy safety on real libvirtd with `fleet apply`: a protected VM survives the deletion of
//! its file, destroys beyond `maxDestroysPerApply` wait, `policy.approve` holds a step kind, a
//! revision that empties the provider waits; an approval naming another digest is refused and
//! noted, and the right digest (committed, or as a host file) releases exactly the held steps.

use crate::libvirt::{Cleanup, domains, enabled, fleet_yaml_with_policy, virsh, vm_yaml};
use crate::support::Repo;

/// The approval id and digest `fleet apply` printed for held steps.
pub fn held_approval(stdout: &str) -> (String, String) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("Held for approval ("))
        .unwrap_or_else(|| panic!("no held steps in:\n{stdout}"));
    let id = line["Held for approval (".len()..]
        .split(';')
        .next()
        .expect("id")
        .to_owned();
    let digest = line
        .rsplit("spec.approve: ")
        .next()
        .expect("digest")
        .trim_end_matches("):")
        .trim_matches('"')
        .to_owned();
    assert_eq!(digest.len(), 64, "{line}");
    (id, digest)
}

/// `fleet apply` on a revision that empties the provider: the destroys wait for an approval,
/// which the host then gives (`fleet hitl answer`), and a second apply runs them.
pub fn apply_emptying(repo: &Repo) {
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(0);
    assert!(
        run.stdout()
            .contains("this revision destroys every VM fleet runs on provider"),
        "{}",
        run.stdout()
    );
    let (id, digest) = held_approval(&run.stdout());
    repo.fleet(&["hitl", "answer", &id, &digest]).expect_code(0);
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
}

fn approval_yaml(id: &str, digest: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: Answer\nmetadata: {{name: {id}}}\nspec: {{approve: \"{digest}\"}}\n"
    )
}

#[test]
fn dangerous_steps_wait_for_an_approval_of_exactly_them() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-appr-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let name = |n: &str| format!("{prefix}{n}");
    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}appr", std::process::id()),
            "{shutdownTimeout: 5s, maxDestroysPerApply: 1, approve: [stop]}",
        ),
    );
    for n in ["a", "b", "c"] {
        repo.write(&format!("fleet/vms/{n}.yaml"), vm_yaml(&name(n), "128Mi"));
    }
    repo.write(
        "fleet/vms/p.yaml",
        vm_yaml(&name("p"), "128Mi").replace("image: micro,", "image: micro, protect: true,"),
    );
    repo.commit("four VMs, one protected");
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    assert_eq!(
        domains(&prefix),
        [name("a"), name("b"), name("c"), name("p")]
    );

    // Deleting the protected VM's file does not lift its protection, and two destroys are
    // over the cap of one: nothing is destroyed.
    repo.remove("fleet/vms/p.yaml")
        .remove("fleet/vms/a.yaml")
        .remove("fleet/vms/b.yaml");
    repo.commit("remove three");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(0);
    let out = run.stdout();
    assert!(
        out.contains(&format!(
            "{} is protected (recorded in its stamp)",
            name("p")
        )),
        "{out}"
    );
    assert!(
        out.contains("this plan destroys 2 VMs, more than policy.maxDestroysPerApply (1)"),
        "{out}"
    );
    assert_eq!(
        domains(&prefix),
        [name("a"), name("b"), name("c"), name("p")]
    );
    let (id, digest) = held_approval(&out);
    let record = crate::daemon::read(&repo.path().join(format!(".fleet/status/hitl/{id}.yaml")));
    assert!(record.contains("state: pending"), "{record}");
    assert!(
        record.contains(&format!("planDigest: {digest}")),
        "{record}"
    );

    // An approval naming another digest is refused and noted; nothing is destroyed.
    let wrong = "0".repeat(64);
    repo.write(&format!("fleet/hitl/{id}.yaml"), approval_yaml(&id, &wrong));
    repo.commit("a wrong approval");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(0);
    assert_eq!(
        held_approval(&run.stdout()).1,
        digest,
        "committing did not move it"
    );
    assert_eq!(
        domains(&prefix),
        [name("a"), name("b"), name("c"), name("p")]
    );
    let record = crate::daemon::read(&repo.path().join(format!(".fleet/status/hitl/{id}.yaml")));
    assert!(
        record.contains("names digest") && record.contains(&wrong),
        "{record}"
    );

    // The right digest, from the host: the held steps run.
    let list = repo.fleet(&["hitl", "list"]);
    assert!(
        list.stdout()
            .contains(&format!("{id}  pending  approval of 3 held step(s)")),
        "{}",
        list.stdout()
    );
    let refused = repo.fleet(&["hitl", "answer", &id, &wrong]);
    refused.expect_code(1);
    assert!(
        refused.stderr().contains("is not the digest of the steps"),
        "{}",
        refused.stderr()
    );
    repo.fleet(&["hitl", "answer", &id, &digest]).expect_code(0);
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(0);
    assert!(
        run.stdout().contains("Plan: 3 to destroy."),
        "{}",
        run.stdout()
    );
    assert_eq!(domains(&prefix), [name("c")]);
    let record = crate::daemon::read(&repo.path().join(format!(".fleet/status/hitl/{id}.yaml")));
    assert!(record.contains("state: approved"), "{record}");
    assert!(
        record.contains("(host file)"),
        "who approved, from the host: {record}"
    );

    // policy.approve holds a stop; a committed approval releases it.
    repo.write(
        "fleet/vms/c.yaml",
        vm_yaml(&name("c"), "128Mi").replace("image: micro,", "image: micro, state: stopped,"),
    );
    repo.commit("stop c");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    assert!(
        run.stdout().contains("policy.approve lists stop"),
        "{}",
        run.stdout()
    );
    let (id, digest) = held_approval(&run.stdout());
    repo.write(
        &format!("fleet/hitl/{id}.yaml"),
        approval_yaml(&id, &digest),
    );
    repo.commit("approve the stop");
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    let state = virsh(&["domstate", &name("c")]);
    assert!(
        String::from_utf8_lossy(&state.stdout).contains("shut off"),
        "{}",
        String::from_utf8_lossy(&state.stdout)
    );

    // A revision with no VM left on the provider waits, whatever the cap says.
    repo.remove("fleet/vms/c.yaml");
    repo.commit("fleet/ emptied");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    assert!(
        run.stdout()
            .contains("this revision destroys every VM fleet runs on provider local"),
        "{}",
        run.stdout()
    );
    assert_eq!(domains(&prefix), [name("c")]);
    let (id, digest) = held_approval(&run.stdout());
    repo.write(
        &format!("fleet/hitl/{id}.yaml"),
        approval_yaml(&id, &digest),
    );
    repo.commit("yes, empty it");
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    assert!(domains(&prefix).is_empty());
}

/// A plan saved while a step was held stays good after the host approves that step: the
/// saved plan is checked against a plan that counts only the approval it counted, and the
/// apply then runs the step the approval released. Nothing is taken or recorded before the
/// check: a saved plan that is stale changes nothing.
#[test]
fn a_saved_plan_runs_the_step_approved_after_it_was_saved() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-saved-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}saved", std::process::id()),
            "{shutdownTimeout: 5s, approve: [stop]}",
        ),
    );
    repo.write(&format!("fleet/vms/{vm}.yaml"), vm_yaml(&vm, "128Mi"));
    repo.commit("one VM");
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);

    repo.write(
        &format!("fleet/vms/{vm}.yaml"),
        vm_yaml(&vm, "128Mi").replace("image: micro,", "image: micro, state: stopped,"),
    );
    repo.commit("stop it");
    // The stop waits for an approval; apply writes the record an answer needs.
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(0);
    let (id, digest) = held_approval(&run.stdout());
    let old_plan = repo.path().join("old-plan.json");
    repo.fleet(&["plan", "--out", old_plan.to_str().expect("utf8")])
        .expect_code(0);
    repo.write("fleet/README.md", "notes\n");
    repo.commit("an unrelated commit");
    // Saved while the stop is held, before anyone approved it.
    let planfile = repo.path().join("plan.json");
    repo.fleet(&["plan", "--out", planfile.to_str().expect("utf8")])
        .expect_code(0);
    repo.fleet(&["hitl", "answer", &id, &digest]).expect_code(0);
    let answer_file = repo.path().join(format!(".fleet/status/hitl/{id}.answer"));

    // A stale saved plan (another revision) is refused before the host file is taken.
    let stale = repo.fleet(&["apply", "--auto-approve", old_plan.to_str().expect("utf8")]);
    stale.expect_code(1);
    assert!(stale.stderr().contains("stale plan"), "{}", stale.stderr());
    assert!(
        answer_file.exists(),
        "the approval was not taken by a refused apply"
    );

    // The plan saved while the stop was held runs, and the approval releases the stop.
    let applied = repo.fleet(&["apply", "--auto-approve", planfile.to_str().expect("utf8")]);
    applied.expect_code(0);
    assert!(
        applied.stdout().contains(&format!("Approved ({id};")),
        "{}",
        applied.stdout()
    );
    let state = virsh(&["domstate", &vm]);
    assert!(
        String::from_utf8_lossy(&state.stdout).contains("shut off"),
        "{}",
        String::from_utf8_lossy(&state.stdout)
    );
    assert!(!answer_file.exists(), "the host file was read once");
}
