//! Egress rules for brokered VMs: which destinations a task's traffic may reach through the
//! host's broker, and why not when it may not. Pure: a request's target in, a decision
//! with its reason out; resolving names and dialing are the broker's, in the shell.
//!
//! The guest is hostile, so everything it names is checked here as bytes, never trusted:
//! a host name is normalised (lower case, trailing dots dropped) and refused unless it
//! is a plain DNS name; a path is refused when an upstream could read it as another path
//! (`..` or `.` segments, encoded dots, slashes or backslashes), so a prefix rule cannot be
//! walked out of. An address the guest names directly, or one a public name resolves to
//! that lies inside a private, loopback, link-local or otherwise internal range, is
//! refused unless a rule names that very address: a public name must never become a way
//! into the host's own services (SSRF).
//!
//! `parse_proxy_request` reads what a task asked the guest's proxy for (CONNECT, a
//! plain-HTTP request in absolute form, or a request to a brokered API at the proxy itself,
//! `/<host>/<path>`) from the connection's first bytes, on the host. A VM's `Policy` holds
//! its rules, its brokered APIs' `Credential`s and its runs' `Budget`; a task's `Narrowing`
//! only narrows them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The port a rule allows when it names none.
pub const DEFAULT_PORT: u16 = 443;

/// One allow rule, as the loader checked it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub host: HostPattern,
    /// Ports allowed; `[DEFAULT_PORT]` when the rule names none.
    pub ports: Vec<u16>,
    /// For plain HTTP only: path prefixes allowed (on segment boundaries); none = any.
    pub path_prefixes: Vec<String>,
    /// Where the rule was written (`file:line`), for refusals and events.
    pub source: String,
}

/// What one brokered VM may reach: its allow rules, and the APIs whose credential the
/// broker adds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub rules: Vec<Rule>,
    pub credentials: Vec<Credential>,
    /// What each task run may use (`None`: no limit).
    pub budget: Option<Budget>,
}

/// What a task narrows its loadout's egress to (`TaskSpec::egress`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Narrowing {
    /// When not empty, a destination must be allowed by these too (a brokered API's host
    /// and port included).
    pub rules: Vec<Rule>,
    pub budget: Option<Budget>,
}

/// A run's egress budget: connections, bytes both ways, model tokens (each optional).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    pub connections: Option<u64>,
    pub bytes: Option<u64>,
    pub tokens: Option<u64>,
}

/// What a run has used, as its budget counts it; and, as `Granted`, what humans allowed
/// beyond the budget (each limit is the budget's plus the grant's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spent {
    #[serde(default)]
    pub connections: u64,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub tokens: u64,
    /// Answers of brokered APIs whose token usage could not be read: under a token budget
    /// each one is a limit reached (fail closed), until a human allows it.
    #[serde(default)]
    pub unread: u64,
}

pub type Granted = Spent;

/// Which limit of a budget a run reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Connections,
    Bytes,
    Tokens,
    /// An answer's token usage could not be read.
    UnreadUsage,
}

/// The limit a run reached, with what it used and may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exhausted {
    pub limit: Limit,
    pub used: u64,
    /// The limit with what was granted so far.
    pub allowed: u64,
    /// What a grant adds.
    pub step: u64,
}

impl Exhausted {
    /// For people: "task t has used 120 tokens of its budget of 100".
    pub fn describe(&self, task: &str) -> String {
        match self.limit {
            Limit::UnreadUsage => format!(
                "task {task} has a token budget, and {} answer(s) of a brokered API did not say how many tokens they used",
                self.used
            ),
            limit => format!(
                "task {task} has used {} {} of its budget of {}",
                self.used,
                limit.unit(),
                self.allowed
            ),
        }
    }

    /// What answering yes allows: "100 more tokens".
    pub fn offer(&self) -> String {
        match self.limit {
            Limit::UnreadUsage => "those answers, and as many tokens again".into(),
            limit => format!("{} more {}", self.step, limit.unit()),
        }
    }
}

impl Limit {
    fn unit(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::Bytes => "bytes",
            Limit::Tokens | Limit::UnreadUsage => "tokens",
        }
    }
}

impl Budget {
    /// Each limit the smaller of the two (a task narrows its loadout's budget).
    pub fn narrowed(loadout: Option<Budget>, task: Option<Budget>) -> Option<Budget> {
        let smaller = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match (loadout, task) {
            (Some(l), Some(t)) => Some(Budget {
                connections: smaller(l.connections, t.connections),
                bytes: smaller(l.bytes, t.bytes),
                tokens: smaller(l.tokens, t.tokens),
            }),
            (l, t) => l.or(t),
        }
    }

    /// The first limit `spent` has reached, with `granted` allowed beyond the budget.
    pub fn exhausted(&self, spent: Spent, granted: Granted) -> Option<Exhausted> {
        if self.tokens.is_some() && spent.unread > granted.unread {
            return Some(Exhausted {
                limit: Limit::UnreadUsage,
                used: spent.unread - granted.unread,
                allowed: 0,
                step: 0,
            });
        }
        [
            (
                Limit::Connections,
                spent.connections,
                self.connections,
                granted.connections,
            ),
            (Limit::Bytes, spent.bytes, self.bytes, granted.bytes),
            (Limit::Tokens, spent.tokens, self.tokens, granted.tokens),
        ]
        .into_iter()
        .find_map(|(limit, used, step, granted)| {
            let step = step?;
            let allowed = step.saturating_add(granted);
            (used >= allowed).then_some(Exhausted {
                limit,
                used,
                allowed,
                step,
            })
        })
    }

    /// What is granted after a human allows more: every limit reached moves to what was
    /// used (an answer may overshoot) plus its step, and unread answers so far are
    /// forgiven. One yes always allows something.
    pub fn grant(&self, spent: Spent, granted: Granted) -> Granted {
        let raise = |step: Option<u64>, used: u64, granted: u64| match step {
            // The new limit, budget plus grant, is what was used plus one step.
            Some(step) if used >= step.saturating_add(granted) => used,
            _ => granted,
        };
        Granted {
            connections: raise(self.connections, spent.connections, granted.connections),
            bytes: raise(self.bytes, spent.bytes, granted.bytes),
            tokens: raise(self.tokens, spent.tokens, granted.tokens),
            unread: spent.unread,
        }
    }
}

