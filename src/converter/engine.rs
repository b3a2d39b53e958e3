//! One sandboxed QuickJS runtime running one converter script: an uplink decoder or a downlink
//! encoder.
//!
//! The sandbox: QuickJS's own allocator with a hard memory limit (rquickjs's `rust-alloc`
//! feature would bypass it), a stack limit, an interrupt handler that stops a script at its
//! deadline, and no module loader or std/os bindings, so a script has no file, network or process
//! access.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use rquickjs::context::EvalOptions;
use rquickjs::{qjs, Array, Context, Ctx, Function, Object, Persistent, Runtime, Value};

use crate::config::ConverterKind;

use super::normalize::Entity;
use super::read::{normalize_direct, read_json, PlainClasses};

/// Stack a script may use; deep recursion ends in a RangeError well before the thread's stack.
const SCRIPT_STACK_BYTES: usize = 512 * 1024;
/// Stack of the thread that runs converters; comfortably above [`SCRIPT_STACK_BYTES`].
pub const THREAD_STACK_BYTES: usize = 4 * 1024 * 1024;

/// Helpers ThingsBoard provides to every decoder; encoders get them too, as they cost nothing. A
/// script's own function declarations shadow them, as they do in ThingsBoard. Chunked so a payload
/// beyond the argument-count limit of `apply` still decodes.
const PRELUDE: &str = r#"
globalThis.decodeToString = function decodeToString(payload) {
  var s = '';
  for (var i = 0; i < payload.length; i += 8192) {
    s += String.fromCharCode.apply(String, payload.slice(i, i + 8192));
  }
  return s;
};
globalThis.decodeToJson = function decodeToJson(payload) {
  return JSON.parse(decodeToString(payload));
};
"#;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub memory_bytes: usize,
}

/// Why a call produced no result. Each variant is a property of this record and this script.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The script threw (or failed to compile); the message is the script's own.
    #[error("{0}")]
    Exception(String),
    /// The deadline passed; the runtime must be recreated before the next call.
    #[error("timed out")]
    Timeout,
    /// The memory limit was reached; the runtime must be recreated before the next call.
    #[error("out of memory")]
    OutOfMemory,
}

impl EngineError {
    /// After these the runtime's heap may be in any state; start from a fresh one.
    pub fn poisons_runtime(&self) -> bool {
        matches!(self, EngineError::Timeout | EngineError::OutOfMemory)
    }
}

/// A compile error, with the line in the script file when QuickJS reports one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileError {
    pub line: Option<u32>,
    pub message: String,
}

pub struct Engine {
    // Field order is drop order: the function handle must go before its runtime.
    /// The compiled `Decoder` or `Encoder` function.
    function: Persistent<Function<'static>>,
    context: Context,
    _runtime: Runtime,
    deadline: Rc<Cell<Option<Instant>>>,
    interrupted: Rc<Cell<bool>>,
    timeout: Duration,
    memory_bytes: usize,
    classes: PlainClasses,
    /// Reused for every payload array: one allocation less per record.
    payload_values: Vec<qjs::JSValue>,
    metadata_keys: KeyAtoms,
}

impl Drop for Engine {
    fn drop(&mut self) {
        let atoms = std::mem::take(&mut self.metadata_keys.0);
        self.context.with(|ctx| {
            for (_, atom) in atoms {
                // SAFETY: the atom was created in this context and is held only here.
                unsafe { qjs::JS_FreeAtom(ctx.as_raw().as_ptr(), atom) };
            }
        });
    }
}

/// Payload array slots kept between records (1 MiB); frames are far smaller.
const KEPT_PAYLOAD_VALUES: usize = 64 * 1024;

/// Metadata keys as QuickJS atoms, kept for the engine's life: creating and freeing the same few
/// atoms for every record showed in profiles. Bounded, as metadata keys come from the
/// configuration and the sources.
#[derive(Default)]
struct KeyAtoms(Vec<(String, qjs::JSAtom)>);

/// More distinct keys than any configuration has; past it, keys are looked up each time.
const MAX_KEY_ATOMS: usize = 64;

