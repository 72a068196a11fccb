//! The host's rules, checked against a revision: what a commit may ask of the host.
//!
//! A revision names providers and images and describes VMs and tasks; the host
//! configuration says which providers exist and how to reach them, where image files are,
//! which repositories tasks may fetch, and how short an interval may be. Anything a revision
//! asks beyond that is a diagnostic naming the host rule, before anything is contacted.

use super::{Diagnostic, LoadedFleet, Object, relative_path_problem};
use crate::spec::{HostDocument, HostSpec, Provider, RepositoryPattern};

/// Where diagnostics say the host's rules come from.
pub const HOST_CONFIG: &str = "the host configuration";

/// Checks of the host configuration that need only itself.
pub fn check_host_object(o: &Object<HostDocument>, diags: &mut Vec<Diagnostic>) {
    let trust = &o.doc.spec.trust;
    if !trust.approvers.is_empty() && !trust.verifies() {
        diags.push(o.field_error(
            "/spec/trust/approvers",
            "approvers are principals of signed commits: set trust.allowedSigners (an OpenSSH allowed-signers file) or trust.openpgpKeyring too",
        ));
    }
    for (i, sink) in o.doc.spec.notify.iter().enumerate() {
        let at = format!("/spec/notify/{i}");
        match (&sink.url, sink.exec.is_empty()) {
            (Some(_), false) | (None, true) => diags.push(o.field_error(
                &at,
                "set exactly one of url (a webhook) and exec (a host command)",
            )),
            (Some(url), true) => {
                if !(url.starts_with("https://") || loopback_http(url)) || url_has_password(url) {
                    diags.push(o.field_error(&format!("{at}/url"), format!("{url:?}: a webhook is an https:// URL (http:// only on loopback), without a password (sign with secretFile)")));
                }
            }
            (None, false) => {
                if !sink.exec[0].starts_with('/') {
                    diags.push(o.field_error(&format!("{at}/exec/0"), "the command is an absolute path (no shell runs it, and no PATH is searched)"));
                }
            }
        }
    }
    if let Some(source) = &o.doc.spec.source {
        if url_has_password(&source.url) {
            diags.push(o.field_error("/spec/source/url", "a password in the URL would be shown in logs and status files: put the token in credentialFile (mode 0600)"));
        }
        for (i, pattern) in source.preview_refs.iter().enumerate() {
            let valid = pattern.starts_with("refs/")
                && pattern.matches('*').count() <= 1
                && !pattern.contains("..")
                && !pattern.contains("//")
                && !pattern.ends_with('/')
                && pattern
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/*-_.".contains(c));
            if !valid {
                diags.push(o.field_error(&format!("/spec/source/previewRefs/{i}"), format!("{pattern:?} is not a ref pattern: write refs/… with letters, digits, / - _ . and at most one *, as refs/pull/*/head")));
            }
        }
    }
    let mut seen = std::collections::BTreeMap::new();
    for (i, p) in o.doc.spec.providers.iter().enumerate() {
        super::unique_in_list(
            o,
            &mut seen,
            p.name().0.as_str(),
            &format!("/spec/providers/{i}/name"),
            "provider",
            diags,
        );
        if let Provider::Libvirt(l) = p
            && let Some(address) = l.full_network.as_ref().and_then(|n| n.address.as_deref())
            && address
                .split_once('/')
                .is_none_or(|(ip, _)| ip.parse::<std::net::Ipv4Addr>().is_err())
        {
            diags.push(o.field_error(&format!("/spec/providers/{i}/fullNetwork/address"), format!("{address:?} is not an IPv4 address with a prefix length, for example 192.168.150.1/24")));
        }
        let Provider::Proxmox(x) = p else {
            continue;
        };
        let sources = [
            x.token.secret.is_some(),
            x.token.file.is_some(),
            x.token.env.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            diags.push(o.field_error(&format!("/spec/providers/{i}/token"), "set exactly one of secret (a Secret in the fleet's fleet/secrets/), file (a host file, mode 0600) and env (an environment variable of fleet's process)"));
        }
        if x.insecure_skip_verify && x.ca_file.is_some() {
            diags.push(o.field_error(
                &format!("/spec/providers/{i}/insecureSkipVerify"),
                "contradicts caFile; remove insecureSkipVerify to verify against the CA file",
            ));
        }
    }
}