impl Policy {
    /// The credential for requests to `api` (a host name as the task wrote it in the path).
    pub fn credential(&self, api: &str) -> Option<&Credential> {
        let api = normalize_host(api);
        self.credentials.iter().find(|c| c.host == api)
    }
}

/// A credential the broker adds for one API (`egress.credentials`), as the loader checked it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// The API's host name, lower case.
    pub host: String,
    pub port: u16,
    /// The header it goes in, lower case.
    pub header: String,
    pub scheme: Scheme,
    /// The Secret and key holding the value.
    pub secret: String,
    pub key: String,
    /// Where it was written, for refusals.
    pub source: String,
}

/// How a credential's value is written into its header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// The value as it is.
    Plain,
    /// `Bearer VALUE`.
    Bearer,
    /// `Basic base64(username:VALUE)`.
    Basic { username: String },
}

impl Credential {
    /// The scheme a credential without one uses: `bearer` in `authorization`, else `plain`.
    pub fn default_scheme(header: &str) -> Scheme {
        if header.eq_ignore_ascii_case("authorization") {
            Scheme::Bearer
        } else {
            Scheme::Plain
        }
    }

    /// The rule its upstream's addresses are checked by (`check_resolved`): its own host and
    /// port, nothing else.
    pub fn as_rule(&self) -> Rule {
        Rule {
            host: HostPattern::parse(&self.host).unwrap_or(HostPattern::Name(self.host.clone())),
            ports: vec![self.port],
            path_prefixes: Vec::new(),
            source: self.source.clone(),
        }
    }

    /// Where a task of the VM reaches this API: the guest proxy's address and the host.
    pub fn base_url(&self) -> String {
        format!("http://{PROXY_HOST_PORT}/{}", self.host)
    }
}

/// The guest's proxy, as tasks address it (`fleet_agent_protocol::stream::PROXY_ADDRESS`).
pub const PROXY_HOST_PORT: &str = "127.0.0.1:3128";

/// What a task's clients send where the real key would go: every agent CLI wants some key,
/// and the broker replaces it.
pub const PLACEHOLDER_KEY: &str = "fleet-brokered-placeholder";

/// The variables that point the agent CLIs fleet knows at a brokered API, with placeholder
/// keys; and `FLEET_API_<HOST>` (the base URL) for every credential.
pub fn api_environment(credentials: &[Credential]) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for c in credentials {
        let base = c.base_url();
        let var: String = c
            .host
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() {
                    ch.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        env.push((format!("FLEET_API_{var}"), base.clone()));
        let known: &[(&str, String)] = match c.host.as_str() {
            // Claude Code and the Anthropic SDKs.
            // Claude Code's telemetry, error reports and update checks would each be
            // refused (and an event): it is told not to try.
            "api.anthropic.com" => &[
                ("ANTHROPIC_BASE_URL", base.clone()),
                ("ANTHROPIC_API_KEY", PLACEHOLDER_KEY.into()),
                ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".into()),
            ],
            // Codex and the OpenAI SDKs (their base URL carries /v1); aider reads the
            // older name.
            "api.openai.com" => &[
                ("OPENAI_BASE_URL", format!("{base}/v1")),
                ("OPENAI_API_BASE", format!("{base}/v1")),
                ("OPENAI_API_KEY", PLACEHOLDER_KEY.into()),
            ],
            // Gemini CLI.
            "generativelanguage.googleapis.com" => &[
                ("GOOGLE_GEMINI_BASE_URL", base.clone()),
                ("GEMINI_API_KEY", PLACEHOLDER_KEY.into()),
            ],
            _ => &[],
        };
        env.extend(known.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    }
    env
}

/// What a rule's `host` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// One name: `api.example.com`.
    Name(String),
    /// Every name below a domain, not the domain itself: `*.example.com`.
    Below(String),
    /// An address written as such: the only way an internal address is ever reached.
    Address(IpAddr),
}

impl HostPattern {
    /// Reads a rule's `host`; the error says what is wrong and what is valid.
    pub fn parse(text: &str) -> Result<HostPattern, String> {
        if let Ok(ip) = text.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Ok(HostPattern::Address(ip));
        }
        if let Some(domain) = text.strip_prefix("*.") {
            let domain = name(domain).ok_or_else(|| bad_pattern(text))?;
            if !domain.contains('.') {
                return Err(format!(
                    "{text:?} allows every name under a top-level domain; name a domain you mean, such as *.example.com"
                ));
            }
            return Ok(HostPattern::Below(domain));
        }
        name(text)
            .map(HostPattern::Name)
            .ok_or_else(|| bad_pattern(text))
    }

    fn matches(&self, target: &Target) -> bool {
        match (self, target) {
            (HostPattern::Name(n), Target::Name(t)) => n == t,
            (HostPattern::Below(d), Target::Name(t)) => t
                .strip_suffix(d.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            (HostPattern::Address(a), Target::Address(t)) => a == t,
            _ => false,
        }
    }
}

fn bad_pattern(text: &str) -> String {
    format!(
        "{text:?} is not a host name, *.domain or IP address; write a name such as api.example.com, *.example.com, or an address such as 10.0.0.5"
    )
}

/// A request's host as the broker checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Name(String),
    Address(IpAddr),
}

impl Target {
    /// Reads a host the guest named (from a CONNECT line or a URL); `None` when it is
    /// neither a plain DNS name nor an address.
    pub fn parse(host: &str) -> Option<Target> {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Some(Target::Address(ip));
        }
        name(host).map(Target::Name)
    }
}

