//! Task repositories fetched over the network, for real: `git http-backend` behind HTTPS
//! with basic auth, and `sshd` with a key, both on loopback; the credentials are given to
//! fleet's fetch as a Secret's value would be. A wrong credential fails with a clear
//! message, and nothing of the credential shows in it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use fleet::spec::{HostGit, HostPath, Repository};
use fleet::tasks::remote::Credential;
use fleet::tasks::repo::{Access, Checkout, fetch_archive};

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A bare repository `app.git` under `root` with one commit on `main`; its id.
fn served_repository(root: &Path) -> String {
    let work = root.join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    std::fs::write(work.join("README"), "served over the network\n").expect("write");
    git(&work, &["init", "-q", "-b", "main"]);
    git(&work, &["add", "."]);
    git(
        &work,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@fleet.invalid",
            "commit",
            "-qm",
            "one",
        ],
    );
    git(root, &["clone", "-q", "--bare", "work", "app.git"]);
    git(&work, &["rev-parse", "HEAD"])
}

/// A commit on top of what `served_repository` made, in its work tree: its id.
fn a_run_commit(root: &Path, text: &str) -> String {
    let work = root.join("work");
    std::fs::write(work.join("README"), text).expect("write");
    git(
        &work,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@fleet.invalid",
            "commit",
            "-qam",
            text.trim(),
        ],
    );
    git(&work, &["rev-parse", "HEAD"])
}

/// Pushes `tip` from the work tree of `served_repository` to `branch` of `url`, as the
/// results check does.
fn push_from(
    root: &Path,
    url: &str,
    tip: &str,
    branch: &str,
    access: &Access,
) -> Result<(), String> {
    fleet::tasks::remote::push(&root.join("work/.git"), url, tip, branch, access)
}

fn checkout() -> Checkout {
    Checkout {
        branch: "fleet/net".into(),
        author: fleet::spec::GitIdentity {
            name: "fleet task net".into(),
            email: "net@fleet.invalid".into(),
        },
    }
}

fn repository(url: &str) -> Repository {
    Repository {
        url: url.to_owned(),
        branch: Some("main".into()),
        rev: None,
        credentials: None,
    }
}

fn credential(user: Option<&str>, secret: &[u8]) -> Credential {
    Credential {
        username: user.map(str::to_owned),
        secret: zeroize::Zeroizing::new(secret.to_vec()),
    }
}

/// `git http-backend` serving `root` over HTTPS on loopback (a certificate for
/// `localhost` from a test authority, whose PEM is returned), for the user `user` with
/// the password `password` alone; everything else gets 401.
pub(crate) fn https_git_server(root: PathBuf, user: &str, password: &str) -> (u16, String) {
    let (config, ca_pem) = crate::egress::test_tls("localhost");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    );
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (config, root, expected) = (config.clone(), root.clone(), expected.clone());
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
                let reply = serve_cgi(&mut tls, &root, &expected).unwrap_or_else(|| {
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_vec()
                });
                let tls = tls.get_mut();
                let _ = tls.write_all(&reply);
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    (port, ca_pem)
}

/// One request, answered by `git http-backend` (CGI) when its credentials are right.
fn serve_cgi(conn: &mut impl BufRead, root: &Path, expected: &str) -> Option<Vec<u8>> {
    let request = crate::support::HttpRequest::read(conn)?;
    let header = |name: &str| request.header(name);
    let body = request.body.clone();
    if header("authorization").as_deref() != Some(expected) {
        return Some(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .to_vec(),
        );
    }
    let mut parts = request.line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut cgi = Command::new("git");
    cgi.arg("http-backend")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("REMOTE_USER", "fleet")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (name, var) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "GIT_PROTOCOL"),
    ] {
        if let Some(v) = header(name) {
            cgi.env(var, v);
        }
    }
    let mut child = cgi.spawn().ok()?;
    let mut stdin = child.stdin.take()?;
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output().ok()?;
    let _ = writer.join();
    let split = out.stdout.windows(4).position(|w| w == b"\r\n\r\n");
    let (cgi_head, cgi_body) = match split {
        Some(at) => (&out.stdout[..at], &out.stdout[at + 4..]),
        None => {
            let at = out.stdout.windows(2).position(|w| w == b"\n\n")?;
            (&out.stdout[..at], &out.stdout[at + 2..])
        }
    };
    let cgi_head = String::from_utf8_lossy(cgi_head);
    let mut status = "200 OK".to_owned();
    let mut headers = String::new();
    for line in cgi_head.lines() {
        match line.split_once(':') {
            Some((k, v)) if k.eq_ignore_ascii_case("status") => status = v.trim().to_owned(),
            Some(_) => headers.push_str(&format!("{}\r\n", line.trim_end())),
            None => {}
        }
    }
    let mut reply = format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        cgi_body.len()
    )
    .into_bytes();
    reply.extend_from_slice(cgi_body);
    Some(reply)
}

