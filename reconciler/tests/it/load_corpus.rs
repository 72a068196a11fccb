//! The bad-input corpus: each case is a small fleet/ tree and the exact diagnostics it must
//! produce (`PATH:LINE:COL: error: MESSAGE`). None may panic; none may load.
//! `UPDATE_EXPECT=1 cargo test` rewrites the expectations (review the diff).

use expect_test::{Expect, expect};
use fleet::source::{Revision, Snapshot, SourceFile};

const FLEET: &str = "apiVersion: fleet/v1
kind: Fleet
metadata:
  name: lab
spec:
  providers:
    - name: local
      type: libvirt
  images:
    - name: micro
      kernel: micro/vmlinuz
      initrd: micro/initrd.img
";

/// The host configuration every case is loaded under: a libvirt provider `local`, a
/// Proxmox provider `pve` whose token is the Secret `pve`/`token`, one allowed repository
/// pattern, and small limits.
pub const HOST: &str = "apiVersion: fleet/v1
kind: Host
spec:
  providers:
    - {name: local, type: libvirt, uri: 'qemu:///system'}
    - name: pve
      type: proxmox
      endpoint: https://pve.example.org:8006
      node: pve1
      token: {id: 'fleet@pve!fleet', file: /etc/fleet/pve.token}
  repositories: ['https://git.example.org/team/*']
  limits: {maxVms: 8, maxCpus: 16, maxMemory: 8Gi}
";

pub fn host() -> fleet::spec::HostSpec {
    host_from(HOST)
}

fn host_from(text: &str) -> fleet::spec::HostSpec {
    fleet::load::load_host("/etc/fleet/host.yaml", text.as_bytes()).expect("the corpus host")
}

/// The corpus host, with the Proxmox token kept as the Secret `pve`/`token`.
fn token_secret_host() -> fleet::spec::HostSpec {
    host_from(&HOST.replace(
        "file: /etc/fleet/pve.token",
        "secret: {secret: pve, key: token}",
    ))
}

const VM: &str = "apiVersion: fleet/v1
kind: VM
metadata:
  name: a
spec:
  provider: local
  image: micro
";

fn snapshot(files: &[(&str, &[u8])], with_fleet: bool) -> Snapshot {
    let mut all: Vec<SourceFile> = files
        .iter()
        .map(|(p, b)| SourceFile {
            path: (*p).to_owned(),
            bytes: b.to_vec(),
        })
        .collect();
    if with_fleet && !files.iter().any(|(p, _)| *p == "fleet/fleet.yaml") {
        all.push(SourceFile {
            path: "fleet/fleet.yaml".into(),
            bytes: FLEET.as_bytes().to_vec(),
        });
    }
    all.sort_by(|a, b| a.path.cmp(&b.path));
    Snapshot {
        revision: Revision {
            id: "0".repeat(40),
            label: "test".into(),
            signed_by: None,
        },
        fleet_dir: "fleet".into(),
        files: all,
        signers: Default::default(),
    }
}

fn diagnostics(snapshot: &Snapshot) -> String {
    diagnostics_under(snapshot, &host())
}

fn diagnostics_under(snapshot: &Snapshot, host: &fleet::spec::HostSpec) -> String {
    let host = host.clone();
    match fleet::load::load(snapshot, Some(&host)) {
        Ok(loaded) => {
            let desired = fleet::resolve::resolve(&loaded, &host);
            let over = fleet::resolve::check(&desired, &host);
            if over.is_empty() {
                "loaded without diagnostics\n".to_owned()
            } else {
                over.iter().map(|d| format!("{d}\n")).collect()
            }
        }
        Err(diags) => {
            assert!(!diags.is_empty());
            diags.iter().map(|d| format!("{d}\n")).collect()
        }
    }
}

fn check_under_token_secret_host(files: &[(&str, &str)], expect: Expect) {
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, t)| (*p, t.as_bytes())).collect();
    expect.assert_eq(&diagnostics_under(
        &snapshot(&files, true),
        &token_secret_host(),
    ));
}

/// The desired state of a revision that must load.
fn desired_of(files: &[(&str, &str)]) -> fleet::resolve::Desired {
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, t)| (*p, t.as_bytes())).collect();
    let host = host();
    let loaded = fleet::load::load(&snapshot(&files, true), Some(&host))
        .unwrap_or_else(|d| panic!("loads: {d:?}"));
    fleet::resolve::resolve(&loaded, &host)
}

fn check(files: &[(&str, &str)], expect: Expect) {
    let files: Vec<(&str, &[u8])> = files.iter().map(|(p, t)| (*p, t.as_bytes())).collect();
    expect.assert_eq(&diagnostics(&snapshot(&files, true)));
}

fn check_bytes(files: &[(&str, &[u8])], with_fleet: bool, expect: Expect) {
    expect.assert_eq(&diagnostics(&snapshot(files, with_fleet)));
}

fn vm_with(spec_tail: &str) -> String {
    format!("{VM}{spec_tail}")
}

