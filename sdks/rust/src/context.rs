//! What a handler receives: the typed invoke event and a `Context` scoped to its own attempt
//! (the handler contract of `docs/architecture/udf.md`, the same in the Python and Node SDKs).
//!
//! Rows (`emit_rows`) and events (`emit_event`) are collected while the handler runs. After it
//! returns `Ok`, the runtime publishes the rows as inline buffer batches keyed `{key}.{i}` (the
//! default key is `{dataset}.{n}`, `n` counting the handler's `emit_rows` calls for that
//! dataset, so a retry of the same input publishes the same keys and the Dispatcher skips them);
//! the events travel in the response and commit with the completion. A handler that fails
//! publishes nothing.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::client::{TaskApiError, TaskSurface};
use crate::json::Value;

/// The invoke event: the task payload plus what the attempt needs to act as itself.
#[derive(Clone, Debug)]
pub struct Event {
    pub task_id: String,
    pub org_id: String,
    pub operator: String,
    pub attempt: i64,
    pub max_attempts: i64,
    pub timeout_s: f64,
    pub status: String,
    pub staging_prefix: String,
    pub capability_token: String,
    pub lease_token: String,
    pub lease_expires_at: String,
    pub bundle_url: String,
    /// The task's own input (`work_payload`): a JSON object.
    pub payload: Value,
    /// The whole event as received.
    pub raw: Value,
}

impl Event {
    /// Read an invoke event; the error says which field is missing or mistyped.
    pub fn from_value(raw: Value) -> Result<Event, String> {
        if !raw.is_object() {
            return Err(format!(
                "the event is not a JSON object (it is {} {})",
                article(raw.kind()),
                raw.kind()
            ));
        }
        let text = |k: &str, required: bool| -> Result<String, String> {
            match raw.get(k).and_then(Value::as_str) {
                Some(s) if !s.is_empty() => Ok(s.to_string()),
                _ if !required => Ok(String::new()),
                _ => Err(format!("event.{k} must be a non-empty string")),
            }
        };
        let task_id = text("task_id", true)?;
        let lease_token = text("lease_token", true)?;
        let capability_token = text("capability_token", true)?;
        let status = text("status", false)?;
        let attempt = raw.get("attempt").and_then(Value::as_i64).filter(|a| *a >= 1);
        let attempt = attempt.ok_or("event.attempt must be an integer >= 1")?;
        let timeout_s = raw.get("timeout_s").and_then(Value::as_f64).unwrap_or(60.0);
        let payload = match raw.get("payload") {
            None | Some(Value::Null) => Value::Object(Vec::new()),
            Some(p) if p.is_object() => p.clone(),
            Some(_) => return Err("event.payload must be a JSON object".into()),
        };
        Ok(Event {
            task_id,
            lease_token,
            capability_token,
            status,
            org_id: text("org_id", false)?,
            operator: text("operator", false)?,
            staging_prefix: text("staging_prefix", false)?,
            lease_expires_at: text("lease_expires_at", false)?,
            bundle_url: text("bundle_url", false)?,
            max_attempts: raw.get("max_attempts").and_then(Value::as_i64).unwrap_or(1),
            attempt,
            timeout_s,
            payload,
            raw,
        })
    }

    /// The fence of every `/v1/task/*` call: `{task_id, attempt, lease_token}`.
    pub fn fence(&self) -> Value {
        Value::object([
            ("task_id", Value::from(self.task_id.as_str())),
            ("attempt", Value::from(self.attempt)),
            ("lease_token", Value::from(self.lease_token.as_str())),
        ])
    }

    /// `fence` plus `extra` members.
    pub fn body(&self, extra: Vec<(&str, Value)>) -> Value {
        let mut body = self.fence();
        for (k, v) in extra {
            body.set(k, v);
        }
        body
    }
}

fn article(kind: &str) -> &'static str {
    if kind.starts_with(['a', 'o']) {
        "an"
    } else {
        "a"
    }
}

