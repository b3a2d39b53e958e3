//! Reads a decoder's plain result (objects, arrays, strings, numbers, booleans, null) the way
//! `JSON.stringify` would, without printing and re-parsing it.
//!
//! This goes through QuickJS's C API instead of rquickjs's typed handles: each rquickjs value
//! carries its own context reference, and taking and dropping those for every property cost
//! about a fifth of a conversion. Anything that needs `JSON.stringify`'s full rules (`toJSON`,
//! boxed primitives, proxies, class instances, cycles, getters that throw) makes the reader give
//! up with `None`, and the caller falls back to `JSON.stringify` itself.
//!
//! [`normalize_direct`] goes one step further for the common case, a valid plain result: it
//! writes the normalized entities' JSON text straight from the JS values, without building a
//! `serde_json::Value` tree, normalizing it and printing it. Whatever it does not handle (an
//! invalid result included) it leaves to the general path, which yields the same text or the
//! precise error.

use rquickjs::qjs;
use serde_json::Value as J;

use super::normalize::{timestamp, Entity};
use super::{number, text};

/// Deepest result structure read directly; deeper (or cyclic) results go through JSON.stringify.
const MAX_DEPTH: u32 = 64;

/// The class ids of `{}` and `[]`, the only objects read directly.
#[derive(Debug, Clone, Copy)]
pub struct PlainClasses {
    object: qjs::JSClassID,
    array: qjs::JSClassID,
}

impl PlainClasses {
    /// Asks QuickJS rather than hard-coding its internal class numbering.
    ///
    /// # Safety
    /// `ctx` must be a live context of the calling thread.
    pub unsafe fn of(ctx: *mut qjs::JSContext) -> PlainClasses {
        let object = qjs::JS_NewObject(ctx);
        let array = qjs::JS_NewArray(ctx);
        let classes = PlainClasses {
            object: qjs::JS_GetClassID(object),
            array: qjs::JS_GetClassID(array),
        };
        qjs::JS_FreeValue(ctx, object);
        qjs::JS_FreeValue(ctx, array);
        classes
    }
}

/// Reads one result. `None` when the value needs JSON.stringify's full rules; `Some(None)` for
/// what it omits (undefined, functions, symbols).
///
/// `budget` bounds what the Rust copy may hold, in bytes (the script's own memory limit is a
/// fair bound): past it the reader gives up and JSON.stringify runs under QuickJS's limit, so a
/// result such as an array with a length of a billion fails as out of memory instead of
/// exhausting the gateway's.
///
/// # Safety
/// `ctx` must be the live context `value` belongs to, on the calling thread.
pub unsafe fn read_json(
    ctx: *mut qjs::JSContext,
    classes: PlainClasses,
    value: qjs::JSValue,
    budget: usize,
) -> Option<Option<J>> {
    with_reader(ctx, classes, budget, |reader| reader.json(value))
}

/// The normalized entities of a valid plain decoder result, as `normalize` would give them.
/// `None` for anything else: the caller takes the general path.
///
/// # Safety
/// As [`read_json`].
pub unsafe fn normalize_direct(
    ctx: *mut qjs::JSContext,
    classes: PlainClasses,
    value: qjs::JSValue,
    captured_ms: u64,
    budget: usize,
) -> Option<Vec<Entity>> {
    with_reader(ctx, classes, budget, |reader| {
        reader.captured_ms = captured_ms;
        reader.entities(value)
    })
}

unsafe fn with_reader<R>(
    ctx: *mut qjs::JSContext,
    classes: PlainClasses,
    budget: usize,
    f: impl FnOnce(&mut Reader) -> R,
) -> R {
    let name = "toJSON";
    let to_json = qjs::JS_NewAtomLen(ctx, name.as_ptr().cast(), name.len() as _);
    let mut reader = Reader {
        ctx,
        classes,
        to_json,
        budget,
        captured_ms: 0,
    };
    let result = f(&mut reader);
    qjs::JS_FreeAtom(ctx, to_json);
    result
}