/// A DNS name, lower-cased, without its trailing dot: labels of letters, digits and
/// hyphens (not at either end), at most 63 bytes each and 253 in all.
fn name(text: &str) -> Option<String> {
    let text = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    let fine = !text.is_empty()
        && text.len() <= 253
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        // All digits is an address in disguise (`2130706433`, `0x7f.1`), never a name.
        && !text
            .split('.')
            .all(|label| label.bytes().all(|b| b.is_ascii_digit()) || label.starts_with("0x"));
    fine.then_some(text)
}

/// What a rule decided, or why none allowed the request, and how to allow it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by `rules[rule]`.
    Allowed {
        rule: usize,
    },
    Refused(Refusal),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub why: String,
    /// What to add to the loadout or task to allow it.
    pub fix: String,
}

/// Whether `rules` allow a request to `host:port` (and, for plain HTTP, `path`).
pub fn decide(rules: &[Rule], host: &str, port: u16, path: Option<&str>) -> Decision {
    let Some(target) = Target::parse(host) else {
        let shown: String = host.chars().take(64).collect();
        return Decision::Refused(Refusal {
            why: format!("{shown:?} is not a host name or address"),
            fix: "use a DNS name".into(),
        });
    };
    if let Some(path) = path
        && let Some(why) = ambiguous_path(path)
    {
        return Decision::Refused(Refusal {
            why: format!("the path {path:?} {why}"),
            fix: "send the path in its plain form".into(),
        });
    }
    let for_host: Vec<(usize, &Rule)> = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.host.matches(&target))
        .collect();
    if for_host.is_empty() {
        let (why, fix) = match &target {
            Target::Name(n) => (
                format!("no egress rule allows {n}"),
                format!("add `{{host: {n}, ports: [{port}]}}` to egress.allow"),
            ),
            Target::Address(a) => (
                format!(
                    "no egress rule names the address {a} (an address is reached only when a rule names it)"
                ),
                format!("add `{{host: '{a}', ports: [{port}]}}` to egress.allow"),
            ),
        };
        return Decision::Refused(Refusal { why, fix });
    }
    let on_port: Vec<&(usize, &Rule)> = for_host
        .iter()
        .filter(|(_, r)| allowed_ports(r).contains(&port))
        .collect();
    let Some(first) = on_port.first() else {
        let (_, rule) = for_host[0];
        return Decision::Refused(Refusal {
            why: format!(
                "the rule for {host} at {} allows port(s) {:?}, not {port}",
                rule.source,
                allowed_ports(rule)
            ),
            fix: format!("add {port} to that rule's ports"),
        });
    };
    let Some(path) = path else {
        // A tunnel carries any path: only a rule without path limits allows one.
        return match on_port.iter().find(|(_, r)| r.path_prefixes.is_empty()) {
            Some((i, _)) => Decision::Allowed { rule: *i },
            None => Decision::Refused(Refusal {
                why: format!(
                    "the rule for {host} at {} allows only some paths, and a tunnel (CONNECT) carries any",
                    first.1.source
                ),
                fix: "send the request as plain HTTP through the proxy, or drop the rule's paths"
                    .into(),
            }),
        };
    };
    match on_port
        .iter()
        .find(|(_, r)| r.path_prefixes.is_empty() || r.path_prefixes.iter().any(|p| under(path, p)))
    {
        Some((i, _)) => Decision::Allowed { rule: *i },
        None => Decision::Refused(Refusal {
            why: format!(
                "the rule for {host} at {} allows the paths {:?}, not {path}",
                first.1.source, first.1.path_prefixes
            ),
            fix: "add the path's prefix to that rule's paths".into(),
        }),
    }
}

fn allowed_ports(rule: &Rule) -> Vec<u16> {
    if rule.ports.is_empty() {
        vec![DEFAULT_PORT]
    } else {
        rule.ports.clone()
    }
}

/// Whether `path` lies under `prefix` on a segment boundary (`/repos/a` is under `/repos/`
/// and `/repos`, not under `/rep`).
fn under(path: &str, prefix: &str) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Why `path` cannot be a rule's prefix (or a request's path), if it cannot.
pub fn path_problem(path: &str) -> Option<&'static str> {
    ambiguous_path(path)
}

/// Why an upstream might read `path` as a different path than a prefix check does.
fn ambiguous_path(target: &str) -> Option<&'static str> {
    // Servers differ on what ends a path (`#`, `;` parameters) and how they fold
    // non-ASCII: the whole target must read the same everywhere.
    if !target.is_ascii() || target.bytes().any(|b| b.is_ascii_control()) {
        return Some("holds bytes other than printable ASCII");
    }
    if target.contains(['#', ';']) {
        return Some("holds a # or ; (read differently by different servers)");
    }
    let path = target.split('?').next().unwrap_or_default();
    if !path.starts_with('/') {
        return Some("does not start with /");
    }
    if path.contains('\\') || path.contains("//") {
        return Some("holds a backslash or an empty segment");
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Some("holds a . or .. segment");
    }
    let lower = path.to_ascii_lowercase();
    if ["%2e", "%2f", "%5c", "%00", "%25"]
        .iter()
        .any(|e| lower.contains(e))
    {
        return Some("holds an encoded dot, slash, backslash, NUL or percent sign");
    }
    None
}

/// After resolving a name `rules[rule]` allowed: every address must be public, unless the
/// rule names that very address. (A name that resolves to 127.0.0.1 must not reach the
/// host's own services.)
pub fn check_resolved(rule: &Rule, addresses: &[IpAddr]) -> Result<(), Refusal> {
    for address in addresses {
        let named = rule.host == HostPattern::Address(*address);
        if is_internal(address) && !named {
            return Err(Refusal {
                why: format!(
                    "it resolves to {address}, an internal address, and the rule at {} does not name that address",
                    rule.source
                ),
                fix: format!("if this is meant, add a rule with host: '{address}'"),
            });
        }
    }
    Ok(())
}

/// Loopback, private, link-local, shared (CGNAT), unspecified, multicast, broadcast,
/// reserved and documentation ranges, and IPv6 forms of them (mapped, NAT64).
pub fn is_internal(address: &IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => internal_v4(v4),
        IpAddr::V6(v6) => internal_v6(v6),
    }
}

