//! Command-line arguments → typed requests → the pipeline. The only module that knows clap;
//! the pipeline never reads flags or the environment.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use clap_complete::engine::ArgValueCandidates;

use crate::output::Output;
use crate::plan::{self, Plan, render};
use crate::reconcile::{self, SourceChoice, Workspace};
use crate::status::StatusDir;

/// `fleet --version`: the release, the git revision it was built from and when (see
/// `build.rs`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("FLEET_REVISION"),
    ", built ",
    env!("FLEET_BUILD_DATE"),
    ")"
);

/// GitOps for agent-sandbox VMs: validate, plan and apply the fleet/ directory of a git
/// repository against libvirt and Proxmox.
#[derive(Debug, Parser)]
#[command(name = "fleet", version = VERSION, about)]
pub struct Cli {
    /// Repository root.
    #[arg(short = 'C', value_name = "DIR", default_value = ".", global = true)]
    pub dir: PathBuf,
    /// The fleet directory, relative to the repository root.
    #[arg(long, default_value = "fleet", global = true)]
    pub fleet_dir: String,
    /// The status directory, relative to the repository root unless absolute.
    #[arg(long, default_value = ".fleet/status", global = true)]
    pub status_dir: PathBuf,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "human", global = true)]
    pub log_format: LogFormat,
    /// The age identity (key file, mode 0600) that opens secrets. Default:
    /// ~/.config/fleet/age.key when it exists.
    #[arg(long, value_name = "FILE", env = "FLEET_AGE_IDENTITY", global = true)]
    pub age_identity: Option<PathBuf>,
    /// The host configuration: providers and how to reach them, image root, allowed
    /// repositories, recipients, limits. Read only when root (or fleet's user) owns it and
    /// nobody else can write it.
    #[arg(long, value_name = "FILE", env = "FLEET_HOST_CONFIG", default_value = crate::host::DEFAULT_PATH, global = true)]
    pub host_config: PathBuf,
    /// More logs (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// How commands that print state print it: text for people, json or yaml for scripts
    /// (status, events, task list, hitl list, secret list, plan, doctor).
    #[arg(short = 'o', long, value_enum, default_value = "text", global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a revision: exit 0 when valid, 1 with every diagnostic when not.
    Validate(SourceArgs),
    /// Show what apply would do: 0 no changes, 2 changes (with --detailed-exitcode), 1 error.
    Plan(PlanArgs),
    /// Make the hypervisors match the revision (or a saved plan).
    Apply(ApplyArgs),
    /// Show the status files as a table (or JSON).
    Status(StatusArgs),
    /// Keep the fleet converged: apply each new commit of the tracked branch, heal drift,
    /// and serve a read-only status page.
    Serve(ServeArgs),
    /// Tell the running `fleet serve` to fetch its source and reconcile now.
    Reconcile,
    /// Stop every change to VMs from the host, for emergencies: fleet serve keeps observing
    /// and reporting drift, and applies nothing until `fleet resume`.
    Suspend {
        /// Why (shown in the summary, the page and the event).
        #[arg(long, default_value = "no reason given")]
        reason: String,
    },
    /// Lift `fleet suspend`.
    Resume,
    /// The event log: steps, drift, refusals, tasks and prompts, oldest first.
    Events(EventsArgs),
    /// Prompts waiting for a human, and answering them from the host.
    #[command(subcommand)]
    Hitl(HitlCommand),
    /// Task runs and their output.
    #[command(subcommand)]
    Task(TaskCommand),
    /// VM leases (`lease:` in a VM's file).
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Snapshots of a VM: take, list, revert to (a planned step), delete.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Wait, for scripts and CI, until VMs are ready, the fleet converged or tasks
    /// succeeded: exit 0 then, 1 with what is missing on timeout (or at once when a task
    /// ended otherwise).
    Wait {
        /// VMs (for ready, converged) or tasks (for succeeded); none: every VM.
        #[arg(add = ArgValueCandidates::new(crate::completion::vm_and_task_names))]
        names: Vec<String>,
        #[arg(long = "for", value_enum, default_value = "converged")]
        condition: crate::wait::Condition,
        /// How long to wait (such as 30s, 5m).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Secrets in fleet/secrets/: age-encrypted values, keys in the clear.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Bring a VM fleet did not make under management. Without --approve: write its file
    /// (fleet/vms/VM.yaml, from what the hypervisor reports) and say what fleet would
    /// change; the VM is not touched. With --approve, once that file is committed: stamp
    /// the VM as this fleet's. Never automatic.
    Adopt {
        /// The provider (of fleet.yaml) the VM runs on.
        provider: String,
        /// The VM's (domain's) name.
        vm: String,
        /// The image fleet would remake it from (default: fleet.yaml's only image).
        #[arg(long)]
        image: Option<String>,
        /// Stamp it, once its file is committed.
        #[arg(long)]
        approve: bool,
    },
    /// Run a command in a VM over its agent link (isolated and brokered VMs too), through
    /// the running `fleet serve`: input, output and error pass through, and fleet exits
    /// with the command's code. With --tty, an interactive terminal. Each exec is recorded
    /// in the events (who, when, which command; never its output).
    Exec {
        #[arg(add = ArgValueCandidates::new(crate::completion::vm_names))]
        vm: String,
        /// An interactive terminal, whose size follows yours.
        #[arg(short = 't', long)]
        tty: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// A VM's serial console, interactive (leave with Ctrl-]); with --follow, its log,
    /// read-only (on a remote libvirt host, which keeps the log, what the console prints
    /// from now on). Works without an agent or fleet serve.
    Console {
        #[arg(add = ArgValueCandidates::new(crate::completion::vm_names))]
        vm: String,
        /// Print the console's log as it is written, read-only, until interrupted (on a
        /// remote libvirt host: the console's output from now on).
        #[arg(long)]
        follow: bool,
        /// Take the console from another client holding it.
        #[arg(long, conflicts_with = "follow")]
        force: bool,
    },
    /// Check that this host can run the fleet: the host configuration, the revision,
    /// libvirtd, QEMU and KVM, images, Proxmox reachability, token privileges and clock,
    /// the age identity, the status directory and disk space. Exit 1 when anything fails;
    /// each problem comes with its fix.
    Doctor,
    /// Print the shell completion script: `fleet completion bash >
    /// /etc/bash_completion.d/fleet`, or `source <(fleet completion bash)`. VM, task and
    /// prompt names complete from the status files under the current directory.
    Completion {
        #[arg(value_enum)]
        shell: crate::completion::Shell,
    },
    /// Write the man pages (fleet.1 and one per subcommand) into DIR.
    #[command(hide = true)]
    Man { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Encrypt a value (read from stdin, or typed without echo) into
    /// fleet/secrets/NAME.yaml under KEY, for the host configuration's recipients (or
    /// --recipients). The value is never taken from the command line.
    Set {
        name: String,
        key: String,
        #[command(flatten)]
        recipients: RecipientArgs,
    },
    /// Re-encrypt every value (of the named Secrets, or all) to the recipients; needs an
    /// identity that can decrypt them.
    Rotate {
        names: Vec<String>,
        #[command(flatten)]
        recipients: RecipientArgs,
    },
    /// Secret names and keys; values are not decrypted.
    List,
}

/// Who secrets are encrypted to: the host configuration's `recipients`, unless given here.
/// Never the repository's say: a commit must not choose who can read every value.
#[derive(Debug, Args)]
pub struct RecipientArgs {
    /// Encrypt to these age recipients (repeat, or separate with commas) instead of the host
    /// configuration's.
    #[arg(long = "recipient", value_name = "AGE1…", value_delimiter = ',')]
    pub recipients: Vec<String>,
    /// Encrypt to recipients that differ from those the Secret's file was last written for
    /// without asking (for scripts).
    #[arg(long)]
    pub yes: bool,
}

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Every task's latest run: VM, phase, run, start and result.
    List,
    /// Stop a task's run under way (or not yet started) from the host; it ends Cancelled,
    /// saying who cancelled it. The committed task file still decides what runs next: a
    /// change of it, or of its `rerun`, starts a new run.
    Cancel {
        #[arg(add = ArgValueCandidates::new(crate::completion::task_names))]
        name: String,
    },
    /// A task's output (its escape sequences removed); with --follow, until the run ends.
    Logs {
        #[arg(add = ArgValueCandidates::new(crate::completion::task_names))]
        name: String,
        #[arg(long, short = 'f')]
        follow: bool,
    },
}

/// `VM` is a VM's name, or `workspace:NAME` for a workspace (taken, reverted and deleted at
/// once, while no VM runs with it).
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a VM now (a running VM's memory too, on libvirt).
    Create {
        #[arg(add = ArgValueCandidates::new(crate::completion::vm_names))]
        vm: String,
        /// Its name (default: s and the UTC time).
        name: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// A VM's (or workspace:NAME's) snapshots, oldest first.
    List {
        #[arg(add = ArgValueCandidates::new(crate::completion::vm_names))]
        vm: String,
    },
    /// Put a VM back to a snapshot: asked for here, planned and run by the next pass
    /// (fleet serve at once; or fleet apply), as a journaled step.
    Revert {
        #[arg(add = ArgValueCandidates::new(crate::completion::vm_names))]
        vm: String,
        name: String,
    },
    Delete {
        #[arg(add = ArgValueCandidates::new(crate::completion::vm_names))]
        vm: String,
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Renew a VM's lease from now, for its ttl or --for; a VM stopped or destroyed at its
    /// lease's end is started or made again.
    Renew {
        #[arg(add = ArgValueCandidates::new(crate::completion::vm_names))]
        name: String,
        /// How long from now (such as 30m, 4h; default: the lease's ttl).
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        length: Option<std::time::Duration>,
    },
}

#[derive(Debug, Subcommand)]
pub enum HitlCommand {
    /// List pending prompts (with --all, answered and withdrawn ones too).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Answer a pending prompt: writes status/hitl/ID.answer, which `fleet serve` types into
    /// the task's terminal (followed by Enter), once.
    Answer {
        /// The prompt's id, as `fleet hitl list` shows it.
        #[arg(add = ArgValueCandidates::new(crate::completion::prompt_ids))]
        id: String,
        /// The answer: one line of plain text.
        text: String,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The branch to follow (default: the branch HEAD points to, or the host source's).
    #[arg(long)]
    pub branch: Option<String>,
    /// Follow this remote repository (https://, ssh:// or file://) instead of the local
    /// one: fleet fetches it into a mirror under .fleet/source (host `source` sets the
    /// poll interval and the credential file).
    #[arg(long, value_name = "URL")]
    pub source: Option<String>,
    /// Listen for push webhooks (GitHub, Gitea/Forgejo, GitLab) on this address: a request
    /// signed with the shared secret makes fleet fetch its source now. Needs
    /// --webhook-secret-file.
    #[arg(long, value_name = "ADDR", requires = "webhook_secret_file")]
    pub webhook_listen: Option<std::net::SocketAddr>,
    /// A file (mode 0600) with the webhook's shared secret (16 characters or more).
    #[arg(long, value_name = "FILE")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Address of the read-only status page.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: std::net::SocketAddr,
    /// A host name the page answers to besides its address (repeat); requests naming any
    /// other host are refused.
    #[arg(long = "allow-host", value_name = "NAME")]
    pub allow_hosts: Vec<String>,
    /// A file (mode 0600) with the bearer token the page requires; needed to listen beyond
    /// loopback.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SourceArgs {
    /// Read the working directory instead of the committed tip of HEAD.
    #[arg(long, conflicts_with = "rev")]
    pub worktree: bool,
    /// Read this revision (commit, branch or tag) instead of HEAD.
    #[arg(long)]
    pub rev: Option<String>,
}

impl SourceArgs {
    fn choice(&self) -> SourceChoice {
        match (&self.rev, self.worktree) {
            (Some(rev), _) => SourceChoice::Rev(rev.clone()),
            (None, true) => SourceChoice::Worktree,
            (None, false) => SourceChoice::Head,
        }
    }
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Print the plan as JSON (the same as --format json).
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// How to print the plan: text for people, json for machines, markdown for a
    /// pull-request comment.
    #[arg(long, value_enum)]
    pub format: Option<PlanFormat>,
    /// Save the plan (JSON) for `fleet apply PLANFILE`.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Exit 2 when the plan has changes, 0 when it has none, 1 on error.
    #[arg(long)]
    pub detailed_exitcode: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    Text,
    Json,
    Yaml,
    Markdown,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Apply without asking.
    #[arg(long)]
    pub auto_approve: bool,
    /// A plan saved with `fleet plan --out`; refused when stale.
    pub planfile: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events this recent (such as 30m, 2h, 1d).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// Only events of this kind (such as step.failed); repeat for several.
    #[arg(long = "kind", value_name = "KIND", value_parser = crate::events::parse_kind)]
    pub kinds: Vec<crate::status::EventKind>,
    /// Only events about this VM.
    #[arg(long, add = ArgValueCandidates::new(crate::completion::vm_names))]
    pub vm: Option<String>,
    /// Only events about this task.
    #[arg(long, add = ArgValueCandidates::new(crate::completion::task_names))]
    pub task: Option<String>,
    /// Each event as the JSON line fleet wrote.
    #[arg(long)]
    pub json: bool,
    /// Keep printing events as they are written.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// One VM.
    #[arg(add = ArgValueCandidates::new(crate::completion::vm_names))]
    pub name: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn init_logging(cli: &Cli) {
    let default = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::secrets::redact::RedactingStderr);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn run(cli: Cli) -> ExitCode {
    // Neither needs a repository.
    let generated = match &cli.command {
        Command::Completion { shell } => Some(crate::completion::write_script(
            *shell,
            &mut std::io::stdout().lock(),
        )),
        Command::Man { dir } => Some(crate::completion::write_man_pages(dir)),
        _ => None,
    };
    if let Some(result) = generated {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let ws = match workspace(&cli) {
        Ok(ws) => ws,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Validate(args) => validate(&ws, args),
            Command::Plan(args) => plan_cmd(&ws, args, cli.output).await,
            Command::Apply(args) => apply_cmd(&ws, args).await,
            Command::Status(args) => status_cmd(&ws, args, cli.output),
            Command::Events(args) => events_cmd(&ws, args, cli.output),
            Command::Hitl(HitlCommand::List { all }) => {
                match cli.output.render(&crate::hitl::records(&ws.status, *all))? {
                    Some(text) => print!("{text}"),
                    None => print!("{}", crate::hitl::list(&ws.status, *all)),
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Hitl(HitlCommand::Answer { id, text }) => {
                crate::hitl::answer(&ws.status, id, text)?;
                println!("answer to {id} written; fleet serve delivers it");
                Ok(ExitCode::SUCCESS)
            }
            Command::Secret(command) => secret_cmd(&ws, command, cli.output),
            Command::Wait {
                names,
                condition,
                timeout,
            } => match crate::wait::wait(&ws.status, names, *condition, *timeout) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(why) => {
                    eprintln!("fleet wait: {why}");
                    Ok(ExitCode::from(1))
                }
            },
            Command::Task(TaskCommand::List) => {
                match cli.output.render(&ws.status.read_task_records())? {
                    Some(text) => print!("{text}"),
                    None => print!("{}", crate::task_view::list(&ws.status)),
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Task(TaskCommand::Cancel { name }) => {
                let who = crate::hitl::local_user();
                let run =
                    crate::task_view::cancel(&ws.status, name, &who, std::time::SystemTime::now())?;
                // A running fleet serve stops it at once (none running: when it starts).
                let _ = signal_serve(&ws);
                println!(
                    "cancel of task {name} (run {run}) written; fleet serve stops it. Its task file still decides what runs next: change it or bump its rerun to run it again"
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Task(TaskCommand::Logs { name, follow }) => {
                crate::task_view::logs(&ws.status, name, *follow, &mut std::io::stdout().lock())?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Lease(LeaseCommand::Renew { name, length }) => {
                let who = crate::hitl::local_user();
                let now = std::time::SystemTime::now();
                let ends = crate::leases::renew(&ws.status, name, *length, &who, now)?;
                // A running fleet serve counts it at once (none running: the next pass).
                let _ = signal_serve(&ws);
                println!("renewed: the lease of {name} ends at {ends}");
                Ok(ExitCode::SUCCESS)
            }
            Command::Snapshot(command) => tokio::task::block_in_place(|| snapshot_cmd(&ws, command, cli.output)),
            Command::Reconcile => reconcile_cmd(&ws),
            Command::Suspend { reason } => {
                let who = crate::hitl::local_user();
                ws.status
                    .set_host_suspension(Some(&format!("by {who}: {reason}")))?;
                // A running fleet serve says so at once (none running is fine).
                let _ = signal_serve(&ws);
                println!("suspended: fleet applies nothing until `fleet resume`");
                Ok(ExitCode::SUCCESS)
            }
            Command::Resume => {
                if ws.status.host_suspension().is_none() {
                    println!("fleet was not suspended from the host");
                } else {
                    ws.status.set_host_suspension(None)?;
                    let _ = signal_serve(&ws);
                    println!("resumed");
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Adopt {
                provider,
                vm,
                image,
                approve,
            } => {
                let request = crate::adopt::Request {
                    provider,
                    vm,
                    image: image.as_deref(),
                    approve: *approve,
                };
                print!(
                    "{}",
                    tokio::task::block_in_place(|| crate::adopt::run(&ws, &request))?
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Exec { vm, tty, command } => {
                let code = tokio::task::block_in_place(|| {
                    crate::exec::client::run(&ws.status, vm, command.clone(), *tty)
                })?;
                Ok(ExitCode::from(code))
            }
            Command::Console { vm, follow, force } => {
                tokio::task::block_in_place(|| {
                    if *follow {
                        crate::console::follow(&ws, vm)
                    } else {
                        crate::console::interactive(&ws, vm, *force)
                    }
                })?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Doctor => {
                let findings =
                    tokio::task::block_in_place(|| crate::doctor::run(&ws));
                match cli.output.render(&findings)? {
                    Some(text) => print!("{text}"),
                    None => print!("{}", crate::doctor::render(&findings)),
                }
                let failed = findings
                    .iter()
                    .any(|f| f.verdict == crate::doctor::Verdict::Fail);
                Ok(if failed {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                })
            }
            Command::Completion { .. } | Command::Man { .. } => Ok(ExitCode::SUCCESS),
            Command::Serve(args) => crate::daemon::serve(
                ws.clone(),
                crate::daemon::ServeOptions {
                    branch: args.branch.clone(),
                    source: args.source.clone(),
                    webhook: args
                        .webhook_listen
                        .map(|a| (a, args.webhook_secret_file.clone().unwrap_or_default())),
                    listen: args.listen,
                    allow_hosts: args.allow_hosts.clone(),
                    token_file: args.token_file.clone(),
                },
            )
            .await
            .map(|()| ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn secret_cmd(ws: &Workspace, command: &SecretCommand, output: Output) -> Result<ExitCode> {
    let files = crate::secrets::files::in_worktree(&ws.repo_root, &ws.fleet_dir);
    match command {
        SecretCommand::Set {
            name,
            key,
            recipients,
        } => {
            let recipients = secret_recipients(ws, recipients)?;
            let value = crate::secrets::files::read_value()?;
            let path = files.set(name, key, &value, &recipients)?;
            println!("{}: {key} encrypted; commit the file", path.display());
        }
        SecretCommand::Rotate { names, recipients } => {
            let recipients = secret_recipients(ws, recipients)?;
            let Some(identity) = &ws.age_identity else {
                anyhow::bail!(
                    "rotating needs an identity that can decrypt: pass --age-identity FILE, set FLEET_AGE_IDENTITY, or create ~/.config/fleet/age.key"
                );
            };
            let keyring = crate::secrets::Keyring::load(identity).map_err(anyhow::Error::msg)?;
            for (path, count) in files.rotate(&keyring, names, &recipients)? {
                println!("{}: {count} value(s) re-encrypted", path.display());
            }
        }
        SecretCommand::List => match output.render(&files.summaries()?)? {
            Some(text) => print!("{text}"),
            None => print!("{}", files.list()?),
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// Who `secret set | rotate` encrypt to: the host configuration's recipients, or those of
/// `--recipient`. Recipients the host configuration does not list are shown, and used only
/// after a `yes` (or `--yes`): encrypting to someone is giving them every value.
fn secret_recipients(ws: &Workspace, args: &RecipientArgs) -> Result<Vec<String>> {
    let host = match ws.host() {
        Ok(host) => host.recipients.into_iter().map(|r| r.0).collect(),
        Err(crate::host::HostError::Missing(_)) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    if args.recipients.is_empty() {
        if host.is_empty() {
            bail!(
                "no recipients to encrypt to: add `recipients: [age1…]` to the host configuration ({}) or pass --recipient AGE1… (age-keygen -y KEYFILE prints yours)",
                ws.host_config.display()
            );
        }
        return Ok(host);
    }
    let strangers: Vec<&String> = args
        .recipients
        .iter()
        .filter(|r| !host.contains(r))
        .collect();
    if !strangers.is_empty() && !args.yes {
        eprintln!("These recipients are not in the host configuration's recipients:");
        for r in &strangers {
            eprintln!("  + {r}");
        }
        if !std::io::stdin().is_terminal() {
            bail!(
                "refusing to encrypt to recipients the host configuration does not list without confirmation; check them and pass --yes"
            );
        }
        eprint!("Encrypt to them? Only 'yes' is accepted: ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != "yes" {
            bail!("nothing was encrypted");
        }
    }
    Ok(args.recipients.clone())
}

fn workspace(cli: &Cli) -> Result<Workspace> {
    // Absolute, because relative image paths end up in domain definitions.
    let repo_root = std::fs::canonicalize(&cli.dir)
        .with_context(|| format!("repository root {}", cli.dir.display()))?;
    let status = if cli.status_dir.is_absolute() {
        cli.status_dir.clone()
    } else {
        repo_root.join(&cli.status_dir)
    };
    let home = std::env::var_os("HOME").map(PathBuf::from);
    Ok(Workspace {
        repo_root,
        fleet_dir: cli.fleet_dir.trim_end_matches('/').to_owned(),
        status: StatusDir::new(status),
        age_identity: crate::secrets::identity_path(
            None,
            cli.age_identity.as_deref(),
            home.as_deref(),
        ),
        host_config: cli.host_config.clone(),
    })
}

fn print_diagnostics(diags: &[crate::load::Diagnostic]) {
    let mut err = std::io::stderr().lock();
    for d in diags {
        let _ = writeln!(err, "{d}");
    }
    let _ = writeln!(err, "{} error(s); nothing was applied", diags.len());
}

/// Checks a revision without contacting anything: no provider, no network, no process.
/// With the host configuration, under the host's rules; without one, the repository alone
/// (and says so).
fn validate(ws: &Workspace, args: &SourceArgs) -> Result<ExitCode> {
    let snapshot = reconcile::read_snapshot(ws, &args.choice())?;
    let host = match ws.host() {
        Ok(host) => Some(host),
        Err(crate::host::HostError::Missing(path)) => {
            eprintln!(
                "note: no host configuration at {}: checking the repository alone, not what the host allows",
                path.display()
            );
            None
        }
        Err(e) => return Err(e.into()),
    };
    let checked = match &host {
        // Reads no image file: a revision is valid or not whatever they hold.
        Some(host) => reconcile::checked(&snapshot, host).map(|d| {
            (
                d.vms.len(),
                d.tasks.len(),
                d.secrets.len(),
                d.providers.len(),
            )
        }),
        None => crate::load::load(&snapshot, None).map(|l| {
            let members: usize = l.pools.values().map(|p| p.doc.spec.replicas as usize).sum();
            (
                l.vms.len() + members,
                l.tasks.len(),
                l.secrets.len(),
                l.fleet.doc.spec.providers.len(),
            )
        }),
    };
    match checked {
        Ok((vms, tasks, secrets, providers)) => {
            println!(
                "{}: valid ({vms} VM(s), {tasks} task(s), {secrets} secret(s), {providers} provider(s)) at {}",
                ws.fleet_dir, snapshot.revision.label
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(diags) => {
            print_diagnostics(&diags);
            Ok(ExitCode::from(1))
        }
    }
}

/// Reads, validates, observes and plans. `Ok(Err(code))` when the revision is invalid.
async fn make_plan(
    ws: &Workspace,
    source: &SourceArgs,
) -> Result<Result<(crate::resolve::Desired, Plan, crate::apply::Drivers), ExitCode>> {
    let host = ws.host()?;
    let mut snapshot = reconcile::read_snapshot(ws, &source.choice())?;
    // A plan is read-only (CI runs it on pull requests): an unsigned revision is planned,
    // with a warning, as if none of its Answers were signed.
    let verifier = crate::trust::Verifier::new(&host.trust);
    if let Err(e) = reconcile::verify(ws, verifier.as_ref(), &mut snapshot) {
        eprintln!("warning: {e}; fleet serve and fleet apply refuse this revision");
    }
    let desired = match reconcile::desired(&snapshot, &host) {
        Ok(d) => d,
        Err(diags) => {
            print_diagnostics(&diags);
            return Ok(Err(ExitCode::from(1)));
        }
    };
    let vault = ws.open_vault(&desired);
    let over = reconcile::capacity_problems(&desired, &host, &vault, &ws.status.read_placement());
    if !over.is_empty() {
        for why in &over {
            eprintln!("error: {why}");
        }
        eprintln!(
            "{} error(s); fleet serve and fleet apply refuse this revision",
            over.len()
        );
        return Ok(Err(ExitCode::from(1)));
    }
    let drivers = reconcile::drivers_for(&desired, &host, &vault);
    let runs = reconcile::recorded_fresh_runs(ws);
    let planned =
        reconcile::plan_pass(ws, &desired, &drivers, &vault, Default::default(), &runs).await;
    let desired = planned.effective.unwrap_or(desired);
    Ok(Ok((desired, planned.plan, drivers)))
}

async fn plan_cmd(ws: &Workspace, args: &PlanArgs, output: Output) -> Result<ExitCode> {
    let (desired, plan, _) = match make_plan(ws, &args.source).await? {
        Ok(p) => p,
        Err(code) => return Ok(code),
    };
    let format = match (args.json, args.format, output) {
        (true, _, _) | (false, None, Output::Json) => PlanFormat::Json,
        (false, None, Output::Yaml) => PlanFormat::Yaml,
        (false, format, _) => format.unwrap_or(PlanFormat::Text),
    };
    match format {
        PlanFormat::Yaml => {
            let value: serde_json::Value = serde_json::from_str(&render::json(&plan))?;
            print!("{}", serde_saphyr::to_string(&value)?);
        }
        PlanFormat::Json => print!("{}", render::json(&plan)),
        PlanFormat::Markdown => print!(
            "{}",
            render::markdown(&plan, &reconcile::task_runs(ws, &desired))
        ),
        PlanFormat::Text => {
            print!("{}", render::text(&plan));
            print!("{}", task_runs_text(ws, &desired));
        }
    }
    if let Some(out) = &args.out {
        crate::atomic_file::write_atomic(out, render::json(&plan).as_bytes())
            .with_context(|| format!("writing the plan to {}", out.display()))?;
        eprintln!(
            "Saved the plan to {}; apply it with: fleet apply {}",
            out.display(),
            out.display()
        );
    }
    if !plan.conflicts().is_empty() || !plan.errors().is_empty() {
        return Ok(ExitCode::from(1));
    }
    Ok(if args.detailed_exitcode && plan.has_changes() {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// The task runs the revision starts, runs again or cancels, against the runs the status
/// directory records (none, for a pull request planned in CI: every task starts).
fn task_runs_text(ws: &Workspace, desired: &crate::resolve::Desired) -> String {
    crate::plan::task_runs::render(&reconcile::task_runs(ws, desired))
}

/// Signals the running `fleet serve` of this status directory (SIGUSR1): fetch and
/// reconcile now. Its PID is the lock's holder's.
fn snapshot_cmd(ws: &Workspace, command: &SnapshotCommand, output: Output) -> Result<ExitCode> {
    use crate::snapshots::Target;
    match command {
        SnapshotCommand::Create {
            vm,
            name,
            description,
        } => {
            let name =
                crate::snapshots::create(ws, &Target::parse(vm), name.as_deref(), description)?;
            println!("took snapshot {name} of {vm}");
        }
        SnapshotCommand::List { vm } => {
            let snapshots = crate::snapshots::list(ws, &Target::parse(vm))?;
            match output.render(&snapshots)? {
                Some(text) => print!("{text}"),
                None => print!("{}", crate::snapshots::render(&snapshots)),
            }
        }
        SnapshotCommand::Revert { vm, name } => {
            if crate::snapshots::revert(ws, &Target::parse(vm), name)? {
                println!("{vm} is back to snapshot {name}");
                return Ok(ExitCode::SUCCESS);
            }
            // A running fleet serve plans it at once (none running: the next fleet apply).
            let served = signal_serve(ws).is_ok();
            println!(
                "asked for {vm} to go back to snapshot {name}: {}",
                if served {
                    "fleet serve runs it now (fleet events --follow shows it)"
                } else {
                    "the next fleet apply runs it"
                }
            );
        }
        SnapshotCommand::Delete { vm, name } => {
            crate::snapshots::delete(ws, &Target::parse(vm), name)?;
            println!("deleted snapshot {name} of {vm}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn signal_serve(ws: &Workspace) -> Result<u32> {
    // The lock names the PID to signal: it must be a file only its owner (or root) wrote,
    // and the PID a fleet process, or a signal could reach anything.
    crate::fsguard::check_owned_chain(&ws.status.root().join("lock"))
        .map_err(|e| anyhow::anyhow!("not signalling: {e}"))?;
    let holder = crate::status::lock::StatusLock::holder(ws.status.root()).with_context(|| {
        format!(
            "no fleet serve holds {}; `fleet apply` reconciles once",
            ws.status.root().display()
        )
    })?;
    let exe = std::fs::read_link(format!("/proc/{}/exe", holder.pid)).unwrap_or_default();
    let ours = std::env::current_exe().unwrap_or_default();
    let name = |p: &std::path::Path| {
        p.file_name().map(|n| {
            n.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_owned()
        })
    };
    anyhow::ensure!(
        name(&exe).is_some() && name(&exe) == name(&ours),
        "PID {} (from {}) is not a fleet process; not signalling it",
        holder.pid,
        ws.status.root().join("lock").display()
    );
    anyhow::ensure!(
        holder.command == "fleet serve",
        "{} is held by {} (PID {}), not fleet serve",
        ws.status.root().display(),
        holder.command,
        holder.pid
    );
    let pid = i32::try_from(holder.pid).context("the lock names no valid PID")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGUSR1,
    )
    .with_context(|| format!("signalling fleet serve (PID {pid})"))?;
    Ok(holder.pid)
}

fn reconcile_cmd(ws: &Workspace) -> Result<ExitCode> {
    let pid = signal_serve(ws)?;
    println!("told fleet serve (PID {pid}) to fetch and reconcile now");
    Ok(ExitCode::SUCCESS)
}

fn read_saved_plan(path: &Path) -> Result<Plan> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the saved plan {}", path.display()))?;
    Plan::read_saved(&text).map_err(|e| anyhow::anyhow!("{} {e}", path.display()))
}

async fn apply_cmd(ws: &Workspace, args: &ApplyArgs) -> Result<ExitCode> {
    // A saved plan names the revision and observation it was made from; both must still hold.
    let saved = args.planfile.as_deref().map(read_saved_plan).transpose()?;
    if let Some(why) = ws.status.host_suspension() {
        anyhow::bail!(
            "fleet is suspended from the host ({why}): nothing is applied; `fleet resume` lifts it"
        );
    }
    // Held until apply returns: nothing else may write the status directory meanwhile.
    let _lock = take_lock(ws, "fleet apply")?;
    let host = ws.host()?;
    let mut snapshot = reconcile::read_snapshot(ws, &args.source.choice())?;
    let verifier = crate::trust::Verifier::new(&host.trust);
    if let Err(e) = reconcile::verify(ws, verifier.as_ref(), &mut snapshot) {
        eprintln!("error: {e}");
        ws.status.record_refused(
            "",
            &snapshot.revision,
            &[e.to_string()],
            std::time::SystemTime::now(),
        )?;
        return Ok(ExitCode::from(1));
    }
    let desired = match reconcile::desired(&snapshot, &host) {
        Ok(d) => d,
        Err(diags) => {
            print_diagnostics(&diags);
            let reasons: Vec<String> = diags.iter().map(ToString::to_string).collect();
            ws.status.record_refused(
                "",
                &snapshot.revision,
                &reasons,
                std::time::SystemTime::now(),
            )?;
            return Ok(ExitCode::from(1));
        }
    };
    let vault = ws.open_vault(&desired);
    let over = reconcile::capacity_problems(&desired, &host, &vault, &ws.status.read_placement());
    if !over.is_empty() {
        for why in &over {
            eprintln!("error: {why}");
        }
        ws.status
            .record_refused("", &desired.revision, &over, std::time::SystemTime::now())?;
        return Ok(ExitCode::from(1));
    }
    if desired.policy.suspend {
        anyhow::bail!(
            "{} sets policy.suspend: nothing is applied (fleet plan shows what would be)",
            desired.revision.label
        );
    }
    let drivers = reconcile::drivers_for(&desired, &host, &vault);
    let (journal, recovered) = reconcile::open_journal(ws, &drivers)
        .await
        .context("opening the journal")?;
    for line in &recovered {
        eprintln!("{line}");
    }
    let runs = reconcile::recorded_fresh_runs(ws);
    let mut planned =
        reconcile::plan_pass(ws, &desired, &drivers, &vault, Default::default(), &runs).await;
    let desired = planned.effective.take().unwrap_or(desired);
    // A saved plan is a claim about what apply will do, never a program: the fresh plan is
    // what runs, and only when it does exactly what the saved one says. Approvals given
    // since it was saved do not make it stale: it is compared with a plan that counts only
    // the approval it counted itself, before anything is recorded.
    if let Some(saved) = &saved {
        let as_saved = plan::PlanInputs {
            approved: saved.approved().iter().map(|a| a.digest.clone()).collect(),
            ..planned.inputs.clone()
        };
        saved.check_fresh(&plan::plan(&desired, &planned.observed, &as_saved))?;
    }
    // Held steps run only with an approval of exactly them (a file; see `approvals`).
    reconcile::record_decisions(ws, &desired, &planned);
    let reconcile::Planned {
        observed,
        plan,
        inputs,
        ..
    } = planned;
    print!("{}", render::text(&plan));
    if !plan.steps().is_empty() && !args.auto_approve {
        if !std::io::stdin().is_terminal() {
            bail!(
                "refusing to apply without confirmation: stdin is not a terminal; review the plan and pass --auto-approve"
            );
        }
        eprint!(
            "\nApply these {} step(s)? Only 'yes' is accepted: ",
            plan.steps().len()
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != "yes" {
            eprintln!("Apply cancelled; nothing was changed.");
            return Ok(ExitCode::from(1));
        }
    }
    // With nothing to do this still records the revision and what runs in the status files.
    let applied = reconcile::apply_and_record(
        ws,
        reconcile::Pass {
            desired: &desired,
            plan: &plan,
            observed: &observed,
            agents: &Default::default(),
            crash_loops: &Default::default(),
            leases: &inputs.leases,
        },
        &drivers,
        journal,
        plan.has_changes(),
    )
    .await?;
    if !plan.has_changes() {
        return Ok(exit_for(&plan, 0));
    }
    let failed = applied.report.failed();
    let last = applied
        .summary
        .last_reconcile
        .as_ref()
        .map(|r| r.outcome.as_str())
        .unwrap_or("unknown");
    println!(
        "\nApply finished: {} step(s), {} failed, {} conflict(s): {last}.",
        applied.report.results.len(),
        failed,
        plan.conflicts().len()
    );
    if let (Some(id), Some(_)) = (plan.approval_id(), &plan.approval_digest()) {
        println!(
            "{} step(s) wait for approval {id}: see {}",
            plan.held().len(),
            ws.status.hitl_dir().join(format!("{id}.yaml")).display()
        );
    }
    Ok(exit_for(&plan, failed))
}

/// The status directory's single-writer lock, or an error naming its holder.
fn take_lock(ws: &Workspace, command: &str) -> Result<crate::status::lock::StatusLock> {
    let lock = crate::status::lock::StatusLock::acquire(ws.status.root(), command)?;
    if let Some(dead) = &lock.stale {
        eprintln!(
            "note: took over a stale lock left by PID {} ({}, since {}), which is no longer running",
            dead.pid,
            dead.command,
            crate::time::shown(dead.since)
        );
    }
    Ok(lock)
}

fn exit_for(plan: &Plan, failed: usize) -> ExitCode {
    if failed > 0 || !plan.conflicts().is_empty() || !plan.errors().is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn events_cmd(ws: &Workspace, args: &EventsArgs, output: Output) -> Result<ExitCode> {
    let format = output.or_json(args.json);
    let filter = crate::events::Filter {
        since: args.since.map(|d| {
            std::time::SystemTime::now()
                .checked_sub(d)
                .unwrap_or(std::time::UNIX_EPOCH)
        }),
        kinds: args.kinds.clone(),
        vm: args.vm.clone(),
        task: args.task.clone(),
    };
    let file = loop {
        match ws.status.open_events() {
            Ok(file) => break file,
            // Following a fleet that has written nothing yet: wait for its first event.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && args.follow => {
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("no events yet in {}", ws.status.root().display());
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "reading {}",
                        ws.status.root().join("events.jsonl").display()
                    )
                });
            }
        }
    };
    let mut out = std::io::stdout().lock();
    // The rotated files first, oldest first: `--since` and `--kind` reach back through them.
    let mut skipped = 0;
    for older in ws.status.open_rotated_events() {
        let mut reader = std::io::BufReader::new(older);
        skipped += crate::events::print(&mut reader, &filter, format, &mut out)?;
    }
    let status = ws.status.clone();
    let mut reader = std::io::BufReader::new(crate::events::RotatingLog::new(file, move || {
        status.open_events()
    }));
    if args.follow {
        crate::events::follow(
            &mut reader,
            &filter,
            format,
            &mut out,
            std::time::Duration::from_millis(250),
            || false,
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    skipped += crate::events::print(&mut reader, &filter, format, &mut out)?;
    if skipped > 0 {
        eprintln!("note: {skipped} line(s) of events.jsonl are not events and were skipped");
    }
    Ok(ExitCode::SUCCESS)
}

fn status_cmd(ws: &Workspace, args: &StatusArgs, output: Output) -> Result<ExitCode> {
    let summary = ws.status.read_summary();
    let mut vms = ws.status.read_vms();
    if let Some(name) = &args.name {
        vms.retain(|n, _| n == name);
        if vms.is_empty() {
            bail!(
                "no status for VM {name:?} in {}",
                ws.status.root().display()
            );
        }
    }
    let value = serde_json::json!({ "summary": summary, "vms": vms });
    if let Some(text) = output.or_json(args.json).render(&value)? {
        print!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let Some(summary) = summary else {
        bail!(
            "no status yet in {}: run `fleet apply` first",
            ws.status.root().display()
        );
    };
    if args.name.is_none() {
        let applied = summary
            .revision_applied
            .as_ref()
            .map(|r| r.label.as_str())
            .unwrap_or("none");
        println!("fleet {}: revision applied {applied}", summary.fleet);
        if let Some(refused) = &summary.revision_refused {
            println!(
                "revision refused {} at {}:",
                refused.revision.label,
                crate::time::shown(refused.at)
            );
            for d in &refused.diagnostics {
                println!("  {d}");
            }
        }
        if let Some(r) = &summary.last_reconcile {
            println!(
                "last reconcile {}: {} ({} step(s), {} failed)",
                crate::time::shown(r.finished),
                r.outcome,
                r.steps,
                r.failed
            );
        }
        println!();
    }
    let width = vms.keys().map(String::len).max().unwrap_or(4).max(4);
    println!(
        "{:<width$}  {:<10} {:<12} {:>4} {:>7}  {:<18}  NOTES",
        "NAME", "PROVIDER", "PHASE", "CPUS", "MEMORY", "ADDRESS"
    );
    for vm in vms.values() {
        let (cpus, mem) = vm
            .observed
            .as_ref()
            .map(|o| (o.cpus.to_string(), format!("{}Mi", o.memory_mib)))
            .unwrap_or(("-".into(), "-".into()));
        let notes = vm
            .last_error
            .clone()
            .or_else(|| {
                vm.conditions
                    .iter()
                    .find(|c| {
                        use crate::status::ConditionKind::{Conflict, Drifted, ProviderObserved};
                        c.kind == Conflict
                            || (c.kind == Drifted && c.status)
                            || (c.kind == ProviderObserved && !c.status)
                    })
                    .map(|c| format!("{}: {}", c.kind, c.message))
            })
            .or_else(|| Some(vm.lease.as_ref()?.describe(std::time::SystemTime::now())))
            .unwrap_or_default();
        // The first reachable address (the page and `-o yaml` show them all).
        let address = vm
            .reachable_addresses()
            .first()
            .map_or("-", |a| a.split('/').next().unwrap_or(a));
        println!(
            "{:<width$}  {:<10} {:<12} {:>4} {:>7}  {:<18}  {}",
            vm.name,
            vm.provider,
            format!("{:?}", vm.phase),
            cpus,
            mem,
            address,
            notes
        );
    }
    Ok(ExitCode::SUCCESS)
}