struct Reader {
    ctx: *mut qjs::JSContext,
    classes: PlainClasses,
    to_json: qjs::JSAtom,
    budget: usize,
    captured_ms: u64,
}

/// Rough bytes of one `serde_json::Value` and its slot in a map or vector.
const VALUE_COST: usize = 64;

impl Reader {
    fn spend(&mut self, bytes: usize) -> Option<()> {
        self.budget = self.budget.checked_sub(bytes)?;
        Some(())
    }

    /// `v` as a JSON value, by way of its text: the tree is only needed off the hot path
    /// (`--raw`, and results the direct normalizer hands over). `v` is borrowed.
    unsafe fn json(&mut self, v: qjs::JSValue) -> Option<Option<J>> {
        let mut text = Vec::new();
        if !self.write(v, 0, &mut text)? {
            return Some(None);
        }
        // The text has JSON.stringify's escapes for lone surrogates; carry them again (and a
        // real U+FDD0 doubled), as every string in edgegate's values is.
        let text = String::from_utf8(text).ok()?;
        serde_json::from_str(&text::carry_escapes(&text))
            .ok()
            .map(Some)
    }

    /// [`Reader::json`] without the round trip through text for numbers, which every reading's
    /// `ts` is: this runs once per telemetry entry.
    unsafe fn scalar_json(&mut self, v: qjs::JSValue) -> Option<Option<J>> {
        match qjs::JS_VALUE_GET_NORM_TAG(v) {
            qjs::JS_TAG_INT => Some(Some(J::from(qjs::JS_VALUE_GET_INT(v)))),
            qjs::JS_TAG_FLOAT64 => Some(Some(number(qjs::JS_VALUE_GET_FLOAT64(v)))),
            _ => self.json(v),
        }
    }

    /// The own enumerable string-keyed properties of a plain object, as JSON.stringify visits
    /// them; `None` for an object with a `toJSON` method or a getter that throws.
    unsafe fn props(&mut self, v: qjs::JSValue) -> Option<Props> {
        if !self.lacks_to_json(v) {
            return None;
        }
        let mut props = Props {
            ctx: self.ctx,
            tab: std::ptr::null_mut(),
            len: 0,
            values: Vec::new(),
        };
        let flags = (qjs::JS_GPN_STRING_MASK | qjs::JS_GPN_ENUM_ONLY) as i32;
        if qjs::JS_GetOwnPropertyNames(self.ctx, &mut props.tab, &mut props.len, v, flags) < 0 {
            return None;
        }
        props.values.reserve(props.len as usize);
        for i in 0..props.len as usize {
            let item = qjs::JS_GetProperty(self.ctx, v, (*props.tab.add(i)).atom);
            props.values.push(item);
            if qjs::JS_IsException(item) {
                return None;
            }
        }
        Some(props)
    }

    /// JSON.stringify calls a `toJSON` method (own or inherited); only objects without one are
    /// read directly.
    unsafe fn lacks_to_json(&mut self, v: qjs::JSValue) -> bool {
        let method = qjs::JS_GetProperty(self.ctx, v, self.to_json);
        let plain = qjs::JS_IsUndefined(method);
        qjs::JS_FreeValue(self.ctx, method);
        plain
    }

    unsafe fn string(&mut self, v: qjs::JSValue) -> Option<String> {
        self.with_string(v, |_, text| text.to_owned())
    }

    /// Lends a JS string's UTF-8 text to `f`; no copy for ASCII, the common case.
    unsafe fn with_string<R>(
        &mut self,
        v: qjs::JSValue,
        f: impl FnOnce(&mut Self, &str) -> R,
    ) -> Option<R> {
        let mut len = 0;
        let text = qjs::JS_ToCStringLen2(self.ctx, &mut len, v, false);
        self.lend(text, len, f)
    }

    unsafe fn with_atom<R>(
        &mut self,
        atom: qjs::JSAtom,
        f: impl FnOnce(&mut Self, &str) -> R,
    ) -> Option<R> {
        let mut len = 0;
        let text = qjs::JS_AtomToCStringLen(self.ctx, &mut len, atom);
        self.lend(text, len, f)
    }

