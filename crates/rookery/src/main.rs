//! The `rookery` command: run the server, check configuration, manage accounts.

#![forbid(unsafe_code)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use rookery_app::{App, Config};

/// Exit status for configuration errors (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Rookery, an XMPP server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (default: ./rookery.toml if it exists, else built-in defaults).
    #[arg(long, short, global = true, env = "ROOKERY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve,
    /// Check or show the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage accounts.
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file (and the environment overrides).
    Check {
        /// The file to check (default: the --config file).
        file: Option<PathBuf>,
    },
    /// Print the effective configuration.
    Show,
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Create an account. The password is read from standard input unless given.
    Add {
        /// User name or bare JID (alice or alice@example.org).
        user: String,
        /// The password (visible to other local users in the process list; prefer standard input).
        #[arg(long)]
        password: Option<String>,
    },
    /// Delete an account and everything stored for it.
    Remove {
        /// User name or bare JID.
        user: String,
    },
    /// Change an account's password. The password is read from standard input unless given.
    Passwd {
        /// User name or bare JID.
        user: String,
        /// The new password.
        #[arg(long)]
        password: Option<String>,
    },
    /// List the accounts of the domain.
    List,
    /// Create many accounts from lines of "user password" (a file, or standard input with "-").
    Import {
        /// The file to read.
        file: PathBuf,
    },
}

fn config_path(cli: &Cli) -> Option<PathBuf> {
    cli.config.clone().or_else(|| {
        Path::new("rookery.toml")
            .exists()
            .then(|| PathBuf::from("rookery.toml"))
    })
}

fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    Config::load(path, std::env::vars()).map_err(|error| {
        eprintln!("rookery: configuration error: {error}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = config_path(&cli);
    let config = match &cli.command {
        Command::Config(ConfigCommand::Check { file: Some(file) }) => load_config(Some(file)),
        _ => load_config(path.as_deref()),
    };
    let config = match config {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("rookery: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve => runtime.block_on(serve(config)),
        Command::Config(ConfigCommand::Check { file }) => {
            let shown = file.or(path).map_or_else(
                || "built-in defaults".to_owned(),
                |p| p.display().to_string(),
            );
            println!(
                "{shown}: configuration is valid (domain {}).",
                config.server.domain
            );
            Ok(())
        }
        Command::Config(ConfigCommand::Show) => match toml::to_string(&config) {
            Ok(text) => {
                print!("{text}");
                Ok(())
            }
            Err(error) => Err(error.into()),
        },
        Command::User(command) => runtime.block_on(user(config, command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("rookery: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .with_context(|| format!("invalid log.level {:?}", config.log.level))?;
    // Colours only for a person at a terminal, not in files and journals.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    init_tracing(&config)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        build = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        "Rookery starting."
    );
    // One socket per client: take every file descriptor the system allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "File descriptor limit."),
        Err(error) => tracing::warn!(%error, "Could not raise the file descriptor limit."),
    }
    let app = App::build(config).await?;
    app.run(shutdown_signal()).await
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received."),
        _ = terminate.recv() => tracing::info!("SIGTERM received."),
    }
}

fn account(config: &Config, user: &str) -> anyhow::Result<jid::BareJid> {
    let (name, domain) = match user.split_once('@') {
        Some((name, domain)) => (name, domain),
        None => (user, config.server.domain.as_str()),
    };
    if domain != config.server.domain {
        bail!("{user} is not an account of {}", config.server.domain);
    }
    Ok(rookery_ext::register::account_jid(name, domain)?)
}

/// Creates the accounts of "user password" lines, deriving keys on every core.
async fn import(
    config: &Config,
    store: &dyn rookery_store::Store,
    text: &str,
    iterations: u32,
) -> anyhow::Result<(usize, usize)> {
    let mut accounts = Vec::new();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
    {
        let Some((user, password)) = line.trim().split_once(char::is_whitespace) else {
            bail!("line {}: expected \"user password\"", number + 1);
        };
        accounts.push((account(config, user)?, password.trim().to_owned()));
    }
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get());
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::with_capacity(accounts.len());
    for (jid, password) in accounts {
        let permit = semaphore.clone().acquire_owned().await?;
        let keys = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            rookery_ext::register::derive_keys(&password, iterations)
        });
        tasks.push((jid, keys));
    }
    let (mut created, mut existing) = (0, 0);
    for (jid, keys) in tasks {
        match store.create_account(&jid, &keys.await??).await {
            Ok(()) => created += 1,
            Err(rookery_store::StoreError::AlreadyExists) => existing += 1,
            Err(error) => return Err(error.into()),
        }
    }
    Ok((created, existing))
}

fn password(given: Option<String>) -> anyhow::Result<String> {
    if let Some(password) = given {
        return Ok(password);
    }
    // A prompt only for a person: piped in, the password needs none.
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprint!("Password: ");
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password")?;
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        bail!("empty password");
    }
    Ok(password)
}

async fn user(config: Config, command: UserCommand) -> anyhow::Result<()> {
    let backend = rookery_app::open_store(&config).await?;
    let store = backend.store();
    let iterations = config.accounts.scram_iterations;
    match command {
        UserCommand::Add {
            user,
            password: given,
        } => {
            let jid = account(&config, &user)?;
            rookery_ext::register::create_account(&*store, &jid, &password(given)?, iterations)
                .await?;
            println!("Created {jid}.");
        }
        UserCommand::Remove { user } => {
            let jid = account(&config, &user)?;
            if !rookery_store::AccountStore::delete_account(&*store, &jid).await? {
                bail!("no account {jid}");
            }
            println!("Removed {jid}.");
        }
        UserCommand::Passwd {
            user,
            password: given,
        } => {
            let jid = account(&config, &user)?;
            rookery_ext::register::set_password(&*store, &jid, &password(given)?, iterations)
                .await?;
            println!("Changed the password of {jid}.");
        }
        UserCommand::Import { file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin().lock())
                    .context("cannot read standard input")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            let (created, existing) = import(&config, &*store, &text, iterations).await?;
            println!("Created {created} accounts ({existing} existed already).");
        }
        UserCommand::List => {
            for jid in
                rookery_store::AccountStore::list_accounts(&*store, &config.server.domain).await?
            {
                println!("{jid}");
            }
        }
    }
    backend.close().await;
    Ok(())
}