#[test]
fn a_repository_over_https_is_fetched_with_its_token_and_a_wrong_one_fails_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let commit = served_repository(dir.path());
    let token = "tok-4f1d2c9e8b";
    let (port, ca_pem) = https_git_server(dir.path().to_owned(), "ci-bot", token);
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).expect("write");
    let host = HostGit {
        known_hosts: None,
        ca_file: Some(HostPath(ca.display().to_string())),
    };
    let url = format!("https://localhost:{port}/app.git");
    let cache = dir.path().join("cache");
    let fetch = |credential: Option<&Credential>| {
        fetch_archive(
            &cache,
            dir.path(),
            &repository(&url),
            &checkout(),
            &Access {
                credential,
                git: &host,
                fleet: &crate::support::fleet_bin(),
            },
        )
    };
    let right = credential(Some("ci-bot"), token.as_bytes());
    let archive = fetch(Some(&right)).expect("fetched over https");
    assert_eq!(archive.commit, commit);
    let mut tar = tar::Archive::new(archive.tar.as_slice());
    let readme = tar
        .entries()
        .expect("tar")
        .filter_map(Result::ok)
        .find(|e| e.path().is_ok_and(|p| p == Path::new("README")))
        .map(|mut e| {
            let mut text = String::new();
            e.read_to_string(&mut text).expect("read");
            text
        });
    assert_eq!(readme.as_deref(), Some("served over the network\n"));

    // A wrong token, or none: refused by the server, said plainly, the token nowhere.
    let wrong = credential(Some("ci-bot"), b"tok-wrong-77aa");
    let refused = fetch(Some(&wrong)).err().expect("refused").to_string();
    assert!(refused.contains("Authentication failed"), "{refused}");
    assert!(!refused.contains("tok-wrong-77aa"), "{refused}");
    // A value on more than one line would be half read by git and half printed.
    let two_lines = credential(Some("ci-bot"), b"tok-first-line\nsecond-line-9c1");
    let refused = fetch(Some(&two_lines)).err().expect("refused").to_string();
    assert!(
        refused.contains("one line of visible characters"),
        "{refused}"
    );
    assert!(!refused.contains("second-line-9c1"), "{refused}");
    let refused = fetch(None).err().expect("refused").to_string();
    assert!(refused.contains(&url), "{refused}");

    // A run's commit goes back the same way, with the same token; again is a no-op; a
    // commit that does not descend is refused (never forced); a wrong token is refused.
    let fleet = crate::support::fleet_bin();
    let access = |credential| Access {
        credential,
        git: &host,
        fleet: &fleet,
    };
    let tip = a_run_commit(dir.path(), "changed by a run\n");
    push_from(
        dir.path(),
        &url,
        &tip,
        "fleet/net/r1",
        &access(Some(&right)),
    )
    .expect("pushed");
    assert_eq!(
        git(
            &dir.path().join("app.git"),
            &["rev-parse", "refs/heads/fleet/net/r1"]
        ),
        tip
    );
    push_from(
        dir.path(),
        &url,
        &tip,
        "fleet/net/r1",
        &access(Some(&right)),
    )
    .expect("again");
    let refused = push_from(
        dir.path(),
        &url,
        &commit,
        "fleet/net/r1",
        &access(Some(&right)),
    )
    .expect_err("not forced");
    assert!(refused.contains("rejected"), "{refused}");
    let refused = push_from(
        dir.path(),
        &url,
        &tip,
        "fleet/net/r2",
        &access(Some(&wrong)),
    )
    .expect_err("refused");
    assert!(refused.contains("Authentication failed"), "{refused}");

    // The host's authority is the only one trusted: without it, the server's certificate is
    // not.
    let untrusted = fetch_archive(
        &cache,
        dir.path(),
        &repository(&url),
        &checkout(),
        &Access {
            credential: Some(&right),
            git: &HostGit::default(),
            fleet: &crate::support::fleet_bin(),
        },
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(untrusted.contains("certificate"), "{untrusted}");
}

