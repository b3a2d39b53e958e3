//! ThingsBoard-compatible downlink data converters: an encoder script turns one command (a Kafka
//! record) into zero or more messages for devices.
//!
//! The script is the body of ThingsBoard's
//! `function Encoder(msg, metadata, msgType, integrationMetadata)` and returns
//! `{contentType: "JSON" | "TEXT" | "BINARY", data: "…", metadata: {…}}`, an array of such
//! objects (one message each), or `null` for nothing to send. `BINARY` data is base64.
//!
//! Like decoders, an encoder's QuickJS runtime is not `Send`: [`Encoders`] runs it on a thread
//! of its own and hands it one command at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::debug::{DebugEvent, DebugLog, Direction};
use super::normalize::type_name;
use super::number::js_number_of;
use super::{
    debug_log, engine, panic_message, script_metadata, static_metadata, ConvertError,
    ConverterError, ConvertersGone, Sandbox,
};
use crate::config::{ConverterConfig, ConverterKind};
use crate::metrics::live::DebugRing;

mod inflight;
use inflight::InFlight;

/// How a message's `data` is to be read: ThingsBoard's downlink content types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// JSON text, sent as the script wrote it.
    Json,
    /// Any text.
    Text,
    /// Bytes; the script gives them as base64.
    Binary,
}

impl ContentType {
    /// The name scripts use: `JSON`, `TEXT` or `BINARY`.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentType::Json => "JSON",
            ContentType::Text => "TEXT",
            ContentType::Binary => "BINARY",
        }
    }

    fn parse(name: &str) -> Option<ContentType> {
        match name {
            "JSON" => Some(ContentType::Json),
            "TEXT" => Some(ContentType::Text),
            "BINARY" => Some(ContentType::Binary),
            _ => None,
        }
    }
}

/// One message for a device, from an encoder's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downlink {
    pub content_type: ContentType,
    /// The bytes to send: the text's UTF-8 for `JSON` and `TEXT`, the decoded base64 for
    /// `BINARY`.
    pub data: Vec<u8>,
    /// The result's `metadata` (numbers and booleans as JavaScript prints them): what routes
    /// match on and topic templates are filled from.
    pub metadata: BTreeMap<String, String>,
}

/// One compiled encoder script with its runtime, limits and debug log. Not `Send`: QuickJS
/// runtimes stay on the thread that made them (see [`Encoders`]).
pub struct Encoder {
    name: Arc<str>,
    sandbox: Sandbox,
    /// The converter's own `metadata` table, part of `integrationMetadata`.
    static_metadata: Arc<[(String, String)]>,
    debug: DebugLog,
}

