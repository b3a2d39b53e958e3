//! Real components for integration tests: mosquitto, a Tansu Kafka broker, a TCP proxy that can
//! cut or blackhole the uplink, a Kafka consumer, an MQTT publisher, and the gateway process.
//! Everything binds to free loopback ports and is killed on drop.
#![allow(dead_code)]

pub mod tls;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

pub fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if StdStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on port {port} after {timeout:?}");
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Finds a helper program: `$EDGEGATE_<NAME>` or the PATH, then ~/.cargo/bin.
pub fn program(name: &str) -> PathBuf {
    let var = format!("EDGEGATE_{}", name.to_uppercase());
    if let Ok(p) = std::env::var(&var) {
        return p.into();
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    for dir in ["/usr/sbin", "/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    let home = std::env::var("HOME").unwrap_or_default();
    Path::new(&home).join(".cargo/bin").join(name)
}

pub struct Mosquitto {
    pub port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

fn spawn_mosquitto(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("mosquitto.log"))
        .unwrap();
    Command::new(program("mosquitto"))
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("mosquitto not installed (apt-get install mosquitto)")
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Mosquitto::start_with("allow_anonymous true\n")
    }

    /// `{dir}` in `extra` stands for the broker's own directory (persistence_location).
    pub fn start_on(port: u16, extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        let extra = extra.replace("{dir}", &format!("{}/", dir.path().display()));
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nmax_queued_messages 0\nmax_inflight_messages 1000\n\
                 persistence false\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n{extra}"
            ),
        )
        .unwrap();
        let child = spawn_mosquitto(dir.path());
        wait_for_port(port, Duration::from_secs(10));
        Mosquitto { port, child, dir }
    }

    /// A broker that keeps sessions and queued messages across [`Mosquitto::restart`].
    pub fn start_persistent() -> Mosquitto {
        // `user root`: started as root, mosquitto would drop to its own user, which cannot write
        // the database into our private temp dir (ignored when not started as root).
        Mosquitto::start_with(
            "allow_anonymous true\nuser root\npersistence true\npersistence_location {dir}\n",
        )
    }

    /// Stops the broker with SIGTERM (a persistent one saves its state) and starts it again on
    /// the same port and configuration.
    pub fn restart(&mut self) {
        // SAFETY: sending a signal to our own child process id.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        self.child = spawn_mosquitto(self.dir.path());
        wait_for_port(self.port, Duration::from_secs(10));
    }

    /// Kills the broker (SIGKILL: a persistent one loses what it did not save) and starts it again.
    pub fn kill_and_restart(&mut self) {
        kill(&mut self.child);
        self.child = spawn_mosquitto(self.dir.path());
        wait_for_port(self.port, Duration::from_secs(10));
    }

    pub fn start_with(extra: &str) -> Mosquitto {
        Mosquitto::start_on(free_port(), extra)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A local S3-compatible object store (moto's server, as `scripts/prerequisites` installs it)
/// holding one bucket, `tansu`, for a durable Tansu. Its objects are in its memory: they outlive
/// Tansu restarts, not its own.
///
/// It serves one request at a time: moto checks a conditional PUT's If-Match/If-None-Match and
/// then writes, without a lock, so `moto_server` (threaded) lets two racing writes both succeed.
/// Tansu's object storage relies on those conditions being atomic (a batch is written at an
/// offset with If-None-Match, the partition's watermark replaced with If-Match).
pub struct S3Server {
    pub port: u16,
    child: Child,
    /// Its request log (one line per request).
    log: tempfile::NamedTempFile,
}

/// moto's server without threads (moto.server.main, `threaded=True` aside).
const MOTO_SERIAL: &str = "
import sys
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
run_simple('127.0.0.1', int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=False)
";

/// A Python with moto: `$EDGEGATE_MOTO_PYTHON`, the virtual environment of
/// `scripts/prerequisites`, or python3.
fn moto_python() -> PathBuf {
    if let Ok(p) = std::env::var("EDGEGATE_MOTO_PYTHON") {
        return p.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let venv = Path::new(&home).join(".local/share/edgegate/venv/bin/python");
    if venv.exists() {
        return venv;
    }
    "python3".into()
}

impl S3Server {
    pub fn start() -> S3Server {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(moto_python())
            .args(["-c", MOTO_SERIAL])
            .arg(port.to_string())
            .env("MOTO_PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("no python3 (scripts/prerequisites installs moto's server)");
        let mut server = S3Server { port, child, log };
        wait_for_port(port, Duration::from_secs(60));
        server.create_bucket("tansu");
        server
    }

    /// An anonymous `PUT /bucket` (moto does not check signatures).
    fn create_bucket(&mut self, bucket: &str) {
        use std::io::{Read, Write};
        let mut stream = StdStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"),
            "creating bucket {bucket}: {}",
            response.lines().next().unwrap_or("")
        );
    }

    /// How many PUT requests it served to a path containing one of `needles`.
    pub fn puts(&self, needles: &[&str]) -> usize {
        std::fs::read_to_string(self.log.path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"PUT /") && needles.iter().any(|n| l.contains(n)))
            .count()
    }

    /// The environment Tansu's object store client (object_store's AmazonS3Builder::from_env)
    /// reads.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "edgegate".into()),
            ("AWS_SECRET_ACCESS_KEY", "edgegate".into()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A Tansu broker that advertises `advertised_port` (a proxy, or itself). Its storage is in
/// memory, or with [`Tansu::start_durable`] in an object store that outlives restarts.
pub struct Tansu {
    pub port: u16,
    pub advertised_port: u16,
    child: Child,
    /// The SQLite storage of a broker that authenticates its clients.
    dir: Option<tempfile::TempDir>,
    s3: Option<S3Server>,
    /// Where the broker's output goes (appended across restarts).
    log: tempfile::NamedTempFile,
}

/// A SASL/SCRAM user of [`Tansu::start_authenticating`].
pub struct ScramUser<'a> {
    pub name: &'a str,
    pub password: &'a str,
    /// `tansu user create --mechanism`: "scram256" or "scram512".
    pub mechanism: &'a str,
}

/// How a broker is started besides its ports.
#[derive(Default, Clone, Copy)]
struct TansuSetup<'a> {
    extra: &'a [&'a str],
    /// The working directory (for a SQLite storage URL, which is relative to it).
    dir: Option<&'a Path>,
    s3: Option<&'a S3Server>,
}

fn spawn_tansu(port: u16, advertised_port: u16, setup: TansuSetup<'_>, log: &Path) -> Child {
    let mut command = Command::new(program("tansu"));
    command
        .args(["broker", "--listener-url"])
        .arg(format!("tcp://127.0.0.1:{port}"))
        .arg("--advertised-listener-url")
        .arg(format!("tcp://127.0.0.1:{advertised_port}"))
        .args(setup.extra);
    if let Some(dir) = setup.dir {
        command.current_dir(dir);
    }
    if let Some(s3) = setup.s3 {
        command
            .args(["--storage-engine", "s3://tansu/"])
            .envs(s3.env());
    }
    let log = std::fs::OpenOptions::new().append(true).open(log).unwrap();
    let child = command
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect(
            "tansu not installed (cargo install tansu --version 0.6.0 --features dynostore,libsql)",
        );
    wait_for_port(port, Duration::from_secs(20));
    child
}

impl Tansu {
    pub fn start() -> Tansu {
        let port = free_port();
        Tansu::start_advertising(port, port)
    }

    pub fn start_advertising(port: u16, advertised_port: u16) -> Tansu {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = spawn_tansu(port, advertised_port, TansuSetup::default(), log.path());
        Tansu {
            port,
            advertised_port,
            child,
            dir: None,
            s3: None,
            log,
        }
    }

    /// A broker that requires SASL/SCRAM authentication (`--authentication`) from every client,
    /// with `users` and `topics` (name, partitions) in place, advertising `advertised_port` (the
    /// TLS listener in front of it).
    ///
    /// Tansu administers users and topics only over the Kafka protocol, and its own command line
    /// cannot authenticate, so they are created on a broker without `--authentication` first;
    /// the broker then restarts with it on the same SQLite storage (the in-memory one would
    /// forget them).
    pub fn start_authenticating(
        advertised_port: u16,
        users: &[ScramUser<'_>],
        topics: &[(&str, u32)],
    ) -> Tansu {
        let dir = tempfile::tempdir().unwrap();
        let storage = ["--storage-engine", "sqlite://tansu.db"];
        let port = free_port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let plain = TansuSetup {
            extra: &storage,
            dir: Some(dir.path()),
            s3: None,
        };
        let mut setup = Tansu {
            port,
            advertised_port: port,
            child: spawn_tansu(port, port, plain, log.path()),
            dir: None,
            s3: None,
            log: tempfile::NamedTempFile::new().unwrap(),
        };
        for user in users {
            setup.create_user(user);
        }
        for (topic, partitions) in topics {
            setup.create_topic(topic, *partitions);
        }
        kill(&mut setup.child);
        let mut args = storage.to_vec();
        args.push("--authentication");
        let authenticating = TansuSetup {
            extra: &args,
            ..plain
        };
        let child = spawn_tansu(port, advertised_port, authenticating, log.path());
        Tansu {
            port,
            advertised_port,
            child,
            dir: Some(dir),
            s3: None,
            log,
        }
    }

    /// A broker whose topics, records, producer ids and consumer group offsets survive
    /// [`Tansu::restart`], as a real Kafka broker's do: its storage is a local S3 server started
    /// for it (and stopped with it).
    pub fn start_durable() -> Tansu {
        let port = free_port();
        Tansu::start_durable_advertising(port, port)
    }

    pub fn start_durable_advertising(port: u16, advertised_port: u16) -> Tansu {
        let s3 = S3Server::start();
        let log = tempfile::NamedTempFile::new().unwrap();
        let setup = TansuSetup {
            s3: Some(&s3),
            ..TansuSetup::default()
        };
        let child = spawn_tansu(port, advertised_port, setup, log.path());
        Tansu {
            port,
            advertised_port,
            child,
            dir: None,
            s3: Some(s3),
            log,
        }
    }

    /// `tansu user create`; only a broker without `--authentication` takes it.
    fn create_user(&self, user: &ScramUser<'_>) {
        let status = Command::new(program("tansu"))
            .args(["user", "create", user.name, user.password, "--mechanism"])
            .arg(user.mechanism)
            .arg("--broker")
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tansu user create {} failed", user.name);
    }

    /// Stops the broker and starts a new one on the same ports. A durable broker is stopped with
    /// SIGTERM and keeps everything; an in-memory one is killed and starts empty: topics,
    /// records and consumer group offsets are gone.
    pub fn restart(&mut self) {
        if self.s3.is_some() {
            // SAFETY: sending a signal to our own child process id.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGTERM);
            }
            let _ = self.child.wait();
        } else {
            kill(&mut self.child);
        }
        let setup = TansuSetup {
            s3: self.s3.as_ref(),
            ..TansuSetup::default()
        };
        self.child = spawn_tansu(self.port, self.advertised_port, setup, self.log.path());
    }

    /// Waits until a durable broker wrote no object whose path contains one of `needles` for
    /// `quiet` (its requests in flight are done); false after `timeout`.
    pub fn wait_storage_quiet(&self, needles: &[&str], quiet: Duration, timeout: Duration) -> bool {
        let s3 = self.s3.as_ref().expect("a durable Tansu");
        let deadline = Instant::now() + timeout;
        let (mut last, mut since) = (s3.puts(needles), Instant::now());
        while since.elapsed() < quiet {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
            let now = s3.puts(needles);
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        true
    }

    /// What the broker printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn create_topic(&self, name: &str, partitions: u32) {
        self.create_topic_with(name, partitions, &[]);
    }

    /// With topic configs such as `("max.message.bytes", "300000")` (Tansu stores and describes
    /// them; it does not enforce them).
    pub fn create_topic_with(&self, name: &str, partitions: u32, configs: &[(&str, &str)]) {
        let mut command = Command::new(program("tansu"));
        command.args(["topic", "create", name]);
        for (key, value) in configs {
            command.arg("--config").arg(format!("{key}={value}"));
        }
        let status = command
            .arg("--partitions")
            .arg(partitions.to_string())
            .arg("--broker")
            .arg(format!("tcp://127.0.0.1:{}", self.port))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "tansu topic create {name} failed");
    }

    /// The address clients use (the advertised one).
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised_port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    Up,
    /// Reset every connection and refuse new ones.
    Cut,
    /// Keep connections open but forward nothing.
    Blackhole,
}

/// A TCP proxy on `port` forwarding to `upstream`, switchable at run time.
pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<ProxyMode>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Tests drop the proxy inside their own runtime, where a blocking shutdown panics.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Proxy {
    pub fn start(port: u16, upstream: u16) -> Proxy {
        Proxy::start_with(port, upstream, None)
    }

    /// A proxy in front of a Kafka broker whose cut and blackhole spare the connections of the
    /// clients whose `client.id` starts with `exempt`: the test's own consumers and producers,
    /// which stand on the platform's side of the gateway's uplink. The client id comes from each
    /// connection's first request. While cut, the proxy keeps listening and resets other clients'
    /// connections as soon as their first request arrives.
    pub fn start_kafka_exempting(port: u16, upstream: u16, exempt: &str) -> Proxy {
        Proxy::start_with(port, upstream, Some(Arc::from(exempt)))
    }

    fn start_with(port: u16, upstream: u16, exempt: Option<Arc<str>>) -> Proxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (mode, rx) = watch::channel(ProxyMode::Up);
        match exempt {
            None => runtime.spawn(accept_loop(port, upstream, rx)),
            Some(exempt) => runtime.spawn(accept_exempting(port, upstream, rx, exempt)),
        };
        wait_for_port(port, Duration::from_secs(5));
        Proxy {
            port,
            mode,
            runtime: Some(runtime),
        }
    }

    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }
}