    /// Lends and then frees a C string from QuickJS (lone surrogates carried, see [`text`]).
    unsafe fn lend<R>(
        &mut self,
        text: *const std::ffi::c_char,
        len: qjs::size_t,
        f: impl FnOnce(&mut Self, &str) -> R,
    ) -> Option<R> {
        if text.is_null() {
            return None;
        }
        // size_t is u32 on armv7 and u64 on 64-bit boards; it always fits usize.
        let len = len as usize;
        let bytes = std::slice::from_raw_parts(text.cast::<u8>(), len);
        let result = self.spend(len).map(|()| f(self, &text::from_wtf8(bytes)));
        qjs::JS_FreeCString(self.ctx, text);
        result
    }
}

/// Writing JSON text, and the normalized entity shape, straight from JS values.
impl Reader {
    /// Writes `v` as JSON.stringify would; `Some(false)` (nothing written) for what it omits.
    unsafe fn write(&mut self, v: qjs::JSValue, depth: u32, out: &mut Vec<u8>) -> Option<bool> {
        self.spend(VALUE_COST)?;
        match qjs::JS_VALUE_GET_NORM_TAG(v) {
            qjs::JS_TAG_UNDEFINED | qjs::JS_TAG_UNINITIALIZED | qjs::JS_TAG_SYMBOL => {
                return Some(false)
            }
            qjs::JS_TAG_NULL => out.extend_from_slice(b"null"),
            qjs::JS_TAG_BOOL if qjs::JS_VALUE_GET_BOOL(v) => out.extend_from_slice(b"true"),
            qjs::JS_TAG_BOOL => out.extend_from_slice(b"false"),
            qjs::JS_TAG_INT => serde_json::to_writer(&mut *out, &qjs::JS_VALUE_GET_INT(v)).ok()?,
            qjs::JS_TAG_FLOAT64 => write_number(out, qjs::JS_VALUE_GET_FLOAT64(v))?,
            qjs::JS_TAG_STRING | qjs::JS_TAG_STRING_ROPE => self.write_string(v, out)?,
            qjs::JS_TAG_OBJECT if depth < MAX_DEPTH => return self.write_object(v, depth, out),
            _ => return None,
        }
        Some(true)
    }

    unsafe fn write_object(
        &mut self,
        v: qjs::JSValue,
        depth: u32,
        out: &mut Vec<u8>,
    ) -> Option<bool> {
        let class = qjs::JS_GetClassID(v);
        if class == self.classes.array {
            self.write_array(v, depth, out)?;
        } else if class == self.classes.object {
            let props = self.props(v)?;
            self.write_props(&props, depth, out)?;
        } else {
            return qjs::JS_IsFunction(self.ctx, v).then_some(false);
        }
        Some(true)
    }

    unsafe fn write_props(&mut self, props: &Props, depth: u32, out: &mut Vec<u8>) -> Option<()> {
        out.push(b'{');
        let mut first = true;
        for (atom, item) in props.iter() {
            if self.omitted(item) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            self.write_atom(atom, out)?;
            out.push(b':');
            self.write(item, depth + 1, out)?;
        }
        out.push(b'}');
        Some(())
    }

    unsafe fn write_array(&mut self, v: qjs::JSValue, depth: u32, out: &mut Vec<u8>) -> Option<()> {
        let mut len: i64 = 0;
        if qjs::JS_GetLength(self.ctx, v, &mut len) < 0 {
            return None;
        }
        let len = usize::try_from(len).ok()?;
        self.spend(len.checked_mul(VALUE_COST)?)?;
        out.push(b'[');
        for i in 0..len {
            if i > 0 {
                out.push(b',');
            }
            let item = qjs::JS_GetPropertyInt64(self.ctx, v, i as i64);
            let written = self.write(item, depth + 1, out);
            qjs::JS_FreeValue(self.ctx, item);
            if !written? {
                out.extend_from_slice(b"null");
            }
        }
        out.push(b']');
        Some(())
    }

