//! fakepve for the Proxmox tests, and a checker of requests against the PVE API schema.
//!
//! The fake runs in `tests/fakepve/harness.py` under the Python of the venv `make fakepve`
//! makes (`FLEET_FAKEPVE_PYTHON` overrides it). Proxmox tests run when
//! `FLEET_TEST_PROXMOX=1` (set by `make test` and CI); then a missing venv fails them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{Value, json};

pub fn enabled() -> bool {
    if std::env::var("FLEET_TEST_PROXMOX").ok().as_deref() == Some("1") {
        true
    } else {
        eprintln!("Proxmox tests skipped: set FLEET_TEST_PROXMOX=1 (make test does)");
        false
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running fake cluster: nodes pve1 and pve2, template `debian-tmpl` (VMID 9000) on pve1.
pub struct FakePve {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub url: String,
    pub ca_file: PathBuf,
    pub token_id: String,
    pub token: String,
    /// Holds the certificate and key for as long as the fake runs.
    _state: tempfile::TempDir,
}

impl FakePve {
    pub fn start() -> FakePve {
        let python = std::env::var_os("FLEET_FAKEPVE_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target/fakepve-venv/bin/python"));
        assert!(
            python.exists(),
            "{} is missing: run `make fakepve` (or set FLEET_FAKEPVE_PYTHON)",
            python.display()
        );
        let state = tempfile::Builder::new()
            .prefix("fakepve-")
            .tempdir()
            .expect("tempdir");
        let mut child = Command::new(python)
            .arg(workspace().join("reconciler/tests/fakepve/harness.py"))
            .arg("--state-dir")
            .arg(state.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start fakepve");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("fakepve hello");
        let hello: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("fakepve did not start ({e}): {line:?}"));
        FakePve {
            child,
            stdin,
            stdout,
            url: hello["url"].as_str().expect("url").to_owned(),
            ca_file: PathBuf::from(hello["caFile"].as_str().expect("caFile")),
            token_id: hello["tokenId"].as_str().expect("tokenId").to_owned(),
            token: hello["token"].as_str().expect("token").to_owned(),
            _state: state,
        }
    }

    /// Sends one control command; panics on an error answer.
    pub fn control(&mut self, command: Value) -> Value {
        writeln!(self.stdin, "{command}").expect("write to fakepve");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read from fakepve");
        let reply: Value = serde_json::from_str(&line).expect("fakepve reply");
        if let Some(e) = reply.get("error") {
            panic!("fakepve {command}: {e}");
        }
        reply["ok"].clone()
    }

    pub fn vms(&mut self) -> Vec<Value> {
        self.control(json!({"op": "vms"}))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn vm_named(&mut self, name: &str) -> Option<Value> {
        self.vms().into_iter().find(|v| v["name"] == name)
    }

    /// Requests since the last call, as they reached the fake.
    pub fn wire(&mut self) -> Vec<WireRequest> {
        serde_json::from_value(self.control(json!({"op": "wire"}))).expect("wire records")
    }

    /// The schema requests are checked against: the file `FLEET_PVE_SCHEMA` names (such as
    /// the official PVE 9.1 schema, when someone has it), else the copy of the same published
    /// API description that fakepve bundles. Nothing outside the checkout and its venv is
    /// needed.
    pub fn schema(&mut self) -> ApiSchema {
        let path = std::env::var_os("FLEET_PVE_SCHEMA")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(
                    self.control(json!({"op": "bundled_schema"}))
                        .as_str()
                        .expect("path"),
                )
            });
        ApiSchema::load(&path)
    }
}

impl Drop for FakePve {
    fn drop(&mut self) {
        // Guests (and their tasks) go first; a panicking test must not leave them running.
        let _ = writeln!(
            self.stdin,
            "{}",
            serde_json::json!({"op": "power_off_guests"})
        );
        let mut line = String::new();
        let _ = self.stdout.read_line(&mut line);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: String,
}

impl WireRequest {
    /// Query and body parameters (form or JSON), values as strings (the last of a
    /// repeated one).
    pub fn params(&self) -> BTreeMap<String, String> {
        self.param_lists()
            .into_iter()
            .filter_map(|(k, mut v)| Some((k, v.pop()?)))
            .collect()
    }

    /// Every value of each parameter: a form repeats an array parameter's name.
    pub fn param_lists(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in form_pairs(&self.query) {
            out.entry(k).or_default().push(v);
        }
        if self.content_type == "application/json" {
            if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&self.body) {
                for (k, v) in map {
                    let values = match v {
                        Value::Array(items) => items.into_iter().map(json_text).collect(),
                        other => vec![json_text(other)],
                    };
                    out.entry(k).or_default().extend(values);
                }
            }
        } else {
            for (k, v) in form_pairs(&self.body) {
                out.entry(k).or_default().push(v);
            }
        }
        out
    }
}

