use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use edgegate::admin::client::AdminClient;
use edgegate::admin::view;
use edgegate::buffer::tools::ToolError;
use edgegate::buffer::Buffer;
use edgegate::config::{Config, ConverterConfig, ConverterKind};
use edgegate::converter::encoder::Encoder;
use edgegate::converter::{script_metadata, Converter, Entity};
use edgegate::gateway;
use edgegate::record::now_ms;
use edgegate::reload::ReloadHandle;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Parser)]
#[command(
    name = "edgegate",
    version,
    about = "Edge gateway: MQTT and serial devices -> durable buffer -> Kafka"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a configuration file; exit 0 when usable, 2 with the offending key otherwise.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Ask the running gateway to re-read its configuration file (as `systemctl reload` does),
    /// after checking it here first. Exit 0 when applied, 2 when the file is invalid, 1 when
    /// the gateway refused it (it runs on unchanged) or cannot be reached.
    Reload {
        #[arg(long, short)]
        config: PathBuf,
        /// Without an [admin] table, send SIGHUP to this process instead (the unit's $MAINPID);
        /// the outcome is then only in its log.
        #[arg(long)]
        pid: Option<i32>,
    },
    /// Show the running gateway's status (from its admin endpoint): link, backlog, sources,
    /// converters, downlink, disk, memory and health. Exit 0 when healthy, 1 on a warning, 2
    /// when critical, 3 when the gateway cannot be asked.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Print the endpoint's JSON (GET /status) instead.
        #[arg(long)]
        json: bool,
    },
    /// The status redrawn in the terminal, with sparklines of the ingest and delivery rates.
    Top {
        #[arg(long, short)]
        config: PathBuf,
        /// Time between two frames, e.g. "1s" or "500ms".
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Stop after this many frames (default: until interrupted).
        #[arg(short = 'n', long = "frames")]
        frames: Option<u64>,
    },
    /// Run a decoder on one payload, like ThingsBoard's "Test decoder function", or with
    /// --encoder an encoder on one command ("Test encoder function"). Prints
    /// {"output": …, "error": …}; exits 0 on success, 1 on a script error, 2 on bad arguments.
    Convert(ConvertArgs),
    /// Inspect or edit the disk buffer while the service is stopped.
    Buffer {
        #[command(subcommand)]
        action: BufferAction,
    },
}

#[derive(Subcommand)]
enum BufferAction {
    /// Records, bytes, oldest and newest capture time.
    Stats {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Every buffered record as a JSON line (base64 payload, metadata), oldest first, to stdout.
    Export {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Remove buffered records: all of them, or those captured longer ago than --older-than.
    Purge {
        #[arg(long, short)]
        config: PathBuf,
        /// For example "7d" or "12h".
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
    },
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// The script: the body of `function Decoder(payload, metadata)`, or with --encoder of
    /// `function Encoder(msg, metadata, msgType, integrationMetadata)`.
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    script: Option<PathBuf>,
    /// Take the script and its settings from this configuration file…
    #[arg(long, short, requires = "converter")]
    config: Option<PathBuf>,
    /// …from its `[converters.<NAME>]` table (with --encoder, one with type = "encoder").
    #[arg(long, requires = "config")]
    converter: Option<String>,
    /// Run a downlink encoder on --msg instead of a decoder on --payload. Output: one
    /// {"contentType", "data", "metadata"} per message, data as the script returned it.
    #[arg(long, requires = "msg")]
    encoder: bool,
    /// Decoder: file holding the payload, or - for standard input.
    #[arg(long, required_unless_present = "encoder", conflicts_with = "encoder")]
    payload: Option<PathBuf>,
    /// Encoder: file holding the command, the script's `msg` (parsed when it is JSON), or - for
    /// standard input.
    #[arg(long, requires = "encoder")]
    msg: Option<PathBuf>,
    /// Encoder: the script's `msgType`.
    #[arg(
        long,
        requires = "encoder",
        default_value = "RPC_CALL_FROM_SERVER_TO_DEVICE"
    )]
    msg_type: String,
    /// The payload (or msg) file holds base64 text; decode it first.
    #[arg(long)]
    base64: bool,
    /// Extra metadata for the script (an encoder's `metadata`), as key=value; repeatable.
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = key_value)]
    metadata: Vec<(String, String)>,
    /// Print the script's own return value, unnormalized and unchecked, as ThingsBoard shows it.
    #[arg(long)]
    raw: bool,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    // Before any thread exists: nothing else reads the environment yet.
    edgegate::converter::dates_in_utc_unless_tz_is_set();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(cfg) => {
                for warning in cfg.admin.iter().flat_map(|a| a.warnings()) {
                    eprintln!("edgegate: warning: {warning}");
                }
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Reload { config, pid } => reload(&config, pid),
        Command::Status { config, json } => {
            ExitCode::from(view::status(&config, json, &mut std::io::stdout()))
        }
        Command::Top {
            config,
            interval,
            frames,
        } => {
            // Not a busy loop against the gateway, whatever is asked.
            let interval = interval.max(std::time::Duration::from_millis(100));
            ExitCode::from(view::top(&config, interval, frames, &mut std::io::stdout()))
        }
        Command::Convert(args) => convert(args),
        Command::Buffer { action } => buffer_tool(action),
        Command::Run { config, log_format } => {
            let Ok(cfg) = load(&config) else {
                return ExitCode::from(2);
            };
            init_logging(cfg.log.level.as_deref(), log_format);
            run(cfg, config)
        }
    }
}