impl Encoder {
    /// Reads and compiles the script as an encoder (whatever its `type`); `debug_dir` enables
    /// the debug log where configured.
    pub fn new(
        name: &str,
        config: &ConverterConfig,
        debug_dir: Option<&Path>,
    ) -> Result<Encoder, ConverterError> {
        Ok(Encoder {
            name: Arc::from(name),
            sandbox: Sandbox::load(ConverterKind::Encoder, config)?,
            static_metadata: static_metadata(config),
            debug: debug_log(name, config, debug_dir),
        })
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// ThingsBoard's downlink converter contract: runs the script on one command and returns
    /// the messages to send, none for `null` or `[]`. `value` is the command (the script's
    /// `msg`, parsed when it is JSON), `metadata` the script's `metadata`; `integrationMetadata`
    /// is the converter's `metadata` table with `integrationName` (the converter's name unless
    /// the table sets it) and `gatewayId` (left out when empty). `seq` (the command's Kafka
    /// offset, or 0) goes into the debug event.
    pub fn encode(
        &mut self,
        value: &[u8],
        metadata: &[(String, String)],
        msg_type: &str,
        gateway_id: &str,
        seq: u64,
    ) -> Result<Vec<Downlink>, ConvertError> {
        let result = self
            .run(value, metadata, msg_type, gateway_id)
            .and_then(|raw| messages(raw).map_err(ConvertError::InvalidResult));
        if result.is_err() || self.debug.wants_successes() {
            let output = result
                .as_ref()
                .ok()
                .map(|messages| Value::Array(messages.iter().map(Message::view).collect()));
            let error = result.as_ref().err().map(ToString::to_string);
            let meta: Vec<(&str, &str)> = metadata
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            self.debug.record(&DebugEvent {
                direction: Direction::Downlink,
                seq,
                payload: value,
                metadata: &meta,
                msg_type: Some(msg_type),
                output: output.as_ref(),
                error: error.as_deref(),
            });
            // Commands are few; each event is visible at once rather than at the next flush.
            self.debug.flush();
        }
        Ok(result?.into_iter().map(Message::into_downlink).collect())
    }

    /// [`Encoder::encode`]'s messages as JSON, `{"contentType", "data", "metadata"}` each, with
    /// `data` as the script returned it (`edgegate convert --encoder`). No debug event.
    pub fn encode_json(
        &mut self,
        value: &[u8],
        metadata: &[(String, String)],
        msg_type: &str,
        gateway_id: &str,
    ) -> Result<Vec<Value>, ConvertError> {
        let raw = self.run(value, metadata, msg_type, gateway_id)?;
        let messages = messages(raw).map_err(ConvertError::InvalidResult)?;
        Ok(messages.iter().map(Message::view).collect())
    }

    /// The script's own return value, unchecked (`edgegate convert --encoder --raw`).
    pub fn encode_raw(
        &mut self,
        value: &[u8],
        metadata: &[(String, String)],
        msg_type: &str,
        gateway_id: &str,
    ) -> Result<Value, ConvertError> {
        self.run(value, metadata, msg_type, gateway_id)?
            .ok_or_else(undefined_result)
    }

    fn run(
        &mut self,
        value: &[u8],
        metadata: &[(String, String)],
        msg_type: &str,
        gateway_id: &str,
    ) -> Result<Option<Value>, ConvertError> {
        #[cfg(test)]
        if value == tests::PANIC_VALUE {
            panic!("a test asked for a panic");
        }
        let mut integration = script_metadata(&self.static_metadata, &self.name, gateway_id, &[]);
        if gateway_id.is_empty() {
            integration.retain(|(k, _)| *k != "gatewayId");
        }
        let meta: Vec<(&str, &str)> = metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.sandbox
            .run(|engine| engine.encode(value, &meta, msg_type, &integration))
    }
}

const UNDEFINED: &str = "the encoder returned undefined; return {contentType, data, metadata}, \
                         an array of them, or null";

fn undefined_result() -> ConvertError {
    ConvertError::InvalidResult(UNDEFINED.into())
}

/// One validated element of an encoder's result.
struct Message {
    content_type: ContentType,
    /// As the script returned it.
    data: String,
    /// `BINARY` data, decoded.
    bytes: Option<Vec<u8>>,
    metadata: BTreeMap<String, String>,
}

impl Message {
    /// The message as the command line and the debug log show it.
    fn view(&self) -> Value {
        json!({
            "contentType": self.content_type.as_str(),
            "data": self.data,
            "metadata": self.metadata,
        })
    }

    fn into_downlink(self) -> Downlink {
        Downlink {
            content_type: self.content_type,
            data: self.bytes.unwrap_or_else(|| self.data.into_bytes()),
            metadata: self.metadata,
        }
    }
}

/// ThingsBoard's downlink result rules. The error names the element (`result` for a single
/// object, `result[i]` in an array) and the key.
fn messages(raw: Option<Value>) -> Result<Vec<Message>, String> {
    match raw {
        None => Err(UNDEFINED.into()),
        Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| message(item, &format!("result[{i}]")))
            .collect(),
        Some(object @ Value::Object(_)) => Ok(vec![message(object, "result")?]),
        Some(other) => Err(format!(
            "the encoder returned {}; return {{contentType, data, metadata}}, an array of them, \
             or null",
            type_name(&other)
        )),
    }
}