    /// What JSON.stringify leaves out of an object: undefined, symbols and functions.
    unsafe fn omitted(&self, v: qjs::JSValue) -> bool {
        match qjs::JS_VALUE_GET_NORM_TAG(v) {
            qjs::JS_TAG_UNDEFINED | qjs::JS_TAG_UNINITIALIZED | qjs::JS_TAG_SYMBOL => true,
            qjs::JS_TAG_OBJECT => qjs::JS_IsFunction(self.ctx, v),
            _ => false,
        }
    }

    unsafe fn class_is(&self, v: qjs::JSValue, class: qjs::JSClassID) -> bool {
        qjs::JS_VALUE_GET_NORM_TAG(v) == qjs::JS_TAG_OBJECT && qjs::JS_GetClassID(v) == class
    }

    unsafe fn write_string(&mut self, v: qjs::JSValue, out: &mut Vec<u8>) -> Option<()> {
        self.with_string(v, |_, text| number::write_js_string(out, text))?
    }

    unsafe fn write_atom(&mut self, atom: qjs::JSAtom, out: &mut Vec<u8>) -> Option<()> {
        self.with_atom(atom, |_, key| number::write_js_string(out, key))?
    }

    /// `null`: no entities; an object: one; an array of objects: one each.
    unsafe fn entities(&mut self, v: qjs::JSValue) -> Option<Vec<Entity>> {
        if qjs::JS_IsNull(v) {
            return Some(Vec::new());
        }
        if self.class_is(v, self.classes.object) {
            return Some(vec![self.entity(v)?]);
        }
        if !self.class_is(v, self.classes.array) {
            return None;
        }
        let mut len: i64 = 0;
        if qjs::JS_GetLength(self.ctx, v, &mut len) < 0 {
            return None;
        }
        let mut entities = Vec::with_capacity(usize::try_from(len).ok()?.min(1024));
        for i in 0..len {
            let item = qjs::JS_GetPropertyInt64(self.ctx, v, i);
            let entity = if self.class_is(item, self.classes.object) {
                self.entity(item)
            } else {
                None
            };
            qjs::JS_FreeValue(self.ctx, item);
            entities.push(entity?);
        }
        Some(entities)
    }

    /// One entity, in `normalize`'s key order.
    unsafe fn entity(&mut self, v: qjs::JSValue) -> Option<Entity> {
        let props = self.props(v)?;
        let mut fields = EntityFields::default();
        let mut scratch = Vec::new();
        for (atom, item) in props.iter() {
            self.with_atom(atom, |this, key| match key {
                "attributes" => {
                    fields.attributes = this.attributes(item)?;
                    Some(())
                }
                "telemetry" => {
                    fields.telemetry = Some(this.telemetry(item)?);
                    Some(())
                }
                name => match fields.name_slot(name) {
                    Some(slot) => {
                        *slot = this.name_field(item)?;
                        Some(())
                    }
                    // JSON.stringify would still print (and could fail on) the rest.
                    None => {
                        scratch.clear();
                        this.write(item, 1, &mut scratch).map(drop)
                    }
                },
            })??;
        }
        fields.finish()
    }

    /// A name-like field: `None` to give up, `Some(None)` when absent or null.
    unsafe fn name_field(&mut self, v: qjs::JSValue) -> Option<Option<String>> {
        if self.omitted(v) || qjs::JS_IsNull(v) {
            return Some(None);
        }
        match qjs::JS_VALUE_GET_NORM_TAG(v) {
            qjs::JS_TAG_STRING | qjs::JS_TAG_STRING_ROPE => {
                let text = self.string(v)?;
                (!text.is_empty()).then_some(Some(text))
            }
            qjs::JS_TAG_INT => Some(Some(qjs::JS_VALUE_GET_INT(v).to_string())),
            qjs::JS_TAG_FLOAT64 => {
                let f = qjs::JS_VALUE_GET_FLOAT64(v);
                f.is_finite().then(|| Some(number::js_number_text(f)))
            }
            _ => None,
        }
    }