/// glibc gives threads their own heap arenas (up to 8 per core) and keeps freed memory in each.
/// With sled's, librdkafka's and tokio's threads that cost 15-25 MB of RSS during a 1M-record
/// drain: 68-74 MB peak with the default, 56 MB with two arenas, 43-50 MB with one. One arena
/// slows the converter (QuickJS allocates per object) by 10-15%, two do not (BENCHMARKS.md).
/// `MALLOC_ARENA_MAX` in the environment still wins.
///
/// glibc also raises its mmap threshold to the size of every large block freed, so after the first
/// 2 MiB MQTT message every later one came from the arenas, which kept the memory: a burst of 150
/// such messages left 364 MB of RSS behind (tests/buffer_full.rs). A fixed threshold keeps blocks
/// of 128 KiB and more in mmaps of their own that go back to the system when freed: 114 MB.
/// `MALLOC_MMAP_THRESHOLD_` in the environment still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only tunes the allocator; it runs before any other thread exists.
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
        }
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    gateway::load(path).map_err(|e| {
        eprintln!("edgegate: invalid configuration: {e}");
        ExitCode::from(2)
    })
}

/// Log filter directives as `target=level,...` (`Targets`: tracing-subscriber's env-filter and
/// its regex engine would add about half a megabyte to the boards' binary for span filters no one
/// sets on a gateway).
fn init_logging(level: Option<&str>, format: LogFormat) {
    let parse = |directives: &str| directives.parse::<Targets>().ok();
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|env| parse(&env))
        .or_else(|| parse(level.unwrap_or("info")))
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    // Under systemd, stderr goes to the journal, which stamps every line itself.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    match (format, journald) {
        (LogFormat::Text, false) => builder.finish().with(filter).init(),
        (LogFormat::Text, true) => builder.without_time().finish().with(filter).init(),
        (LogFormat::Json, _) => builder.json().finish().with(filter).init(),
    }
}

fn run(config: Config, path: PathBuf) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let (reload, requests) = ReloadHandle::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        tokio::spawn(reload_on_sighup(reload.clone()));
        gateway::run(config, &path, shutdown, reload, requests).await
    });
    // Everything durable is flushed by now; a blocking Kafka metadata request against an
    // unreachable broker must not hold up the exit for its full timeout.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "edgegate stopped");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}

fn reload(path: &Path, pid: Option<i32>) -> ExitCode {
    let Ok(config) = load(path) else {
        eprintln!("edgegate reload: nothing was sent; the running configuration stays in force");
        return ExitCode::from(2);
    };
    if let (None, Some(pid)) = (&config.admin, pid) {
        return reload_by_signal(pid);
    }
    // Applying waits for in-flight Kafka deliveries (up to kafka.shutdown_timeout).
    let timeout = config.kafka.shutdown_timeout + std::time::Duration::from_secs(30);
    // The gateway refuses if it runs another file than the one checked here.
    let named = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let hex: String = named
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let answer = AdminClient::for_config(&config, timeout)
        .and_then(|c| c.post_with("/-/reload", edgegate::admin::CONFIG_HEADER, &hex));
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("edgegate reload: {e}");
            eprintln!("(a new admin.listen is reached only after the reload: use systemctl reload edgegate, or kill -HUP, to move it)");
            return ExitCode::from(1);
        }
    };
    let body: serde_json::Value = serde_json::from_str(&answer.body).unwrap_or_default();
    match (answer.status, body.get("error").and_then(|e| e.as_str())) {
        (200, _) => {
            let applied = body.get("applied").and_then(|a| a.as_array());
            let applied: Vec<&str> = applied
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str())
                .collect();
            let took = body.get("took").and_then(|t| t.as_str()).unwrap_or("?");
            println!("reloaded in {took}: {}", applied.join(", "));
            ExitCode::SUCCESS
        }
        (status, Some(error)) => {
            eprintln!("edgegate reload: refused: {error}");
            ExitCode::from(if status == 422 { 2 } else { 1 })
        }
        (status, None) => {
            eprintln!("edgegate reload: HTTP {status}: {}", answer.body.trim());
            ExitCode::from(1)
        }
    }
}