/// An `sshd` on loopback that lets in whoever holds `authorized` (as root, the only user
/// this test can count on), its host key as a `known_hosts` line, and its process.
pub(crate) fn sshd(dir: &Path, authorized: &str) -> (u16, String, std::process::Child) {
    let (port, config) = sshd_config(dir, authorized);
    // Privilege separation needs its empty directory.
    std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sshd (apt-get install openssh-server)");
    crate::daemon::wait_until("sshd listens", std::time::Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let public = std::fs::read_to_string(dir.join("host_key.pub")).expect("host key");
    let mut words = public.split_whitespace();
    let known = format!(
        "[127.0.0.1]:{port} {} {}\n",
        words.next().expect("type"),
        words.next().expect("key")
    );
    (port, known, child)
}

/// An sshd configuration in `dir` (with a new host key) on a free loopback port that lets
/// in the holder of `authorized`: the port and the configuration file.
pub(crate) fn sshd_config(dir: &Path, authorized: &str) -> (u16, std::path::PathBuf) {
    crate::remote::second_host::sshd_config(dir, authorized).expect("sshd configuration")
}

pub(crate) fn keygen(path: &Path) {
    crate::remote::second_host::keygen(path).expect("ssh-keygen");
}

pub(crate) struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_repository_over_ssh_is_fetched_with_its_key_and_only_from_a_known_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let commit = served_repository(dir.path());
    let client = dir.path().join("client_key");
    keygen(&client);
    let authorized = std::fs::read_to_string(dir.path().join("client_key.pub")).expect("pub");
    let sshd_dir = dir.path().join("sshd");
    std::fs::create_dir_all(&sshd_dir).expect("mkdir");
    let (port, known, child) = sshd(&sshd_dir, &authorized);
    let _sshd = Killed(child);
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, &known).expect("write");
    let key = std::fs::read(&client).expect("key");
    // The key exists only in the Secret from here on: not a file fleet could read.
    std::fs::remove_file(&client).expect("rm");
    let url = format!(
        "ssh://root@127.0.0.1:{port}{}",
        dir.path().join("app.git").display()
    );
    let cache = dir.path().join("cache");
    let with = |host: &HostGit, credential: Option<&Credential>| {
        fetch_archive(
            &cache,
            dir.path(),
            &repository(&url),
            &checkout(),
            &Access {
                credential,
                git: host,
                fleet: &crate::support::fleet_bin(),
            },
        )
    };
    let host = HostGit {
        known_hosts: Some(HostPath(known_hosts.display().to_string())),
        ca_file: None,
    };
    let right = credential(None, &key);
    let archive = with(&host, Some(&right)).expect("fetched over ssh");
    assert_eq!(archive.commit, commit);

    // A run's commit goes back over ssh with the same key.
    let tip = a_run_commit(dir.path(), "changed over ssh\n");
    push_from(
        dir.path(),
        &url,
        &tip,
        "fleet/net/r1",
        &Access {
            credential: Some(&right),
            git: &host,
            fleet: &crate::support::fleet_bin(),
        },
    )
    .expect("pushed over ssh");
    assert_eq!(
        git(
            &dir.path().join("app.git"),
            &["rev-parse", "refs/heads/fleet/net/r1"]
        ),
        tip
    );

    // Another key is refused by the server; text that is no key, by ssh-add.
    let other = dir.path().join("other_key");
    keygen(&other);
    let wrong = credential(None, &std::fs::read(&other).expect("key"));
    let refused = with(&host, Some(&wrong))
        .err()
        .expect("refused")
        .to_string();
    assert!(refused.contains("Permission denied"), "{refused}");
    let garbage = credential(None, b"not a key");
    let refused = with(&host, Some(&garbage))
        .err()
        .expect("refused")
        .to_string();
    assert!(refused.contains("not an OpenSSH private key"), "{refused}");

    // A server whose key the host does not list is never trusted, and without any
    // knownHosts no ssh fetch is tried.
    std::fs::write(&known_hosts, known.replace("[127.0.0.1]", "[127.0.0.2]")).expect("write");
    let refused = with(&host, Some(&right))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        refused.contains("Host key verification failed"),
        "{refused}"
    );
    let refused = with(&HostGit::default(), Some(&right))
        .err()
        .expect("refused")
        .to_string();
    assert!(refused.contains("git.knownHosts"), "{refused}");
}