/// Everything a revision asks of the host, against what the host allows.
pub fn check(f: &LoadedFleet, host: &HostSpec, diags: &mut Vec<Diagnostic>) {
    check_providers(f, host, diags);
    check_intervals(f, host, diags);
    check_repositories(f, host, diags);
    check_credentials(f, host, diags);
}

fn check_providers(f: &LoadedFleet, host: &HostSpec, diags: &mut Vec<Diagnostic>) {
    let o = &f.fleet;
    for (i, p) in o.doc.spec.providers.iter().enumerate() {
        match host.provider(&p.name.0) {
            None => {
                let defined: Vec<String> =
                    host.providers.iter().map(|h| h.name().0.clone()).collect();
                let list = if defined.is_empty() {
                    "it defines none".to_owned()
                } else {
                    format!("it defines: {}", defined.join(", "))
                };
                diags.push(o.field_error(&format!("/spec/providers/{i}/name"), format!("{HOST_CONFIG} has no provider {:?} ({list}); name one of those, or ask the host's administrator to add it",
                        p.name.0)));
            }
            Some(h) if h.kind() != p.kind => diags.push(o.field_error(
                &format!("/spec/providers/{i}/type"),
                format!(
                    "provider {:?} is {} in {HOST_CONFIG}, not {}; set type: {}",
                    p.name.0,
                    h.kind().as_str(),
                    p.kind.as_str(),
                    h.kind().as_str()
                ),
            )),
            Some(_) => {}
        }
    }
}

fn check_intervals(f: &LoadedFleet, host: &HostSpec, diags: &mut Vec<Diagnostic>) {
    let o = &f.fleet;
    let floor = host.limits.min_interval();
    let policy = &o.doc.spec.policy;
    for (field, value) in [
        ("reconcileInterval", &policy.reconcile_interval),
        ("resyncInterval", &policy.resync_interval),
    ] {
        if let Some(d) = value
            && d.to_std() < floor
        {
            diags.push(o.field_error(&format!("/spec/policy/{field}"), format!("{} is shorter than {HOST_CONFIG} allows (limits.minInterval {}); use {} or more",
                    d.as_str(),
                    humantime::format_duration(floor),
                    humantime::format_duration(floor))));
        }
    }
}