fn message(item: Value, at: &str) -> Result<Message, String> {
    let Value::Object(mut fields) = item else {
        return Err(format!(
            "{at}: expected an object {{contentType, data, metadata}}, got {}",
            type_name(&item)
        ));
    };
    let content_type = match fields.get("contentType") {
        None => return Err(format!("{at}.contentType: missing (JSON, TEXT or BINARY)")),
        Some(Value::String(name)) => ContentType::parse(name).ok_or_else(|| {
            format!("{at}.contentType: {name:?} is not one of JSON, TEXT, BINARY")
        })?,
        Some(other) => {
            return Err(format!(
                "{at}.contentType: expected \"JSON\", \"TEXT\" or \"BINARY\", got {}",
                type_name(other)
            ))
        }
    };
    let data = match fields.remove("data") {
        // Device bytes are UTF-8: a lone surrogate becomes U+FFFD.
        Some(Value::String(data)) => super::text::into_well_formed(data),
        None => return Err(format!("{at}.data: missing (the message, as a string)")),
        Some(other) => {
            return Err(format!(
                "{at}.data: expected a string, got {} (JSON.stringify it, or base64 for BINARY)",
                type_name(&other)
            ))
        }
    };
    let metadata = match fields.remove("metadata") {
        // ThingsBoard reads an absent or null metadata as none.
        None | Some(Value::Null) => BTreeMap::new(),
        Some(Value::Object(entries)) => entries
            .into_iter()
            .map(|(key, value)| match scalar_text(&value) {
                Some(text) => Ok((super::text::into_well_formed(key), text)),
                None => Err(format!(
                    "{at}.metadata.{key}: expected a string, number or boolean, got {}",
                    type_name(&value)
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(format!(
                "{at}.metadata: expected an object of strings, got {}",
                type_name(&other)
            ))
        }
    };
    let bytes = match content_type {
        ContentType::Binary => Some(
            decode_base64(&data)
                .map_err(|e| format!("{at}.data: BINARY data is not base64: {e}"))?,
        ),
        ContentType::Json | ContentType::Text => None,
    };
    Ok(Message {
        content_type,
        data,
        bytes,
        metadata,
    })
}

/// Standard-alphabet base64, with or without padding, surrounding whitespace ignored: what
/// `btoa` and the usual encoders give.
fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(text.trim())
}

/// A metadata value as JavaScript's `String(value)` gives it; `None` for anything but a
/// string, number or boolean.
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(super::text::well_formed(s).into_owned()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(js_number_of(n)),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// One command for the encoder thread.
#[derive(Debug, Clone)]
pub struct EncodeJob {
    /// The Kafka record's value: the script's `msg`.
    pub value: Vec<u8>,
    /// The script's `metadata`.
    pub metadata: Vec<(String, String)>,
    pub msg_type: String,
    /// The command's Kafka offset (or 0), for the debug log.
    pub seq: u64,
    /// Names the command across restarts (`topic/partition/offset`) for the crash guard; empty:
    /// not guarded.
    pub origin: String,
}

struct Request {
    job: EncodeJob,
    reply: oneshot::Sender<Result<Vec<Downlink>, ConvertError>>,
}

/// The encoder's thread, as the downlink sees it.
pub struct Encoders {
    // Unbounded, yet bounded in practice: every caller awaits its reply before sending again, so
    // the queue never holds more than one job per concurrent caller. A full bounded channel would
    // block the async caller's worker thread. Dropping the sender ends the thread after its
    // current job; it is not joined, so a script stuck until its timeout does not hold up
    // shutdown.
    jobs: std::sync::mpsc::Sender<Request>,
    name: Arc<str>,
    /// What [`Encoders::restart`] starts the thread again with.
    config: ConverterConfig,
    debug_dir: PathBuf,
    gateway_id: String,
    debug_ring: Option<DebugRing>,
}

impl Encoders {
    /// Starts the thread and compiles the encoder on it (QuickJS runtimes cannot move between
    /// threads); a script that does not compile is reported here. `debug_dir` holds the debug
    /// log if the converter's `debug` setting wants one.
    pub fn start(
        name: &str,
        config: &ConverterConfig,
        data_dir: &Path,
        gateway_id: String,
    ) -> Result<Encoders, ConverterError> {
        Encoders::start_sharing(name, config, data_dir, gateway_id, None)
    }

    /// [`Encoders::start`], its debug events also kept in `debug_ring` (the status page's).
    pub fn start_sharing(
        name: &str,
        config: &ConverterConfig,
        data_dir: &Path,
        gateway_id: String,
        debug_ring: Option<DebugRing>,
    ) -> Result<Encoders, ConverterError> {
        let debug_dir = data_dir.join("debug");
        let jobs = spawn(name, config, &debug_dir, &gateway_id, debug_ring.clone())?;
        Ok(Encoders {
            jobs,
            name: Arc::from(name),
            config: config.clone(),
            debug_dir,
            gateway_id,
            debug_ring,
        })
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Starts a new thread after [`ConvertersGone`]; the script is read and compiled again.
    pub fn restart(&mut self) -> Result<(), ConverterError> {
        tracing::error!(converter = %self.name, "the encoder thread stopped; starting a new one");
        let ring = self.debug_ring.clone();
        self.jobs = spawn(
            &self.name,
            &self.config,
            &self.debug_dir,
            &self.gateway_id,
            ring,
        )?;
        Ok(())
    }

    /// Encodes one command on the encoder thread. The inner result is the command's own (see
    /// [`Encoder::encode`]); [`ConvertersGone`] means the thread has died: [`Encoders::restart`]
    /// it and encode the command again.
    pub async fn encode(
        &self,
        job: EncodeJob,
    ) -> Result<Result<Vec<Downlink>, ConvertError>, ConvertersGone> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Request { job, reply })
            .map_err(|_| ConvertersGone)?;
        answer.await.map_err(|_| ConvertersGone)
    }
}

fn spawn(
    name: &str,
    config: &ConverterConfig,
    debug_dir: &Path,
    gateway_id: &str,
    debug_ring: Option<DebugRing>,
) -> Result<std::sync::mpsc::Sender<Request>, ConverterError> {
    let (tx, rx) = std::sync::mpsc::channel::<Request>();
    let (loaded_tx, loaded_rx) = std::sync::mpsc::sync_channel(1);
    let (name, config) = (name.to_owned(), config.clone());
    let (debug_dir, gateway_id) = (debug_dir.to_owned(), gateway_id.to_owned());
    std::thread::Builder::new()
        .name("edgegate-encoder".into())
        .stack_size(engine::THREAD_STACK_BYTES)
        .spawn(move || {
            let mut encoder = match Encoder::new(&name, &config, Some(&debug_dir)) {
                Ok(encoder) => encoder,
                Err(e) => {
                    let _ = loaded_tx.send(Err(e));
                    return;
                }
            };
            let _ = loaded_tx.send(Ok(()));
            if let Some(ring) = debug_ring {
                encoder.debug.share_with(&name, ring);
            }
            let mut in_flight = debug_dir.parent().map(InFlight::open);
            while let Ok(request) = rx.recv() {
                let origin = &request.job.origin;
                let guard = match in_flight.as_mut().filter(|_| !origin.is_empty()) {
                    Some(g) => g.begin(origin).map(|()| Some(g)),
                    None => Ok(None),
                };
                let result = match guard {
                    Ok(guard) => {
                        let result = encode_guarded(&mut encoder, &request.job, &gateway_id);
                        if let Some(g) = guard {
                            g.end();
                        }
                        result
                    }
                    Err(crashed) => Err(crashed),
                };
                // The caller may have stopped waiting (shutdown); nothing to do then.
                let _ = request.reply.send(result);
            }
        })
        .map_err(ConverterError::Thread)?;
    loaded_rx.recv().unwrap_or_else(|_| {
        Err(ConverterError::Thread(std::io::Error::other(
            "encoder thread died at start",
        )))
    })?;
    Ok(tx)
}

/// Encodes one command; a panic fails this command only (the release profile unwinds) and the
/// runtime is recreated, as for decoders.
fn encode_guarded(
    encoder: &mut Encoder,
    job: &EncodeJob,
    gateway_id: &str,
) -> Result<Vec<Downlink>, ConvertError> {
    let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        encoder.encode(
            &job.value,
            &job.metadata,
            &job.msg_type,
            gateway_id,
            job.seq,
        )
    }));
    encoded.unwrap_or_else(|panic| {
        let message = panic_message(&*panic);
        tracing::error!(converter = %encoder.name, seq = job.seq, %message,
            "encoder panicked on a command; the command fails, the runtime is recreated");
        encoder.sandbox.reset();
        Err(ConvertError::Panicked(message))
    })
}

#[cfg(test)]
mod tests;