/// Through the daemon, with the token in a Secret: the task with the right key gets the
/// repository in its VM; the one with a wrong key fails alone, saying why, and neither
/// token is anywhere under the status directory or in fleet's log.
#[test]
fn a_wrong_repository_credential_fails_that_task_alone() {
    use crate::daemon::Daemon;
    use crate::libvirt::{Cleanup, enabled, fleet_yaml_with_policy, vm_yaml};
    use crate::secrets::{age_identity, files_containing, random_hex, secret_set};
    use crate::support::Repo;
    use crate::tasks::{Status, task_yaml};
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-gitnet-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let served = tempfile::tempdir().expect("tempdir");
    let commit = served_repository(served.path());
    let token = format!("tok{}", random_hex(10));
    let wrong = format!("bad{}", random_hex(10));
    let (port, ca_pem) = https_git_server(served.path().to_owned(), "ci-bot", &token);
    let keys = tempfile::tempdir().expect("tempdir");
    let (identity, recipient) = age_identity(keys.path(), "age.key");
    let ca = keys.path().join("git-ca.pem");
    std::fs::write(&ca, ca_pem).expect("write");

    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}gitnet", std::process::id()),
            "{shutdownTimeout: 10s, reconcileInterval: 30s}",
        ),
    );
    let host = crate::support::host_yaml(
        &[crate::support::local_provider(repo.path())],
        &format!(
            "  recipients: [{recipient}]\n  pushes: ['https://localhost:*/**']\n  git: {{caFile: '{}'}}\n",
            ca.display()
        ),
    );
    repo.host_config(&host.replace(
        "repositories: ['file:///**']",
        "repositories: ['https://localhost:*/**']",
    ));
    secret_set(&repo, "git", "token", &token);
    secret_set(&repo, "git", "wrong", &wrong);
    repo.allow_secret(
        "git",
        &format!("{{hosts: ['localhost:{port}'], tasks: [good, bad]}}"),
    );
    repo.write(&format!("fleet/vms/{vm}.yaml"), vm_yaml(&vm, "256Mi"));
    let url = format!("https://localhost:{port}/app.git");
    for (task, key) in [("good", "token"), ("bad", "wrong")] {
        repo.write(
            &format!("fleet/tasks/{task}.yaml"),
            task_yaml(
                task,
                &vm,
                &format!(
                    "  repository: {{url: '{url}', branch: main, credentials: {{secret: git, key: {key}, username: ci-bot}}}}\n  results: {{push: {{}}}}\n  command: [sh, -c, 'cat README; echo from the run > out.txt']\n"
                ),
            ),
        );
    }
    repo.commit("two tasks on a repository behind https");
    crate::support::Run(repo.fleet(&["validate"]).0).expect_code(0);
    let identity_env = identity.to_str().expect("utf8").to_owned();
    let daemon = Daemon::start_with(&repo, &[("FLEET_AGE_IDENTITY", &identity_env)], &[]);
    let status = Status(repo.path().join(".fleet/status"));
    status.wait_phase("good", "Succeeded", std::time::Duration::from_secs(180));
    status.wait_phase("bad", "Failed", std::time::Duration::from_secs(60));
    assert!(
        status.output("good").contains("served over the network"),
        "{}",
        status.output("good")
    );
    let good = status.task("good");
    assert!(
        good.contains(&commit),
        "the fetched commit is recorded: {good}"
    );
    // Its commit went back to the same repository, with the same credential.
    crate::daemon::wait_until(
        "the run's results are pushed",
        std::time::Duration::from_secs(60),
        || status.task("good").contains("pushed: "),
    );
    let good = status.task("good");
    let run = crate::tasks::field(&good, "run").expect("a run");
    assert_eq!(
        git(
            &served.path().join("app.git"),
            &["show", &format!("fleet/good/{run}:out.txt")]
        ),
        "from the run"
    );
    let bad = status.task("bad");
    assert!(
        bad.contains("cannot fetch the repository") && bad.contains("Authentication failed"),
        "{bad}"
    );
    let log = daemon.log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    drop(daemon);
    for value in [&token, &wrong] {
        assert!(!log.contains(value.as_str()), "a token is in fleet's log");
        assert_eq!(
            files_containing(&repo.path().join(".fleet"), value.as_bytes()),
            Vec::<PathBuf>::new()
        );
    }
}
