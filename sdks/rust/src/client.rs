//! The task surface a UDF reaches, as a trait (`TaskSurface`) with two implementations: HTTP to
//! `/v1/task/*` with the attempt's capability token (`HttpTaskSurface`; the base URL is
//! `TRACE_TASK_API_URL`: the Dispatcher, or the Lite runner's relay), and the local harness's
//! in-memory one (`local::LocalTaskSurface`).
//!
//! The HTTP surface holds nothing but the capability token it is given, replaced by each
//! heartbeat's renewed token. Transient failures (unreachable, 5xx) are retried with capped,
//! jittered backoff until a deadline: every call is fenced by `(task_id, attempt,
//! lease_token)` and keyed or replayed by the Dispatcher, so repeating one is safe.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::http;
use crate::json::Value;

/// The header that carries the attempt's capability token.
pub const CAPABILITY_HEADER: &str = "X-Trace-Task-Capability";

/// A `/v1/task/*` call answered with an error body (`{error, message, field?}`), or not at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskApiError {
    /// The HTTP status (0 when the Dispatcher could not be reached).
    pub status: u16,
    /// The body's `error` code: `lease_lost`, `task_canceled`, `validation_failed`, ...
    pub code: String,
    pub message: String,
    /// The body's `field` path, when the error names one.
    pub field: Option<String>,
}

impl TaskApiError {
    pub fn new(status: u16, code: &str, message: &str) -> TaskApiError {
        TaskApiError { status, code: code.into(), message: message.into(), field: None }
    }

    /// Unreachable or 5xx: worth retrying.
    pub fn transient(&self) -> bool {
        self.status == 0 || self.status >= 500
    }

    /// The error an HTTP answer's body names.
    pub fn from_body(status: u16, body: &Value) -> TaskApiError {
        let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_string);
        TaskApiError {
            status,
            code: text("error")
                .unwrap_or_else(|| if status >= 500 { "unavailable" } else { "http_error" }.into()),
            message: text("message").unwrap_or_else(|| format!("HTTP {status}")),
            field: text("field"),
        }
    }
}

impl fmt::Display for TaskApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        match &self.field {
            Some(field) => write!(f, " ({field})"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for TaskApiError {}

/// What the runtime and a handler's context call; bodies are the wire JSON of
/// `docs/architecture/contracts.md`, the fence fields included.
pub trait TaskSurface: Send + Sync {
    /// `POST /v1/task/heartbeat`; answers `{lease_expires_at, capability_token}`.
    fn heartbeat(&self, fence: &Value) -> Result<Value, TaskApiError>;
    /// `POST /v1/task/buffer-publish`; answers `{accepted, duplicate}`.
    fn buffer_publish(&self, body: &Value) -> Result<Value, TaskApiError>;
    /// `POST /v1/task/query`; answers `{columns, rows, truncated, versions}`.
    fn query(&self, body: &Value) -> Result<Value, TaskApiError>;
}

/// `TaskSurface` over HTTP.
pub struct HttpTaskSurface {
    host: String,
    base: String,
    token: Mutex<String>,
    /// Give up retrying a transient failure after this long.
    pub deadline: Duration,
}

impl HttpTaskSurface {
    /// A surface for the Dispatcher at `base_url` (`http://host:port`), acting with `token`.
    pub fn new(base_url: &str, token: &str) -> std::io::Result<HttpTaskSurface> {
        let (host, base) = http::split_url(base_url)?;
        Ok(HttpTaskSurface { host, base, token: Mutex::new(token.into()), deadline: Duration::from_secs(30) })
    }

    /// The capability token in use (the latest heartbeat's).
    pub fn token(&self) -> String {
        self.token.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn post(&self, route: &str, body: &Value, deadline: Duration) -> Result<Value, TaskApiError> {
        let until = Instant::now() + deadline;
        let payload = body.to_json();
        let mut tries: u32 = 0;
        loop {
            let token = self.token();
            let answer = http::request(
                "POST",
                &self.host,
                &format!("{}{route}", self.base),
                &[("Content-Type", "application/json"), (CAPABILITY_HEADER, &token)],
                Some(payload.as_bytes()),
                Some(Duration::from_secs(60)),
            );
            let failure = match answer {
                Ok(resp) => {
                    let decoded = Value::parse_bytes(&resp.body).unwrap_or(Value::Null);
                    if resp.status < 400 && !decoded.is_null() {
                        return Ok(decoded);
                    }
                    TaskApiError::from_body(resp.status, &decoded)
                }
                Err(e) => TaskApiError::new(0, "unreachable", &format!("task API unreachable: {e}")),
            };
            if !failure.transient() || Instant::now() >= until {
                return Err(failure);
            }
            tries += 1;
            std::thread::sleep(backoff(tries));
        }
    }
}

/// Capped exponential backoff with jitter (50 ms doubling to 2 s, times 0.5-1.5).
fn backoff(tries: u32) -> Duration {
    let base = (50u64 << tries.min(6)).min(2000);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let jitter = 500 + u64::from(nanos % 1000);
    Duration::from_millis(base * jitter / 1000)
}

impl TaskSurface for HttpTaskSurface {
    fn heartbeat(&self, fence: &Value) -> Result<Value, TaskApiError> {
        let answer = self.post("/v1/task/heartbeat", fence, Duration::from_secs(10))?;
        if let Some(token) = answer.get("capability_token").and_then(Value::as_str) {
            if let Ok(mut held) = self.token.lock() {
                *held = token.to_string();
            }
        }
        Ok(answer)
    }

    fn buffer_publish(&self, body: &Value) -> Result<Value, TaskApiError> {
        self.post("/v1/task/buffer-publish", body, self.deadline)
    }

    fn query(&self, body: &Value) -> Result<Value, TaskApiError> {
        self.post("/v1/task/query", body, self.deadline)
    }
}