/// Most rows in one inline batch.
pub const MAX_BATCH_ROWS: usize = 1000;
/// Most bytes of canonical JSON lines (sorted keys, ASCII) in one inline batch.
pub const MAX_BATCH_BYTES: usize = 240 * 1024;

/// Rows collected under one key.
#[derive(Clone, Debug)]
pub struct CollectedBatch {
    pub dataset: String,
    pub key: String,
    pub rows: Vec<Value>,
    pub scope: Option<Value>,
}

/// The handler's view of its attempt.
pub struct Context {
    event: Event,
    surface: Arc<dyn TaskSurface>,
    deadline_ms: Option<u64>,
    calls: Vec<(String, usize)>,
    /// Batches collected so far, in call order.
    pub batches: Vec<CollectedBatch>,
    /// Events committed with the completion, in call order.
    pub final_events: Vec<Value>,
}

impl Context {
    /// A context for `event` calling `surface`; `deadline_ms` is `Lambda-Runtime-Deadline-Ms`.
    pub fn new(event: Event, surface: Arc<dyn TaskSurface>, deadline_ms: Option<u64>) -> Context {
        Context {
            event,
            surface,
            deadline_ms,
            calls: Vec::new(),
            batches: Vec::new(),
            final_events: Vec::new(),
        }
    }

    /// The invoke event.
    pub fn event(&self) -> &Event {
        &self.event
    }

    /// The work payload (the task payload): a JSON object.
    pub fn payload(&self) -> &Value {
        &self.event.payload
    }

    /// Dataset names this attempt may read (its token's `grants.datasets.read`; not verified
    /// here: the Dispatcher verifies every call).
    pub fn datasets(&self) -> Vec<String> {
        granted_datasets(&self.event.capability_token)
    }

