//! Hostile input, generated (proptest): the loader and the answer checks never panic, and
//! what they accept keeps their promises. Each property runs `FLEET_FUZZ_CASES` cases
//! (default 256, a few seconds; `make fuzz` runs many more). A panic fails the case, and
//! proptest shrinks it to a small reproduction.

use proptest::prelude::*;

use fleet::source::{Revision, Snapshot, SourceFile};

fn cases() -> u32 {
    std::env::var("FLEET_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

const FLEET: &str = "apiVersion: fleet/v1
kind: Fleet
metadata: {name: lab}
spec:
  providers:
    - {name: local, type: libvirt, domainType: qemu}
  images:
    - {name: micro, kernel: vmlinuz, initrd: initrd.img}
";

const HOST: &str = "apiVersion: fleet/v1
kind: Host
spec:
  providers:
    - {name: local, type: libvirt, uri: 'qemu:///system'}
  repositories: ['https://git.example.org/**']
  limits: {maxVms: 50}
";

fn host() -> fleet::spec::HostSpec {
    fleet::load::load_host("host.yaml", HOST.as_bytes()).expect("the fuzz host configuration")
}

/// Valid files of every kind: the seeds that mutations start from.
const SEEDS: &[(&str, &str)] = &[
    (
        "fleet/vms/a.yaml",
        "apiVersion: fleet/v1\nkind: VM\nmetadata:\n  name: a\n  labels: {team: infra}\nspec:\n  provider: local\n  image: micro\n  loadout: dev\n  resources: {cpus: 2, memory: 512Mi}\n  state: running\n",
    ),
    (
        "fleet/loadouts/dev.yaml",
        "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: dev}\nspec:\n  packages: [git]\n  files:\n    - {path: /etc/motd, content: \"hi\\n\", mode: \"0644\"}\n  runcmd: [\"echo ready\"]\n  users: [{name: agent, groups: [adm], shell: /bin/sh}]\n  secrets: [{secret: api, key: token, file: api/token}]\n  env: {A: b}\n",
    ),
    (
        "fleet/tasks/t.yaml",
        "apiVersion: fleet/v1\nkind: Task\nmetadata: {name: t}\nspec:\n  vm: a\n  command: [sh, -c, 'echo hi']\n  timeout: 10m\n  artifacts: ['out/*']\n  secrets: [{secret: api, key: token, env: TOKEN}]\n  prompts: {patterns: ['proceed\\?'], deadline: 1h, onDeadline: fail}\n",
    ),
    (
        "fleet/vms/pool.yaml",
        "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {name: p}\nspec:\n  replicas: 3\n  template:\n    spec: {provider: local, image: micro}\n",
    ),
    (
        "fleet/hitl/t-0a1b2c3d-1.yaml",
        "apiVersion: fleet/v1\nkind: Answer\nmetadata: {name: t-0a1b2c3d-1}\nspec: {response: \"yes\"}\n",
    ),
    (
        "fleet/secrets/api.yaml",
        "apiVersion: fleet/v1\nkind: Secret\nmetadata: {name: api}\nspec:\n  allowed: {loadouts: [dev], tasks: [t]}\n  data:\n    token: |\n      -----BEGIN AGE ENCRYPTED FILE-----\n      YWdlLWVuY3J5cHRpb24ub3JnL3YxCg==\n      -----END AGE ENCRYPTED FILE-----\n",
    ),
];

fn snapshot(files: Vec<(String, Vec<u8>)>) -> Snapshot {
    let mut all: Vec<SourceFile> = files
        .into_iter()
        .map(|(path, bytes)| SourceFile { path, bytes })
        .collect();
    if !all.iter().any(|f| f.path == "fleet/fleet.yaml") {
        all.push(SourceFile {
            path: "fleet/fleet.yaml".into(),
            bytes: FLEET.as_bytes().to_vec(),
        });
    }
    all.sort_by(|a, b| a.path.cmp(&b.path));
    all.dedup_by(|a, b| a.path == b.path);
    Snapshot {
        revision: Revision {
            id: "0".repeat(40),
            label: "fuzz".into(),
            signed_by: None,
        },
        fleet_dir: "fleet".into(),
        files: all,
        signers: Default::default(),
    }
}

/// Loads and checks the promises every outcome keeps: diagnostics point into files of the
/// snapshot at a real position; a loaded revision resolves.
fn load_and_check(snapshot: &Snapshot) -> Result<(), TestCaseError> {
    let host = host();
    match fleet::load::load(snapshot, Some(&host)) {
        Ok(loaded) => {
            let desired = fleet::resolve::resolve(&loaded, &host);
            for d in fleet::resolve::check(&desired, &host) {
                prop_assert!(
                    snapshot.files.iter().any(|f| f.path == d.path),
                    "limit diagnostic for a file that is not there: {d}"
                );
            }
        }
        Err(diags) => {
            prop_assert!(!diags.is_empty(), "an error without a diagnostic");
            for d in &diags {
                prop_assert!(
                    snapshot.files.iter().any(|f| f.path == d.path),
                    "diagnostic for a file that is not there: {d}"
                );
                prop_assert!(d.line >= 1 && d.column >= 1, "position 0 in {d}");
                prop_assert!(!d.message.is_empty());
            }
        }
    }
    Ok(())
}

/// One edit of a file: insert, delete or overwrite a byte at a position.
#[derive(Clone, Debug)]
enum Edit {
    Insert(usize, u8),
    Delete(usize),
    Overwrite(usize, u8),
}

/// Bytes that matter to YAML more than most.
fn yaml_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => prop::sample::select(b":-[]{}#&*!|>'\"%@`,? \n\t\\".to_vec()),
        1 => any::<u8>(),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), yaml_byte()).prop_map(|(at, b)| Edit::Insert(at, b)),
        any::<usize>().prop_map(Edit::Delete),
        (any::<usize>(), yaml_byte()).prop_map(|(at, b)| Edit::Overwrite(at, b)),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let len = bytes.len();
        match *e {
            Edit::Insert(at, b) => bytes.insert(at % (len + 1), b),
            Edit::Delete(at) if len > 0 => {
                bytes.remove(at % len);
            }
            Edit::Overwrite(at, b) if len > 0 => bytes[at % len] = b,
            _ => {}
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_loader_survives_any_bytes_in_any_place(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        place in prop::sample::select(vec![
            "fleet/fleet.yaml", "fleet/vms/x.yaml", "fleet/loadouts/x.yaml",
            "fleet/tasks/x.yaml", "fleet/hitl/x.yaml", "fleet/secrets/x.yaml", "fleet/x.yaml",
        ]),
    ) {
        load_and_check(&snapshot(vec![(place.to_owned(), bytes)]))?;
    }

    #[test]
    fn the_host_configuration_survives_any_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..2048),
        edits in prop::collection::vec(edit(), 0..12),
    ) {
        for input in [bytes, apply(HOST.as_bytes().to_vec(), &edits)] {
            if let Err(diags) = fleet::load::load_host("/etc/fleet/host.yaml", &input) {
                prop_assert!(!diags.is_empty(), "an error without a diagnostic");
                for d in &diags {
                    prop_assert_eq!(&d.path, "/etc/fleet/host.yaml");
                    prop_assert!(d.line >= 1 && d.column >= 1, "position 0 in {}", d);
                }
            }
        }
    }

    #[test]
    fn the_loader_survives_edited_valid_files(
        edits in prop::collection::vec((0..SEEDS.len(), edit()), 1..12),
    ) {
        let mut files: Vec<(String, Vec<u8>)> = SEEDS
            .iter()
            .map(|(p, t)| ((*p).to_owned(), t.as_bytes().to_vec()))
            .collect();
        for (which, e) in &edits {
            let bytes = std::mem::take(&mut files[*which].1);
            files[*which].1 = apply(bytes, std::slice::from_ref(e));
        }
        load_and_check(&snapshot(files))?;
    }

    #[test]
    fn an_accepted_answer_is_one_bounded_line_of_plain_text(text in any::<String>()) {
        match fleet::answer::answer_problem(&text, false) {
            None => {
                prop_assert!(text.len() <= 4096);
                prop_assert!(!text.chars().any(char::is_control), "{text:?}");
            }
            Some(why) => prop_assert!(!why.is_empty()),
        }
        let from_file = fleet::hitl::answer_from_file(&text);
        prop_assert!(text.starts_with(from_file));
        prop_assert!(text.len() - from_file.len() <= 2);
    }

    #[test]
    fn a_committed_answer_loads_only_as_plain_text(response in any::<String>()) {
        let quoted = serde_json::to_string(&response).expect("a JSON string is a YAML string");
        let file = format!(
            "apiVersion: fleet/v1\nkind: Answer\nmetadata: {{name: p-1}}\nspec: {{response: {quoted}}}\n"
        );
        let snap = snapshot(vec![("fleet/hitl/p-1.yaml".into(), file.into_bytes())]);
        load_and_check(&snap)?;
        if let Ok(loaded) = fleet::load::load(&snap, Some(&host())) {
            let got = loaded.answers["p-1"].doc.spec.response.clone().unwrap_or_default();
            prop_assert_eq!(&got, &response);
            prop_assert!(fleet::answer::answer_problem(&got, false).is_none());
        }
    }
}