fn internal_v4(ip: &Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (b == 18 || b == 19))
        || (a == 192 && b == 88 && c == 99)
        || a >= 240
}

fn internal_v6(ip: &Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return internal_v4(&v4);
    }
    let s = ip.segments();
    // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits, 6to4
    // (2002::/16) the one in bits 16-47; local-use NAT64 (64:ff9b:1::/48) is the site's.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6].iter().all(|&x| x == 0) {
        return internal_v4(&Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return true;
    }
    if s[0] == 0x2002 {
        return internal_v4(&Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    // Site-local (deprecated, fec0::/10), IPv4-translated (::ffff:0:0:0/96), Teredo
    // (2001::/32), discard (100::/64), benchmarking (2001:2::/48) and documentation
    // (3fff::/20): none is a destination a task needs.
    if s[0] & 0xffc0 == 0xfec0
        || (s[..4].iter().all(|&x| x == 0) && s[4] == 0xffff && s[5] == 0)
        || (s[0] == 0x2001 && s[1] == 0)
        || (s[0] == 0x100 && s[1..4].iter().all(|&x| x == 0))
        || (s[0] == 0x2001 && s[1] == 2 && s[2] == 0)
        || (s[0] & 0xfff0 == 0x3ff0)
    {
        return true;
    }
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        // IPv4-compatible (deprecated) and the rest of ::/96.
        || s[..6].iter().all(|&x| x == 0)
}

/// The most bytes a proxy request's head (request line and headers) may take.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// What a task asked the guest's proxy for, read from the head of its request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRequest {
    /// The host as the client wrote it (checked by `decide`), or the API's host for a
    /// `Credentialed` request (whose port is then its credential's).
    pub host: String,
    pub port: u16,
    pub kind: ProxyKind,
    /// How many bytes of the input the head took; what follows is the request's body (or,
    /// after a CONNECT, the tunnel's first bytes).
    pub head_len: usize,
}

impl ProxyRequest {
    /// What was asked for, for logs and refusals (at most 300 characters).
    pub fn describe(&self) -> String {
        let text = match &self.kind {
            ProxyKind::Connect => format!("CONNECT {}:{}", self.host, self.port),
            ProxyKind::Http { path, .. } => {
                format!("http://{}:{}{}", self.host, self.port, path)
            }
            ProxyKind::Credentialed { method, path, .. } => {
                format!("{method} https://{}{path}", self.host)
            }
        };
        text.chars().take(300).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyKind {
    /// `CONNECT host:port`: a tunnel (TLS, usually); the broker sees no path.
    Connect,
    /// A plain-HTTP request in absolute form; `head` is the request to send upstream, in
    /// origin form (`GET /path HTTP/1.1`), with `Host` set to the target and the proxy's
    /// own headers (`Proxy-Authorization`, `Proxy-Connection`) left out.
    Http {
        path: String,
        head: Vec<u8>,
        /// The request's body length (`Content-Length`, 0 without one): what follows the
        /// head up to it goes upstream, and nothing after it.
        body_len: u64,
    },
    /// A request to a brokered API, sent to the proxy as to a server (`/<host>/<path>`):
    /// `host` names the API, whose credential the broker adds (`credentialed_head`) before
    /// forwarding over TLS. `headers` are the checked ones that may go upstream.
    Credentialed {
        method: String,
        path: String,
        headers: Vec<(String, Vec<u8>)>,
        body_len: u64,
    },
}

/// Why a proxy request is refused before any rule is asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BadRequest {
    /// The head has not ended yet and is within `MAX_HEAD_BYTES`: read more.
    Incomplete,
    /// Anything else, with why (the body of the 400 the client gets).
    Refused(String),
}

/// Reads a proxy request's head from the start of a connection's bytes.
pub fn parse_proxy_request(bytes: &[u8]) -> Result<ProxyRequest, BadRequest> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(bytes) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD_BYTES => n,
        Ok(httparse::Status::Complete(_)) => {
            return Err(refused(format!(
                "the request's head is longer than {MAX_HEAD_BYTES} bytes"
            )));
        }
        Ok(httparse::Status::Partial) if bytes.len() < MAX_HEAD_BYTES => {
            return Err(BadRequest::Incomplete);
        }
        Ok(httparse::Status::Partial) => {
            return Err(refused(format!(
                "the request's head is longer than {MAX_HEAD_BYTES} bytes"
            )));
        }
        Err(e) => return Err(refused(format!("not an HTTP request ({e})"))),
    };
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(refused("no request line".into()));
    };
    if method == "CONNECT" {
        let (host, port) = authority(target, None)?;
        return Ok(ProxyRequest {
            host,
            port,
            kind: ProxyKind::Connect,
            head_len,
        });
    }
    // A client that ignores NO_PROXY sends a request for the proxy's own address to the
    // proxy in absolute form: it is meant for the credential endpoint all the same.
    let own_port = PROXY_HOST_PORT.rsplit(':').next().unwrap_or_default();
    let target = [PROXY_HOST_PORT.to_owned(), format!("localhost:{own_port}")]
        .iter()
        .find_map(|own| target.strip_prefix("http://")?.strip_prefix(own.as_str()))
        .filter(|rest| rest.starts_with('/'))
        .unwrap_or(target);
    if let Some(origin) = target.strip_prefix('/') {
        // The credential endpoint: `/<api host>/<path>`, sent to the proxy as to a server.
        let (api, path) = match origin.find(['/', '?']) {
            Some(at) => (&origin[..at], &origin[at..]),
            None => (origin, "/"),
        };
        if api.is_empty() {
            return Err(refused(
                "a request to the proxy itself names the API first: /<host>/<path>".into(),
            ));
        }
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        // Only methods that act on the API: TRACE (which echoes the request, the key with
        // it), CONNECT and the like never carry a credential.
        if !API_METHODS.contains(&method) {
            return Err(refused(format!(
                "{method} is not sent to a brokered API; use one of {}",
                API_METHODS.join(", ")
            )));
        }
        let checked = checked_headers(request.headers)?;
        return Ok(ProxyRequest {
            host: api.to_owned(),
            port: DEFAULT_PORT,
            kind: ProxyKind::Credentialed {
                method: method.to_owned(),
                path,
                headers: checked.forwarded,
                body_len: checked.body_len,
            },
            head_len,
        });
    }
    let Some(rest) = target.strip_prefix("http://") else {
        return Err(refused(if target.starts_with("https://") {
            "an https:// URL is asked for with CONNECT, not sent to the proxy in the clear".into()
        } else {
            format!("{target:?} is not an absolute http:// URL; this is a proxy")
        }));
    };
    let (authority_part, path) = match rest.find(['/', '?']) {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    let (host, port) = authority(authority_part, Some(80))?;
    let checked = checked_headers(request.headers)?;
    let host_header = if port == 80 {
        host.clone()
    } else {
        format!("{host}:{port}")
    };
    let head = upstream_head(
        method,
        &path,
        &host_header,
        checked.had_length.then_some(checked.body_len),
        None,
        &checked.forwarded,
    );
    Ok(ProxyRequest {
        host,
        port,
        kind: ProxyKind::Http {
            path,
            head,
            body_len: checked.body_len,
        },
        head_len,
    })
}