async fn accept_loop(port: u16, upstream: u16, mut mode: watch::Receiver<ProxyMode>) {
    loop {
        // While cut, nothing listens: connects are refused.
        while *mode.borrow_and_update() == ProxyMode::Cut {
            if mode.changed().await.is_err() {
                return;
            }
        }
        let listener = loop {
            match bind_reuse(port) {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    if let Ok((client, _)) = accepted {
                        tokio::spawn(relay(client, upstream, mode.clone()));
                    }
                }
                changed = mode.changed() => {
                    if changed.is_err() { return; }
                    if *mode.borrow() == ProxyMode::Cut { break; }
                }
            }
        }
    }
}

async fn accept_exempting(
    port: u16,
    upstream: u16,
    mode: watch::Receiver<ProxyMode>,
    exempt: Arc<str>,
) {
    let listener = loop {
        match bind_reuse(port) {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    loop {
        if let Ok((client, _)) = listener.accept().await {
            tokio::spawn(relay_exempting(
                client,
                upstream,
                mode.clone(),
                exempt.clone(),
            ));
        }
    }
}

/// Reads a Kafka request's size, header and client id: (the bytes read, the client id).
async fn kafka_client_id(client: &mut TcpStream) -> Option<(Vec<u8>, String)> {
    // size (4), api_key (2), api_version (2), correlation_id (4), client_id length (2)
    let mut head = vec![0u8; 14];
    client.read_exact(&mut head).await.ok()?;
    let len = i16::from_be_bytes([head[12], head[13]]);
    let mut id = vec![0u8; usize::try_from(len).unwrap_or(0)];
    client.read_exact(&mut id).await.ok()?;
    head.extend_from_slice(&id);
    Some((head, String::from_utf8_lossy(&id).into_owned()))
}

fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
}

async fn relay_exempting(
    mut client: TcpStream,
    upstream: u16,
    mut mode: watch::Receiver<ProxyMode>,
    exempt: Arc<str>,
) {
    let Some((head, client_id)) = kafka_client_id(&mut client).await else {
        return;
    };
    // Exempt connections see a link that is always up; the sender lives as long as the relay.
    let (_always_up, up) = watch::channel(ProxyMode::Up);
    let mode = if client_id.starts_with(&*exempt) {
        up
    } else {
        loop {
            match *mode.borrow_and_update() {
                ProxyMode::Up => break,
                ProxyMode::Cut => return reset(client),
                ProxyMode::Blackhole => {}
            }
            if mode.changed().await.is_err() {
                return;
            }
        }
        mode
    };
    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return reset(client);
    };
    if server.write_all(&head).await.is_err() {
        return reset(client);
    }
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let a = tokio::spawn(pipe(cr, sw, mode.clone()));
    let b = tokio::spawn(pipe(sr, cw, mode));
    let _ = tokio::join!(a, b);
}