fn check_repositories(f: &LoadedFleet, host: &HostSpec, diags: &mut Vec<Diagnostic>) {
    for o in f.tasks.values() {
        check_push(o, host, diags);
        let Some(repo) = &o.doc.spec.repository else {
            continue;
        };
        let url = repo.url.as_str();
        let at = "/spec/repository/url";
        if !url.contains("://") && !url.contains('@') {
            if let Some(problem) = relative_path_problem(url) {
                diags.push(o.field_error(
                    at,
                    format!(
                        "{problem}; a local repository must be a path inside this repository (or a URL {HOST_CONFIG} allows)"
                    ),
                ));
            }
            continue;
        }
        if let Some(problem) = network_url_problem(url) {
            diags.push(o.field_error(at, problem));
            continue;
        }
        if !host.repositories.iter().any(|p| pattern_matches(p, url)) {
            let allowed = if host.repositories.is_empty() {
                "it allows none".to_owned()
            } else {
                format!(
                    "it allows: {}",
                    host.repositories
                        .iter()
                        .map(|p| p.0.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            diags.push(o.field_error(
                at,
                format!(
                    "{url:?} is not a repository {HOST_CONFIG} allows ({allowed}); ask the host's administrator to add a pattern to repositories"
                ),
            ));
        }
    }
}

/// Where a network repository URL leads: its scheme, user, host and port (the scheme's
/// default when absent). `None` for a path, a `file://` URL or the `user@host:path` form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: String,
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
    /// `host` or `host:port` as the URL writes it (lower-case): how git's credential
    /// protocol names the server.
    pub written: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Option<Endpoint> {
        let (scheme, rest) = url.split_once("://")?;
        let default_port = match scheme {
            "https" => 443,
            "ssh" => 22,
            "git" => 9418,
            _ => return None,
        };
        let authority = rest.split(['/', '?', '#']).next()?;
        let (user, host_port) = match authority.rsplit_once('@') {
            Some((user, hp)) => (Some(user.to_owned()), hp),
            None => (None, authority),
        };
        // Strictly a name or a bracketed IPv6 address, then an optional port: git reads
        // `[a]b` as the host `a`, so anything looser could name one host to fleet's checks
        // and another to git.
        let (host, port) = match host_port.strip_prefix('[') {
            Some(v6) => {
                let (address, after) = v6.split_once(']')?;
                address.parse::<std::net::Ipv6Addr>().ok()?;
                (format!("[{address}]"), after)
            }
            None => {
                let end = host_port.find(':').unwrap_or(host_port.len());
                (host_port[..end].to_ascii_lowercase(), &host_port[end..])
            }
        };
        let port = match port {
            "" => default_port,
            explicit => explicit
                .strip_prefix(':')?
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)?,
        };
        let name_ok = host.starts_with('[')
            || (!host.is_empty()
                && !host.starts_with(['-', '.'])
                && !host.ends_with('.')
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
        if !name_ok {
            return None;
        }
        Some(Endpoint {
            scheme: scheme.to_owned(),
            user,
            host,
            port,
            written: host_port.to_ascii_lowercase(),
        })
    }

    /// As a Secret's `allowed.hosts` names it: the host, with `:PORT` unless 443.
    pub fn allowed_name(&self) -> String {
        if self.port == 443 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A results push goes to a URL the host configuration's `pushes` allows: never into a
/// path of the fleet's own repository, never anywhere by default.
fn check_push(o: &Object<crate::spec::TaskDocument>, host: &HostSpec, diags: &mut Vec<Diagnostic>) {
    let Some(push) = o.doc.spec.results.as_ref().and_then(|r| r.push.as_ref()) else {
        return;
    };
    let (url, at) = match (&push.url, &o.doc.spec.repository) {
        (Some(url), _) => (url.as_str(), "/spec/results/push/url"),
        (None, Some(repo)) => (repo.url.as_str(), "/spec/results/push"),
        (None, None) => {
            diags.push(o.field_error(
                "/spec/results/push",
                "a task without a repository has no commits to push; add repository, or remove results.push".to_owned(),
            ));
            return;
        }
    };
    if let Some(problem) = network_url_problem(url) {
        diags.push(o.field_error(at, problem));
        return;
    }
    if !host.pushes.iter().any(|p| pattern_matches(p, url)) {
        diags.push(o.field_error(
            at,
            format!(
                "{url:?} is not a repository {HOST_CONFIG} lets results be pushed to (pushes); ask the host's administrator to add a pattern to pushes"
            ),
        ));
    }
    // The repository fleet follows takes a guest's commits only on fleet/ branches: on the
    // followed branch they would be applied as the next revision.
    if let (Some(source), Some(branch)) = (&host.source, &push.branch)
        && same_repository(&source.url, url)
        && !branch.starts_with("fleet/")
    {
        diags.push(o.field_error(
            "/spec/results/push/branch",
            format!(
                "{url:?} is the repository {HOST_CONFIG} follows (source): a task's results go there only on a branch under fleet/ (the default, fleet/<task>/<run>)"
            ),
        ));
    }
}

/// Whether `url` carries a credential: a password (`https://user:token@host/…`), or for
/// https any user at all (a token is often passed as the user name). ssh's `git@` is a user.
pub fn url_has_password(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority.rsplit_once('@') {
        Some((userinfo, _)) => scheme != "ssh" || userinfo.contains(':'),
        None => false,
    }
}

/// Whether `url` is plain HTTP to this host itself: `http://` then exactly `localhost`,
/// an address of 127.0.0.0/8 or `[::1]`, then a port, a path or nothing (no user).
fn loopback_http(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    if authority.contains('@') {
        return false;
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, "")) => (addr, None),
            Some((addr, port)) => match port.strip_prefix(':') {
                Some(port) => (addr, Some(port)),
                None => return false,
            },
            None => return false,
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    port.is_none_or(|p| p.parse::<u16>().is_ok())
        && (host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()))
}

/// Whether two URLs name the same repository: compared without user, default port, case of
/// the host, trailing slash or `.git`.
fn same_repository(a: &str, b: &str) -> bool {
    fn key(url: &str) -> Option<String> {
        let (scheme, rest) = url.split_once("://")?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = host.to_ascii_lowercase();
        let host = match (scheme, host.rsplit_once(':')) {
            ("https", Some((h, "443"))) | ("ssh", Some((h, "22"))) => h.to_owned(),
            _ => host,
        };
        let path: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let path = path.join("/");
        let path = path.strip_suffix(".git").unwrap_or(&path);
        Some(format!("{host}/{path}"))
    }
    matches!((key(a), key(b)), (Some(x), Some(y)) if x == y)
}

/// Why an `https://`, `ssh://` or `git://` URL is not one fleet reaches, if it is not.
fn network_url_problem(url: &str) -> Option<String> {
    let network = ["https://", "ssh://", "git://"]
        .iter()
        .any(|scheme| url.starts_with(scheme));
    (network && Endpoint::parse(url).is_none()).then(|| {
        format!(
            "{url:?}: the server must be a host name (letters, digits, dots, hyphens) or a bracketed IPv6 address, with an optional port"
        )
    })
}

/// `*` matches any run of characters but `/`, `?`, `#`, `@`, `\\`, `:`, `[` and `]` (so it
/// never spans a host, port, query or user part, nor makes git read another host); `**`
/// any run at all; everything else itself.
/// A URL with `.` or `..` segments or percent-escapes matches nothing: servers normalise
/// those, so they could lead outside what the pattern names.
pub fn pattern_matches(pattern: &RepositoryPattern, url: &str) -> bool {
    if url.contains('%') || url.split('/').any(|part| part == "." || part == "..") {
        return false;
    }
    fn matches(p: &[u8], s: &[u8]) -> bool {
        match p {
            [] => s.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=s.len()).any(|i| matches(rest, &s[i..])),
            [b'*', rest @ ..] => {
                let run = s
                    .iter()
                    .position(|&c| {
                        matches!(c, b'/' | b'?' | b'#' | b'@' | b'\\' | b':' | b'[' | b']')
                    })
                    .unwrap_or(s.len());
                (0..=run).any(|i| matches(rest, &s[i..]))
            }
            [c, rest @ ..] => s.first() == Some(c) && matches(rest, &s[1..]),
        }
    }
    matches(pattern.0.as_bytes(), url.as_bytes())
}

/// A Proxmox API token kept as a Secret is a provider credential: the revision must hold it,
/// and no loadout or task may take it (it would give a guest the cluster).
fn check_credentials(f: &LoadedFleet, host: &HostSpec, diags: &mut Vec<Diagnostic>) {
    for p in &host.providers {
        let Provider::Proxmox(x) = p else {
            continue;
        };
        let Some(r) = &x.token.secret else {
            continue;
        };
        let used = f
            .fleet
            .doc
            .spec
            .providers
            .iter()
            .position(|used| used.name == *p.name());
        let holds = f
            .secrets
            .get(&r.secret.0)
            .is_some_and(|s| s.doc.spec.data.contains_key(&r.key));
        // Required even when this revision does not use the provider: with the token's own
        // Secret in the revision, a copy of its ciphertext under another name is recognised
        // by its value and withheld (`Vault::withhold_copies_of`).
        if !holds {
            let pointer = match used {
                Some(i) => format!("/spec/providers/{i}/name"),
                None => "/metadata/name".to_owned(),
            };
            diags.push(f.fleet.field_error(
                &pointer,
                format!(
                    "provider {:?} takes its API token from Secret {}/{} ({HOST_CONFIG}), which this revision lacks; create it with `fleet secret set {} {}`",
                    p.name().0, r.secret.0, r.key.0, r.secret.0, r.key.0
                ),
            ));
        }
        let uses = f
            .loadouts
            .values()
            .map(|o| (&o.path, &o.tree, &o.doc.spec.secrets))
            .chain(
                f.tasks
                    .values()
                    .map(|o| (&o.path, &o.tree, &o.doc.spec.secrets)),
            );
        for (path, tree, refs) in uses {
            for (j, used) in refs.iter().enumerate() {
                if used.secret == r.secret {
                    diags.push(super::field_error_in(
                        path,
                        tree,
                        &format!("/spec/secrets/{j}/secret"),
                        super::At::Value,
                        format!(
                            "Secret {:?} holds provider {:?}'s API token ({HOST_CONFIG}); a provider credential never goes to a guest",
                            r.secret.0,
                            p.name().0
                        ),
                    ));
                }
            }
        }
        // Nor to any server: an API behind the broker, a git host.
        let sent = f
            .loadouts
            .values()
            .flat_map(|o| {
                let credentials = o.doc.spec.egress.iter().flat_map(|e| &e.credentials);
                credentials.enumerate().map(move |(j, c)| {
                    (
                        o.path.as_str(),
                        &o.tree,
                        format!("/spec/egress/credentials/{j}/secret/secret"),
                        &c.secret.secret,
                    )
                })
            })
            .chain(f.tasks.values().flat_map(|o| {
                let fetch = o
                    .doc
                    .spec
                    .repository
                    .as_ref()
                    .and_then(|r| r.credentials.as_ref())
                    .map(|c| ("/spec/repository/credentials/secret", &c.secret));
                let push = o
                    .doc
                    .spec
                    .results
                    .as_ref()
                    .and_then(|r| r.push.as_ref()?.credentials.as_ref())
                    .map(|c| ("/spec/results/push/credentials/secret", &c.secret));
                fetch
                    .into_iter()
                    .chain(push)
                    .map(move |(at, secret)| (o.path.as_str(), &o.tree, at.to_owned(), secret))
            }));
        for (path, tree, at, secret) in sent {
            if *secret == r.secret {
                diags.push(super::field_error_in(
                    path,
                    tree,
                    &at,
                    super::At::Value,
                    format!(
                        "Secret {:?} holds provider {:?}'s API token ({HOST_CONFIG}); a provider credential is never sent anywhere but to its provider",
                        r.secret.0,
                        p.name().0
                    ),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_host_is_loopback_and_no_https_url_carries_a_user() {
        for yes in [
            "http://127.0.0.1:8080/hook",
            "http://localhost/",
            "http://[::1]:9/x",
            "http://127.1.2.3",
        ] {
            assert!(loopback_http(yes), "{yes}");
        }
        for no in [
            "http://127.0.0.1.evil.com/",
            "http://localhost.evil.com/",
            "http://localhost@evil.com/",
            "http://[::1].evil.com/",
            "http://10.0.0.1/",
            "https://127.0.0.1/",
        ] {
            assert!(!loopback_http(no), "{no}");
        }
        assert!(url_has_password("https://ghp_token@github.com/o/r"));
        assert!(url_has_password("https://u:p@github.com/o/r"));
        assert!(!url_has_password("ssh://git@github.com/o/r"));
        assert!(url_has_password("ssh://git:p@github.com/o/r"));
        assert!(!url_has_password("https://github.com/o/r@main"));
    }

    #[test]
    fn a_repository_is_the_same_under_another_user_port_case_or_suffix() {
        let same = |a, b| same_repository(a, b);
        assert!(same(
            "ssh://git@Git.Example.org:22/ops/fleet.git",
            "https://git.example.org/ops/fleet"
        ));
        assert!(same(
            "https://git.example.org:443//ops/fleet/",
            "https://token@git.example.org/ops/fleet.git"
        ));
        assert!(!same(
            "https://git.example.org/ops/fleet",
            "https://git.example.org/ops/app"
        ));
        assert!(!same(
            "https://git.example.org:8443/ops/fleet",
            "https://git.example.org/ops/fleet"
        ));
    }

    #[test]
    fn repository_patterns_match_by_segment() {
        let p = |s: &str| RepositoryPattern(s.to_owned());
        assert!(pattern_matches(
            &p("https://git.example.org/team/*"),
            "https://git.example.org/team/app"
        ));
        assert!(!pattern_matches(
            &p("https://git.example.org/team/*"),
            "https://git.example.org/team/app/../../other"
        ));
        assert!(!pattern_matches(
            &p("https://git.example.org/team/*"),
            "https://git.example.org.evil.net/team/app"
        ));
        assert!(pattern_matches(
            &p("https://git.example.org/**"),
            "https://git.example.org/a/b/c.git"
        ));
        assert!(!pattern_matches(
            &p("https://git.example.org/*"),
            "https://git.example.org/a/b"
        ));
        assert!(!pattern_matches(
            &p("https://git.example.org/**"),
            "https://git.example.org/a/../../b"
        ));
        assert!(!pattern_matches(
            &p("https://git.example.org/**"),
            "https://git.example.org/a/%2e%2e/b"
        ));
        assert!(!pattern_matches(
            &p("https://*.example.org/**"),
            "https://evil.net?.example.org/x"
        ));
        assert!(!pattern_matches(
            &p("https://*.example.org/**"),
            "https://evil.net@a.example.org/x"
        ));
        // git reads `[github.com]x.example.org` as the host github.com.
        assert!(!pattern_matches(
            &p("ssh://git@*.example.org/**"),
            "ssh://git@[github.com]x.example.org/org/repo"
        ));
    }

    #[test]
    fn an_endpoint_is_a_plain_host_name_or_a_bracketed_ipv6_address() {
        let e = |url: &str| Endpoint::parse(url).map(|e| (e.host, e.port, e.written));
        assert_eq!(
            e("https://Git.Example.org/team/app"),
            Some(("git.example.org".into(), 443, "git.example.org".into()))
        );
        assert_eq!(
            e("https://git.example.org:443/x"),
            Some(("git.example.org".into(), 443, "git.example.org:443".into()))
        );
        assert_eq!(
            e("ssh://git@git.example.org/x"),
            Some(("git.example.org".into(), 22, "git.example.org".into()))
        );
        assert_eq!(
            e("ssh://root@127.0.0.1:2222/srv/app.git"),
            Some(("127.0.0.1".into(), 2222, "127.0.0.1:2222".into()))
        );
        assert_eq!(
            e("https://[::1]:8443/r"),
            Some(("[::1]".into(), 8443, "[::1]:8443".into()))
        );
        assert_eq!(e("https://[::1]/r").map(|x| x.1), Some(443));
        for refused in [
            "ssh://git@[github.com]x.example.org/org/repo",
            "https://[::1]x/r",
            "https://host./r",
            "ssh://-oProxyCommand=x/r",
            "https://host:0/r",
            "https://host:99999/r",
            "https://ho_st/r",
            "file:///srv/app.git",
            "git@host:app.git",
        ] {
            assert_eq!(Endpoint::parse(refused), None, "{refused}");
        }
    }
}
