//! A VM's NoCloud seed (user-data, meta-data, network-config), rendered from the templates in
//! `cloud-init/` and its resolved loadout.
//!
//! The templates are parsed as YAML and the VM's values are added as data, then serialised:
//! no string templating, so a loadout value cannot inject keys or documents.
//!
//! Architecture invariant: pure, and never given a secret (a `DesiredVm` holds none).

use serde_json::{Map, Value, json};

use crate::resolve::DesiredVm;
use crate::spec::{GuestUser, NetworkMode};

const USER_DATA: &str = include_str!("../../../cloud-init/user-data.yaml");
const META_DATA: &str = include_str!("../../../cloud-init/meta-data.yaml");
const NETWORK_ISOLATED: &str = include_str!("../../../cloud-init/network-config-isolated.yaml");
const NETWORK_FULL: &str = include_str!("../../../cloud-init/network-config-full.yaml");

/// The three files of a seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    pub user_data: String,
    pub meta_data: String,
    pub network_config: String,
}

fn template(text: &str) -> Map<String, Value> {
    match serde_saphyr::from_str::<Value>(text) {
        Ok(Value::Object(map)) => map,
        // The templates are part of the build and covered by tests; an empty mapping is the
        // safe reading of anything else.
        _ => Map::new(),
    }
}

fn yaml(value: &Value) -> String {
    serde_saphyr::to_string(value).expect("JSON values serialise to YAML")
}

/// One `users` entry of cloud-config. The password stays locked and no other keys are set, so
/// a loadout grants exactly what it names.
fn cloud_init_user(u: &GuestUser) -> Value {
    let mut entry = json!({ "name": u.name, "lock_passwd": true });
    if !u.groups.is_empty() {
        let groups: Vec<&str> = u.groups.iter().map(|g| g.0.as_str()).collect();
        entry["groups"] = json!(groups.join(","));
    }
    if let Some(shell) = &u.shell {
        entry["shell"] = json!(shell);
    }
    // Without a rule cloud-init grants no sudo (`sudo: false` is deprecated upstream).
    if let Some(rule) = &u.sudo {
        entry["sudo"] = json!(rule);
    }
    if !u.ssh_authorized_keys.is_empty() {
        let keys: Vec<&str> = u.ssh_authorized_keys.iter().map(|k| k.0.as_str()).collect();
        entry["ssh_authorized_keys"] = json!(keys);
    }
    entry
}

/// Renders the seed of `vm`, whose domain UUID is `instance_id`.
pub fn render(vm: &DesiredVm, instance_id: &str) -> Seed {
    let config = &vm.config;
    let mut user = template(USER_DATA);
    if !config.packages.is_empty() {
        user.insert("packages".into(), json!(config.packages));
    }
    if !config.files.is_empty() {
        let files: Vec<Value> = config
            .files
            .iter()
            .map(|f| {
                let mut entry = json!({ "path": f.path, "content": f.content });
                if let Some(mode) = &f.mode {
                    // cloud-init wants a leading zero (0644).
                    let mode = if mode.len() == 3 {
                        format!("0{mode}")
                    } else {
                        mode.clone()
                    };
                    entry["permissions"] = json!(mode);
                }
                entry
            })
            .collect();
        user.insert("write_files".into(), Value::Array(files));
    }
    if !config.runcmd.is_empty() {
        user.insert("runcmd".into(), json!(config.runcmd));
    }
    if !config.users.is_empty() {
        // "default" keeps the image's own user; cloud-init drops it once `users` is set.
        let mut users = vec![json!("default")];
        users.extend(config.users.iter().map(cloud_init_user));
        user.insert("users".into(), Value::Array(users));
    }
    let mut meta = template(META_DATA);
    meta.insert("instance-id".into(), json!(instance_id));
    meta.insert("local-hostname".into(), json!(vm.name));
    let network = match config.network {
        NetworkMode::Full => NETWORK_FULL,
        NetworkMode::Isolated | NetworkMode::Brokered => NETWORK_ISOLATED,
    };
    Seed {
        user_data: format!("#cloud-config\n{}", yaml(&Value::Object(user))),
        meta_data: yaml(&Value::Object(meta)),
        network_config: yaml(&Value::Object(template(network))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::GuestFile;

    fn vm(runcmd: Vec<String>, files: Vec<GuestFile>) -> DesiredVm {
        crate::resolve::example_vm("a", |c| {
            c.memory_mib = 256;
            c.packages = vec!["git".into()];
            c.files = files;
            c.runcmd = runcmd;
        })
    }

    #[test]
    fn renders_the_loadout_into_cloud_config() {
        let seed = render(
            &vm(
                vec!["echo ready".into()],
                vec![GuestFile {
                    path: "/etc/motd".into(),
                    content: "hi\n".into(),
                    mode: Some("644".into()),
                }],
            ),
            "1234",
        );
        expect_test::expect![[r#"
            #cloud-config
            package_update: false
            package_upgrade: false
            ssh_pwauth: false
            disable_root: true
            packages:
            - git
            write_files:
            - path: /etc/motd
              content: |
                hi
              permissions: "0644"
            runcmd:
            - echo ready
        "#]]
        .assert_eq(&seed.user_data);
        assert_eq!(
            seed.meta_data,
            "instance-id: '1234'\nlocal-hostname: a\n".replace('\'', "\"")
        );
        assert_eq!(seed.network_config, "network:\n  config: disabled\n");
    }

    #[test]
    fn users_keep_the_default_user_and_lock_passwords() {
        let mut vm = vm(vec![], vec![]);
        vm.config.users = vec![
            GuestUser {
                name: "agent".into(),
                groups: vec![
                    crate::spec::UnixName("docker".into()),
                    crate::spec::UnixName("adm".into()),
                ],
                shell: Some("/bin/bash".into()),
                sudo: Some("ALL=(ALL) NOPASSWD:ALL".into()),
                ssh_authorized_keys: vec![crate::spec::SshPublicKey(
                    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA op@example".into(),
                )],
            },
            GuestUser {
                name: "viewer".into(),
                groups: vec![],
                shell: None,
                sudo: None,
                ssh_authorized_keys: vec![],
            },
        ];
        let seed = render(&vm, "id");
        let parsed: Value =
            serde_saphyr::from_str(seed.user_data.trim_start_matches("#cloud-config\n"))
                .expect("one YAML document");
        assert_eq!(
            parsed["users"],
            json!([
                "default",
                {
                    "name": "agent",
                    "lock_passwd": true,
                    "groups": "docker,adm",
                    "shell": "/bin/bash",
                    "sudo": "ALL=(ALL) NOPASSWD:ALL",
                    "ssh_authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA op@example"],
                },
                { "name": "viewer", "lock_passwd": true },
            ])
        );
    }

    #[test]
    fn loadout_values_cannot_inject_keys() {
        let hostile = "x\nusers: [{name: evil}]\n---\nruncmd: [rm -rf /]".to_owned();
        let seed = render(&vm(vec![hostile.clone()], vec![]), "id");
        let parsed: Value =
            serde_saphyr::from_str(seed.user_data.trim_start_matches("#cloud-config\n"))
                .expect("one YAML document");
        assert_eq!(parsed["runcmd"], json!([hostile]));
        assert!(parsed.get("users").is_none());
    }
}