impl KeyAtoms {
    fn get<'a>(&mut self, ctx: &Ctx<'_>, key: &'a str) -> Key<'a> {
        if let Some((_, atom)) = self.0.iter().find(|(k, _)| k == key) {
            return Key::Atom(*atom);
        }
        if self.0.len() >= MAX_KEY_ATOMS {
            return Key::Text(key);
        }
        // SAFETY: the context is live on this thread; the atom is freed in `Engine::drop`.
        let atom = unsafe {
            qjs::JS_NewAtomLen(ctx.as_raw().as_ptr(), key.as_ptr().cast(), key.len() as _)
        };
        if atom == qjs::JS_ATOM_NULL {
            return Key::Text(key);
        }
        self.0.push((key.to_owned(), atom));
        Key::Atom(atom)
    }
}

enum Key<'a> {
    Atom(qjs::JSAtom),
    Text(&'a str),
}

fn set_string<'js>(
    ctx: &Ctx<'js>,
    object: &Object<'js>,
    key: Key<'_>,
    value: &str,
) -> rquickjs::Result<()> {
    let atom = match key {
        Key::Text(key) => return object.set(key, value),
        Key::Atom(atom) => atom,
    };
    let raw = ctx.as_raw().as_ptr();
    // SAFETY: the context and object are live on this thread; JS_DefinePropertyValue takes the
    // new string's reference whatever it returns.
    unsafe {
        let text = qjs::JS_NewStringLen(raw, value.as_ptr().cast(), value.len() as _);
        if qjs::JS_IsException(text) {
            return Err(rquickjs::Error::Exception);
        }
        let flags = qjs::JS_PROP_C_W_E as i32;
        if qjs::JS_DefinePropertyValue(raw, object.as_raw(), atom, text, flags) < 0 {
            return Err(rquickjs::Error::Exception);
        }
    }
    Ok(())
}

impl Engine {
    /// Compiles `body` as the body of the function `kind` names: `Decoder(payload, metadata)` or
    /// `Encoder(msg, metadata, msgType, integrationMetadata)`, ThingsBoard's signatures.
    pub fn compile(
        kind: ConverterKind,
        body: &str,
        filename: &str,
        limits: Limits,
    ) -> Result<Engine, CompileError> {
        let engine_err = |e: rquickjs::Error| CompileError {
            line: None,
            message: format!("javascript engine: {e}"),
        };
        super::math::install();
        super::number::install();
        let runtime = Runtime::new().map_err(engine_err)?;
        runtime.set_memory_limit(limits.memory_bytes);
        runtime.set_max_stack_size(SCRIPT_STACK_BYTES);
        let deadline: Rc<Cell<Option<Instant>>> = Rc::new(Cell::new(None));
        let interrupted = Rc::new(Cell::new(false));
        let (d, i) = (deadline.clone(), interrupted.clone());
        runtime.set_interrupt_handler(Some(Box::new(move || {
            let late = d.get().is_some_and(|t| Instant::now() >= t);
            if late {
                i.set(true);
            }
            late
        })));
        let context = Context::full(&runtime).map_err(engine_err)?;
        deadline.set(Some(
            Instant::now() + limits.timeout.max(Duration::from_secs(5)),
        ));
        let function = context.with(|ctx| compile(&ctx, signature(kind), body, filename));
        deadline.set(None);
        // SAFETY: the context is live and used on this thread only.
        let classes = context.with(|ctx| unsafe { PlainClasses::of(ctx.as_raw().as_ptr()) });
        Ok(Engine {
            function: function?,
            memory_bytes: limits.memory_bytes,
            classes,
            payload_values: Vec::new(),
            metadata_keys: KeyAtoms::default(),
            context,
            _runtime: runtime,
            deadline,
            interrupted,
            timeout: limits.timeout,
        })
    }