fn reload_by_signal(pid: i32) -> ExitCode {
    // SAFETY: kill only sends a signal; a wrong pid fails with ESRCH or EPERM.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        let e = std::io::Error::last_os_error();
        eprintln!("edgegate reload: cannot signal process {pid}: {e}");
        return ExitCode::from(1);
    }
    println!("sent SIGHUP to {pid} (no [admin] table to ask); the outcome is in its log");
    ExitCode::SUCCESS
}

/// SIGHUP (`systemctl reload`) reloads the configuration; the gateway logs the outcome.
async fn reload_on_sighup(reload: ReloadHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reload with `edgegate reload`");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP received");
        // The outcome is logged where it is applied.
        let _ = reload.request().await;
    }
}

fn convert(args: ConvertArgs) -> ExitCode {
    let usage = |message: String| {
        eprintln!("edgegate convert: {message}");
        ExitCode::from(2)
    };
    // clap makes exactly one of them present.
    let Some(input) = args.msg.as_ref().or(args.payload.as_ref()) else {
        return usage("give --payload, or --encoder with --msg".into());
    };
    let payload = match read_payload(input, args.base64) {
        Ok(p) => p,
        Err(message) => return usage(message),
    };
    let kind = if args.encoder {
        ConverterKind::Encoder
    } else {
        ConverterKind::Decoder
    };
    let (name, settings, gateway_id) = match (&args.script, &args.config, &args.converter) {
        (Some(script), _, _) => {
            let name = script
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| if args.encoder { "encoder" } else { "decoder" }.into());
            let mut settings = ConverterConfig::for_script(script.clone());
            settings.kind = kind;
            (name, settings, String::new())
        }
        (None, Some(path), Some(name)) => {
            let config = match Config::load(path) {
                Ok(c) => c,
                Err(e) => return usage(e.to_string()),
            };
            let Some(settings) = config.converters.get(name) else {
                return usage(format!("{}: no [converters.{name}] table", path.display()));
            };
            match (settings.kind, kind) {
                (ConverterKind::Encoder, ConverterKind::Decoder) => {
                    return usage(format!("[converters.{name}] is an encoder: add --encoder"))
                }
                (ConverterKind::Decoder, ConverterKind::Encoder) => {
                    return usage(format!("[converters.{name}] is a decoder: drop --encoder"))
                }
                _ => {}
            }
            (name.clone(), settings.clone(), config.gateway.id.clone())
        }
        _ => return usage("give --script, or --config with --converter".into()),
    };
    if let Err(e) = std::fs::metadata(&settings.script) {
        return usage(format!("{}: {e}", settings.script.display()));
    }
    let (output, error) = match kind {
        ConverterKind::Decoder => decode(&args, &name, &settings, &gateway_id, &payload),
        ConverterKind::Encoder => encode(&args, &name, &settings, &gateway_id, &payload),
    };
    let failed = error.is_some();
    let report = serde_json::json!({ "output": output, "error": error });
    // A closed pipe (`| head`) is the reader's choice, not a failure worth a panic.
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        edgegate::converter::number::to_string_pretty_js(&report)
    );
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// `convert`'s (output, error) for a decoder.
fn decode(
    args: &ConvertArgs,
    name: &str,
    settings: &ConverterConfig,
    gateway_id: &str,
    payload: &[u8],
) -> (Option<serde_json::Value>, Option<String>) {
    match Converter::new(name, settings, None) {
        Err(e) => (None, Some(e.to_string())),
        Ok(mut converter) => {
            let static_meta = converter.static_metadata();
            let mut meta = script_metadata(&static_meta, name, gateway_id, &args.metadata);
            if gateway_id.is_empty() {
                meta.retain(|(k, _)| *k != "gatewayId");
            }
            let result = if args.raw {
                converter.run_raw(payload, &meta)
            } else {
                converter
                    .convert(payload, &meta, now_ms())
                    .map(|entities| entities.iter().map(Entity::value).collect())
            };
            report(result)
        }
    }
}