/// A host name as rules, credentials, Secrets and the host's pins compare it: lower case,
/// without its trailing dots.
pub fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// An entry of a Secret's `allowed.hosts`: `host` (port 443) or `host:port`, lower case
/// without a trailing dot; the port is `None` when it does not parse.
pub fn allowed_host(entry: &str) -> (String, Option<u16>) {
    let (host, port) = match entry.rsplit_once(':') {
        Some((host, port)) => (host, port.parse::<u16>().ok().filter(|p| *p != 0)),
        None => (entry, Some(DEFAULT_PORT)),
    };
    (normalize_host(host), port)
}

/// The methods a request to a brokered API may use.
pub const API_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// The headers a credential may go in, and that are never forwarded from the guest to a
/// brokered API: headers an API reads a key from, never ones a server might echo back.
pub const CREDENTIAL_HEADERS: [&str; 4] =
    ["authorization", "x-api-key", "api-key", "x-goog-api-key"];

/// Headers of the guest's that never go to a brokered API besides the credential ones:
/// `max-forwards` would let a TRACE-like echo stop at a proxy on the way; without
/// `accept-encoding` the answer comes uncompressed, so the broker can read its token usage
/// (`tokens`), and without `expect` it comes without an interim answer first.
const NOT_TO_APIS: [&str; 3] = ["max-forwards", "accept-encoding", "expect"];