    /// Runs the decoder and returns its result as `JSON.stringify` would see it, `None` for
    /// `undefined` (or anything else JSON cannot represent, such as a function).
    pub fn call(
        &mut self,
        payload: &[u8],
        metadata: &[(&str, &str)],
    ) -> Result<Option<serde_json::Value>, EngineError> {
        let (classes, budget) = (self.classes, self.memory_bytes);
        self.run(payload, metadata, |ctx, out| {
            to_json(ctx, classes, budget, out)
        })
    }

    /// Runs the decoder and normalizes a plain, valid result directly; anything else comes back
    /// as [`Converted::Result`] for the general rules.
    pub fn convert(
        &mut self,
        payload: &[u8],
        metadata: &[(&str, &str)],
        captured_ms: u64,
    ) -> Result<Converted, EngineError> {
        let (classes, budget) = (self.classes, self.memory_bytes);
        self.run(payload, metadata, |ctx, out| {
            let raw = ctx.as_raw().as_ptr();
            // SAFETY: `out` is a live value of this context, which this thread holds.
            let direct =
                unsafe { normalize_direct(raw, classes, out.as_raw(), captured_ms, budget) };
            match direct {
                Some(entities) => Ok(Converted::Entities(entities)),
                None => to_json(ctx, classes, budget, out).map(Converted::Result),
            }
        })
    }

    /// Runs the decoder on one record.
    fn run<R>(
        &mut self,
        payload: &[u8],
        metadata: &[(&str, &str)],
        finish: impl for<'js> FnOnce(&Ctx<'js>, Value<'js>) -> rquickjs::Result<R>,
    ) -> Result<R, EngineError> {
        let result = self.guarded(|ctx, f, values, atoms| {
            let payload = payload_array(ctx, payload, values)?;
            let meta = Object::new(ctx.clone())?;
            for (k, v) in metadata {
                set_string(ctx, &meta, atoms.get(ctx, k), v)?;
            }
            let out: Value = f.call((payload, meta))?;
            finish(ctx, out)
        });
        if self.payload_values.capacity() > KEPT_PAYLOAD_VALUES {
            // One large payload must not keep its 16 bytes per byte for the engine's life.
            self.payload_values = Vec::new();
        }
        result
    }

    /// Runs the encoder on one command and returns its result as [`Engine::call`] does. `msg` is
    /// the command's JSON value when its bytes are JSON, its text otherwise (ThingsBoard hands
    /// encoders the parsed message body); the metadata tables become objects of strings.
    pub fn encode(
        &mut self,
        msg: &[u8],
        metadata: &[(&str, &str)],
        msg_type: &str,
        integration_metadata: &[(&str, &str)],
    ) -> Result<Option<serde_json::Value>, EngineError> {
        let (classes, budget) = (self.classes, self.memory_bytes);
        self.guarded(|ctx, f, _, _| {
            let msg = msg_value(ctx, msg)?;
            let meta = string_object(ctx, metadata)?;
            let integration = string_object(ctx, integration_metadata)?;
            let out: Value = f.call((msg, meta, msg_type, integration))?;
            to_json(ctx, classes, budget, out)
        })
    }

    /// Calls the script's function under the deadline; what goes wrong becomes an
    /// [`EngineError`].
    fn guarded<R>(
        &mut self,
        call: impl for<'js> FnOnce(
            &Ctx<'js>,
            Function<'js>,
            &mut Vec<qjs::JSValue>,
            &mut KeyAtoms,
        ) -> rquickjs::Result<R>,
    ) -> Result<R, EngineError> {
        self.interrupted.set(false);
        self.deadline.set(Some(Instant::now() + self.timeout));
        let function = self.function.clone();
        let interrupted = self.interrupted.clone();
        let values = &mut self.payload_values;
        let atoms = &mut self.metadata_keys;
        let result = self.context.with(|ctx| {
            let run = || -> rquickjs::Result<R> {
                let f = function.restore(&ctx)?;
                call(&ctx, f, values, atoms)
            };
            run().map_err(|e| classify(&ctx, e, interrupted.get()))
        });
        self.deadline.set(None);
        result
    }
}