    /// Milliseconds until the deadline, or None without one.
    pub fn remaining_ms(&self) -> Option<u64> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.deadline_ms.map(|d| d.saturating_sub(now))
    }

    /// Collect rows (JSON objects) for the buffered `dataset` under the default key
    /// `{dataset}.{n}`; published after the handler returns. Returns the key.
    pub fn emit_rows(&mut self, dataset: &str, rows: Vec<Value>) -> Result<String, String> {
        self.emit_rows_with(dataset, rows, None, None)
    }

    /// `emit_rows` with your own `key` and an optional batch `scope`
    /// (`{"cursor": s}`, `{"partition_key": s}` or `{"range": {"start", "end"}}`).
    pub fn emit_rows_with(
        &mut self,
        dataset: &str,
        rows: Vec<Value>,
        key: Option<&str>,
        scope: Option<Value>,
    ) -> Result<String, String> {
        if !valid_name(dataset) {
            return Err(format!("invalid dataset name {dataset:?}"));
        }
        let n = match self.calls.iter_mut().find(|(d, _)| d == dataset) {
            Some((_, n)) => {
                *n += 1;
                *n - 1
            }
            None => {
                self.calls.push((dataset.to_string(), 1));
                0
            }
        };
        let key = key.map_or_else(|| format!("{dataset}.{n}"), str::to_string);
        if !valid_key(&key) || key.len() > 191 {
            return Err(format!("key {key:?} must match ^[A-Za-z0-9][A-Za-z0-9._:\\-/]{{0,190}}$"));
        }
        if self.batches.iter().any(|b| b.key == key) {
            return Err(format!("key {key:?} was already used in this invocation"));
        }
        if let Some(i) = rows.iter().position(|r| !r.is_object()) {
            return Err(format!("row {i} for {dataset} is not a JSON object"));
        }
        self.batches.push(CollectedBatch { dataset: dataset.to_string(), key: key.clone(), rows, scope });
        Ok(key)
    }

    /// Collect an event, committed with the completion (deduplicated per task by `key`).
    pub fn emit_event(&mut self, kind: &str, payload: Value, key: &str) -> Result<(), String> {
        if !valid_key(key) || !valid_name(kind) || !payload.is_object() {
            return Err(format!("invalid event {key:?} of type {kind:?} (payload must be an object)"));
        }
        self.final_events.push(Value::object([
            ("key", Value::from(key)),
            ("type", Value::from(kind)),
            ("payload", payload),
        ]));
        Ok(())
    }

    /// Rows of `sql` over the granted datasets (`POST /v1/task/query`), as objects keyed by
    /// column name. Errors: `not_found` for a dataset not granted, `validation_failed` for bad SQL.
    pub fn query(&self, sql: &str, max_rows: Option<i64>) -> Result<Vec<Value>, TaskApiError> {
        let answer = self.query_result(sql, max_rows)?;
        let names: Vec<String> = answer
            .get("columns")
            .and_then(Value::as_array)
            .map(|cols| {
                cols.iter()
                    .filter_map(|c| c.get("name").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let rows = answer.get("rows").and_then(Value::as_array).cloned().unwrap_or_default();
        Ok(rows
            .into_iter()
            .map(|row| {
                let cells = row.as_array().cloned().unwrap_or_default();
                Value::object(
                    names.iter().cloned().zip(cells.into_iter().chain(std::iter::repeat(Value::Null))),
                )
            })
            .collect())
    }

    /// `query`'s whole answer: `{columns: [{name, type}], rows: [[...]], truncated, versions}`.
    pub fn query_result(&self, sql: &str, max_rows: Option<i64>) -> Result<Value, TaskApiError> {
        let mut body = self.event.body(vec![("sql", Value::from(sql)), ("format", Value::from("json"))]);
        if let Some(n) = max_rows {
            body.set("max_rows", Value::from(n));
        }
        self.surface.query(&body)
    }

    /// Tell the Dispatcher the attempt is alive and keep the renewed token. Errors with
    /// `lease_lost` / `task_canceled`: stop. The Lite runner heartbeats on its own too.
    pub fn heartbeat(&self) -> Result<(), TaskApiError> {
        self.surface.heartbeat(&self.event.fence()).map(|_| ())
    }

    /// Publish every collected batch (inline, keys `{key}.{i}`); returns the number of calls.
    pub fn publish_rows(&self) -> Result<usize, Box<dyn std::error::Error + Send + Sync>> {
        let mut calls = 0;
        for batch in &self.batches {
            for (i, rows) in chunk_rows(&batch.rows)?.into_iter().enumerate() {
                let mut inline = Value::object([
                    ("key", Value::from(format!("{}.{i}", batch.key))),
                    ("dataset", Value::from(batch.dataset.as_str())),
                    ("rows", Value::Array(rows)),
                ]);
                if let Some(scope) = &batch.scope {
                    inline.set("scope", scope.clone());
                }
                self.surface.buffer_publish(&self.event.body(vec![("batch", inline)]))?;
                calls += 1;
            }
        }
        Ok(calls)
    }
}

/// Bytes of a row as a canonical JSON line (ASCII only: a non-ASCII character is `\uXXXX`,
/// two of them outside the BMP).
pub fn line_bytes(row: &Value) -> usize {
    let text = row.to_json();
    let extra: usize = text
        .chars()
        .filter(|c| !c.is_ascii())
        .map(|c| if c.len_utf16() == 2 { 12 } else { 6 } - c.len_utf8())
        .sum();
    text.len() + extra + 1
}

/// Split rows into batches of at most `MAX_BATCH_ROWS` rows and `MAX_BATCH_BYTES` bytes; an
/// error for a single row over the byte limit.
pub fn chunk_rows(rows: &[Value]) -> Result<Vec<Vec<Value>>, String> {
    let mut out = Vec::new();
    let mut current: Vec<Value> = Vec::new();
    let mut size = 0;
    for row in rows {
        let bytes = line_bytes(row);
        if bytes > MAX_BATCH_BYTES {
            return Err(format!("a row of {bytes} bytes exceeds {MAX_BATCH_BYTES}"));
        }
        if !current.is_empty() && (current.len() >= MAX_BATCH_ROWS || size + bytes > MAX_BATCH_BYTES) {
            out.push(std::mem::take(&mut current));
            size = 0;
        }
        current.push(row.clone());
        size += bytes;
    }
    if !current.is_empty() {
        out.push(current);
    }
    Ok(out)
}

/// `^[a-z][a-z0-9_.\-]{0,127}$`: dataset and event type names.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_.-".contains(c))
}

/// `^[A-Za-z0-9][A-Za-z0-9._:\-/]{0,199}$`: event and batch keys.
pub fn valid_key(key: &str) -> bool {
    let b = key.as_bytes();
    !b.is_empty()
        && b.len() <= 200
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || b"._:-/".contains(c))
}