/// Whether a credential's value can go into a header as it is: visible ASCII only, so no
/// value can end the header or start another.
pub fn value_fits_header(value: &[u8]) -> bool {
    !value.is_empty() && value.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// The head of a request to a brokered API (`ProxyKind::Credentialed`), with `credential`'s
/// header set to `value` (written by the broker: the real key, never seen by the guest).
/// Any header of the request's that could carry a credential is left out.
pub fn credentialed_head(
    method: &str,
    path: &str,
    headers: &[(String, Vec<u8>)],
    body_len: u64,
    credential: &Credential,
    value: &[u8],
) -> Vec<u8> {
    let kept: Vec<(String, Vec<u8>)> = headers
        .iter()
        .filter(|(name, _)| {
            let name = name.to_ascii_lowercase();
            name != credential.header
                && !CREDENTIAL_HEADERS.contains(&name.as_str())
                && !NOT_TO_APIS.contains(&name.as_str())
        })
        .cloned()
        .collect();
    let host_header = if credential.port == DEFAULT_PORT {
        credential.host.clone()
    } else {
        format!("{}:{}", credential.host, credential.port)
    };
    upstream_head(
        method,
        path,
        &host_header,
        Some(body_len),
        Some((&credential.header, value)),
        &kept,
    )
}

/// A request's headers once checked: what may go upstream, and its body's length.
struct CheckedHeaders {
    forwarded: Vec<(String, Vec<u8>)>,
    body_len: u64,
    had_length: bool,
}

/// One request per connection, checked: nothing may turn it into a tunnel (Upgrade), a
/// second request (keep-alive, pipelining) or a body whose end two parsers read apart
/// (Transfer-Encoding beside Content-Length). Hop-by-hop headers, the ones the broker
/// writes itself, and those some servers route by instead of the request line (which the
/// rule was checked against) are not forwarded.
fn checked_headers(headers: &[httparse::Header<'_>]) -> Result<CheckedHeaders, BadRequest> {
    let named = |name: &str| headers.iter().any(|h| h.name.eq_ignore_ascii_case(name));
    if named("upgrade") || named("transfer-encoding") {
        return Err(refused(
            "an Upgrade or Transfer-Encoding request is not brokered as plain HTTP; use https:// (CONNECT)"
                .into(),
        ));
    }
    let lengths: Vec<&[u8]> = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value)
        .collect();
    // Digits only: a sign, spaces or another kind of digit would be read differently
    // upstream, and the bytes after the body it then sees would be a request no rule saw.
    let body_len = match lengths.as_slice() {
        [] => 0,
        [one] if !one.is_empty() && one.len() <= 18 && one.iter().all(u8::is_ascii_digit) => {
            std::str::from_utf8(one)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| refused("a Content-Length that is not a number".into()))?
        }
        [_] => return Err(refused("a Content-Length that is not plain digits".into())),
        _ => return Err(refused("more than one Content-Length".into())),
    };
    if headers.iter().any(|h| h.name.contains('_')) {
        return Err(refused(
            "a header name with an underscore (some servers read it as another header)".into(),
        ));
    }
    let by_connection: Vec<String> = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| {
            String::from_utf8_lossy(h.value)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let forwarded = headers
        .iter()
        .filter(|h| {
            let name = h.name.to_ascii_lowercase();
            let hop_by_hop = matches!(
                name.as_str(),
                "host"
                    | "content-length"
                    | "connection"
                    | "keep-alive"
                    | "proxy-authorization"
                    | "proxy-authenticate"
                    | "proxy-connection"
                    | "te"
                    | "trailer"
                    | "forwarded"
                    | "x-forwarded-host"
                    | "x-forwarded-for"
                    | "x-forwarded-proto"
                    | "x-original-url"
                    | "x-rewrite-url"
                    | "x-http-method-override"
                    | "x-http-method"
                    | "x-method-override"
            );
            !hop_by_hop && !by_connection.contains(&name)
        })
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect();
    Ok(CheckedHeaders {
        forwarded,
        body_len,
        had_length: !lengths.is_empty(),
    })
}

/// A request's head as the broker sends it upstream: origin form, `Host`, `Connection:
/// close`, the length the broker forwards by (written by the broker: no header of the
/// client's can remove or restate it), an added header, then `headers`.
fn upstream_head(
    method: &str,
    path: &str,
    host_header: &str,
    body_len: Option<u64>,
    added: Option<(&str, &[u8])>,
    headers: &[(String, Vec<u8>)],
) -> Vec<u8> {
    let start = format!("{method} {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n");
    let length = body_len.map(|len| format!("Content-Length: {len}\r\n"));
    let fields = || {
        added
            .into_iter()
            .chain(headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())))
    };
    // Sized once: the added header may be a credential, and a buffer that grew would
    // leave copies of it behind in memory nobody wipes.
    let size = start.len()
        + length.as_ref().map_or(0, String::len)
        + fields().map(|(n, v)| n.len() + v.len() + 4).sum::<usize>()
        + 2;
    let mut head = Vec::with_capacity(size);
    head.extend_from_slice(start.as_bytes());
    if let Some(length) = length {
        head.extend_from_slice(length.as_bytes());
    }
    for (name, value) in fields() {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

fn refused(why: String) -> BadRequest {
    BadRequest::Refused(why)
}

/// `host:port` (or `[v6]:port`), the port required unless `default` says.
fn authority(text: &str, default: Option<u16>) -> Result<(String, u16), BadRequest> {
    if text.contains('@') {
        return Err(refused(format!(
            "{text:?} carries credentials; the broker adds them"
        )));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !port.contains(']') => {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| refused(format!("{text:?} names no valid port")))?;
            (host, port)
        }
        _ => match default {
            Some(port) => (text, port),
            None => return Err(refused(format!("{text:?} is not host:port"))),
        },
    };
    if host.is_empty() {
        return Err(refused(format!("{text:?} names no host")));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(refused(format!(
            "{text:?}: an IPv6 address is written in brackets, [address]:port"
        )));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(host: &str, ports: &[u16], paths: &[&str]) -> Rule {
        Rule {
            host: HostPattern::parse(host).expect("a pattern"),
            ports: ports.to_vec(),
            path_prefixes: paths.iter().map(|p| (*p).to_owned()).collect(),
            source: "fleet/loadouts/agent.yaml:7".into(),
        }
    }

    fn allowed(rules: &[Rule], host: &str, port: u16, path: Option<&str>) -> bool {
        matches!(decide(rules, host, port, path), Decision::Allowed { .. })
    }

    #[test]
    fn names_match_exactly_and_wildcards_only_below_their_domain() {
        let rules = [
            rule("api.example.com", &[], &[]),
            rule("*.github.com", &[443, 22], &[]),
        ];
        assert!(allowed(&rules, "api.example.com", 443, None));
        assert!(
            allowed(&rules, "API.Example.COM.", 443, None),
            "case and the root dot"
        );
        assert!(
            !allowed(&rules, "api.example.com", 80, None),
            "443 unless a rule says"
        );
        assert!(!allowed(&rules, "x.api.example.com", 443, None));
        assert!(!allowed(&rules, "example.com", 443, None));
        assert!(allowed(&rules, "codeload.github.com", 22, None));
        assert!(
            !allowed(&rules, "github.com", 443, None),
            "the domain itself is not below it"
        );
        assert!(!allowed(&rules, "evilgithub.com", 443, None));
        assert!(!allowed(&rules, "github.com.evil.net", 443, None));
    }

    #[test]
    fn what_the_guest_names_is_checked_as_bytes() {
        let rules = [rule("*.example.com", &[], &[])];
        for host in [
            "a.example.com\0",
            "a b.example.com",
            "a.example.com:443",
            "",
            "ä.example.com",
            "-a.example.com",
        ] {
            assert!(!allowed(&rules, host, 443, None), "{host:?}");
        }
        // Numeric names are addresses in disguise.
        assert_eq!(Target::parse("2130706433"), None);
        assert_eq!(Target::parse("0x7f.0.0.1"), None);
    }

    #[test]
    fn an_address_is_reached_only_when_a_rule_names_it() {
        let rules = [
            rule("*.example.com", &[], &[]),
            rule("10.0.0.5", &[8080], &[]),
        ];
        assert!(!allowed(&rules, "127.0.0.1", 443, None));
        assert!(!allowed(&rules, "[::1]", 443, None));
        assert!(allowed(&rules, "10.0.0.5", 8080, None));
        let Decision::Refused(r) = decide(&rules, "10.0.0.6", 8080, None) else {
            panic!("refused");
        };
        assert!(
            r.why.contains("no egress rule names the address 10.0.0.6"),
            "{r:?}"
        );
    }

    #[test]
    fn a_public_name_resolving_inside_is_refused_unless_that_address_is_named() {
        let public = rule("registry.example.com", &[], &[]);
        assert!(check_resolved(&public, &["93.184.216.34".parse().expect("ip")]).is_ok());
        for inside in [
            "127.0.0.1",
            "10.1.2.3",
            "169.254.169.254",
            "100.64.0.1",
            "::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "0.0.0.0",
            "2002:7f00:1::",
            "64:ff9b:1::5",
            "fec0::1",
        ] {
            let why = check_resolved(&public, &[inside.parse().expect("ip")])
                .expect_err(inside)
                .why;
            assert!(why.contains("internal address"), "{why}");
        }
        let named = rule("10.0.0.5", &[], &[]);
        assert!(check_resolved(&named, &["10.0.0.5".parse().expect("ip")]).is_ok());
    }

    #[test]
    fn path_prefixes_hold_on_segment_boundaries_and_cannot_be_walked_out_of() {
        let rules = [rule("git.example.com", &[80], &["/repos/team/"])];
        assert!(allowed(
            &rules,
            "git.example.com",
            80,
            Some("/repos/team/app.git/info/refs?service=x")
        ));
        assert!(!allowed(
            &rules,
            "git.example.com",
            80,
            Some("/repos/teamwork/x")
        ));
        for walk in [
            "/repos/team/../other/x",
            "/repos/team/%2e%2e/other",
            "/repos/team/..%2Fother",
            "/repos/team//x",
            "/repos/team/.\\x",
            "repos/team/x",
            "/repos/team#/../../admin",
            "/repos/team/..;/admin",
            "/repos/team/\u{ff0e}\u{ff0e}/admin",
        ] {
            assert!(
                !allowed(&rules, "git.example.com", 80, Some(walk)),
                "{walk}"
            );
        }
        let open = [rule("git.example.com", &[80], &[])];
        assert!(allowed(&open, "git.example.com", 80, Some("/anything")));
        // A tunnel carries any path: a path-limited rule never allows one.
        assert!(!allowed(&rules, "git.example.com", 80, None));
        assert!(allowed(&open, "git.example.com", 80, None));
    }

    #[test]
    fn a_refusal_names_the_rule_and_the_fix() {
        let rules = [rule("api.example.com", &[], &[])];
        let Decision::Refused(r) = decide(&rules, "api.example.com", 8443, None) else {
            panic!("refused");
        };
        assert!(r.why.contains("fleet/loadouts/agent.yaml:7"), "{r:?}");
        assert!(r.fix.contains("8443"), "{r:?}");
        let Decision::Refused(r) = decide(&rules, "pypi.org", 443, None) else {
            panic!("refused");
        };
        assert_eq!(
            r.fix,
            "add `{host: pypi.org, ports: [443]}` to egress.allow"
        );
    }

    #[test]
    fn patterns_that_would_allow_too_much_or_nothing_are_refused() {
        assert!(HostPattern::parse("*.com").is_err());
        assert!(HostPattern::parse("*").is_err());
        assert!(HostPattern::parse("api.*.com").is_err());
        assert!(HostPattern::parse("http://api.example.com").is_err());
        assert_eq!(
            HostPattern::parse("[fd00::5]"),
            Ok(HostPattern::Address("fd00::5".parse().expect("ip")))
        );
    }

    #[test]
    fn a_connect_names_its_host_and_port() {
        let head =
            b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n\x16\x03";
        let request = parse_proxy_request(head).expect("a request");
        assert_eq!(request.host, "api.example.com");
        assert_eq!(request.port, 443);
        assert_eq!(request.kind, ProxyKind::Connect);
        assert_eq!(
            &head[request.head_len..],
            b"\x16\x03",
            "the tunnel's first bytes follow"
        );
        let v6 = parse_proxy_request(b"CONNECT [fd00::5]:8443 HTTP/1.1\r\n\r\n").expect("v6");
        assert_eq!((v6.host.as_str(), v6.port), ("[fd00::5]", 8443));
        assert_eq!(
            decide(&[], &v6.host, v6.port, None),
            Decision::Refused(Refusal {
                why: "no egress rule names the address fd00::5 (an address is reached only when a rule names it)".into(),
                fix: "add `{host: 'fd00::5', ports: [8443]}` to egress.allow".into(),
            })
        );
    }

    #[test]
    fn a_plain_request_goes_upstream_in_origin_form_without_the_proxys_headers() {
        let head = b"GET http://git.example.com/repos/team/x?y=1 HTTP/1.1\r\nHost: evil.example\r\nProxy-Authorization: Basic eA==\r\nAccept: */*\r\n\r\n";
        let request = parse_proxy_request(head).expect("a request");
        assert_eq!(
            (request.host.as_str(), request.port),
            ("git.example.com", 80)
        );
        let ProxyKind::Http { path, head, .. } = request.kind else {
            panic!("plain HTTP");
        };
        assert_eq!(path, "/repos/team/x?y=1");
        assert_eq!(
            String::from_utf8(head).expect("text"),
            "GET /repos/team/x?y=1 HTTP/1.1\r\nHost: git.example.com\r\nConnection: close\r\nAccept: */*\r\n\r\n"
        );
        // Hop-by-hop headers, and those the client's Connection names, stay behind.
        let head = b"GET http://a.example.com/ HTTP/1.1\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\nX-Secret: s\r\nAccept: */*\r\n\r\n";
        let ProxyKind::Http { head, .. } = parse_proxy_request(head).expect("a request").kind
        else {
            panic!("plain HTTP");
        };
        assert_eq!(
            String::from_utf8(head).expect("text"),
            "GET / HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\nAccept: */*\r\n\r\n"
        );
    }

    #[test]
    fn what_is_not_a_proxy_request_is_refused_or_waited_for() {
        assert_eq!(
            parse_proxy_request(b"CONNECT a.example.com:443 HTTP/1.1\r\n"),
            Err(BadRequest::Incomplete)
        );
        for bad in [
            &b"GET relative HTTP/1.1\r\n\r\n"[..],
            b"GET https://a.example.com/ HTTP/1.1\r\n\r\n",
            b"CONNECT a.example.com HTTP/1.1\r\n\r\n",
            b"CONNECT user:pw@a.example.com:443 HTTP/1.1\r\n\r\n",
            b"CONNECT a.example.com:0 HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01 TLS without CONNECT",
            b"GET http://a.example.com/ HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"POST http://a.example.com/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            b"POST http://a.example.com/ HTTP/1.1\r\nContent-Length: +40\r\n\r\n",
            b"POST http://a.example.com/ HTTP/1.1\r\nContent_Length: 40\r\n\r\n",
            b"GET http://fd00::5:80/ HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(parse_proxy_request(bad), Err(BadRequest::Refused(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let endless = [b'a'; MAX_HEAD_BYTES + 1];
        assert!(matches!(
            parse_proxy_request(&endless),
            Err(BadRequest::Refused(_))
        ));
    }

    #[test]
    fn no_header_of_the_clients_can_change_what_was_checked() {
        let head = b"POST http://a.example.com/ok/x HTTP/1.1\r\nConnection: content-length, host\r\nContent-Length: 4\r\nX-Original-URL: /admin\r\nForwarded: host=evil\r\n\r\nbody";
        let request = parse_proxy_request(head).expect("a request");
        let ProxyKind::Http { head, body_len, .. } = request.kind else {
            panic!("plain HTTP");
        };
        assert_eq!(body_len, 4);
        assert_eq!(
            String::from_utf8(head).expect("text"),
            "POST /ok/x HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\nContent-Length: 4\r\n\r\n"
        );
        let rules = [rule("a.example.com", &[80], &["/ok/"])];
        assert!(!allowed(
            &rules,
            "a.example.com",
            80,
            Some("/ok/%252e%252e/admin")
        ));
    }

    #[test]
    fn a_request_to_the_proxy_itself_names_a_brokered_api_and_loses_its_credentials() {
        let request = parse_proxy_request(
            b"POST /api.anthropic.com/v1/messages HTTP/1.1\r\nHost: 127.0.0.1:3128\r\nX-Api-Key: placeholder\r\nAuthorization: Bearer x\r\nx-goog-api-key: y\r\nanthropic-version: 2023-06-01\r\nContent-Length: 2\r\n\r\n{}",
        )
        .expect("a request");
        assert_eq!(request.host, "api.anthropic.com");
        let ProxyKind::Credentialed {
            method,
            path,
            headers,
            body_len,
        } = request.kind
        else {
            panic!("a credentialed request");
        };
        assert_eq!(
            (method.as_str(), path.as_str(), body_len),
            ("POST", "/v1/messages", 2)
        );
        let credential = Credential {
            host: "api.anthropic.com".into(),
            port: 443,
            header: "x-api-key".into(),
            scheme: Scheme::Plain,
            secret: "anthropic".into(),
            key: "api_key".into(),
            source: "loadout agent egress.credentials[0]".into(),
        };
        let head = credentialed_head(&method, &path, &headers, body_len, &credential, b"REAL");
        assert_eq!(
            String::from_utf8(head).expect("text"),
            "POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nConnection: close\r\nContent-Length: 2\r\nx-api-key: REAL\r\nanthropic-version: 2023-06-01\r\n\r\n"
        );
        // Only methods that act on an API: TRACE would echo the key back.
        for method in ["TRACE", "CONNECT", "PROPFIND"] {
            let line = format!("{method} /api.anthropic.com/ HTTP/1.1\r\n\r\n");
            assert!(
                matches!(
                    parse_proxy_request(line.as_bytes()),
                    Err(BadRequest::Refused(_))
                ),
                "{method}"
            );
        }
        assert!(!value_fits_header(b"sk-1\r\nx-evil: 1"));
        assert!(!value_fits_header(b""));
        assert!(value_fits_header(b"sk-ant-api03_AbC-9"));
        assert_eq!(
            allowed_host("API.example.com."),
            ("api.example.com".into(), Some(443))
        );
        assert_eq!(
            allowed_host("api.example.com:8443"),
            ("api.example.com".into(), Some(8443))
        );
        assert_eq!(allowed_host("api.example.com:x").1, None);
        // The API's name comes first; the proxy's own root names none.
        for bad in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"GET /?x HTTP/1.1\r\n\r\n"] {
            assert!(matches!(
                parse_proxy_request(bad),
                Err(BadRequest::Refused(_))
            ));
        }
        let absolute = parse_proxy_request(
            b"GET http://127.0.0.1:3128/api.openai.com/v1/models HTTP/1.1\r\n\r\n",
        )
        .expect("ok");
        assert_eq!(absolute.host, "api.openai.com");
        assert!(
            matches!(absolute.kind, ProxyKind::Credentialed { ref path, .. } if path == "/v1/models")
        );
        let other_port =
            parse_proxy_request(b"GET http://127.0.0.1:31289/x HTTP/1.1\r\n\r\n").expect("ok");
        assert!(matches!(other_port.kind, ProxyKind::Http { .. }));
        let bare = parse_proxy_request(b"GET /api.openai.com HTTP/1.1\r\n\r\n").expect("ok");
        assert!(matches!(bare.kind, ProxyKind::Credentialed { ref path, .. } if path == "/"));
    }

    #[test]
    fn agents_are_pointed_at_their_brokered_api_with_a_placeholder_key() {
        let credential = |host: &str| Credential {
            host: host.into(),
            port: 443,
            header: "authorization".into(),
            scheme: Scheme::Bearer,
            secret: "s".into(),
            key: "k".into(),
            source: String::new(),
        };
        let env: std::collections::BTreeMap<String, String> = api_environment(&[
            credential("api.anthropic.com"),
            credential("api.openai.com"),
            credential("git.example.org"),
        ])
        .into_iter()
        .collect();
        assert_eq!(
            env["ANTHROPIC_BASE_URL"],
            "http://127.0.0.1:3128/api.anthropic.com"
        );
        assert_eq!(env["ANTHROPIC_API_KEY"], PLACEHOLDER_KEY);
        assert_eq!(
            env["OPENAI_BASE_URL"],
            "http://127.0.0.1:3128/api.openai.com/v1"
        );
        assert_eq!(env["OPENAI_API_KEY"], PLACEHOLDER_KEY);
        assert_eq!(
            env["FLEET_API_GIT_EXAMPLE_ORG"],
            "http://127.0.0.1:3128/git.example.org"
        );
        assert!(!env.contains_key("GEMINI_API_KEY"));
    }
}