fn bind_reuse(port: u16) -> std::io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    socket.listen(128)
}

async fn relay(client: TcpStream, upstream: u16, mode: watch::Receiver<ProxyMode>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let a = tokio::spawn(pipe(cr, sw, mode.clone()));
    let b = tokio::spawn(pipe(sr, cw, mode));
    let _ = tokio::join!(a, b);
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let current = *mode.borrow_and_update();
        match current {
            ProxyMode::Cut => {
                // Reset, not close: the peer sees ECONNRESET like a dropped link.
                if let Ok(stream) = from.reunite(to) {
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                }
                return;
            }
            ProxyMode::Blackhole => {
                if mode.changed().await.is_err() {
                    return;
                }
                continue;
            }
            ProxyMode::Up => {}
        }
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    // Data read just as the link went down is swallowed, like a real outage.
                    if *mode.borrow() != ProxyMode::Up { continue; }
                    if to.write_all(&buf[..n]).await.is_err() { return; }
                }
            },
            changed = mode.changed() => if changed.is_err() { return; },
        }
    }
}

#[derive(Debug, Clone)]
pub struct KafkaMessage {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub timestamp: Option<i64>,
    pub headers: HashMap<String, String>,
}

impl KafkaMessage {
    pub fn from_message(m: &impl Message) -> KafkaMessage {
        KafkaMessage {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            timestamp: m.timestamp().to_millis(),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            let v = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                            (h.key.to_owned(), v.unwrap_or_default())
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub fn header(&self, k: &str) -> &str {
        self.headers.get(k).map(String::as_str).unwrap_or("")
    }
    pub fn seq(&self) -> u64 {
        self.header("edgegate-seq")
            .parse()
            .expect("edgegate-seq header")
    }
}

/// Reads a whole topic from the beginning (assign, no consumer group) until `expected` messages
/// arrived or `timeout` passed.
pub fn consume(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<KafkaMessage> {
    consume_until(bootstrap, topic, timeout, |msgs| msgs.len() >= expected)
}

/// Reads until every distinct test payload (topic, counter) up to `expected` was seen, so that
/// duplicates do not end the read early.
pub fn consume_distinct(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<KafkaMessage> {
    let mut seen = std::collections::HashSet::new();
    let mut counted = 0;
    consume_until(bootstrap, topic, timeout, move |msgs| {
        for m in &msgs[counted..] {
            seen.insert(parse_payload(&m.payload));
        }
        counted = msgs.len();
        seen.len() >= expected
    })
}

pub fn consume_until(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    done: impl FnMut(&[KafkaMessage]) -> bool,
) -> Vec<KafkaMessage> {
    consume_until_with(bootstrap, &[], topic, timeout, done)
}

/// [`consume_distinct`] with librdkafka properties (security settings).
pub fn consume_distinct_with(
    bootstrap: &str,
    properties: &[(String, String)],
    topic: &str,
    expected: usize,
    timeout: Duration,
) -> Vec<KafkaMessage> {
    let mut seen = std::collections::HashSet::new();
    let mut counted = 0;
    consume_until_with(bootstrap, properties, topic, timeout, move |msgs| {
        for m in &msgs[counted..] {
            seen.insert(parse_payload(&m.payload));
        }
        counted = msgs.len();
        seen.len() >= expected
    })
}

fn test_consumer(bootstrap: &str, properties: &[(String, String)]) -> BaseConsumer {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "edgegate-tests")
        .set("enable.auto.commit", "false")
        .set("fetch.message.max.bytes", "16777216")
        .set("fetch.wait.max.ms", "10")
        .set("receive.message.max.bytes", "67108864");
    for (key, value) in properties {
        config.set(key, value);
    }
    config.create().unwrap()
}

/// The records in `topic`: the sum of its partitions' high watermarks.
pub fn topic_records(bootstrap: &str, properties: &[(String, String)], topic: &str) -> i64 {
    let consumer = test_consumer(bootstrap, properties);
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    assert!(partitions > 0, "topic {topic} has no partitions");
    (0..partitions as i32)
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap();
            high - low
        })
        .sum()
}

pub fn consume_until_with(
    bootstrap: &str,
    properties: &[(String, String)],
    topic: &str,
    timeout: Duration,
    mut done: impl FnMut(&[KafkaMessage]) -> bool,
) -> Vec<KafkaMessage> {
    let consumer = test_consumer(bootstrap, properties);
    let deadline = Instant::now() + timeout;
    let partitions = loop {
        if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            let n = md
                .topics()
                .first()
                .map(|t| t.partitions().len())
                .unwrap_or(0);
            if n > 0 {
                break n;
            }
        }
        assert!(Instant::now() < deadline, "topic {topic} never appeared");
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    while !done(&out) && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(KafkaMessage::from_message(&m)),
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None => {}
        }
    }
    out
}