/// The `grants.datasets.read` claim of a compact JWS (unverified).
pub fn granted_datasets(token: &str) -> Vec<String> {
    let Some(part) = token.split('.').nth(1) else { return Vec::new() };
    let Some(bytes) = base64url_decode(part) else { return Vec::new() };
    let Ok(claims) = Value::parse_bytes(&bytes) else { return Vec::new() };
    claims
        .get("grants")
        .and_then(|g| g.get("datasets"))
        .and_then(|d| d.get("read"))
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grants_from_a_token() {
        // {"grants":{"datasets":{"read":["blocks","logs"]}}}
        let token = "e30.eyJncmFudHMiOnsiZGF0YXNldHMiOnsicmVhZCI6WyJibG9ja3MiLCJsb2dzIl19fX0.sig";
        assert_eq!(granted_datasets(token), vec!["blocks", "logs"]);
        assert!(granted_datasets("nodots").is_empty());
    }

    #[test]
    fn chunks_by_rows_and_canonical_bytes() {
        let rows: Vec<Value> = (0..2500).map(|i| Value::object([("i", Value::from(i))])).collect();
        let sizes: Vec<usize> = chunk_rows(&rows).unwrap().iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1000, 1000, 500]);
        // 30,000 two-byte characters are 180,000 canonical bytes (\u00e9 each): two batches.
        let wide = Value::object([("s", Value::from("\u{e9}".repeat(30_000)))]);
        assert_eq!(line_bytes(&wide), 180_000 + 8 + 1);
        assert_eq!(chunk_rows(&[wide.clone(), wide]).unwrap().len(), 2);
        let huge = Value::object([("s", Value::from("x".repeat(MAX_BATCH_BYTES)))]);
        assert!(chunk_rows(&[huge]).unwrap_err().contains("exceeds"));
    }

    #[test]
    fn checks_names_and_keys() {
        assert!(valid_name("blocks.v2") && !valid_name("Blocks") && !valid_name(""));
        assert!(valid_key("rows:blocks:0") && !valid_key(":x") && !valid_key("a b"));
    }

    #[test]
    fn reads_an_event_or_names_the_bad_field() {
        let ok = Value::parse(r#"{"task_id":"t","attempt":2,"lease_token":"l","capability_token":"c","status":"running","timeout_s":60,"payload":{"n":1}}"#).unwrap();
        let event = Event::from_value(ok).unwrap();
        assert_eq!((event.attempt, event.payload.get("n").and_then(Value::as_i64)), (2, Some(1)));
        let bad = Value::parse(r#"{"task_id":"t","attempt":0}"#).unwrap();
        assert!(Event::from_value(bad).unwrap_err().contains("event.lease_token"));
        let bad =
            Value::parse(r#"{"task_id":"t","attempt":0,"lease_token":"l","capability_token":"c"}"#).unwrap();
        assert!(Event::from_value(bad).unwrap_err().contains("event.attempt"));
        assert!(Event::from_value(Value::Array(vec![])).unwrap_err().contains("an array"));
    }
}