/// `convert`'s (output, error) for an encoder: the command line's metadata is the script's
/// `metadata`; `integrationMetadata` comes from the converter's settings.
fn encode(
    args: &ConvertArgs,
    name: &str,
    settings: &ConverterConfig,
    gateway_id: &str,
    msg: &[u8],
) -> (Option<serde_json::Value>, Option<String>) {
    let mut encoder = match Encoder::new(name, settings, None) {
        Ok(encoder) => encoder,
        Err(e) => return (None, Some(e.to_string())),
    };
    let (meta, msg_type) = (&args.metadata, &args.msg_type);
    let result = if args.raw {
        encoder.encode_raw(msg, meta, msg_type, gateway_id)
    } else {
        encoder
            .encode_json(msg, meta, msg_type, gateway_id)
            .map(serde_json::Value::Array)
    };
    report(result)
}

fn report<E: ToString>(
    result: Result<serde_json::Value, E>,
) -> (Option<serde_json::Value>, Option<String>) {
    match result {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e.to_string())),
    }
}

fn read_payload(path: &Path, base64: bool) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin().read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut bytes))
    };
    read.map_err(|e| format!("{}: {e}", path.display()))?;
    if !base64 {
        return Ok(bytes);
    }
    use base64::Engine as _;
    let text: Vec<u8> = bytes
        .into_iter()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| format!("{}: not base64: {e}", path.display()))
}

fn buffer_tool(action: BufferAction) -> ExitCode {
    let path = match &action {
        BufferAction::Stats { config, .. }
        | BufferAction::Export { config }
        | BufferAction::Purge { config, .. } => config.clone(),
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgegate: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let metrics = std::sync::Arc::new(edgegate::metrics::Metrics::new());
    let buffer = match Buffer::open(&config.gateway.data_dir, &config.buffer, metrics) {
        Ok((buffer, _, _)) => buffer,
        Err(e) => {
            eprintln!("edgegate buffer: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match action {
        BufferAction::Stats { json, .. } => {
            print_stats(&buffer, json);
            Ok(())
        }
        BufferAction::Export { .. } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            match buffer.export(&mut out) {
                Ok(n) => {
                    eprintln!("exported {n} records");
                    Ok(())
                }
                // The reader went away (`| head`): not an error.
                Err(ToolError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                Err(e) => Err(e.to_string()),
            }
        }
        BufferAction::Purge { older_than, .. } => {
            let cutoff = older_than.map(|d| now_ms().saturating_sub(d.as_millis() as u64));
            buffer
                .purge(cutoff)
                .map(|p| {
                    println!(
                        "purged {} records ({} bytes); {} remain",
                        p.records,
                        p.bytes,
                        buffer.stats().records
                    )
                })
                .map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgegate buffer: {e}");
            ExitCode::from(1)
        }
    }
}

fn print_stats(buffer: &Buffer, json: bool) {
    let s = buffer.stats();
    let time = |ms: Option<u64>| {
        ms.map(|ms| {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
            humantime::format_rfc3339_millis(t).to_string()
        })
    };
    if json {
        let v = serde_json::json!({
            "records": s.records,
            "bytes": s.bytes,
            "chunks": s.chunks,
            "oldest_ms": s.oldest_ms,
            "newest_ms": s.newest_ms,
            "oldest": time(s.oldest_ms),
            "newest": time(s.newest_ms),
            "next_seq": s.next_seq,
            "disk_bytes": buffer.disk_bytes(),
        });
        println!("{v}");
        return;
    }
    println!("records:    {}", s.records);
    println!("bytes:      {}", s.bytes);
    println!("chunks:     {}", s.chunks);
    println!(
        "oldest:     {}",
        time(s.oldest_ms).unwrap_or_else(|| "-".into())
    );
    println!(
        "newest:     {}",
        time(s.newest_ms).unwrap_or_else(|| "-".into())
    );
    println!("next seq:   {}", s.next_seq);
    println!("disk bytes: {}", buffer.disk_bytes());
}