/// The wrapper a script body is compiled in.
fn signature(kind: ConverterKind) -> &'static str {
    match kind {
        ConverterKind::Decoder => "function Decoder(payload, metadata)",
        ConverterKind::Encoder => "function Encoder(msg, metadata, msgType, integrationMetadata)",
    }
}

/// An encoder's `msg`: the parsed value when the bytes are JSON (parsed by QuickJS itself, so
/// numbers are exactly what `JSON.parse` gives a script), the text otherwise, with invalid UTF-8
/// replaced.
fn msg_value<'js>(ctx: &Ctx<'js>, msg: &[u8]) -> rquickjs::Result<Value<'js>> {
    // JSON text is UTF-8 (RFC 8259) and never holds a raw NUL, which `json_parse` cannot take.
    let maybe_json = std::str::from_utf8(msg).is_ok() && !msg.contains(&0);
    if maybe_json {
        match ctx.json_parse(msg) {
            Ok(value) => return Ok(value),
            Err(rquickjs::Error::Exception) => {
                let caught = ctx.catch();
                // Out of memory or a nesting too deep for the stack are failures of this command,
                // not a sign that it is text.
                if !is_syntax_error(&caught) {
                    return Err(ctx.throw(caught));
                }
            }
            Err(e) => return Err(e),
        }
    }
    let text = String::from_utf8_lossy(msg);
    rquickjs::String::from_str(ctx.clone(), &text).map(rquickjs::String::into_value)
}

fn is_syntax_error(caught: &Value<'_>) -> bool {
    caught
        .as_object()
        .and_then(|o| o.get::<_, String>("name").ok())
        .is_some_and(|name| name == "SyntaxError")
}

/// A fresh object holding `entries` as string properties.
fn string_object<'js>(ctx: &Ctx<'js>, entries: &[(&str, &str)]) -> rquickjs::Result<Object<'js>> {
    let object = Object::new(ctx.clone())?;
    for (k, v) in entries {
        object.set(*k, *v)?;
    }
    Ok(object)
}

/// What [`Engine::convert`] made of a result.
pub enum Converted {
    /// A plain, valid result, already normalized.
    Entities(Vec<Entity>),
    /// Anything else, as JSON (`None` for undefined): `normalize` judges it.
    Result(Option<serde_json::Value>),
}

/// A result as JSON: read directly when plain, through JSON.stringify's own rules otherwise
/// (toJSON, boxed values, proxies, cycles).
fn to_json<'js>(
    ctx: &Ctx<'js>,
    classes: PlainClasses,
    budget: usize,
    out: Value<'js>,
) -> rquickjs::Result<Option<serde_json::Value>> {
    // SAFETY: `out` is a live value of this context, which this thread holds.
    let direct = unsafe { read_json(ctx.as_raw().as_ptr(), classes, out.as_raw(), budget) };
    if let Some(json) = direct {
        return Ok(json);
    }
    let Some(text) = ctx.json_stringify(out)? else {
        return Ok(None);
    };
    serde_json::from_str(&super::text::carry_escapes(&text.to_string()?))
        .map(Some)
        .map_err(|e| rquickjs::Error::new_from_js_message("JSON", "value", e.to_string()))
}

fn compile<'js>(
    ctx: &Ctx<'js>,
    signature: &str,
    body: &str,
    filename: &str,
) -> Result<Persistent<Function<'static>>, CompileError> {
    let fail = |ctx: &Ctx<'js>, e: rquickjs::Error| {
        let caught = ctx.catch();
        let message = describe(&caught).unwrap_or_else(|| e.to_string());
        CompileError {
            line: error_line(&caught, filename),
            message,
        }
    };
    ctx.eval::<(), _>(PRELUDE).map_err(|e| fail(ctx, e))?;
    let mut options = EvalOptions::default();
    options.strict = false; // ThingsBoard converters are sloppy-mode scripts.
    options.backtrace_barrier = true;
    options.filename = Some(filename.to_owned());
    // The body starts on the wrapper's first line so script line numbers stay true.
    let source = format!("({signature} {{{body}\n}})");
    let f: Function = ctx
        .eval_with_options(source, options)
        .map_err(|e| fail(ctx, e))?;
    Ok(Persistent::save(ctx, f))
}