    /// The attributes object's text; `Some(None)` when absent or null.
    unsafe fn attributes(&mut self, v: qjs::JSValue) -> Option<Option<Vec<u8>>> {
        if self.omitted(v) || qjs::JS_IsNull(v) {
            return Some(None);
        }
        if !self.class_is(v, self.classes.object) {
            return None;
        }
        let mut out = Vec::with_capacity(128);
        self.write_object(v, 1, &mut out)?;
        Some(Some(out))
    }

    /// `[{ts, values}, …]` from any of ThingsBoard's telemetry forms.
    unsafe fn telemetry(&mut self, v: qjs::JSValue) -> Option<Vec<u8>> {
        if self.omitted(v) || qjs::JS_IsNull(v) {
            return Some(b"[]".to_vec());
        }
        let mut out = Vec::with_capacity(256);
        out.push(b'[');
        if self.class_is(v, self.classes.object) {
            self.telemetry_entry(v, &mut out)?;
        } else if self.class_is(v, self.classes.array) {
            let mut len: i64 = 0;
            if qjs::JS_GetLength(self.ctx, v, &mut len) < 0 {
                return None;
            }
            for i in 0..len {
                if i > 0 {
                    out.push(b',');
                }
                let item = qjs::JS_GetPropertyInt64(self.ctx, v, i);
                let written = if self.class_is(item, self.classes.object) {
                    self.telemetry_entry(item, &mut out)
                } else {
                    None
                };
                qjs::JS_FreeValue(self.ctx, item);
                written?;
            }
        } else {
            return None;
        }
        out.push(b']');
        Some(out)
    }

    /// `{ts, values}` stays as it is (a missing ts is the capture time); any other object is
    /// the values of one reading taken at capture time.
    unsafe fn telemetry_entry(&mut self, v: qjs::JSValue, out: &mut Vec<u8>) -> Option<()> {
        let props = self.props(v)?;
        let (mut ts, mut values, mut others) = (None, None, false);
        for (atom, item) in props.iter() {
            if self.omitted(item) {
                continue;
            }
            self.with_atom(atom, |_, key| match key {
                "ts" => ts = Some(item),
                "values" => values = Some(item),
                _ => others = true,
            })?;
        }
        let values = match values {
            Some(values) if self.class_is(values, self.classes.object) => Some(values),
            // Anything else JSON.stringify might print as an object: let the general path judge.
            Some(values)
                if qjs::JS_VALUE_GET_NORM_TAG(values) == qjs::JS_TAG_OBJECT
                    && !self.class_is(values, self.classes.array) =>
            {
                return None
            }
            _ => None,
        };
        let ts_form = values.filter(|_| !others);
        let ts = match (ts_form, ts) {
            (Some(_), Some(ts)) if !qjs::JS_IsNull(ts) => timestamp(&self.scalar_json(ts)??)?,
            _ => self.captured_ms,
        };
        out.extend_from_slice(b"{\"ts\":");
        serde_json::to_writer(&mut *out, &ts).ok()?;
        out.extend_from_slice(b",\"values\":");
        match ts_form {
            Some(values) => self.write_object(values, 2, out)?,
            None => {
                self.write_props(&props, 2, out)?;
                true
            }
        };
        out.push(b'}');
        Some(())
    }
}

/// An entity's fields as found in a plain result object.
#[derive(Default)]
struct EntityFields {
    device_name: Option<String>,
    device_type: Option<String>,
    device_label: Option<String>,
    asset_name: Option<String>,
    asset_type: Option<String>,
    asset_label: Option<String>,
    customer_name: Option<String>,
    group_name: Option<String>,
    attributes: Option<Vec<u8>>,
    telemetry: Option<Vec<u8>>,
}