/// Publishes messages (QoS 1 unless told) and counts what the broker acknowledged.
pub struct Publisher {
    client: rumqttc::AsyncClient,
    pub acked: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub async fn connect(port: u16, client_id: &str) -> Publisher {
        Publisher::connect_with(port, client_id, 200, 1000).await
    }

    /// `inflight` unacknowledged publishes at most; `capacity` requests queued in the client.
    pub async fn connect_with(
        port: u16,
        client_id: &str,
        inflight: u16,
        capacity: usize,
    ) -> Publisher {
        let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        o.set_max_packet_size(4 << 20, 4 << 20)
            .set_inflight(inflight);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(o, capacity);
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = acked.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(
                        rumqttc::Packet::PubAck(_) | rumqttc::Packet::PubComp(_),
                    )) => {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Publisher {
            client,
            acked,
            task,
        }
    }

    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.publish_qos(topic, rumqttc::QoS::AtLeastOnce, payload)
            .await;
    }

    /// `acked` counts QoS 1 and 2 publishes once complete (PUBACK, PUBCOMP), never QoS 0 ones.
    pub async fn publish_qos(&self, topic: &str, qos: rumqttc::QoS, payload: Vec<u8>) {
        self.client
            .publish(topic, qos, false, payload)
            .await
            .unwrap();
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `n` publishes were acknowledged by the broker.
    pub async fn wait_acked(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.acked() < n {
            assert!(
                Instant::now() < deadline,
                "broker acked {} of {n}",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The edgegate binary running as a child process, its stderr captured line by line.
pub struct Gateway {
    child: Option<Child>,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub config: PathBuf,
    env: Vec<(String, String)>,
}

pub fn edgegate() -> Command {
    // EDGEGATE_BIN measures another build (a release binary) with the same tests. Examples (the
    // load tool) reuse this module; cargo only tells tests where the binary is.
    if let Some(bin) = std::env::var_os("EDGEGATE_BIN") {
        return Command::new(bin);
    }
    Command::new(option_env!("CARGO_BIN_EXE_edgegate").unwrap_or("target/release/edgegate"))
}

impl Gateway {
    pub fn start(config: &Path) -> Gateway {
        Gateway::start_with_env(config, &[])
    }

    /// Starts with extra environment variables (NOTIFY_SOCKET, WATCHDOG_USEC, …).
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Gateway {
        let mut g = Gateway {
            child: None,
            lines: Arc::new(Mutex::new(Vec::new())),
            config: config.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        g.restart();
        g
    }

    pub fn restart(&mut self) {
        let mut child = edgegate()
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            // Lines stamped with their time (under systemd the journal stamps them instead).
            .env_remove("JOURNAL_STREAM")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = self.lines.clone();
        let echo = std::env::var_os("EDGEGATE_TEST_ECHO").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[gateway] {line}");
                }
                lines.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
    }

    /// Lines containing `needle` so far.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits until at least `n` log lines contain `needle`.
    pub fn wait_for_count(&self, needle: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count(needle) < n {
            assert!(
                Instant::now() < deadline,
                "no log line {needle:?} within {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        self.wait_for_count(needle, 1, timeout);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        // SAFETY: sending a signal to our own child process id.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                kill(&mut c);
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit code once the process ended by itself (`None` while it runs, or for a signal).
    pub fn exit_code(&mut self) -> Option<i32> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        status.code()
    }

    /// How the process ended, once it did (`None` while it runs).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok()?
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }
}

/// A gateway configuration for tests; `extra` is appended verbatim.
pub fn write_config(
    dir: &Path,
    mqtt_port: u16,
    bootstrap: &str,
    topic: &str,
    extra: &str,
) -> PathBuf {
    let path = dir.join("edgegate.toml");
    let text = format!(
        r#"
[gateway]
id = "gw-test"
data_dir = "{data}"

[kafka]
bootstrap_servers = "{bootstrap}"
topic = "{topic}"
topic_partitions = 3
stall_timeout = "3s"

[sources.plant]
type = "mqtt"
host = "127.0.0.1"
port = {mqtt_port}
topics = ["sensors/#"]
reconnect_max = "2s"
{extra}
"#,
        data = dir.join("data").display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The per-topic counter a test payload carries: `<topic>#<n>#<padding>`.
pub fn payload(topic: &str, n: u64, size: usize) -> Vec<u8> {
    let mut p = format!("{topic}#{n}#").into_bytes();
    p.resize(size.max(p.len()), b'x');
    p
}

pub fn parse_payload(p: &[u8]) -> (String, u64) {
    let s = String::from_utf8_lossy(p);
    let mut parts = s.split('#');
    let topic = parts.next().unwrap_or_default().to_owned();
    let n = parts
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    (topic, n)
}

/// What a scenario delivered: distinct messages and duplicates by cause.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub messages: u64,
    /// The same gateway sequence number twice: a record sent again after its confirmation was
    /// lost (a gateway crash before the release was written, a producer retry).
    pub resent: u64,
    /// A new sequence number for a message already delivered: the MQTT broker redelivered a
    /// message whose PUBACK the gateway had not sent (or the broker had not received).
    pub redelivered: u64,
}

/// Asserts that for every topic the counters seen are 0..n in order, ignoring exact duplicates
/// (same gateway sequence number) when `allow_duplicates`; returns what was counted.
pub fn assert_complete_in_order(
    msgs: &[KafkaMessage],
    topics: &[String],
    per_topic: u64,
    allow_duplicates: bool,
) -> Tally {
    let mut seen_seq = std::collections::HashSet::new();
    let mut next: HashMap<String, u64> = topics.iter().map(|t| (t.clone(), 0)).collect();
    let mut tally = Tally::default();
    for m in msgs {
        if !seen_seq.insert(m.seq()) {
            tally.resent += 1;
            continue;
        }
        let (topic, n) = parse_payload(&m.payload);
        let expected = next
            .get_mut(&topic)
            .unwrap_or_else(|| panic!("unexpected topic {topic}"));
        if allow_duplicates && n < *expected {
            // The same message redelivered by the broker after a crash: new seq, old counter.
            tally.redelivered += 1;
            continue;
        }
        assert_eq!(n, *expected, "topic {topic}: out of order or missing");
        *expected += 1;
        tally.messages += 1;
    }
    for (t, n) in &next {
        assert_eq!(*n, per_topic, "topic {t}: got {n} of {per_topic}");
    }
    if !allow_duplicates {
        assert_eq!(
            tally.resent + tally.redelivered,
            0,
            "duplicates when nothing failed"
        );
    }
    tally
}

/// The records of a stopped gateway's buffer, as `edgegate buffer export` writes them.
pub fn buffer_export(config: &Path) -> Vec<serde_json::Value> {
    let out = edgegate()
        .args(["buffer", "export", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// One row of RELIABILITY.md, printed for `scripts/reliability` (run with `--nocapture`). Only
/// called after the scenario's assertions passed, so "lost" is 0 by then.
pub fn report(scenario: &str, tally: Tally, recovery: Option<Duration>) {
    let recovery = recovery.map_or("–".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
    println!(
        "RELIABILITY|{scenario}|{}|0|{} resent, {} redelivered|{recovery}",
        tally.messages, tally.resent, tally.redelivered
    );
}

/// A pseudo-terminal pair: the gateway opens the slave (a real tty) by path, the test plays the
/// device on the master. Dropping it is unplugging the device.
pub struct Pty {
    pub master: std::fs::File,
    pub slave_path: PathBuf,
}

impl Pty {
    pub fn open() -> Pty {
        use std::os::fd::FromRawFd;
        let (mut master, mut slave) = (0, 0);
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: openpty writes two fds and a NUL-terminated name into buffers we own.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                name.as_mut_ptr(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // Not inherited by the processes the test starts later (a gateway restarted after a kill):
        // a child holding a copy of the master would keep the terminal alive after the test
        // closes it, and the gateway would never see the unplug.
        // SAFETY: setting a flag on two fds we own.
        unsafe {
            libc::fcntl(master, libc::F_SETFD, libc::FD_CLOEXEC);
            libc::fcntl(slave, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        // Raw mode before anyone writes, so the line discipline neither echoes nor rewrites bytes;
        // then close our slave end: the gateway opens it by path.
        // SAFETY: `slave` is an open tty fd; termios is a plain C struct.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            libc::tcgetattr(slave, &mut t);
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(slave, libc::TCSANOW, &t);
            libc::close(slave);
        }
        // SAFETY: `name` was NUL-terminated by openpty.
        let slave_path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
            .to_string_lossy()
            .into_owned()
            .into();
        Pty {
            // SAFETY: `master` is an fd we own from here on.
            master: unsafe { std::fs::File::from_raw_fd(master) },
            slave_path,
        }
    }

    /// Points `link` (the configured device path) at this terminal, like udev's by-id links.
    pub fn link_as(&self, link: &Path) {
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(&self.slave_path, link).unwrap();
    }

    pub fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.master.write_all(bytes).unwrap();
        self.master.flush().unwrap();
    }

    /// Reads what the gateway wrote to the device, waiting up to `timeout` for `n` bytes.
    pub fn receive(&mut self, n: usize, timeout: Duration) -> Vec<u8> {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: self.master.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 50) } > 0 {
                let mut buf = [0u8; 256];
                match self.master.read(&mut buf) {
                    Ok(k) => out.extend_from_slice(&buf[..k]),
                    Err(_) => break,
                }
            }
        }
        out
    }
}

/// `GET path` on a loopback HTTP port: (status, whole response).
/// The sum of every sample of `name` (all label sets) on the admin endpoint at `port`.
pub fn metric(port: u16, name: &str) -> f64 {
    http_get(port, "/metrics")
        .1
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `ok(metric(port, name))`; returns the value.
pub fn wait_metric(port: u16, name: &str, ok: impl Fn(f64) -> bool, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = metric(port, name);
        if ok(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} = {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = StdStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Throws on payloads containing "bad"; otherwise one device's telemetry (status tests).
pub const METER_DECODER: &str = r#"
var text = String.fromCharCode.apply(null, payload);
if (text.indexOf("bad") >= 0) throw new Error("bad payload: " + text);
return { deviceName: "meter-1", deviceType: "meter", telemetry: { size: text.length } };
"#;

/// `write_config` with `plant` through [`METER_DECODER`] in debug mode "all" and an admin
/// endpoint on a free port; returns the file and the port.
pub fn meter_config(dir: &Path, mqtt_port: u16, bootstrap: &str) -> (PathBuf, u16) {
    std::fs::write(dir.join("decoder.js"), METER_DECODER).unwrap();
    let admin = free_port();
    let extra = format!(
        "converter = \"tb\"\n[converters.tb]\nscript = \"decoder.js\"\ndebug = \"all\"\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n"
    );
    (
        write_config(dir, mqtt_port, bootstrap, "uplink", &extra),
        admin,
    )
}

/// Publishes test payloads 0..n of `size` bytes on `topic`, then waits until Kafka confirmed at
/// least `n` records in all (the admin endpoint's `edgegate_records_out_total`).
pub async fn publish_delivered(
    publisher: &Publisher,
    admin: u16,
    topic: &str,
    n: u64,
    size: usize,
    timeout: Duration,
) {
    for i in 0..n {
        publisher.publish(topic, payload(topic, i, size)).await;
    }
    wait_metric(
        admin,
        "edgegate_records_out_total",
        |v| v >= n as f64,
        timeout,
    );
}