/// ThingsBoard's payload quirk: valid UTF-8 arrives as the UTF-16 code units of its text (so
/// `String.fromCharCode.apply` gives the text back), anything else as raw bytes.
fn payload_array<'js>(
    ctx: &Ctx<'js>,
    payload: &[u8],
    values: &mut Vec<qjs::JSValue>,
) -> rquickjs::Result<Array<'js>> {
    let int = |v: i32| qjs::JS_MKVAL(qjs::JS_TAG_INT, v);
    values.clear();
    // ASCII is both valid UTF-8 and its own UTF-16; checking it first skips the validation.
    let text = (!payload.is_ascii())
        .then(|| std::str::from_utf8(payload).ok())
        .flatten();
    match text {
        Some(text) => values.extend(text.encode_utf16().map(|u| int(i32::from(u)))),
        None => values.extend(payload.iter().map(|b| int(i32::from(*b)))),
    }
    let count = i32::try_from(values.len()).map_err(|_| rquickjs::Error::Allocation)?;
    // One allocation instead of a property write per byte: the hot spot of every conversion.
    // SAFETY: the context pointer is valid inside `Context::with`; integers carry no reference
    // count, so QuickJS taking "ownership" of the copied values needs nothing from us.
    let raw = unsafe { qjs::JS_NewArrayFrom(ctx.as_raw().as_ptr(), count, values.as_ptr()) };
    // SAFETY: reading the tag of a value just returned by QuickJS.
    if unsafe { qjs::JS_VALUE_GET_TAG(raw) } == qjs::JS_TAG_EXCEPTION {
        return Err(rquickjs::Error::Exception);
    }
    // SAFETY: `raw` is a new, owned array value of this context.
    let value = unsafe { Value::from_raw(ctx.clone(), raw) };
    Array::from_value(value)
}

fn classify(ctx: &Ctx<'_>, e: rquickjs::Error, interrupted: bool) -> EngineError {
    if interrupted {
        // The pending exception is QuickJS's "interrupted"; clear it.
        let _ = ctx.catch();
        return EngineError::Timeout;
    }
    match e {
        rquickjs::Error::Exception => {
            let caught = ctx.catch();
            let message = describe(&caught).unwrap_or_else(|| "exception".into());
            // QuickJS throws `null` when it cannot even allocate its "out of memory" error (seen
            // with many small objects); a script's own `throw null` is taken for it too, which
            // only costs a fresh runtime.
            if caught.is_null() || message.contains("out of memory") {
                EngineError::OutOfMemory
            } else {
                EngineError::Exception(message)
            }
        }
        rquickjs::Error::Allocation => EngineError::OutOfMemory,
        other => {
            let text = other.to_string();
            if text.contains("out of memory") {
                EngineError::OutOfMemory
            } else {
                EngineError::Exception(text)
            }
        }
    }
}

/// `Name: message` for Error objects, the value itself for anything else thrown.
fn describe(caught: &Value<'_>) -> Option<String> {
    if let Some(obj) = caught.as_object() {
        let name: Option<String> = obj.get("name").ok();
        let message: Option<String> = obj.get("message").ok();
        if let Some(message) = message {
            let name = name.unwrap_or_else(|| "Error".into());
            return Some(format!("{name}: {message}"));
        }
    }
    if let Some(s) = caught.as_string() {
        return s.to_string().ok();
    }
    caught
        .ctx()
        .json_stringify(caught.clone())
        .ok()
        .flatten()
        .and_then(|s| s.to_string().ok())
}

/// The script line of an error, from QuickJS's `lineNumber` or from its stack (`at file:LINE`).
fn error_line(caught: &Value<'_>, filename: &str) -> Option<u32> {
    let obj = caught.as_object()?;
    if let Ok(line) = obj.get::<_, u32>("lineNumber") {
        return Some(line);
    }
    let stack: String = obj.get("stack").ok()?;
    let at = stack.find(&format!("{filename}:"))? + filename.len() + 1;
    let digits: String = stack[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}