impl EntityFields {
    fn name_slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        Some(match key {
            "deviceName" => &mut self.device_name,
            "deviceType" => &mut self.device_type,
            "deviceLabel" => &mut self.device_label,
            "assetName" => &mut self.asset_name,
            "assetType" => &mut self.asset_type,
            "assetLabel" => &mut self.asset_label,
            "customerName" => &mut self.customer_name,
            "groupName" => &mut self.group_name,
            _ => return None,
        })
    }

    /// The entity in `normalize`'s key order; `None` for an invalid one (the general path
    /// words the error).
    fn finish(self) -> Option<Entity> {
        let mut json = Vec::with_capacity(
            64 + self.attributes.as_ref().map_or(2, Vec::len)
                + self.telemetry.as_ref().map_or(2, Vec::len),
        );
        let field = |json: &mut Vec<u8>, key: &str, value: &str| -> Option<()> {
            json.push(if json.is_empty() { b'{' } else { b',' });
            number::write_js_string(json, key)?;
            json.push(b':');
            number::write_js_string(json, value)
        };
        let name = match (self.device_name, self.asset_name) {
            (Some(name), None) => {
                field(&mut json, "deviceName", &name)?;
                field(
                    &mut json,
                    "deviceType",
                    self.device_type.as_deref().unwrap_or("default"),
                )?;
                if let Some(label) = &self.device_label {
                    field(&mut json, "deviceLabel", label)?;
                }
                name
            }
            (None, Some(name)) => {
                field(&mut json, "assetName", &name)?;
                field(&mut json, "assetType", self.asset_type.as_deref()?)?;
                if let Some(label) = &self.asset_label {
                    field(&mut json, "assetLabel", label)?;
                }
                name
            }
            _ => return None,
        };
        for (key, value) in [
            ("customerName", &self.customer_name),
            ("groupName", &self.group_name),
        ] {
            if let Some(value) = value {
                field(&mut json, key, value)?;
            }
        }
        json.extend_from_slice(b",\"attributes\":");
        json.extend_from_slice(self.attributes.as_deref().unwrap_or(b"{}"));
        json.extend_from_slice(b",\"telemetry\":");
        json.extend_from_slice(self.telemetry.as_deref().unwrap_or(b"[]"));
        json.push(b'}');
        Some(Entity { name, json })
    }
}

/// An object's enumerable own properties and their values, owned until dropped.
struct Props {
    ctx: *mut qjs::JSContext,
    tab: *mut qjs::JSPropertyEnum,
    len: u32,
    values: Vec<qjs::JSValue>,
}

impl Props {
    fn atoms(&self) -> impl Iterator<Item = qjs::JSAtom> + '_ {
        let entries: &[qjs::JSPropertyEnum] = if self.tab.is_null() {
            &[]
        } else {
            // SAFETY: QuickJS filled `tab` with `len` entries, freed only in `drop`.
            unsafe { std::slice::from_raw_parts(self.tab, self.len as usize) }
        };
        entries.iter().map(|e| e.atom)
    }

    /// (key, value) pairs; the values stay owned by `self`.
    fn iter(&self) -> impl Iterator<Item = (qjs::JSAtom, qjs::JSValue)> + '_ {
        self.atoms().zip(self.values.iter().copied())
    }
}

impl Drop for Props {
    fn drop(&mut self) {
        // SAFETY: the values and the table are ours, from this live context.
        unsafe {
            for v in &self.values {
                qjs::JS_FreeValue(self.ctx, *v);
            }
            if !self.tab.is_null() {
                qjs::JS_FreePropertyEnum(self.ctx, self.tab, self.len);
            }
        }
    }
}

/// Writes what [`number`] gives, without building it.
fn write_number(out: &mut Vec<u8>, f: f64) -> Option<()> {
    match integral(f) {
        Some(i) => serde_json::to_writer(out, &i).ok(),
        None => {
            number::write_js_number(out, f);
            Some(())
        }
    }
}

/// A JS number as JSON.stringify prints it: integral values without a fraction, NaN and
/// infinities as null.
fn number(f: f64) -> J {
    match integral(f) {
        Some(i) => J::from(i),
        None => serde_json::Number::from_f64(f).map_or(J::Null, J::Number),
    }
}

/// Integral values JSON.stringify prints without a fraction (and exactly, below 2^53).
fn integral(f: f64) -> Option<i64> {
    const SAFE: f64 = 9_007_199_254_740_992.0; // 2^53
    (f.fract() == 0.0 && f.abs() < SAFE).then_some(f as i64)
}