fn json_text(v: Value) -> String {
    match v {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

fn form_pairs(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The PVE API schema (the API viewer's tree), indexed for checking requests.
pub struct ApiSchema {
    /// (path template split in segments, method, that method's `parameters`).
    methods: Vec<(Vec<String>, String, Value)>,
}

impl ApiSchema {
    pub fn load(path: &Path) -> ApiSchema {
        let text = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let tree: Value = serde_json::from_slice(&text).expect("schema JSON");
        let mut methods = Vec::new();
        let split = |path: &str| -> Vec<String> {
            path.split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        // Two shapes of one published description: PVE's api-viewer tree (`path`, `info`,
        // `children`), and fakepve's flat `{"paths": {PATH: {METHOD: spec}}}`.
        fn walk(
            nodes: &Value,
            split: &dyn Fn(&str) -> Vec<String>,
            out: &mut Vec<(Vec<String>, String, Value)>,
        ) {
            for node in nodes.as_array().into_iter().flatten() {
                let segments = split(node["path"].as_str().unwrap_or(""));
                if let Some(info) = node["info"].as_object() {
                    for (method, spec) in info {
                        out.push((segments.clone(), method.clone(), spec["parameters"].clone()));
                    }
                }
                walk(&node["children"], split, out);
            }
        }
        if let Some(paths) = tree["paths"].as_object() {
            for (path, info) in paths {
                for (method, spec) in info.as_object().into_iter().flatten() {
                    methods.push((split(path), method.clone(), spec["parameters"].clone()));
                }
            }
        } else {
            walk(&tree, &split, &mut methods);
        }
        assert!(
            methods.len() > 500,
            "{} holds only {} methods",
            path.display(),
            methods.len()
        );
        ApiSchema { methods }
    }

    /// Checks one request: the path and method exist, every parameter is declared with a
    /// value of its type (enum, pattern, bounds, length), and required ones are present.
    pub fn check(&self, request: &WireRequest) -> Result<(), String> {
        let what = format!("{} {}", request.method, request.path);
        let rel = request
            .path
            .strip_prefix("/api2/json")
            .ok_or_else(|| format!("{what}: not under /api2/json"))?;
        let segments: Vec<String> = rel
            .split('/')
            .filter(|s| !s.is_empty())
            .map(percent_decode)
            .collect();
        // The template with the most literal segments that matches wins (as PVE routes).
        let mut best: Option<(usize, &Vec<String>, BTreeMap<String, String>)> = None;
        for (template, _, _) in &self.methods {
            if template.len() != segments.len() {
                continue;
            }
            let mut captured = BTreeMap::new();
            let mut literal = 0;
            let fits = template.iter().zip(&segments).all(|(t, s)| {
                if let Some(name) = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                    captured.insert(name.to_owned(), s.clone());
                    true
                } else {
                    literal += 1;
                    t == s
                }
            });
            if fits && best.as_ref().is_none_or(|(l, _, _)| literal > *l) {
                best = Some((literal, template, captured));
            }
        }
        let (_, template, captured) = best.ok_or_else(|| format!("{what}: no such path"))?;
        let parameters = self
            .methods
            .iter()
            .find(|(t, m, _)| t == template && *m == request.method)
            .map(|(_, _, p)| p)
            .ok_or_else(|| format!("{what}: method not allowed on /{}", template.join("/")))?;
        let properties = parameters["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let mut given = request.param_lists();
        given.extend(captured.into_iter().map(|(k, v)| (k, vec![v])));
        for (name, values) in &given {
            // Numbered keys (`net0`, `ide2`) are declared once as `net[n]`, `ide[n]`.
            let numbered = format!("{}[n]", name.trim_end_matches(|c: char| c.is_ascii_digit()));
            let spec = properties
                .get(name)
                .or_else(|| {
                    name.ends_with(|c: char| c.is_ascii_digit())
                        .then(|| properties.get(&numbered))
                        .flatten()
                })
                .ok_or_else(|| format!("{what}: parameter {name:?} is not in the schema"))?;
            let item = if spec["type"] == "array" {
                &spec["items"]
            } else if values.len() > 1 {
                return Err(format!("{what}: {name} given {} times", values.len()));
            } else {
                spec
            };
            for value in values {
                check_value(item, value).map_err(|e| format!("{what}: {name}={value:?}: {e}"))?;
            }
        }
        for (name, spec) in &properties {
            let optional = spec["optional"].as_u64() == Some(1) || spec["optional"] == true;
            if !optional && !given.contains_key(name) {
                return Err(format!("{what}: required parameter {name:?} is missing"));
            }
        }
        Ok(())
    }
}

fn check_value(spec: &Value, value: &str) -> Result<(), String> {
    match spec["type"].as_str().unwrap_or("string") {
        "integer" => {
            let n: i64 = value.parse().map_err(|_| "not an integer".to_owned())?;
            if let Some(min) = spec["minimum"].as_i64()
                && n < min
            {
                return Err(format!("below the minimum {min}"));
            }
            if let Some(max) = spec["maximum"].as_i64()
                && n > max
            {
                return Err(format!("above the maximum {max}"));
            }
        }
        "number" => {
            value
                .parse::<f64>()
                .map_err(|_| "not a number".to_owned())?;
        }
        "boolean" if !["0", "1", "true", "false"].contains(&value) => {
            return Err("not a boolean".into());
        }
        "string" => {
            if let Some(values) = spec["enum"].as_array()
                && !values.iter().any(|v| v.as_str() == Some(value))
            {
                return Err(format!("not one of {values:?}"));
            }
            if let Some(max) = spec["maxLength"].as_u64()
                && value.len() as u64 > max
            {
                return Err(format!("longer than {max}"));
            }
            if let Some(pattern) = spec["pattern"].as_str()
                && let Ok(re) = regex::Regex::new(&format!("^(?:{pattern})$"))
                && !re.is_match(value)
            {
                return Err(format!("does not match {pattern}"));
            }
            if spec["format"] == "pve-vmid" {
                let n: u64 = value.parse().map_err(|_| "not a VMID".to_owned())?;
                if !(100..=999_999_999).contains(&n) {
                    return Err("not a VMID".into());
                }
            }
        }
        _ => {}
    }
    Ok(())
}

#[test]
fn the_schema_checker_refuses_what_pve_would() {
    if !enabled() {
        return;
    }
    let mut pve = FakePve::start();
    let schema = pve.schema();
    let request = |method: &str, path: &str, query: &str, body: &str| WireRequest {
        method: method.into(),
        path: format!("/api2/json{path}"),
        query: query.into(),
        content_type: "application/x-www-form-urlencoded".into(),
        body: body.into(),
    };
    schema
        .check(&request("GET", "/cluster/resources", "type=vm", ""))
        .expect("valid");
    schema
        .check(&request(
            "PUT",
            "/nodes/pve1/qemu/100/config",
            "",
            "net0=virtio%2Cbridge%3Dvmbr0&ide2=local-lvm%3Acloudinit",
        ))
        .expect("valid");
    schema
        .check(&request(
            "POST",
            "/nodes/pve1/qemu/9000/clone",
            "",
            "newid=101&name=a",
        ))
        .expect("valid");
    schema
        .check(&request(
            "POST",
            "/nodes/pve1/qemu/100/agent/exec",
            "",
            "command=fleet-agent&command=exchange&input-data=x",
        ))
        .expect("valid: an array parameter repeats its name");
    for (bad, why) in [
        (request("GET", "/cluster/resourcez", "", ""), "no such path"),
        (
            request("GET", "/cluster/resources", "type=vm&type=vm", ""),
            "given 2 times",
        ),
        (
            request(
                "POST",
                "/nodes/pve1/qemu/100/agent/exec",
                "",
                &format!("command=a&input-data={}", "x".repeat(65_537)),
            ),
            "longer than 65536",
        ),
        (
            request("PATCH", "/cluster/resources", "", ""),
            "method not allowed",
        ),
        (
            request("GET", "/cluster/resources", "type=vms", ""),
            "not one of",
        ),
        (
            request("GET", "/cluster/resources", "kind=vm", ""),
            "not in the schema",
        ),
        (
            request("POST", "/nodes/pve1/qemu/9000/clone", "", "name=a"),
            "required parameter \"newid\"",
        ),
        (
            request("POST", "/nodes/pve1/qemu/9000/clone", "", "newid=12"),
            "below the minimum",
        ),
        (
            request("PUT", "/nodes/pve1/qemu/100/config", "", "cores=two"),
            "not an integer",
        ),
        (
            request("PUT", "/nodes/pve1/qemu/100/config", "", "nett0=virtio"),
            "not in the schema",
        ),
        (
            request(
                "PUT",
                "/nodes/pve1/qemu/100/resize",
                "",
                "disk=scsi0&size=big",
            ),
            "does not match",
        ),
    ] {
        let e = schema.check(&bad).expect_err(why);
        assert!(e.contains(why), "{e} (wanted {why})");
    }
}