#[test]
fn the_base_fleet_is_valid() {
    check(
        &[("fleet/vms/a.yaml", VM)],
        expect![[r#"
        loaded without diagnostics
    "#]],
    );
}

#[test]
fn yaml_unclosed_flow_sequence() {
    check(
        &[(
            "fleet/vms/a.yaml",
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: a}\nspec: {provider: local, image: [micro}\n",
        )],
        expect![[r#"
            fleet/vms/a.yaml:4:32: error: YAML syntax: mismatched bracket '[' closed by '}'
        "#]],
    );
}

#[test]
fn yaml_bad_indentation() {
    check(
        &[(
            "fleet/vms/a.yaml",
            "apiVersion: fleet/v1\nkind: VM\nmetadata:\n  name: a\n spec:\n  provider: local\n",
        )],
        expect![[r#"
            fleet/vms/a.yaml:5:2: error: YAML syntax: while parsing a block mapping, did not find expected key
        "#]],
    );
}

#[test]
fn yaml_unclosed_quote() {
    check(
        &[(
            "fleet/vms/a.yaml",
            "apiVersion: fleet/v1\nkind: VM\nmetadata:\n  name: \"a\nspec: {}\n",
        )],
        expect![[r#"
            fleet/vms/a.yaml:4:9: error: YAML syntax: unclosed quote
        "#]],
    );
}

#[test]
fn yaml_tab_indentation() {
    check(
        &[(
            "fleet/vms/a.yaml",
            "apiVersion: fleet/v1\nkind: VM\nmetadata:\n\tname: a\n",
        )],
        expect![[r#"
            fleet/vms/a.yaml:4:2: error: YAML syntax: tabs disallowed within this context (block indentation)
        "#]],
    );
}

#[test]
fn duplicate_top_level_key() {
    check(
        &[("fleet/vms/a.yaml", &format!("{VM}kind: VM\n"))],
        expect![[r#"
            fleet/vms/a.yaml:8:1: error: duplicate key `kind`: each key may appear once per mapping; remove the repeated one
        "#]],
    );
}

#[test]
fn duplicate_nested_key() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &vm_with("  resources:\n    cpus: 1\n    cpus: 2\n"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:10:5: error: duplicate key `cpus`: each key may appear once per mapping; remove the repeated one
        "#]],
    );
}

#[test]
fn multiple_documents_in_one_file() {
    check(
        &[("fleet/vms/a.yaml", &format!("{VM}---\n{VM}"))],
        expect![[r#"
            fleet/vms/a.yaml:9:1: error: this file holds several YAML documents (separated by ---); a file holds exactly one object, split them into separate files
        "#]],
    );
}

#[test]
fn document_is_a_list() {
    check(
        &[("fleet/vms/a.yaml", "- apiVersion: fleet/v1\n- kind: VM\n")],
        expect![[r#"
            fleet/vms/a.yaml:1:1: error: the document must be a mapping with apiVersion, kind, metadata and spec
        "#]],
    );
}

#[test]
fn empty_file() {
    check(
        &[("fleet/vms/a.yaml", "")],
        expect![[r#"
        fleet/vms/a.yaml:1:1: error: the document must be a mapping with apiVersion, kind, metadata and spec
    "#]],
    );
}

#[test]
fn missing_kind() {
    check(
        &[(
            "fleet/vms/a.yaml",
            "apiVersion: fleet/v1\nmetadata: {name: a}\nspec: {provider: local, image: micro}\n",
        )],
        expect![[r#"
            fleet/vms/a.yaml:1:1: error: missing required field `kind`; a file here holds kind VM or VMPool
        "#]],
    );
}

#[test]
fn unknown_kind() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &VM.replace("kind: VM", "kind: VirtualMachine"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:2:7: error: kind: "VirtualMachine" is not a fleet kind; valid here: VM or VMPool
        "#]],
    );
}

#[test]
fn kind_in_the_wrong_directory() {
    check(
        &[("fleet/loadouts/a.yaml", VM)],
        expect![[r#"
        fleet/loadouts/a.yaml:2:7: error: kind: VM does not belong in loadouts/a.yaml; a file here holds kind Loadout
    "#]],
    );
}

#[test]
fn wrong_api_version() {
    check(
        &[("fleet/vms/a.yaml", &VM.replace("fleet/v1", "fleet/v2"))],
        expect![[r#"
            fleet/vms/a.yaml:1:13: error: apiVersion: string "fleet/v2" is not valid; valid: fleet/v1
        "#]],
    );
}

#[test]
fn missing_metadata_name() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &VM.replace("  name: a\n", "  labels: {x: y}\n"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:4:3: error: metadata: missing required field `name`
        "#]],
    );
}

#[test]
fn name_with_upper_case() {
    check(
        &[("fleet/vms/a.yaml", &VM.replace("name: a", "name: Agent-01"))],
        expect![[r#"
            fleet/vms/a.yaml:4:9: error: metadata.name: string "Agent-01" is not valid; expected a lower-case DNS label: letters, digits and '-', at most 63 characters, starting and ending with a letter or digit
        "#]],
    );
}

#[test]
fn name_too_long() {
    let long = "a".repeat(64);
    check(
        &[(
            "fleet/vms/a.yaml",
            &VM.replace("name: a", &format!("name: {long}")),
        )],
        expect![[r#"
            fleet/vms/a.yaml:4:9: error: metadata.name: string "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa…" is not valid; expected a lower-case DNS label: letters, digits and '-', at most 63 characters, starting and ending with a letter or digit
        "#]],
    );
}

#[test]
fn name_ending_with_dash() {
    check(
        &[("fleet/vms/a.yaml", &VM.replace("name: a", "name: agent-"))],
        expect![[r#"
            fleet/vms/a.yaml:4:9: error: metadata.name: string "agent-" is not valid; expected a lower-case DNS label: letters, digits and '-', at most 63 characters, starting and ending with a letter or digit
        "#]],
    );
}

#[test]
fn unknown_top_level_field() {
    check(
        &[("fleet/vms/a.yaml", &format!("{VM}status: {{}}\n"))],
        expect![[r#"
            fleet/vms/a.yaml:8:1: error: status: unknown field; valid fields: apiVersion, kind, metadata, spec
        "#]],
    );
}

#[test]
fn unknown_field_with_a_suggestion() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &vm_with("  resources:\n    memroy: 1Gi\n"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:9:5: error: spec.resources.memroy: unknown field; did you mean `memory`? valid fields: cpus, memory, disk
        "#]],
    );
}

#[test]
fn unknown_metadata_field() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &VM.replace("  name: a\n", "  name: a\n  annotations: {}\n"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:5:3: error: metadata.annotations: unknown field; valid fields: name, labels
        "#]],
    );
}

#[test]
fn cpus_is_a_string() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &vm_with("  resources:\n    cpus: two\n"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:9:11: error: spec.resources.cpus: expected a whole number, found string "two"
        "#]],
    );
}

#[test]
fn yaml_1_1_boolean_is_refused() {
    check(
        &[("fleet/vms/a.yaml", &vm_with("  protect: yes\n"))],
        expect![[r#"
            fleet/vms/a.yaml:8:12: error: spec.protect: expected true or false, found string "yes"
        "#]],
    );
}

#[test]
fn labels_are_a_list() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &VM.replace("  name: a\n", "  name: a\n  labels: [a, b]\n"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:5:11: error: metadata.labels: expected a mapping, found a list
        "#]],
    );
}

#[test]
fn zero_cpus() {
    check(
        &[("fleet/vms/a.yaml", &vm_with("  resources:\n    cpus: 0\n"))],
        expect![[r#"
            fleet/vms/a.yaml:9:11: error: spec.resources.cpus: 0 is too small; the minimum is 1
        "#]],
    );
}

#[test]
fn too_many_cpus() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &vm_with("  resources:\n    cpus: 500\n"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:9:11: error: spec.resources.cpus: 500 is too large; the maximum is 128
        "#]],
    );
}

#[test]
fn memory_with_a_decimal_unit() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &vm_with("  resources:\n    memory: 2G\n"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:9:13: error: spec.resources.memory: string "2G" is not valid; expected a size with a binary unit: Mi, Gi or Ti (for example 512Mi or 2Gi)
        "#]],
    );
}

#[test]
fn memory_too_small() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &vm_with("  resources:\n    memory: 32Mi\n"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:9:13: error: spec.resources.memory: "32Mi" is out of bounds; memory must be 64Mi to 1Ti
        "#]],
    );
}

#[test]
fn memory_too_large() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &vm_with("  resources:\n    memory: 2Ti\n"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:9:13: error: spec.resources.memory: "2Ti" is out of bounds; memory must be 64Mi to 1Ti
        "#]],
    );
}

#[test]
fn disk_too_small_in_a_loadout() {
    check(
        &[
            ("fleet/vms/a.yaml", &vm_with("  loadout: dev\n")),
            (
                "fleet/loadouts/dev.yaml",
                "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: dev}\nspec:\n  resources: {disk: 512Mi}\n",
            ),
        ],
        expect![[r#"
            fleet/loadouts/dev.yaml:5:21: error: spec.resources.disk: "512Mi" is out of bounds; disk must be 1Gi to 16Ti
        "#]],
    );
}

#[test]
fn unknown_power_state() {
    check(
        &[("fleet/vms/a.yaml", &vm_with("  state: paused\n"))],
        expect![[r#"
            fleet/vms/a.yaml:8:10: error: spec.state: string "paused" is not valid; valid: running, stopped
        "#]],
    );
}

#[test]
fn unknown_network_mode() {
    check(
        &[("fleet/vms/a.yaml", &vm_with("  network: {mode: bridged}\n"))],
        expect![[r#"
            fleet/vms/a.yaml:8:19: error: spec.network.mode: string "bridged" is not valid; valid: isolated, full, brokered
        "#]],
    );
}

#[test]
fn allowlist_is_not_a_network_mode() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &vm_with("  network: {mode: allowlist}\n"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:8:19: error: spec.network.mode: string "allowlist" is not valid; valid: isolated, full, brokered
        "#]],
    );
}

#[test]
fn egress_rules_are_checked_and_need_the_brokered_mode() {
    check(
        &[(
            "fleet/loadouts/dev.yaml",
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: dev}\nspec:\n  network: {mode: full}\n  egress:\n    allow:\n      - {host: '*.com'}\n      - {host: 'api.example.com', paths: ['/a/../b']}\n      - {host: 'http://x.example.com'}\n",
        )],
        expect![[r#"
            fleet/loadouts/dev.yaml:6:3: error: spec.egress: egress rules take effect only with network.mode: brokered; set it, or remove them
            fleet/loadouts/dev.yaml:8:16: error: spec.egress.allow[0].host: "*.com" allows every name under a top-level domain; name a domain you mean, such as *.example.com
            fleet/loadouts/dev.yaml:9:43: error: spec.egress.allow[1].paths[0]: "/a/../b" holds a . or .. segment; write a plain prefix such as /repos/team/
            fleet/loadouts/dev.yaml:10:16: error: spec.egress.allow[2].host: "http://x.example.com" is not a host name, *.domain or IP address; write a name such as api.example.com, *.example.com, or an address such as 10.0.0.5
        "#]],
    );
}

#[test]
fn egress_credentials_are_checked_and_go_only_where_their_secret_allows() {
    check(
        &[
            (
                "fleet/loadouts/dev.yaml",
                "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: dev}\nspec:\n  network: {mode: brokered}\n  egress:\n    credentials:\n      - {host: api.example.com, header: x-api-key, secret: {secret: api, key: token}}\n      - {host: '*.example.com', secret: {secret: api, key: token}}\n      - {host: git.example.com, scheme: basic, header: content-length, secret: {secret: api, key: nope}}\n      - {host: api.example.com, username: me, secret: {secret: none, key: token}}\n",
            ),
            (
                "fleet/loadouts/other.yaml",
                "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: other}\nspec:\n  network: {mode: brokered}\n  secrets: [{secret: api, key: token, env: KEY}]\n  egress:\n    credentials:\n      - {host: api.example.com, port: 8443, secret: {secret: api, key: token}}\n",
            ),
            (
                "fleet/secrets/api.yaml",
                &SECRET.replace(
                    "tasks: [t]}",
                    "tasks: [t], hosts: [api.example.com, '*.x.com']}",
                ),
            ),
        ],
        expect![[r#"
            fleet/loadouts/dev.yaml:9:16: error: spec.egress.credentials[1].host: "*.example.com": a credential is for one API host name (its TLS certificate names it); write its exact name
            fleet/loadouts/dev.yaml:9:50: error: spec.egress.credentials[1].secret.secret: Secret "api" (fleet/secrets/api.yaml) may not be sent to *.example.com; add *.example.com to the Secret's spec.allowed.hosts
            fleet/loadouts/dev.yaml:10:9: error: spec.egress.credentials[2]: scheme basic needs a username (for example x-access-token for a git host's token)
            fleet/loadouts/dev.yaml:10:56: error: spec.egress.credentials[2].header: "content-length" cannot carry a credential (a server might echo it back); use one of authorization, x-api-key, api-key, x-goog-api-key
            fleet/loadouts/dev.yaml:10:89: error: spec.egress.credentials[2].secret.secret: Secret "api" (fleet/secrets/api.yaml) may not be sent to git.example.com; add git.example.com to the Secret's spec.allowed.hosts
            fleet/loadouts/dev.yaml:10:99: error: spec.egress.credentials[2].secret.key: Secret "api" (fleet/secrets/api.yaml) has no key "nope"; its keys: token
            fleet/loadouts/dev.yaml:11:16: error: spec.egress.credentials[3].host: credential host "api.example.com" is already defined at line 8; credential host names must be unique
            fleet/loadouts/dev.yaml:11:43: error: spec.egress.credentials[3].username: a username is used only with scheme: basic; set that, or remove it
            fleet/loadouts/dev.yaml:11:64: error: spec.egress.credentials[3].secret.secret: no Secret named "none"; create one with `fleet secret set none KEY`
            fleet/loadouts/other.yaml:6:22: error: spec.secrets[0].secret: Secret "api" (fleet/secrets/api.yaml) lists allowed.hosts: its values go only to those APIs, through the host's broker, never into a guest; use it in egress.credentials
            fleet/loadouts/other.yaml:9:62: error: spec.egress.credentials[0].secret.secret: Secret "api" (fleet/secrets/api.yaml) does not allow loadout "other"; add it to the Secret's spec.allowed.loadouts
            fleet/loadouts/other.yaml:9:62: error: spec.egress.credentials[0].secret.secret: Secret "api" (fleet/secrets/api.yaml) may not be sent to api.example.com:8443; add api.example.com:8443 to the Secret's spec.allowed.hosts
            fleet/secrets/api.yaml:5:67: error: spec.allowed.hosts[1]: "*.x.com" is not an API host; write its exact name, with :port unless it is 443, for example api.anthropic.com
        "#]],
    );
}

#[test]
fn unknown_provider() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &VM.replace("provider: local", "provider: remote"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:6:13: error: spec.provider: no provider named "remote"; defined: local
        "#]],
    );
}

#[test]
fn unknown_image() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &VM.replace("image: micro", "image: debian"),
        )],
        expect![[r#"
            fleet/vms/a.yaml:7:10: error: spec.image: no image named "debian"; defined: micro
        "#]],
    );
}

#[test]
fn unknown_loadout_with_none_defined() {
    check(
        &[("fleet/vms/a.yaml", &vm_with("  loadout: dev\n"))],
        expect![[r#"
            fleet/vms/a.yaml:8:12: error: spec.loadout: no Loadout named "dev"; none are defined; add one to fleet/loadouts/
        "#]],
    );
}

#[test]
fn extends_an_unknown_loadout() {
    check(
        &[(
            "fleet/loadouts/dev.yaml",
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: dev}\nspec:\n  extends: [base]\n",
        )],
        expect![[r#"
            fleet/loadouts/dev.yaml:5:13: error: spec.extends[0]: no Loadout named "base"; defined: dev
        "#]],
    );
}

#[test]
fn loadout_extends_itself() {
    check(
        &[(
            "fleet/loadouts/dev.yaml",
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: dev}\nspec:\n  extends: [dev]\n",
        )],
        expect![[r#"
            fleet/loadouts/dev.yaml:5:13: error: spec.extends: cycle dev → dev; a loadout cannot extend itself, directly or through others
        "#]],
    );
}

#[test]
fn extends_cycle_through_three_loadouts() {
    let l = |name: &str, parent: &str| {
        format!(
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {{name: {name}}}\nspec:\n  extends: [{parent}]\n"
        )
    };
    check(
        &[
            ("fleet/loadouts/a.yaml", &l("a", "b")),
            ("fleet/loadouts/b.yaml", &l("b", "c")),
            ("fleet/loadouts/c.yaml", &l("c", "a")),
        ],
        expect![[r#"
            fleet/loadouts/c.yaml:5:13: error: spec.extends: cycle a → b → c → a; a loadout cannot extend itself, directly or through others
        "#]],
    );
}

#[test]
fn the_same_vm_name_in_two_files() {
    check(
        &[("fleet/vms/a.yaml", VM), ("fleet/vms/b.yaml", VM)],
        expect![[r#"
            fleet/vms/b.yaml:4:9: error: metadata.name: VM "a" is already defined at fleet/vms/a.yaml:4:9; names must be unique, rename one of them
        "#]],
    );
}

#[test]
fn duplicate_provider_names() {
    let fleet = FLEET.replace(
        "  images:",
        "    - name: local\n      type: libvirt\n  images:",
    );
    check(
        &[("fleet/fleet.yaml", &fleet)],
        expect![[r#"
            fleet/fleet.yaml:9:13: error: spec.providers[1].name: provider "local" is already defined at line 7; provider names must be unique
        "#]],
    );
}

#[test]
fn image_without_kernel_or_disk() {
    let fleet = format!("{FLEET}    - name: empty\n");
    check(
        &[("fleet/fleet.yaml", &fleet)],
        expect![[r#"
            fleet/fleet.yaml:13:7: error: spec.images[1]: image "empty" has neither kernel nor disk nor template; set kernel (and initrd) for direct kernel boot, disk for a qcow2 base image, or template for Proxmox
        "#]],
    );
}

#[test]
fn initrd_without_kernel() {
    let fleet = format!(
        "{FLEET}    - name: odd\n      disk: /var/lib/x.qcow2\n      initrd: /boot/initrd\n"
    );
    check(
        &[("fleet/fleet.yaml", &fleet)],
        expect![[r#"
            fleet/fleet.yaml:14:13: error: spec.images[1].disk: an absolute path; image files are named relative to the host's image root (imageRoot in the host configuration)
            fleet/fleet.yaml:15:7: error: spec.images[1].initrd: only used with direct kernel boot; set kernel as well or remove initrd
            fleet/fleet.yaml:15:15: error: spec.images[1].initrd: an absolute path; image files are named relative to the host's image root (imageRoot in the host configuration)
        "#]],
    );
}

#[test]
fn unknown_provider_type() {
    check(
        &[(
            "fleet/fleet.yaml",
            &FLEET.replace("type: libvirt", "type: vmware"),
        )],
        expect![[r#"
            fleet/fleet.yaml:8:13: error: spec.providers[0].type: string "vmware" is not valid; valid: libvirt, proxmox
        "#]],
    );
}

#[test]
fn provider_without_type() {
    check(
        &[(
            "fleet/fleet.yaml",
            &FLEET.replace("      type: libvirt\n", ""),
        )],
        expect![[r#"
            fleet/fleet.yaml:7:7: error: spec.providers[0]: missing required field `type`
        "#]],
    );
}

#[test]
fn fleet_without_providers() {
    check(
        &[(
            "fleet/fleet.yaml",
            "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: lab}\nspec:\n  providers: []\n",
        )],
        expect![[r#"
            fleet/fleet.yaml:5:14: error: spec.providers: needs at least 1 item(s)
        "#]],
    );
}

#[test]
fn bad_duration_in_policy() {
    check(
        &[(
            "fleet/fleet.yaml",
            &format!("{FLEET}  policy:\n    reconcileInterval: 1 minute\n"),
        )],
        expect![[r#"
            fleet/fleet.yaml:14:24: error: spec.policy.reconcileInterval: string "1 minute" is not valid; expected a duration: a whole number with a unit ms, s, m or h (for example 30s or 5m)
        "#]],
    );
}

#[test]
fn null_spec() {
    check(
        &[(
            "fleet/vms/a.yaml",
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: a}\nspec:\n",
        )],
        expect![[r#"
            fleet/vms/a.yaml:4:5: error: spec: expected a mapping, found nothing (null)
        "#]],
    );
}

fn pool(name: &str, replicas: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {{name: {name}}}\nspec:\n  replicas: {replicas}\n  template:\n    spec: {{provider: local, image: micro}}\n"
    )
}

#[test]
fn pool_member_clashes_with_a_vm() {
    check(
        &[
            ("fleet/vms/w.yaml", &pool("w", "3")),
            ("fleet/vms/w-02.yaml", &VM.replace("name: a", "name: w-02")),
        ],
        expect![[r#"
            fleet/vms/w.yaml:5:13: error: spec.replicas: pool member "w-02" clashes with the VM defined at fleet/vms/w-02.yaml:4:9; rename the pool or that object
        "#]],
    );
}

#[test]
fn pool_name_too_long_for_its_members() {
    check(
        &[("fleet/vms/p.yaml", &pool(&"p".repeat(62), "2"))],
        expect![[r#"
            fleet/vms/p.yaml:3:18: error: metadata.name: VM names made from this pool (pppppppppppppppppppppppppppppppppppppppppppppppppppppppppppppp-00) would be 65 characters; names are at most 63, shorten the pool name
        "#]],
    );
}

#[test]
fn pool_with_negative_replicas() {
    check(
        &[("fleet/vms/p.yaml", &pool("p", "-1"))],
        expect![[r#"
        fleet/vms/p.yaml:5:13: error: spec.replicas: -1 is too small; the minimum is 0
    "#]],
    );
}

#[test]
fn several_errors_in_several_files_are_all_reported() {
    check(
        &[
            (
                "fleet/vms/a.yaml",
                &vm_with("  resources:\n    cpus: 0\n    memory: lots\n  state: paused\n"),
            ),
            (
                "fleet/vms/b.yaml",
                &VM.replace("name: a", "name: b")
                    .replace("image: micro", "image: nope"),
            ),
        ],
        expect![[r#"
            fleet/vms/a.yaml:9:11: error: spec.resources.cpus: 0 is too small; the minimum is 1
            fleet/vms/a.yaml:10:13: error: spec.resources.memory: string "lots" is not valid; expected a size with a binary unit: Mi, Gi or Ti (for example 512Mi or 2Gi)
            fleet/vms/a.yaml:11:10: error: spec.state: string "paused" is not valid; valid: running, stopped
            fleet/vms/b.yaml:7:10: error: spec.image: no image named "nope"; defined: micro
        "#]],
    );
}

#[test]
fn complex_mapping_key() {
    check(
        &[("fleet/vms/a.yaml", "apiVersion: fleet/v1\n? [a, b]\n: c\n")],
        expect![[r#"
            fleet/vms/a.yaml:2:3: error: YAML syntax: mapping keys must be plain scalars, not lists or mappings
        "#]],
    );
}

#[test]
fn alias_bomb() {
    let mut text =
        String::from("apiVersion: fleet/v1\nkind: VM\na: &a [x, x, x, x, x, x, x, x, x]\n");
    for i in 0..9u8 {
        let (prev, cur) = ((b'a' + i) as char, (b'a' + i + 1) as char);
        text.push_str(&format!("{cur}: &{cur} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"));
    }
    check(
        &[("fleet/vms/a.yaml", &text)],
        expect![[r#"
        fleet/vms/a.yaml:8:16: error: the document expands to too many values (anchors and aliases repeated over and over); fleet objects are small, write the values out
    "#]],
    );
}

#[test]
fn deeply_nested_flow_collections() {
    let text = format!(
        "apiVersion: fleet/v1\nkind: VM\nspec: {}\n",
        "[".repeat(100_000)
    );
    check(
        &[("fleet/vms/a.yaml", &text)],
        expect![[r#"
        fleet/vms/a.yaml:3:262: error: YAML nesting is too deep; fleet objects nest at most 64 levels
    "#]],
    );
}

#[test]
fn oversized_file() {
    let text = format!("{VM}# {}\n", "x".repeat(1024 * 1024));
    check(
        &[("fleet/vms/a.yaml", &text)],
        expect![[r#"
        fleet/vms/a.yaml:1:1: error: file is larger than 1024 KiB; fleet objects are small, split it or remove what does not belong
    "#]],
    );
}

#[test]
fn not_utf8() {
    let mut bytes = VM.as_bytes().to_vec();
    bytes.extend_from_slice(b"  loadout: caf\xe9\n");
    check_bytes(
        &[("fleet/vms/a.yaml", &bytes)],
        true,
        expect![[r#"
        fleet/vms/a.yaml:8:15: error: file is not valid UTF-8; save it as UTF-8 text
    "#]],
    );
}

#[test]
fn revision_without_fleet_yaml() {
    check_bytes(
        &[("fleet/vms/a.yaml", VM.as_bytes())],
        false,
        expect![[r#"
        fleet/fleet.yaml:1:1: error: missing fleet/fleet.yaml: every revision needs one object of kind Fleet there (providers, images, policy)
    "#]],
    );
}

#[test]
fn secret_without_metadata_and_spec() {
    check(
        &[(
            "fleet/secrets/s.yaml",
            "apiVersion: fleet/v1\nkind: Secret\n",
        )],
        expect![[r#"
            fleet/secrets/s.yaml:1:1: error: the document: missing required field `metadata`
            fleet/secrets/s.yaml:1:1: error: the document: missing required field `spec`
        "#]],
    );
}

fn task_with(name: &str, spec: &str) -> String {
    format!("apiVersion: fleet/v1\nkind: Task\nmetadata:\n  name: {name}\nspec:\n  vm: a\n{spec}")
}

#[test]
fn a_valid_task_and_answer_load() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with(
                    "t",
                    "  command: [make, test]\n  timeout: 30m\n  artifacts: ['out/**']\n  prompts: {patterns: ['^approve'], deadline: 1h, onDeadline: fail}\n",
                ),
            ),
            (
                "fleet/tasks/agent.yaml",
                &task_with(
                    "agent",
                    "  agent: {kind: claude, prompt: 'fix the tests', model: sonnet}\n  repository: {url: 'https://git.example.org/team/app', branch: main}\n  git: {author: {name: Ada Agent, email: ada@example.org}}\n",
                ),
            ),
            (
                "fleet/hitl/t-0123abcd-1.yaml",
                "apiVersion: fleet/v1\nkind: Answer\nmetadata: {name: t-0123abcd-1}\nspec: {response: 'yes'}\n",
            ),
        ],
        expect![[r#"
            loaded without diagnostics
        "#]],
    );
}

#[test]
fn task_without_command_or_agent() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            ("fleet/tasks/t.yaml", &task_with("t", "  timeout: 5m\n")),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:6:3: error: spec: a task needs `command` (a program and its arguments) or `agent` (kind and prompt); add one
        "#]],
    );
}

#[test]
fn task_with_command_and_agent() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with(
                    "t",
                    "  command: [make]\n  agent: {kind: codex, prompt: go}\n",
                ),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:3: error: spec.agent: a task runs either `command` or `agent`, not both; remove one
        "#]],
    );
}

#[test]
fn task_for_an_unknown_vm() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                "apiVersion: fleet/v1\nkind: Task\nmetadata: {name: t}\nspec: {vm: b, command: ['true']}\n",
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:4:12: error: spec.vm: no VM named "b"; defined: a
        "#]],
    );
}

#[test]
fn task_with_an_unknown_agent_kind() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with("t", "  agent: {kind: clippy, prompt: go}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:7:17: error: spec.agent.kind: string "clippy" is not valid; valid: claude, codex, gemini, aider
        "#]],
    );
}

#[test]
fn task_with_a_git_author_git_could_not_write() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with(
                    "t",
                    "  command: [make]\n  git: {author: {name: \"Eve <root@host>\", email: nobody}}\n",
                ),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:24: error: spec.git.author.name: string "Eve <root@host>" is not valid; it must match ^[^<>\r\n]+$
            fleet/tasks/t.yaml:8:50: error: spec.git.author.email: string "nobody" is not valid; it must match ^[^<>\s]+@[^<>\s]+$
        "#]],
    );
}

#[test]
fn task_results_pushed_where_the_host_does_not_allow() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with(
                    "t",
                    "  command: [make]\n  repository: {url: app}\n  results: {push: {branch: review/t}}\n",
                ),
            ),
            (
                "fleet/tasks/u.yaml",
                &task_with("u", "  command: [make]\n  results:\n    push: {}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:9:19: error: spec.results.push: "app" is not a repository the host configuration lets results be pushed to (pushes); ask the host's administrator to add a pattern to pushes
            fleet/tasks/u.yaml:9:11: error: spec.results.push: a task without a repository has no commits to push; add repository, or remove results.push
        "#]],
    );
}

#[test]
fn task_with_an_empty_command() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            ("fleet/tasks/t.yaml", &task_with("t", "  command: []\n")),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:7:12: error: spec.command: needs at least 1 item(s)
        "#]],
    );
}

#[test]
fn task_artifacts_outside_its_directory() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with(
                    "t",
                    "  command: [make]\n  artifacts: [/etc/passwd, '../x/*']\n",
                ),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:15: error: spec.artifacts[0]: "/etc/passwd" must be a relative glob inside the task's directory (no leading / and no ..)
            fleet/tasks/t.yaml:8:28: error: spec.artifacts[1]: "../x/*" must be a relative glob inside the task's directory (no leading / and no ..)
        "#]],
    );
}

#[test]
fn task_with_a_bad_prompt_pattern() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with(
                    "t",
                    "  command: [make]\n  prompts: {patterns: ['(unclosed']}\n",
                ),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:24: error: spec.prompts.patterns[0]: not a valid regular expression (error: unclosed group)
        "#]],
    );
}

#[test]
fn task_with_a_bad_deadline_policy() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with("t", "  command: [make]\n  prompts: {onDeadline: explode}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:25: error: spec.prompts.onDeadline: string "explode" is not valid; valid: wait, fail
        "#]],
    );
}

#[test]
fn task_name_too_long_for_prompt_ids() {
    let name = "t".repeat(55);
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with(&name, "  command: [make]\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:4:9: error: metadata.name: task names are at most 50 characters (this one has 55), so the prompt ids made from them stay valid names; shorten it
        "#]],
    );
}

#[test]
fn answer_with_control_characters() {
    check(
        &[(
            "fleet/hitl/p-1.yaml",
            "apiVersion: fleet/v1\nkind: Answer\nmetadata: {name: p-1}\nspec: {response: \"y\\nrm -rf /\"}\n",
        )],
        expect![[r#"
            fleet/hitl/p-1.yaml:4:18: error: spec.response: the answer contains the control character U+000A; answers are one line of plain text (Enter is added)
        "#]],
    );
}

#[test]
fn answer_without_a_response() {
    check(
        &[(
            "fleet/hitl/p-1.yaml",
            "apiVersion: fleet/v1\nkind: Answer\nmetadata: {name: p-1}\nspec: {}\n",
        )],
        expect![[r#"
            fleet/hitl/p-1.yaml:4:7: error: spec: say what the answer is: `response: TEXT` for a prompt, or `approve: DIGEST` for an approval
        "#]],
    );
}

#[test]
fn stray_yaml_file_at_the_fleet_root() {
    check(
        &[
            ("fleet/notes.yaml", "a: 1\n"),
            ("fleet/README.md", "not YAML, ignored"),
        ],
        expect![[r#"
            fleet/notes.yaml:1:1: error: unexpected file: fleet objects live in fleet.yaml, loadouts/, vms/, tasks/, secrets/, workspaces/ and hitl/; move or remove it
        "#]],
    );
}

#[test]
fn fleet_yaml_holds_a_vm() {
    check(
        &[("fleet/fleet.yaml", VM)],
        expect![[r#"
        fleet/fleet.yaml:2:7: error: kind: VM does not belong in fleet.yaml; a file here holds kind Fleet
    "#]],
    );
}

#[test]
fn loadout_user_with_an_uppercase_name() {
    check(
        &[(
            "fleet/loadouts/dev.yaml",
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: dev}\nspec:\n  users:\n    - name: Agent\n",
        )],
        expect![[r#"
            fleet/loadouts/dev.yaml:6:13: error: spec.users[0].name: string "Agent" is not valid; expected a POSIX login name: lowercase letters, digits, `_` and `-`, at most 32 characters
        "#]],
    );
}

#[test]
fn loadout_user_with_a_private_key_instead_of_a_public_one() {
    check(
        &[(
            "fleet/loadouts/dev.yaml",
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: dev}\nspec:\n  users:\n    - name: agent\n      sshAuthorizedKeys: [\"-----BEGIN OPENSSH PRIVATE KEY-----\"]\n",
        )],
        expect![[r#"
            fleet/loadouts/dev.yaml:7:27: error: spec.users[0].sshAuthorizedKeys[0]: string "-----BEGIN OPENSSH PRIVATE KEY-----" is not valid; expected one OpenSSH public key line: `TYPE BASE64 [COMMENT]`
        "#]],
    );
}

#[test]
fn loadout_user_sudo_rule_spanning_lines() {
    check(
        &[(
            "fleet/loadouts/dev.yaml",
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: dev}\nspec:\n  users:\n    - name: agent\n      sudo: \"ALL=(ALL) ALL\\nroot ALL=(ALL) ALL\"\n",
        )],
        expect![[r#"
            fleet/loadouts/dev.yaml:7:13: error: spec.users[0].sudo: string "ALL=(ALL) ALL\nroot ALL=(ALL) ALL" is not valid; expected one single-line sudoers rule, for example `ALL=(ALL) NOPASSWD:ALL`; no sudo without it
        "#]],
    );
}

const SECRET: &str = "apiVersion: fleet/v1
kind: Secret
metadata: {name: api}
spec:
  allowed: {loadouts: [dev], tasks: [t]}
  data:
    token: |
      -----BEGIN AGE ENCRYPTED FILE-----
      YWdlLWVuY3J5cHRpb24ub3JnL3YxCg==
      -----END AGE ENCRYPTED FILE-----
";

fn task_with_secrets(refs: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: Task\nmetadata: {{name: t}}\nspec:\n  vm: a\n  command: [env]\n  secrets:\n{refs}"
    )
}

#[test]
fn secret_reference_to_a_missing_secret_and_key() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            ("fleet/secrets/api.yaml", SECRET),
            (
                "fleet/tasks/t.yaml",
                &task_with_secrets(
                    "    - {secret: apii, key: token, env: A}\n    - {secret: api, key: tokn, env: B}\n",
                ),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:16: error: spec.secrets[0].secret: no Secret named "apii"; defined: api
            fleet/tasks/t.yaml:9:26: error: spec.secrets[1].key: Secret "api" (fleet/secrets/api.yaml) has no key "tokn"; its keys: token
        "#]],
    );
}

#[test]
fn secret_reference_with_both_env_and_file_and_one_without_either() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            ("fleet/secrets/api.yaml", SECRET),
            (
                "fleet/tasks/t.yaml",
                &task_with_secrets(
                    "    - {secret: api, key: token, env: A, file: a}\n    - {secret: api, key: token}\n",
                ),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:41: error: spec.secrets[0].file: a secret reference sets either `env` or `file`, not both; remove one
            fleet/tasks/t.yaml:9:7: error: spec.secrets[1]: say where the value goes: `env: VAR` (an environment variable) or `file: PATH` (under /run/fleet/secrets)
        "#]],
    );
}

#[test]
fn secret_reference_twice_to_one_variable() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            ("fleet/secrets/api.yaml", SECRET),
            (
                "fleet/tasks/t.yaml",
                &task_with_secrets(
                    "    - {secret: api, key: token, env: A}\n    - {secret: api, key: token, file: x}\n    - {secret: api, key: token, env: A}\n",
                ),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:10:7: error: spec.secrets[2]: env A is already set by spec.secrets[0]; each variable or file takes one secret
        "#]],
    );
}

#[test]
fn secret_value_in_the_clear() {
    check(
        &[(
            "fleet/secrets/api.yaml",
            "apiVersion: fleet/v1\nkind: Secret\nmetadata: {name: api}\nspec:\n  data:\n    token: sk-live-1234\n",
        )],
        expect![[r#"
            fleet/secrets/api.yaml:6:12: error: spec.data.token: not an ASCII-armored age value; encrypt it with `fleet secret set api token` (a value in the clear is never accepted nor repeated here; if one was committed, change it at its source)
        "#]],
    );
}

#[test]
fn secret_with_recipients_of_its_own() {
    check(
        &[(
            "fleet/secrets/api.yaml",
            SECRET
                .replace(
                    "  allowed: {loadouts: [dev], tasks: [t]}\n",
                    "  recipients: [age1sve4p6nuq0599zp7p7s02pvfsnqgqnw8aydanew04msp05wadqyskjem93]\n",
                )
                .as_str(),
        )],
        expect![[r#"
            fleet/secrets/api.yaml:5:3: error: spec.recipients: belongs in the host configuration (recipients): a commit must not choose who can read every secret; move it to /etc/fleet/host.yaml
        "#]],
    );
}

#[test]
fn secret_with_a_bad_allowed_name_and_key_name() {
    check(
        &[(
            "fleet/secrets/api.yaml",
            SECRET
                .replace("loadouts: [dev]", "loadouts: [Dev]")
                .replace("    token: |", "    to ken: |")
                .as_str(),
        )],
        expect![[r#"
            fleet/secrets/api.yaml:5:24: error: spec.allowed.loadouts[0]: string "Dev" is not valid; expected a lower-case DNS label: letters, digits and '-', at most 63 characters, starting and ending with a letter or digit
            fleet/secrets/api.yaml:7:5: error: spec.data: key "to ken" is not valid; keys use letters, digits, `_`, `.` and `-` (at most 64)
        "#]],
    );
}

#[test]
fn secret_reference_to_a_file_outside_the_secrets_directory() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            ("fleet/secrets/api.yaml", SECRET),
            (
                "fleet/tasks/t.yaml",
                &task_with_secrets("    - {secret: api, key: token, file: ../etc/passwd}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:39: error: spec.secrets[0].file: string "../etc/passwd" is not valid; expected a relative path under `/run/fleet/secrets`, for example `git/token`
        "#]],
    );
}

fn loadout_with(spec: &str) -> String {
    format!("apiVersion: fleet/v1\nkind: Loadout\nmetadata: {{name: dev}}\nspec:\n{spec}")
}

fn answer_with(response_yaml: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: Answer\nmetadata: {{name: p-1}}\nspec:\n  response: {response_yaml}\n"
    )
}

#[test]
fn task_timeout_is_not_a_duration() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with("t", "  command: [\"true\"]\n  timeout: forever\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:12: error: spec.timeout: string "forever" is not valid; expected a duration: a whole number with a unit ms, s, m or h (for example 30s or 5m)
        "#]],
    );
}

#[test]
fn task_timeout_beyond_a_week() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with("t", "  command: [\"true\"]\n  timeout: 200h\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:12: error: spec.timeout: "200h" is out of range; use a duration up to 168h
        "#]],
    );
}

#[test]
fn task_rerun_is_negative() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with("t", "  command: [\"true\"]\n  rerun: -1\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:10: error: spec.rerun: -1 is too small; the minimum is 0
        "#]],
    );
}

#[test]
fn task_repository_without_a_url() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with("t", "  command: [\"true\"]\n  repository: {branch: main}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:15: error: spec.repository: missing required field `url`
        "#]],
    );
}

#[test]
fn task_agent_without_a_prompt() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with("t", "  agent: {kind: claude}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:7:10: error: spec.agent: missing required field `prompt`
        "#]],
    );
}

#[test]
fn task_env_value_is_a_number() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with("t", "  command: [\"true\"]\n  env: {RETRIES: 3}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:18: error: spec.env.RETRIES: expected a string, found number 3
        "#]],
    );
}

#[test]
fn task_prompts_with_an_unknown_field() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with("t", "  command: [\"true\"]\n  prompts: {timeout: 1h}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:13: error: spec.prompts.timeout: unknown field; valid fields: patterns, deadline, onDeadline, allowControl
        "#]],
    );
}

#[test]
fn answer_longer_than_four_kib() {
    let long = format!("\"{}\"", "y".repeat(5000));
    check(
        &[("fleet/hitl/p-1.yaml", &answer_with(&long))],
        expect![[r#"
            fleet/hitl/p-1.yaml:5:13: error: spec.response: must be at most 4096 characters long
        "#]],
    );
}

#[test]
fn answer_with_an_escape_sequence() {
    check(
        &[("fleet/hitl/p-1.yaml", &answer_with("\"yes\\e[2J\""))],
        expect![[r#"
            fleet/hitl/p-1.yaml:5:13: error: spec.response: the answer contains the control character U+001B; answers are one line of plain text (Enter is added)
        "#]],
    );
}

#[test]
fn loadout_file_with_a_relative_path() {
    check(
        &[(
            "fleet/loadouts/dev.yaml",
            &loadout_with("  files: [{path: etc/motd, content: hi}]\n"),
        )],
        expect![[r#"
            fleet/loadouts/dev.yaml:5:18: error: spec.files[0].path: string "etc/motd" is not valid; expected absolute path in the guest
        "#]],
    );
}

#[test]
fn loadout_file_with_a_mode_that_is_not_octal() {
    check(
        &[(
            "fleet/loadouts/dev.yaml",
            &loadout_with("  files: [{path: /etc/motd, content: hi, mode: \"0999\"}]\n"),
        )],
        expect![[r#"
            fleet/loadouts/dev.yaml:5:48: error: spec.files[0].mode: string "0999" is not valid; expected octal permission bits, for example "0644"
        "#]],
    );
}

#[test]
fn loadout_file_with_an_owner_field() {
    check(
        &[(
            "fleet/loadouts/dev.yaml",
            &loadout_with("  files: [{path: /etc/motd, content: hi, owner: root}]\n"),
        )],
        expect![[r#"
            fleet/loadouts/dev.yaml:5:42: error: spec.files[0].owner: unknown field; valid fields: path, content, mode
        "#]],
    );
}

#[test]
fn loadout_user_with_a_relative_shell() {
    check(
        &[(
            "fleet/loadouts/dev.yaml",
            &loadout_with("  users: [{name: agent, shell: bash}]\n"),
        )],
        expect![[r#"
            fleet/loadouts/dev.yaml:5:32: error: spec.users[0].shell: string "bash" is not valid; expected login shell, an absolute path
        "#]],
    );
}

#[test]
fn loadout_secret_reference_to_a_missing_key() {
    check(
        &[
            ("fleet/secrets/api.yaml", SECRET),
            (
                "fleet/loadouts/dev.yaml",
                &loadout_with("  secrets: [{secret: api, key: password, env: PW}]\n"),
            ),
        ],
        expect![[r#"
            fleet/loadouts/dev.yaml:5:32: error: spec.secrets[0].key: Secret "api" (fleet/secrets/api.yaml) has no key "password"; its keys: token
        "#]],
    );
}

#[test]
fn two_secrets_with_the_same_name() {
    check(
        &[
            ("fleet/secrets/api.yaml", SECRET),
            ("fleet/secrets/api-copy.yaml", SECRET),
        ],
        expect![[r#"
            fleet/secrets/api.yaml:3:18: error: metadata.name: Secret "api" is already defined at fleet/secrets/api-copy.yaml:3:18; names must be unique, rename one of them
        "#]],
    );
}

#[test]
fn policy_recipients_belong_to_the_host() {
    check(
        &[(
            "fleet/fleet.yaml",
            &FLEET.replace(
                "  images:",
                "  policy: {recipients: age1sve4p6nuq0599zp7p7s02pvfsnqgqnw8aydanew04msp05wadqyskjem93}\n  images:",
            ),
        )],
        expect![[r#"
            fleet/fleet.yaml:9:12: error: spec.policy.recipients: belongs in the host configuration (recipients): a commit must not choose who can read every secret; move it to /etc/fleet/host.yaml
        "#]],
    );
}

#[test]
fn vm_protect_is_a_string() {
    check(
        &[("fleet/vms/a.yaml", &format!("{VM}  protect: \"yes\"\n"))],
        expect![[r#"
            fleet/vms/a.yaml:8:12: error: spec.protect: expected true or false, found string "yes"
        "#]],
    );
}

#[test]
fn pool_replicas_written_as_a_word() {
    check(
        &[(
            "fleet/vms/p.yaml",
            "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {name: p}\nspec:\n  replicas: three\n  template:\n    spec: {provider: local, image: micro}\n",
        )],
        expect![[r#"
            fleet/vms/p.yaml:5:13: error: spec.replicas: expected a whole number, found string "three"
        "#]],
    );
}

#[test]
fn vm_label_value_is_a_number() {
    check(
        &[(
            "fleet/vms/a.yaml",
            "apiVersion: fleet/v1\nkind: VM\nmetadata:\n  name: a\n  labels: {tier: 1}\nspec: {provider: local, image: micro}\n",
        )],
        expect![[r#"
            fleet/vms/a.yaml:5:18: error: metadata.labels.tier: expected a string, found number 1
        "#]],
    );
}

#[test]
fn image_with_a_firmware_field() {
    check(
        &[(
            "fleet/fleet.yaml",
            &FLEET.replace(
                "      initrd: micro/initrd.img\n",
                "      initrd: micro/initrd.img\n      firmware: uefi\n",
            ),
        )],
        expect![[r#"
            fleet/fleet.yaml:13:7: error: spec.images[0].firmware: unknown field; valid fields: name, kernel, initrd, cmdline, disk, template
        "#]],
    );
}

#[test]
fn secret_reference_with_a_variable_name_starting_with_a_digit() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            ("fleet/secrets/api.yaml", SECRET),
            (
                "fleet/tasks/t.yaml",
                &task_with_secrets("    - {secret: api, key: token, env: 1TOKEN}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:38: error: spec.secrets[0].env: string "1TOKEN" is not valid; expected an environment variable name, for example `ANTHROPIC_API_KEY`
        "#]],
    );
}

#[test]
fn answer_with_both_a_response_and_an_approval() {
    check(
        &[(
            "fleet/hitl/p-1.yaml",
            &format!(
                "apiVersion: fleet/v1\nkind: Answer\nmetadata: {{name: p-1}}\nspec:\n  response: y\n  approve: {}\n",
                "ab".repeat(32)
            ),
        )],
        expect![[r#"
            fleet/hitl/p-1.yaml:6:3: error: spec.approve: an Answer either answers a prompt (`response`) or approves held steps (`approve`), not both; remove one
        "#]],
    );
}

#[test]
fn approval_digest_that_is_not_a_digest() {
    check(
        &[(
            "fleet/hitl/approval-0123456789ab.yaml",
            "apiVersion: fleet/v1\nkind: Answer\nmetadata: {name: approval-0123456789ab}\nspec: {approve: yes-please}\n",
        )],
        expect![[r#"
            fleet/hitl/approval-0123456789ab.yaml:4:17: error: spec.approve: string "yes-please" is not valid; expected the 64-hex digest of the held steps it approves, as their approval file shows it
        "#]],
    );
}

#[test]
fn policy_approves_an_unknown_step_kind() {
    check(
        &[(
            "fleet/fleet.yaml",
            &FLEET.replace(
                "  images:",
                "  policy: {approve: [destroy, delete]}\n  images:",
            ),
        )],
        expect![[r#"
            fleet/fleet.yaml:9:31: error: spec.policy.approve[1]: string "delete" is not valid; valid: create, start, stop, update, replace, destroy
        "#]],
    );
}

#[test]
fn an_escape_sequence_answers_a_task_that_allows_control_characters() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/keys.yaml",
                &task_with("keys", "  command: [vi]\n  prompts: {allowControl: true}\n"),
            ),
            (
                "fleet/hitl/keys-0a1b2c3d-1.yaml",
                "apiVersion: fleet/v1\nkind: Answer\nmetadata: {name: keys-0a1b2c3d-1}\nspec: {response: \"\\e:wq\"}\n",
            ),
            (
                "fleet/hitl/p-0a1b2c3d-1.yaml",
                "apiVersion: fleet/v1\nkind: Answer\nmetadata: {name: p-0a1b2c3d-1}\nspec: {response: \"\\e:wq\"}\n",
            ),
        ],
        expect![[r#"
            fleet/hitl/p-0a1b2c3d-1.yaml:4:18: error: spec.response: the answer contains the control character U+001B; answers are one line of plain text (Enter is added)
        "#]],
    );
}

// ---- The host's rules (issue: a commit describes VMs, it never acts as root on the host).

fn check_host(text: &str, expect: Expect) {
    let out = match fleet::load::load_host("/etc/fleet/host.yaml", text.as_bytes()) {
        Ok(_) => "loaded without diagnostics\n".to_owned(),
        Err(diags) => diags.iter().map(|d| format!("{d}\n")).collect(),
    };
    expect.assert_eq(&out);
}

fn host_with(providers: &str, extra: &str) -> String {
    format!("apiVersion: fleet/v1\nkind: Host\nspec:\n  providers:\n{providers}{extra}")
}

fn fleet_with_provider(provider: &str) -> String {
    FLEET.replace("    - name: local\n      type: libvirt\n", provider)
}

#[test]
fn host_provider_of_an_unknown_type() {
    check_host(
        &host_with("    - {name: x, type: vmware}\n", ""),
        expect![[r#"
        /etc/fleet/host.yaml:5:23: error: spec.providers[0].type: unsupported value "vmware"; valid: libvirt, proxmox
    "#]],
    );
}

#[test]
fn host_libvirt_provider_without_uri() {
    check_host(
        &host_with("    - {name: x, type: libvirt}\n", ""),
        expect![[r#"
        /etc/fleet/host.yaml:5:7: error: spec.providers[0]: missing required field `uri`
    "#]],
    );
}

#[test]
fn host_libvirt_uri_is_an_alias() {
    check_host(
        &host_with("    - {name: x, type: libvirt, uri: hail}\n", ""),
        expect![[r#"
            /etc/fleet/host.yaml:5:37: error: spec.providers[0].uri: string "hail" is not valid; expected a libvirt connection URI with its scheme, for example `qemu:///system` or `qemu+ssh://fleet@host/system` (not an alias from libvirt.conf: fleet tells from the URI whether the host is its own)
        "#]],
    );
}

#[test]
fn host_storage_dir_is_relative() {
    check_host(
        &host_with(
            "    - {name: x, type: libvirt, uri: 'qemu:///system', storageDir: .fleet/storage}\n",
            "",
        ),
        expect![[r#"
            /etc/fleet/host.yaml:5:67: error: spec.providers[0].storageDir: string ".fleet/storage" is not valid; expected an absolute path on the host, for example /var/lib/fleet/images
        "#]],
    );
}

#[test]
fn host_image_root_is_relative() {
    check_host(
        &host_with(
            "    - {name: x, type: libvirt, uri: 'qemu:///system'}\n",
            "  imageRoot: build/image\n",
        ),
        expect![[r#"
            /etc/fleet/host.yaml:6:14: error: spec.imageRoot: string "build/image" is not valid; expected an absolute path on the host, for example /var/lib/fleet/images
        "#]],
    );
}

const PVE: &str = "    - name: pve\n      type: proxmox\n      endpoint: https://pve.example.org:8006\n      node: pve1\n";

#[test]
fn host_proxmox_token_with_two_sources() {
    check_host(
        &host_with(
            &format!("{PVE}      token: {{id: 'a@pve!b', file: /etc/fleet/t, env: PVE_TOKEN}}\n"),
            "",
        ),
        expect![[r#"
            /etc/fleet/host.yaml:9:14: error: spec.providers[0].token: set exactly one of secret (a Secret in the fleet's fleet/secrets/), file (a host file, mode 0600) and env (an environment variable of fleet's process)
        "#]],
    );
}

#[test]
fn host_proxmox_token_without_a_source() {
    check_host(
        &host_with(&format!("{PVE}      token: {{id: 'a@pve!b'}}\n"), ""),
        expect![[r#"
            /etc/fleet/host.yaml:9:14: error: spec.providers[0].token: set exactly one of secret (a Secret in the fleet's fleet/secrets/), file (a host file, mode 0600) and env (an environment variable of fleet's process)
        "#]],
    );
}

#[test]
fn host_proxmox_insecure_with_a_ca_file() {
    check_host(
        &host_with(
            &format!(
                "{PVE}      token: {{id: 'a@pve!b', env: T}}\n      caFile: /etc/fleet/ca.pem\n      insecureSkipVerify: true\n"
            ),
            "",
        ),
        expect![[r#"
            /etc/fleet/host.yaml:11:27: error: spec.providers[0].insecureSkipVerify: contradicts caFile; remove insecureSkipVerify to verify against the CA file
        "#]],
    );
}

#[test]
fn host_proxmox_token_file_is_relative() {
    check_host(
        &host_with(
            &format!("{PVE}      token: {{id: 'a@pve!b', file: token}}\n"),
            "",
        ),
        expect![[r#"
            /etc/fleet/host.yaml:9:36: error: spec.providers[0].token.file: string "token" is not valid; expected an absolute path on the host, for example /var/lib/fleet/images
        "#]],
    );
}

#[test]
fn host_proxmox_ca_file_is_relative() {
    check_host(
        &host_with(
            &format!("{PVE}      token: {{id: 'a@pve!b', env: T}}\n      caFile: ca.pem\n"),
            "",
        ),
        expect![[r#"
            /etc/fleet/host.yaml:10:15: error: spec.providers[0].caFile: string "ca.pem" is not valid; expected an absolute path on the host, for example /var/lib/fleet/images
        "#]],
    );
}

#[test]
fn host_proxmox_snippets_dir_is_relative() {
    check_host(
        &host_with(
            &format!(
                "{PVE}      token: {{id: 'a@pve!b', env: T}}\n      snippets: {{storage: local, dir: snippets}}\n"
            ),
            "",
        ),
        expect![[r#"
            /etc/fleet/host.yaml:10:39: error: spec.providers[0].snippets.dir: string "snippets" is not valid; expected an absolute path on the host, for example /var/lib/fleet/images
        "#]],
    );
}

#[test]
fn host_duplicate_provider_names() {
    check_host(
        &host_with(
            "    - {name: x, type: libvirt, uri: 'qemu:///system'}\n    - {name: x, type: libvirt, uri: 'qemu:///session'}\n",
            "",
        ),
        expect![[r#"
            /etc/fleet/host.yaml:6:14: error: spec.providers[1].name: provider "x" is already defined at line 5; provider names must be unique
        "#]],
    );
}

#[test]
fn host_repository_pattern_is_a_path() {
    check_host(
        &host_with("    []\n", "  repositories: ['/etc/*']\n"),
        expect![[r#"
        /etc/fleet/host.yaml:6:18: error: spec.repositories[0]: string "/etc/*" is not valid; expected a URL pattern for task repositories
    "#]],
    );
}

#[test]
fn host_recipient_is_not_an_age_recipient() {
    check_host(
        &host_with("    []\n", "  recipients: [ssh-ed25519 AAAA]\n"),
        expect![[r#"
        /etc/fleet/host.yaml:6:16: error: spec.recipients[0]: string "ssh-ed25519 AAAA" is not valid; expected an age X25519 recipient, `age1` and 58 Bech32 characters (from `age-keygen -y`)
    "#]],
    );
}

#[test]
fn host_unknown_field() {
    check_host(
        &host_with("    []\n", "  imageRoots: [/var/lib/fleet/images]\n"),
        expect![[r#"
            /etc/fleet/host.yaml:6:3: error: spec.imageRoots: unknown field; did you mean `imageRoot`? valid fields: providers, imageRoot, repositories, pushes, recipients, limits, egress, git, trust, source, notify
        "#]],
    );
}

#[test]
fn host_file_holding_a_fleet() {
    check_host(
        FLEET,
        expect![[r#"
        /etc/fleet/host.yaml:2:7: error: kind: Fleet does not belong in /etc/fleet/host.yaml; a file here holds kind Host
    "#]],
    );
}

#[test]
fn host_limits_out_of_range() {
    check_host(
        &host_with(
            "    []\n",
            "  limits: {maxVms: -1, maxMemory: 8G, minInterval: 5 seconds}\n",
        ),
        expect![[r#"
            /etc/fleet/host.yaml:6:20: error: spec.limits.maxVms: -1 is too small; the minimum is 0
            /etc/fleet/host.yaml:6:35: error: spec.limits.maxMemory: string "8G" is not valid; expected a size with a binary unit: Mi, Gi or Ti (for example 512Mi or 2Gi)
            /etc/fleet/host.yaml:6:52: error: spec.limits.minInterval: string "5 seconds" is not valid; expected a duration: a whole number with a unit ms, s, m or h (for example 30s or 5m)
        "#]],
    );
}

#[test]
fn host_file_is_a_list() {
    check_host(
        "- a\n- b\n",
        expect![[r#"
        /etc/fleet/host.yaml:1:1: error: the document must be a mapping with apiVersion, kind, metadata and spec
    "#]],
    );
}

#[test]
fn committed_libvirt_uri_running_a_command() {
    check(
        &[(
            "fleet/fleet.yaml",
            &fleet_with_provider(
                "    - name: local\n      type: libvirt\n      uri: qemu+ext:///system?command=fleet/hook.sh\n",
            ),
        )],
        expect![[r#"
            fleet/fleet.yaml:9:7: error: spec.providers[0].uri: belongs in the host configuration, not the repository: how to reach a provider, where it stores files and which credentials it uses are the host's to say (fleet.yaml keeps only name, type and domainType); move it to the provider of that name in /etc/fleet/host.yaml
        "#]],
    );
}

#[test]
fn committed_test_driver_uri_reading_a_host_file() {
    check(
        &[(
            "fleet/fleet.yaml",
            &fleet_with_provider("    - {name: local, type: libvirt, uri: 'test:///etc/shadow'}\n"),
        )],
        expect![[r#"
            fleet/fleet.yaml:7:36: error: spec.providers[0].uri: belongs in the host configuration, not the repository: how to reach a provider, where it stores files and which credentials it uses are the host's to say (fleet.yaml keeps only name, type and domainType); move it to the provider of that name in /etc/fleet/host.yaml
        "#]],
    );
}

#[test]
fn committed_storage_dir() {
    check(
        &[(
            "fleet/fleet.yaml",
            &fleet_with_provider("    - {name: local, type: libvirt, storageDir: /}\n"),
        )],
        expect![[r#"
            fleet/fleet.yaml:7:36: error: spec.providers[0].storageDir: belongs in the host configuration, not the repository: how to reach a provider, where it stores files and which credentials it uses are the host's to say (fleet.yaml keeps only name, type and domainType); move it to the provider of that name in /etc/fleet/host.yaml
        "#]],
    );
}

#[test]
fn committed_proxmox_endpoint_and_token() {
    check(
        &[(
            "fleet/fleet.yaml",
            &fleet_with_provider(
                "    - name: pve\n      type: proxmox\n      endpoint: https://attacker.example\n      token: {id: 'a@pve!b', env: GITHUB_TOKEN}\n      insecureSkipVerify: true\n",
            ),
        )],
        expect![[r#"
            fleet/fleet.yaml:9:7: error: spec.providers[0].endpoint: belongs in the host configuration, not the repository: how to reach a provider, where it stores files and which credentials it uses are the host's to say (fleet.yaml keeps only name, type and domainType); move it to the provider of that name in /etc/fleet/host.yaml
            fleet/fleet.yaml:10:7: error: spec.providers[0].token: belongs in the host configuration, not the repository: how to reach a provider, where it stores files and which credentials it uses are the host's to say (fleet.yaml keeps only name, type and domainType); move it to the provider of that name in /etc/fleet/host.yaml
            fleet/fleet.yaml:11:7: error: spec.providers[0].insecureSkipVerify: belongs in the host configuration, not the repository: how to reach a provider, where it stores files and which credentials it uses are the host's to say (fleet.yaml keeps only name, type and domainType); move it to the provider of that name in /etc/fleet/host.yaml
        "#]],
    );
}

#[test]
fn committed_proxmox_ca_file_node_and_snippets() {
    check(
        &[(
            "fleet/fleet.yaml",
            &fleet_with_provider(
                "    - name: pve\n      type: proxmox\n      node: pve1\n      caFile: /etc/ssl/private/key.pem\n      snippets: {storage: local, dir: /etc/netplan}\n      storage: local-lvm\n      bridge: vmbr0\n",
            ),
        )],
        expect![[r#"
            fleet/fleet.yaml:9:7: error: spec.providers[0].node: belongs in the host configuration, not the repository: how to reach a provider, where it stores files and which credentials it uses are the host's to say (fleet.yaml keeps only name, type and domainType); move it to the provider of that name in /etc/fleet/host.yaml
            fleet/fleet.yaml:10:7: error: spec.providers[0].caFile: belongs in the host configuration, not the repository: how to reach a provider, where it stores files and which credentials it uses are the host's to say (fleet.yaml keeps only name, type and domainType); move it to the provider of that name in /etc/fleet/host.yaml
            fleet/fleet.yaml:11:7: error: spec.providers[0].snippets: belongs in the host configuration, not the repository: how to reach a provider, where it stores files and which credentials it uses are the host's to say (fleet.yaml keeps only name, type and domainType); move it to the provider of that name in /etc/fleet/host.yaml
            fleet/fleet.yaml:12:7: error: spec.providers[0].storage: belongs in the host configuration, not the repository: how to reach a provider, where it stores files and which credentials it uses are the host's to say (fleet.yaml keeps only name, type and domainType); move it to the provider of that name in /etc/fleet/host.yaml
            fleet/fleet.yaml:13:7: error: spec.providers[0].bridge: belongs in the host configuration, not the repository: how to reach a provider, where it stores files and which credentials it uses are the host's to say (fleet.yaml keeps only name, type and domainType); move it to the provider of that name in /etc/fleet/host.yaml
        "#]],
    );
}

#[test]
fn committed_provider_the_host_does_not_define() {
    check(
        &[(
            "fleet/fleet.yaml",
            &fleet_with_provider("    - {name: elsewhere, type: libvirt}\n"),
        )],
        expect![[r#"
            fleet/fleet.yaml:7:14: error: spec.providers[0].name: the host configuration has no provider "elsewhere" (it defines: local, pve); name one of those, or ask the host's administrator to add it
        "#]],
    );
}

#[test]
fn committed_provider_of_another_type_than_the_host_says() {
    check(
        &[(
            "fleet/fleet.yaml",
            &fleet_with_provider("    - {name: local, type: proxmox}\n"),
        )],
        expect![[r#"
            fleet/fleet.yaml:7:27: error: spec.providers[0].type: provider "local" is libvirt in the host configuration, not proxmox; set type: libvirt
        "#]],
    );
}

#[test]
fn image_kernel_is_an_absolute_path() {
    check(
        &[(
            "fleet/fleet.yaml",
            &FLEET.replace(
                "kernel: micro/vmlinuz",
                "kernel: /etc/ssh/ssh_host_ed25519_key",
            ),
        )],
        expect![[r#"
            fleet/fleet.yaml:11:15: error: spec.images[0].kernel: an absolute path; image files are named relative to the host's image root (imageRoot in the host configuration)
        "#]],
    );
}

#[test]
fn image_kernel_climbs_out_of_the_root() {
    check(
        &[(
            "fleet/fleet.yaml",
            &FLEET.replace("kernel: micro/vmlinuz", "kernel: ../../etc/fleet/age.key"),
        )],
        expect![[r#"
            fleet/fleet.yaml:11:15: error: spec.images[0].kernel: empty, `.` or `..` parts in a path; image files are named relative to the host's image root (imageRoot in the host configuration)
        "#]],
    );
}

#[test]
fn image_disk_is_a_block_device() {
    check(
        &[(
            "fleet/fleet.yaml",
            &format!("{FLEET}    - {{name: raw, disk: /dev/sda}}\n"),
        )],
        expect![[r#"
            fleet/fleet.yaml:13:25: error: spec.images[1].disk: an absolute path; image files are named relative to the host's image root (imageRoot in the host configuration)
        "#]],
    );
}

#[test]
fn image_initrd_with_a_dot_part() {
    check(
        &[(
            "fleet/fleet.yaml",
            &FLEET.replace("initrd: micro/initrd.img", "initrd: micro/./initrd.img"),
        )],
        expect![[r#"
            fleet/fleet.yaml:12:15: error: spec.images[0].initrd: empty, `.` or `..` parts in a path; image files are named relative to the host's image root (imageRoot in the host configuration)
        "#]],
    );
}

#[test]
fn task_repository_is_a_host_path() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with("t", "  command: [ls]\n  repository: {url: /etc}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:21: error: spec.repository.url: an absolute path; a local repository must be a path inside this repository (or a URL the host configuration allows)
        "#]],
    );
}

#[test]
fn task_repository_climbs_out_of_the_repository() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with(
                    "t",
                    "  command: [ls]\n  repository: {url: ../../srv/other/.git}\n",
                ),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:21: error: spec.repository.url: empty, `.` or `..` parts in a path; a local repository must be a path inside this repository (or a URL the host configuration allows)
        "#]],
    );
}

#[test]
fn task_repository_the_host_does_not_allow() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with(
                    "t",
                    "  command: [ls]\n  repository: {url: 'https://evil.example/x.git'}\n",
                ),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:21: error: spec.repository.url: "https://evil.example/x.git" is not a repository the host configuration allows (it allows: https://git.example.org/team/*); ask the host's administrator to add a pattern to repositories
        "#]],
    );
}

#[test]
fn task_repository_escaping_an_allowed_pattern() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with(
                    "t",
                    "  command: [ls]\n  repository: {url: 'https://git.example.org/team/../other/x'}\n",
                ),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:21: error: spec.repository.url: "https://git.example.org/team/../other/x" is not a repository the host configuration allows (it allows: https://git.example.org/team/*); ask the host's administrator to add a pattern to repositories
        "#]],
    );
}

#[test]
fn task_repository_on_the_hosts_disk_by_url() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with("t", "  command: [ls]\n  repository: {url: 'file:///etc'}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:21: error: spec.repository.url: "file:///etc" is not a repository the host configuration allows (it allows: https://git.example.org/team/*); ask the host's administrator to add a pattern to repositories
        "#]],
    );
}

#[test]
fn task_repository_allowed_by_the_host() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with(
                    "t",
                    "  command: [ls]\n  repository: {url: 'https://git.example.org/team/app'}\n",
                ),
            ),
        ],
        expect![[r#"
            loaded without diagnostics
        "#]],
    );
}

#[test]
fn reconcile_interval_below_the_hosts_floor() {
    check(
        &[(
            "fleet/fleet.yaml",
            &format!("{FLEET}  policy: {{reconcileInterval: 1ms, resyncInterval: 2s}}\n"),
        )],
        expect![[r#"
            fleet/fleet.yaml:13:31: error: spec.policy.reconcileInterval: 1ms is shorter than the host configuration allows (limits.minInterval 5s); use 5s or more
            fleet/fleet.yaml:13:52: error: spec.policy.resyncInterval: 2s is shorter than the host configuration allows (limits.minInterval 5s); use 5s or more
        "#]],
    );
}

#[test]
fn secret_without_allowed_goes_nowhere() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/secrets/api.yaml",
                &SECRET.replace("  allowed: {loadouts: [dev], tasks: [t]}\n", ""),
            ),
            (
                "fleet/tasks/t.yaml",
                &task_with_secrets("    - {secret: api, key: token, env: A}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:16: error: spec.secrets[0].secret: Secret "api" (fleet/secrets/api.yaml) does not allow task "t" (in VM "a"); add the task to the Secret's spec.allowed.tasks or its VM to spec.allowed.vms
        "#]],
    );
}

#[test]
fn secret_allowed_for_another_task() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/secrets/api.yaml",
                &SECRET.replace("tasks: [t]", "tasks: [deploy]"),
            ),
            (
                "fleet/tasks/t.yaml",
                &task_with_secrets("    - {secret: api, key: token, env: A}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:16: error: spec.secrets[0].secret: Secret "api" (fleet/secrets/api.yaml) does not allow task "t" (in VM "a"); add the task to the Secret's spec.allowed.tasks or its VM to spec.allowed.vms
        "#]],
    );
}

#[test]
fn secret_not_allowed_for_a_loadout() {
    check(
        &[
            (
                "fleet/loadouts/other.yaml",
                "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: other}\nspec:\n  secrets: [{secret: api, key: token, file: api}]\n",
            ),
            ("fleet/secrets/api.yaml", SECRET),
        ],
        expect![[r#"
            fleet/loadouts/other.yaml:5:22: error: spec.secrets[0].secret: Secret "api" (fleet/secrets/api.yaml) does not allow loadout "other"; add it to the Secret's spec.allowed.loadouts
        "#]],
    );
}

#[test]
fn secret_allowed_for_the_tasks_vm() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/secrets/api.yaml",
                &SECRET.replace("tasks: [t]", "vms: [a]"),
            ),
            (
                "fleet/tasks/t.yaml",
                &task_with_secrets("    - {secret: api, key: token, env: A}\n"),
            ),
        ],
        expect![[r#"
            loaded without diagnostics
        "#]],
    );
}

#[test]
fn secret_allowed_for_the_pool_of_the_tasks_vm() {
    check(
        &[
            (
                "fleet/vms/pool.yaml",
                "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {name: p}\nspec:\n  replicas: 2\n  template:\n    spec: {provider: local, image: micro}\n",
            ),
            (
                "fleet/secrets/api.yaml",
                &SECRET.replace("tasks: [t]", "vms: [p]"),
            ),
            (
                "fleet/tasks/t.yaml",
                &task_with_secrets("    - {secret: api, key: token, env: A}\n")
                    .replace("vm: a", "vm: p-02"),
            ),
        ],
        expect![[r#"
            loaded without diagnostics
        "#]],
    );
}

const PVE_TOKEN_SECRET: &str = "apiVersion: fleet/v1
kind: Secret
metadata: {name: pve}
spec:
  allowed: {tasks: [t]}
  data:
    token: |
      -----BEGIN AGE ENCRYPTED FILE-----
      YWdlLWVuY3J5cHRpb24ub3JnL3YxCg==
      -----END AGE ENCRYPTED FILE-----
";

#[test]
fn the_proxmox_token_never_goes_to_a_guest() {
    check_under_token_secret_host(
        &[
            (
                "fleet/fleet.yaml",
                &FLEET.replace(
                    "  images:\n",
                    "    - {name: pve, type: proxmox}\n  images:\n",
                ),
            ),
            ("fleet/vms/a.yaml", VM),
            ("fleet/secrets/pve.yaml", PVE_TOKEN_SECRET),
            (
                "fleet/tasks/t.yaml",
                &task_with_secrets("    - {secret: pve, key: token, env: PVE}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:16: error: spec.secrets[0].secret: Secret "pve" holds provider "pve"'s API token (the host configuration); a provider credential never goes to a guest
        "#]],
    );
}

#[test]
fn the_proxmox_token_is_never_sent_to_a_git_host_or_an_api() {
    check_under_token_secret_host(
        &[
            (
                "fleet/fleet.yaml",
                &FLEET.replace(
                    "  images:\n",
                    "    - {name: pve, type: proxmox}\n  images:\n",
                ),
            ),
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/secrets/pve.yaml",
                &PVE_TOKEN_SECRET.replace(
                    "allowed: {tasks: [t]}",
                    "allowed: {tasks: [t], loadouts: [dev], hosts: [git.example.org, api.example.com]}",
                ),
            ),
            (
                "fleet/tasks/t.yaml",
                &task_with(
                    "t",
                    "  command: ['true']\n  repository: {url: 'https://git.example.org/team/app', credentials: {secret: pve, key: token}}\n",
                ),
            ),
            (
                "fleet/loadouts/dev.yaml",
                "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: dev}\nspec:\n  network: {mode: brokered}\n  egress:\n    credentials:\n      - {host: api.example.com, secret: {secret: pve, key: token}}\n",
            ),
        ],
        expect![[r#"
            fleet/loadouts/dev.yaml:8:50: error: spec.egress.credentials[0].secret.secret: Secret "pve" holds provider "pve"'s API token (the host configuration); a provider credential is never sent anywhere but to its provider
            fleet/tasks/t.yaml:8:79: error: spec.repository.credentials.secret: Secret "pve" holds provider "pve"'s API token (the host configuration); a provider credential is never sent anywhere but to its provider
        "#]],
    );
}

#[test]
fn the_proxmox_token_secret_is_missing() {
    check_under_token_secret_host(
        &[(
            "fleet/fleet.yaml",
            &FLEET.replace(
                "  images:\n",
                "    - {name: pve, type: proxmox}\n  images:\n",
            ),
        )],
        expect![[r#"
            fleet/fleet.yaml:9:14: error: spec.providers[1].name: provider "pve" takes its API token from Secret pve/token (the host configuration), which this revision lacks; create it with `fleet secret set pve token`
        "#]],
    );
}

#[test]
fn a_pool_over_the_hosts_vm_limit() {
    check(
        &[(
            "fleet/vms/pool.yaml",
            "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {name: p}\nspec:\n  replicas: 9\n  template:\n    spec: {provider: local, image: micro, resources: {memory: 64Mi}}\n",
        )],
        expect![[r#"
            fleet/vms/pool.yaml:1:1: error: VM p-09: this revision asks for more than 8 VMs, limits.maxVms (the host configuration's limits); ask the host's administrator to raise it, or ask for less
        "#]],
    );
}

#[test]
fn vms_over_the_hosts_cpu_limit() {
    check(
        &[
            (
                "fleet/vms/a.yaml",
                &VM.replace(
                    "  image: micro\n",
                    "  image: micro\n  resources: {cpus: 12}\n",
                ),
            ),
            (
                "fleet/vms/b.yaml",
                &VM.replace("name: a", "name: b").replace(
                    "  image: micro\n",
                    "  image: micro\n  resources: {cpus: 8}\n",
                ),
            ),
        ],
        expect![[r#"
            fleet/vms/b.yaml:1:1: error: VM b: this revision asks for more than 16 vCPUs in total, limits.maxCpus (the host configuration's limits); ask the host's administrator to raise it, or ask for less
        "#]],
    );
}

#[test]
fn vms_over_the_hosts_memory_limit() {
    check(
        &[(
            "fleet/vms/a.yaml",
            &VM.replace(
                "  image: micro\n",
                "  image: micro\n  resources: {memory: 9Gi}\n",
            ),
        )],
        expect![[r#"
            fleet/vms/a.yaml:1:1: error: VM a: this revision asks for more than 8192 MiB of memory in total, limits.maxMemory (the host configuration's limits); ask the host's administrator to raise it, or ask for less
        "#]],
    );
}

#[test]
fn a_host_configuration_committed_into_the_fleet() {
    check(
        &[("fleet/vms/host.yaml", HOST)],
        expect![[r#"
            fleet/vms/host.yaml:2:7: error: kind: Host does not belong in vms/host.yaml; a file here holds kind VM or VMPool
        "#]],
    );
}

#[test]
fn two_references_of_one_vm_deliver_one_file_differently() {
    let other = SECRET
        .replace("name: api", "name: other")
        .replace("tasks: [t]", "tasks: [u]");
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            ("fleet/secrets/api.yaml", SECRET),
            ("fleet/secrets/other.yaml", &other),
            (
                "fleet/tasks/t.yaml",
                &task_with_secrets("    - {secret: api, key: token, file: git/token}\n"),
            ),
            (
                "fleet/tasks/u.yaml",
                &task_with_secrets("    - {secret: other, key: token, file: git/token}\n")
                    .replace("name: t", "name: u"),
            ),
        ],
        expect![[r#"
            fleet/tasks/u.yaml:1:1: error: VM a: secret file git/token is other/token here but api/token in fleet/tasks/t.yaml; one path holds one value, use another file name
        "#]],
    );
}

#[test]
fn the_proxmox_token_goes_to_no_guest_even_when_its_provider_is_unused() {
    // The revision does not name `pve`, and a task takes the token's Secret by name.
    check_under_token_secret_host(
        &[
            ("fleet/vms/a.yaml", VM),
            ("fleet/secrets/pve.yaml", PVE_TOKEN_SECRET),
            (
                "fleet/tasks/t.yaml",
                &task_with_secrets("    - {secret: pve, key: token, env: PVE}\n"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:8:16: error: spec.secrets[0].secret: Secret "pve" holds provider "pve"'s API token (the host configuration); a provider credential never goes to a guest
        "#]],
    );
}

#[test]
fn the_proxmox_token_secret_must_stay_in_the_revision() {
    check_under_token_secret_host(
        &[("fleet/vms/a.yaml", VM)],
        expect![[r#"
        fleet/fleet.yaml:4:9: error: metadata.name: provider "pve" takes its API token from Secret pve/token (the host configuration), which this revision lacks; create it with `fleet secret set pve token`
    "#]],
    );
}

#[test]
fn repository_credentials_go_only_to_the_host_and_task_their_secret_allows() {
    check(
        &[
            ("fleet/vms/a.yaml", VM),
            (
                "fleet/tasks/t.yaml",
                &task_with(
                    "t",
                    "  command: ['true']\n  repository:\n    url: https://git.example.org/team/app\n    rev: 0123456789abcdef0123456789abcdef01234567\n    credentials: {secret: api, key: token}\n",
                ),
            ),
            (
                "fleet/tasks/u.yaml",
                &task_with(
                    "u",
                    "  command: ['true']\n  repository:\n    url: https://git.example.org:8443/team/app\n    credentials: {secret: api, key: nope, username: me}\n",
                ),
            ),
            (
                "fleet/tasks/v.yaml",
                &task_with(
                    "v",
                    "  command: ['true']\n  repository: {url: app, credentials: {secret: api, key: token}}\n",
                ),
            ),
            (
                "fleet/secrets/api.yaml",
                &SECRET.replace("tasks: [t]}", "tasks: [t], hosts: [git.example.org]}"),
            ),
            (
                "fleet/tasks/w.yaml",
                &task_with(
                    "w",
                    "  command: ['true']\n  repository: {url: 'https://git.example.org/team/app', rev: main}\n",
                ),
            ),
            (
                "fleet/tasks/x.yaml",
                &task_with(
                    "x",
                    "  command: ['true']\n  repository: {url: app}\n  results: {push: {url: 'ssh://git@git.example.org/team/app', credentials: {secret: api, key: token}}}\n",
                ),
            ),
            ("fleet/app/README", "app\n"),
        ],
        expect![[r#"
            fleet/tasks/u.yaml:9:10: error: spec.repository.url: "https://git.example.org:8443/team/app" is not a repository the host configuration allows (it allows: https://git.example.org/team/*); ask the host's administrator to add a pattern to repositories
            fleet/tasks/u.yaml:10:27: error: spec.repository.credentials.secret: Secret "api" (fleet/secrets/api.yaml) does not allow task "u"; add it to the Secret's spec.allowed.tasks
            fleet/tasks/u.yaml:10:27: error: spec.repository.credentials.secret: Secret "api" (fleet/secrets/api.yaml) may not be sent to git.example.org:8443; add git.example.org:8443 to the Secret's spec.allowed.hosts
            fleet/tasks/u.yaml:10:37: error: spec.repository.credentials.key: Secret "api" (fleet/secrets/api.yaml) has no key "nope"; its keys: token
            fleet/tasks/v.yaml:8:39: error: spec.repository.credentials: credentials are for https:// and ssh:// repositories, and "app" is neither; remove credentials
            fleet/tasks/w.yaml:8:62: error: spec.repository.rev: string "main" is not valid; expected the commit to check out, pinned: 40 hex digits, on `branch` (else on any branch)
            fleet/tasks/x.yaml:9:25: error: spec.results.push.url: "ssh://git@git.example.org/team/app" is not a repository the host configuration lets results be pushed to (pushes); ask the host's administrator to add a pattern to pushes
            fleet/tasks/x.yaml:9:85: error: spec.results.push.credentials.secret: Secret "api" (fleet/secrets/api.yaml) does not allow task "x"; add it to the Secret's spec.allowed.tasks
            fleet/tasks/x.yaml:9:85: error: spec.results.push.credentials.secret: Secret "api" (fleet/secrets/api.yaml) may not be sent to git.example.org:22; add git.example.org:22 to the Secret's spec.allowed.hosts
        "#]],
    );
}

fn fresh_task(vm: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: Task\nmetadata: {{name: t}}\nspec:\n  vm: {vm}\n  command: [\"true\"]\n"
    )
}

#[test]
fn fresh_task_names_no_pool_or_is_not_fresh_or_a_vm_takes_a_members_name() {
    check(
        &[
            (
                "fleet/vms/w.yaml",
                &pool("w", "0").replace("  template:", "  fresh: {warm: 1}\n  template:"),
            ),
            ("fleet/vms/w-f2.yaml", &VM.replace("name: a", "name: w-f2")),
            (
                "fleet/tasks/t.yaml",
                &fresh_task("{pool: nowhere, fresh: true}"),
            ),
            (
                "fleet/tasks/u.yaml",
                &fresh_task("{pool: w, fresh: false}").replace("name: t", "name: u"),
            ),
            (
                "fleet/tasks/v.yaml",
                &fresh_task("{pool: w, fresh: true, keepFor: soon}").replace("name: t", "name: v"),
            ),
        ],
        expect![[r#"
            fleet/tasks/t.yaml:5:14: error: spec.vm.pool: no VMPool named "nowhere"; defined: w
            fleet/tasks/u.yaml:5:24: error: spec.vm.fresh: boolean false is not valid; expected true
            fleet/tasks/v.yaml:5:39: error: spec.vm.keepFor: string "soon" is not valid; expected a duration: a whole number with a unit ms, s, m or h (for example 30s or 5m)
            fleet/vms/w-f2.yaml:4:9: error: metadata.name: the VM "w-f2" has the name of a fresh member of pool "w" (<pool>-f<N>); rename it
        "#]],
    );
}

#[test]
fn a_fresh_pool_protects_no_member() {
    check(
        &[(
            "fleet/vms/w.yaml",
            &pool("w", "0").replace(
                "  template:\n    spec: {provider: local, image: micro}",
                "  fresh: {}\n  template:\n    spec: {provider: local, image: micro, protect: true}",
            ),
        )],
        expect![[r#"
            fleet/vms/w.yaml:8:52: error: spec.template.spec.protect: pool w makes fresh members for task runs, which go when their run is over; remove protect, or make the long-lived VMs replicas of another pool
        "#]],
    );
}

#[test]
fn leases_and_idle_rules_are_bounded_and_only_for_vms_that_can_have_them() {
    let lease = |name: &str, lease: &str| {
        VM.replace("name: a", &format!("name: {name}")).replace(
            "  image: micro\n",
            &format!("  image: micro\n  lease: {lease}\n"),
        )
    };
    check(
        &[
            ("fleet/vms/a.yaml", &lease("a", "{ttl: 5s}")),
            ("fleet/vms/b.yaml", &lease("b", "{ttl: 9000h}")),
            (
                "fleet/vms/c.yaml",
                &lease("c", "{ttl: 1h, onExpiry: pause}"),
            ),
            ("fleet/vms/d.yaml", &lease("d", "{ttl: 1h, renewals: -1}")),
            ("fleet/vms/e.yaml", &lease("e", "{onExpiry: stop}")),
            (
                "fleet/vms/f.yaml",
                &lease("f", "{ttl: 8h, onExpiry: destroy, renewals: 2}"),
            ),
            (
                "fleet/vms/g.yaml",
                &VM.replace("name: a", "name: g")
                    .replace("  image: micro\n", "  image: micro\n  idle: {stopAfter: 2s}\n"),
            ),
            (
                "fleet/vms/w.yaml",
                &pool("w", "0").replace(
                    "  template:\n    spec: {provider: local, image: micro}",
                    "  fresh: {}\n  template:\n    spec: {provider: local, image: micro, lease: {ttl: 1h}, idle: {stopAfter: 5m}}",
                ),
            ),
        ],
        expect![[r#"
            fleet/vms/a.yaml:8:16: error: spec.lease.ttl: "5s" is out of range; a lease lasts from 10s to 8784h (a year)
            fleet/vms/b.yaml:8:16: error: spec.lease.ttl: "9000h" is out of range; a lease lasts from 10s to 8784h (a year)
            fleet/vms/c.yaml:8:30: error: spec.lease.onExpiry: string "pause" is not valid; valid: stop, destroy
            fleet/vms/d.yaml:8:30: error: spec.lease.renewals: -1 is too small; the minimum is 0
            fleet/vms/e.yaml:8:10: error: spec.lease: missing required field `ttl`
            fleet/vms/g.yaml:8:21: error: spec.idle.stopAfter: "2s" is out of range; use a duration from 10s to 168h
            fleet/vms/w.yaml:8:43: error: spec.template.spec.lease: applies to the pool's replicas, and it has none (fresh members live for their runs); remove lease, or set replicas
            fleet/vms/w.yaml:8:61: error: spec.template.spec.idle: applies to the pool's replicas, and it has none (fresh members live for their runs); remove idle, or set replicas
        "#]],
    );
}

#[test]
fn a_quota_names_a_pool_or_labels_and_caps_something() {
    check(
        &[
            (
                "fleet/fleet.yaml",
                &format!(
                    "{FLEET}  policy:\n    quota:\n      - {{pool: nowhere, vms: 1}}\n      - {{pool: w, labels: {{team: ml}}, vms: 1}}\n      - {{labels: {{team: ml}}}}\n      - {{vms: 2}}\n"
                ),
            ),
            ("fleet/vms/w.yaml", &pool("w", "1")),
        ],
        expect![[r#"
            fleet/fleet.yaml:15:16: error: spec.policy.quota[0].pool: no VMPool named "nowhere"; defined: w
            fleet/fleet.yaml:16:9: error: spec.policy.quota[1]: counts the VMs of a pool or those with some labels: set exactly one of pool and labels
            fleet/fleet.yaml:17:9: error: spec.policy.quota[2]: caps nothing: set vms, memory or both
            fleet/fleet.yaml:18:9: error: spec.policy.quota[3]: counts the VMs of a pool or those with some labels: set exactly one of pool and labels
        "#]],
    );
}

#[test]
fn a_revision_over_a_quota_is_refused_naming_the_rule() {
    let labelled = |name: &str, memory: &str| {
        VM.replace("name: a", &format!("name: {name}\n  labels: {{team: ml}}"))
            .replace(
                "  image: micro\n",
                &format!("  image: micro\n  resources: {{memory: {memory}}}\n"),
            )
    };
    check(
        &[
            (
                "fleet/fleet.yaml",
                &format!(
                    "{FLEET}  policy:\n    quota:\n      - {{pool: w, vms: 4}}\n      - {{labels: {{team: ml}}, vms: 5, memory: 1Gi}}\n"
                ),
            ),
            (
                "fleet/vms/w.yaml",
                &pool("w", "2").replace("  template:", "  fresh: {max: 2, warm: 1}\n  template:"),
            ),
            ("fleet/vms/m1.yaml", &labelled("m1", "768Mi")),
            ("fleet/vms/m2.yaml", &labelled("m2", "512Mi")),
            (
                "fleet/vms/m3.yaml",
                &format!("{}  state: stopped\n", labelled("m3", "4Gi")),
            ),
        ],
        expect![[r#"
            fleet/fleet.yaml:15:9: error: spec.policy.quota[0] (pool w): the revision has 5 such VMs (fresh pools counted at fresh.max + fresh.warm), the quota allows 4: remove some, or raise vms
            fleet/fleet.yaml:16:9: error: spec.policy.quota[1] (labels team=ml): its running VMs ask for 1280 MiB of memory, the quota allows 1024 MiB: stop or shrink some, or raise memory
        "#]],
    );
}

const WORKSPACE: &str = "apiVersion: fleet/v1\nkind: Workspace\nmetadata: {name: notes}\nspec: {provider: local, size: 1Gi}\n";

#[test]
fn workspaces_mount_paths_the_schema_refuses() {
    check(
        &[
            ("fleet/workspaces/notes.yaml", WORKSPACE),
            (
                "fleet/workspaces/big.yaml",
                "apiVersion: fleet/v1\nkind: Workspace\nmetadata: {name: big}\nspec: {provider: local, size: 1Gi, label: 'bad label'}\n",
            ),
            (
                "fleet/vms/a.yaml",
                &vm_with(
                    "  workspaces:\n    - {name: notes, mountPath: /}\n    - {name: big, mountPath: '/workspace; rm'}\n    - {name: big, mountPath: relative}\n",
                ),
            ),
        ],
        expect![[r#"
            fleet/vms/a.yaml:9:32: error: spec.workspaces[0].mountPath: string "/" is not valid; expected an absolute guest path: `/` and letters, digits, `.`, `_`, `-`, at most 255 bytes
            fleet/vms/a.yaml:10:30: error: spec.workspaces[1].mountPath: string "/workspace; rm" is not valid; expected an absolute guest path: `/` and letters, digits, `.`, `_`, `-`, at most 255 bytes
            fleet/vms/a.yaml:11:30: error: spec.workspaces[2].mountPath: string "relative" is not valid; expected an absolute guest path: `/` and letters, digits, `.`, `_`, `-`, at most 255 bytes
            fleet/workspaces/big.yaml:4:43: error: spec.label: string "bad label" is not valid; expected an ext filesystem label: letters, digits, `-` and `_`, at most 16
        "#]],
    );
}

#[test]
fn workspaces_hostile_mounts_sizes_and_sharing() {
    check(
        &[
            ("fleet/workspaces/notes.yaml", WORKSPACE),
            (
                "fleet/workspaces/tiny.yaml",
                "apiVersion: fleet/v1\nkind: Workspace\nmetadata: {name: tiny}\nspec: {provider: local, size: 8Mi}\n",
            ),
            (
                "fleet/vms/a.yaml",
                &vm_with(
                    "  workspaces:\n    - {name: notes, mountPath: /workspace/../etc}\n    - {name: notes, mountPath: /proc/x}\n    - {name: nope, mountPath: /workspace}\n    - {name: tiny, mountPath: /data}\n    - {name: tiny, mountPath: /data/}\n    - {name: notes, mountPath: /usr}\n    - {name: tiny, mountPath: /tmp/w}\n    - {name: tiny, mountPath: /var/run/x}\n    - {name: tiny, mountPath: /data/inner}\n",
                ),
            ),
            (
                "fleet/vms/b.yaml",
                "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: b}\nspec:\n  provider: local\n  image: micro\n  workspaces: [{name: notes, mountPath: /workspace}]\n",
            ),
            (
                "fleet/vms/pool.yaml",
                "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {name: pool}\nspec:\n  replicas: 2\n  template:\n    spec:\n      provider: local\n      image: micro\n      workspaces: [{name: notes, mountPath: /workspace}]\n",
            ),
        ],
        expect![[r#"
            fleet/vms/a.yaml:9:5: error: spec.workspaces: 9 workspaces; a VM mounts at most 8
            fleet/vms/a.yaml:9:32: error: spec.workspaces[0].mountPath: "/workspace/../etc" is not a plain path (no empty, . or .. parts); write it as /workspace/repo
            fleet/vms/a.yaml:10:14: error: spec.workspaces[1].name: workspace "notes" is mounted twice in this VM; mount it once
            fleet/vms/a.yaml:10:32: error: spec.workspaces[1].mountPath: "/proc/x" is in /proc, which the guest's system owns; mount workspaces elsewhere, such as /workspace
            fleet/vms/a.yaml:11:14: error: spec.workspaces[2].name: no Workspace named "nope"; add fleet/workspaces/nope.yaml, or remove the mount
            fleet/vms/a.yaml:13:14: error: spec.workspaces[4].name: workspace "tiny" is mounted twice in this VM; mount it once
            fleet/vms/a.yaml:13:31: error: spec.workspaces[4].mountPath: "/data/" is mounted twice; give each workspace its own path
            fleet/vms/a.yaml:14:14: error: spec.workspaces[5].name: workspace "notes" is mounted twice in this VM; mount it once
            fleet/vms/a.yaml:14:32: error: spec.workspaces[5].mountPath: "/usr" is in /usr, which the guest's system owns; mount workspaces elsewhere, such as /workspace
            fleet/vms/a.yaml:15:14: error: spec.workspaces[6].name: workspace "tiny" is mounted twice in this VM; mount it once
            fleet/vms/a.yaml:15:31: error: spec.workspaces[6].mountPath: "/tmp/w" is in a directory every user of the guest may write to; mount workspaces elsewhere, such as /workspace
            fleet/vms/a.yaml:16:14: error: spec.workspaces[7].name: workspace "tiny" is mounted twice in this VM; mount it once
            fleet/vms/a.yaml:16:31: error: spec.workspaces[7].mountPath: "/var/run/x" is in a directory every user of the guest may write to; mount workspaces elsewhere, such as /workspace
            fleet/vms/a.yaml:17:14: error: spec.workspaces[8].name: workspace "tiny" is mounted twice in this VM; mount it once
            fleet/vms/a.yaml:17:31: error: spec.workspaces[8].mountPath: "/data/inner" and "/data" nest: one workspace would hide part of the other; mount them side by side
            fleet/vms/b.yaml:7:23: error: spec.workspaces[0].name: workspace "notes" is attached to VM "a" already; a workspace belongs to one VM at a time
            fleet/vms/pool.yaml:10:7: error: spec.template.spec.workspaces: a workspace belongs to one VM, and a pool's members would share it; attach workspaces to VMs of their own
            fleet/workspaces/tiny.yaml:4:31: error: spec.size: "8Mi" is out of bounds; a workspace is 16Mi to 16Ti
        "#]],
    );
}

#[test]
fn a_workspace_on_proxmox_or_another_provider_is_refused() {
    let fleet = "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: lab}\nspec:\n  providers:\n    - {name: local, type: libvirt}\n    - {name: pve, type: proxmox}\n  images:\n    - {name: micro, kernel: micro/vmlinuz, initrd: micro/initrd.img, template: tmpl}\n";
    let workspace = "apiVersion: fleet/v1\nkind: Workspace\nmetadata: {name: notes}\nspec: {provider: pve, size: 1Gi}\n";
    let vm = vm_with("  workspaces: [{name: notes, mountPath: /workspace}]\n");
    check_bytes(
        &[
            ("fleet/fleet.yaml", fleet.as_bytes()),
            ("fleet/workspaces/notes.yaml", workspace.as_bytes()),
            ("fleet/vms/a.yaml", vm.as_bytes()),
        ],
        false,
        expect![[r#"
            fleet/vms/a.yaml:8:23: error: spec.workspaces[0].name: workspace "notes" lives on provider "pve" and this VM runs on "local"; a workspace is attached on its own provider
            fleet/workspaces/notes.yaml:4:18: error: spec.provider: "pve" is a Proxmox provider, and workspaces live on libvirt providers for now; use a libvirt provider
        "#]],
    );
}

#[test]
fn a_snapshot_policy_needs_workspaces_and_sane_bounds() {
    check(
        &[
            ("fleet/workspaces/notes.yaml", WORKSPACE),
            (
                "fleet/vms/a.yaml",
                &vm_with("  snapshots: {before: [replace], keep: 3}\n"),
            ),
            (
                "fleet/vms/b.yaml",
                &vm_with(
                    "  workspaces: [{name: notes, mountPath: /workspace}]\n  snapshots: {before: [replace, replace, destroy], keep: 0}\n",
                ),
            ),
            (
                "fleet/vms/c.yaml",
                &vm_with("  snapshots: {before: [], keep: 51}\n"),
            ),
            (
                "fleet/vms/pool.yaml",
                "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {name: pool}\nspec:\n  replicas: 1\n  template:\n    spec: {provider: local, image: micro, snapshots: {before: [reset], keep: 2}}\n",
            ),
        ],
        expect![[r#"
            fleet/vms/a.yaml:8:14: error: spec.snapshots: snapshots are of the VM's workspaces, and it has none: add workspaces, or remove snapshots
            fleet/vms/b.yaml:9:23: error: spec.snapshots.before: ["replace","replace","destroy"] has non-unique elements
            fleet/vms/b.yaml:9:42: error: spec.snapshots.before[2]: string "destroy" is not valid; valid: replace, reset
            fleet/vms/b.yaml:9:58: error: spec.snapshots.keep: 0 is too small; the minimum is 1
            fleet/vms/c.yaml:8:23: error: spec.snapshots.before: needs at least 1 item(s)
            fleet/vms/c.yaml:8:33: error: spec.snapshots.keep: 51 is too large; the maximum is 50
            fleet/vms/pool.yaml:7:54: error: spec.template.spec.snapshots: snapshots are of a VM's workspaces, and a pool's members have none: remove snapshots
        "#]],
    );
}

#[test]
fn a_loadouts_workspaces_serve_one_vm_and_no_pool() {
    let loadout = |name: &str, tail: &str| {
        format!("apiVersion: fleet/v1\nkind: Loadout\nmetadata: {{name: {name}}}\nspec:\n{tail}")
    };
    let vm = |name: &str, tail: &str| {
        format!(
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec:\n  provider: local\n  image: micro\n{tail}"
        )
    };
    check(
        &[
            ("fleet/workspaces/notes.yaml", WORKSPACE),
            (
                "fleet/workspaces/cache.yaml",
                "apiVersion: fleet/v1\nkind: Workspace\nmetadata: {name: cache}\nspec: {provider: local, size: 1Gi}\n",
            ),
            (
                "fleet/loadouts/dev.yaml",
                &loadout(
                    "dev",
                    "  workspaces:\n    - {name: notes, mountPath: /workspace}\n    - {name: gone, mountPath: /gone}\n    - {name: cache, mountPath: /proc/cache}\n",
                ),
            ),
            (
                "fleet/loadouts/solo.yaml",
                &loadout("solo", "  workspaces: [{name: cache, mountPath: /cache}]\n"),
            ),
            // Uses dev: its own mount nests in dev's /workspace.
            (
                "fleet/vms/a.yaml",
                &vm(
                    "a",
                    "  loadout: dev\n  workspaces: [{name: cache, mountPath: /workspace/cache}]\n",
                ),
            ),
            // Uses dev too: notes would be on two VMs.
            ("fleet/vms/b.yaml", &vm("b", "  loadout: dev\n")),
            (
                "fleet/vms/pool.yaml",
                "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {name: pool}\nspec:\n  replicas: 2\n  template:\n    spec: {provider: local, image: micro, loadout: solo}\n",
            ),
        ],
        expect![[r#"
            fleet/loadouts/dev.yaml:6:14: error: spec.workspaces[0].name: (for VM "b") workspace "notes" is attached to VM "a" already; a workspace belongs to one VM at a time (loadout "dev" mounts it: use that loadout in one VM only, or mount the workspace in the VM's own file)
            fleet/loadouts/dev.yaml:7:14: error: spec.workspaces[1].name: no Workspace named "gone"; add fleet/workspaces/gone.yaml, or remove the mount
            fleet/loadouts/dev.yaml:8:14: error: spec.workspaces[2].name: (for VM "b") workspace "cache" is attached to VM "a" already; a workspace belongs to one VM at a time (loadout "dev" mounts it: use that loadout in one VM only, or mount the workspace in the VM's own file)
            fleet/loadouts/dev.yaml:8:32: error: spec.workspaces[2].mountPath: "/proc/cache" is in /proc, which the guest's system owns; mount workspaces elsewhere, such as /workspace
            fleet/vms/a.yaml:8:41: error: spec.workspaces[0].mountPath: "/workspace/cache" and workspace "notes"'s "/workspace" (from loadout "dev") are the same or nest; mount them side by side
            fleet/vms/pool.yaml:7:52: error: spec.template.spec.loadout: loadout "solo" mounts workspace "cache" (from loadout "solo"), and a pool's members would share it; give the pool a loadout without workspaces
        "#]],
    );
}

#[test]
fn a_vm_takes_its_loadouts_workspaces_and_overrides_their_paths() {
    let desired = desired_of(&[
        ("fleet/workspaces/notes.yaml", WORKSPACE),
        (
            "fleet/workspaces/cache.yaml",
            "apiVersion: fleet/v1\nkind: Workspace\nmetadata: {name: cache}\nspec: {provider: local, size: 2Gi}\n",
        ),
        (
            "fleet/loadouts/base.yaml",
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: base}\nspec:\n  workspaces: [{name: notes, mountPath: /notes}]\n",
        ),
        (
            "fleet/loadouts/dev.yaml",
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: dev}\nspec:\n  extends: [base]\n  workspaces: [{name: cache, mountPath: /cache}]\n",
        ),
        (
            "fleet/vms/a.yaml",
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: a}\nspec:\n  provider: local\n  image: micro\n  loadout: dev\n  workspaces: [{name: notes, mountPath: /workspace}]\n  snapshots: {before: [reset], keep: 2}\n",
        ),
    ]);
    let mounts: Vec<(String, String, u64)> = desired.vms["a"]
        .config
        .workspaces
        .iter()
        .map(|m| (m.name.clone(), m.mount_path.clone(), m.size_mib))
        .collect();
    assert_eq!(
        mounts,
        [
            ("notes".to_owned(), "/workspace".to_owned(), 1024),
            ("cache".to_owned(), "/cache".to_owned(), 2048)
        ]
    );
    assert_eq!(desired.workspaces["cache"].vm.as_deref(), Some("a"));
}

#[test]
fn a_placement_names_the_fleets_libvirt_providers_with_its_template_among_them() {
    let pool = |name: &str, tail: &str| {
        format!(
            "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {{name: {name}}}\nspec:\n  replicas: 2\n{tail}"
        )
    };
    check(
        &[
            (
                "fleet/fleet.yaml",
                &fleet_with_provider(
                    "    - name: local\n      type: libvirt\n    - {name: pve, type: proxmox}\n",
                ),
            ),
            (
                "fleet/vms/a.yaml",
                &pool(
                    "a",
                    "  placement: {providers: [local, nowhere, pve]}\n  template:\n    spec: {provider: local, image: micro}\n",
                ),
            ),
            (
                "fleet/vms/b.yaml",
                &pool(
                    "b",
                    "  placement: {providers: [local, local], strategy: balance}\n  template:\n    spec: {provider: local, image: micro}\n",
                ),
            ),
            (
                "fleet/vms/c.yaml",
                &pool(
                    "c",
                    "  placement: {providers: []}\n  template:\n    spec: {provider: pve, image: micro}\n",
                ),
            ),
            (
                "fleet/vms/d.yaml",
                &pool(
                    "d",
                    "  placement: {providers: [local], strategy: pack}\n  fresh: {max: 2}\n  template:\n    spec: {provider: local, image: micro}\n",
                ),
            ),
        ],
        expect![[r#"
            fleet/vms/a.yaml:6:34: error: spec.placement.providers[1]: no provider named "nowhere"; name one of spec.providers in fleet.yaml
            fleet/vms/a.yaml:6:43: error: spec.placement.providers[2]: "pve" is a Proxmox provider, and placement spreads pools over libvirt providers for now; list libvirt providers only
            fleet/vms/b.yaml:6:26: error: spec.placement.providers: ["local","local"] has non-unique elements
            fleet/vms/b.yaml:6:52: error: spec.placement.strategy: string "balance" is not valid; valid: spread, pack
            fleet/vms/c.yaml:6:26: error: spec.placement.providers: needs at least 1 item(s)
            fleet/vms/d.yaml:6:14: error: spec.placement: pool d makes fresh members for task runs, which are made on its template's provider; remove placement, or make the fresh members in a pool of their own
        "#]],
    );
}
