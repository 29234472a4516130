//! The Rust runtime: one invocation of a handler (`invoke`) and the AWS Lambda Runtime API loop
//! (`serve`), so one `bootstrap` runs under Trace Lite's runner (which implements that API) and
//! as a Lambda custom runtime. The contract is `docs/architecture/udf.md` (ADR 0028), the same
//! as the Python and Node runtimes':
//!
//!   1. `GET /2018-06-01/runtime/invocation/next`: the event is the invoke payload;
//!   2. the handler runs with a `Context`;
//!   3. on `Ok(result)` the collected rows are published (`/v1/task/buffer-publish`), then
//!      `POST .../invocation/{id}/response` with exactly `{"result", "final_events"}`: the
//!      runner completes the attempt with it;
//!   4. otherwise `POST .../invocation/{id}/error` with an `errorType`: `HandlerError` (an
//!      `Err`), `NonRetryableError` (fails the task for good), `Runtime.OutOfMemory` (an `Err`
//!      holding a `TryReserveError`: a fallible allocation failed), `Panic` (the handler panicked;
//!      the loop goes on), `Runtime.InvalidResult` (a result that is not a JSON object or
//!      null), `Runtime.InvalidEvent`, `Runtime.PublishFailed`; nothing is published.
//!
//! The runtime holds nothing but the event's capability token and never completes the attempt:
//! the runner does, with the same token.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use crate::client::{HttpTaskSurface, TaskSurface};
use crate::context::{Context, Event};
use crate::http;
use crate::json::Value;

/// What a handler returns: a JSON object (or null) as the task's result, or an error.
pub type HandlerResult = Result<Value, Box<dyn std::error::Error + Send + Sync>>;

/// An error that fails the task without a retry (`errorType` `NonRetryableError`).
#[derive(Debug)]
pub struct NonRetryable(pub String);

impl std::fmt::Display for NonRetryable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NonRetryable {}

/// `NonRetryable(message)`, boxed, for `Err(...)` or `?`.
pub fn non_retryable(message: impl Into<String>) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(NonRetryable(message.into()))
}

/// How one invocation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The `/response` body: `{"result", "final_events"}`.
    Response(Value),
    /// The `/error` body: `{"errorType", "errorMessage", "stackTrace"}`.
    Error(Value),
}

impl Outcome {
    /// An error outcome.
    pub fn error(error_type: &str, message: &str) -> Outcome {
        Outcome::Error(Value::object([
            ("errorType", Value::from(error_type)),
            ("errorMessage", Value::from(message.chars().take(2000).collect::<String>())),
            ("stackTrace", Value::Array(Vec::new())),
        ]))
    }

    /// The error type, for an error.
    pub fn error_type(&self) -> Option<&str> {
        match self {
            Outcome::Error(body) => body.get("errorType").and_then(Value::as_str),
            Outcome::Response(_) => None,
        }
    }
}

/// Run `handler` for one event against `surface` (see the module comment).
pub fn invoke<H>(raw: Value, handler: &H, surface: Arc<dyn TaskSurface>, deadline_ms: Option<u64>) -> Outcome
where
    H: Fn(&mut Context) -> HandlerResult,
{
    let event = match Event::from_value(raw) {
        Ok(event) => event,
        Err(problem) => return Outcome::error("Runtime.InvalidEvent", &problem),
    };
    let mut ctx = Context::new(event, surface, deadline_ms);
    let value = match panic::catch_unwind(AssertUnwindSafe(|| handler(&mut ctx))) {
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            return Outcome::error("Panic", &text);
        }
        Ok(Err(err)) => {
            let kind = if err.downcast_ref::<NonRetryable>().is_some() {
                "NonRetryableError"
            } else if err.downcast_ref::<std::collections::TryReserveError>().is_some() {
                "Runtime.OutOfMemory"
            } else {
                "HandlerError"
            };
            return Outcome::error(kind, &err.to_string());
        }
        Ok(Ok(value)) => value,
    };
    if !value.is_object() && !value.is_null() {
        let article = if value.kind() == "array" || value.kind() == "object" { "an" } else { "a" };
        let message = format!(
            "the handler returned {article} {}; a handler returns a JSON object or null",
            value.kind()
        );
        return Outcome::error("Runtime.InvalidResult", &message);
    }
    if let Err(e) = ctx.publish_rows() {
        return Outcome::error("Runtime.PublishFailed", &e.to_string());
    }
    Outcome::Response(Value::object([("result", value), ("final_events", Value::Array(ctx.final_events))]))
}

/// Serve the Lambda Runtime API (`AWS_LAMBDA_RUNTIME_API`) with `handler` until it goes away;
/// `/v1/task/*` is at `TRACE_TASK_API_URL`.
pub fn serve<H>(handler: H) -> std::io::Result<()>
where
    H: Fn(&mut Context) -> HandlerResult,
{
    let api = std::env::var("AWS_LAMBDA_RUNTIME_API").map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "AWS_LAMBDA_RUNTIME_API is not set")
    })?;
    let task_api = std::env::var("TRACE_TASK_API_URL").unwrap_or_default();
    let base = "/2018-06-01/runtime";
    loop {
        let next = http::request("GET", &api, &format!("{base}/invocation/next"), &[], None, None)?;
        let request_id = next.header("lambda-runtime-aws-request-id").unwrap_or("").to_string();
        let deadline = next.header("lambda-runtime-deadline-ms").and_then(|d| d.parse::<u64>().ok());
        let outcome = match Value::parse_bytes(&next.body) {
            Err(e) => Outcome::error("Runtime.InvalidEvent", &format!("the event is not JSON: {e}")),
            Ok(_) if task_api.is_empty() => {
                Outcome::error("Runtime.InvalidEvent", "TRACE_TASK_API_URL is not set")
            }
            Ok(raw) => {
                let token = raw.get("capability_token").and_then(Value::as_str).unwrap_or("").to_string();
                match HttpTaskSurface::new(&task_api, &token) {
                    Err(e) => Outcome::error("Runtime.InvalidEvent", &e.to_string()),
                    Ok(surface) => invoke(raw, &handler, Arc::new(surface), deadline),
                }
            }
        };
        let (path, body, error_type) = match &outcome {
            Outcome::Response(body) => (format!("{base}/invocation/{request_id}/response"), body, None),
            Outcome::Error(body) => {
                (format!("{base}/invocation/{request_id}/error"), body, outcome.error_type())
            }
        };
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(t) = error_type {
            headers.push(("Lambda-Runtime-Function-Error-Type", t));
        }
        http::request(
            "POST",
            &api,
            &path,
            &headers,
            Some(body.to_json().as_bytes()),
            Some(Duration::from_secs(30)),
        )?;
    }
}

/// Report an initialisation failure on `/runtime/init/error` (best effort), e.g. from `main`
/// before `serve` when the UDF's own set-up fails.
pub fn init_error(error_type: &str, message: &str) {
    let Ok(api) = std::env::var("AWS_LAMBDA_RUNTIME_API") else { return };
    if let Outcome::Error(body) = Outcome::error(error_type, message) {
        let _ = http::request(
            "POST",
            &api,
            "/2018-06-01/runtime/init/error",
            &[("Content-Type", "application/json"), ("Lambda-Runtime-Function-Error-Type", error_type)],
            Some(body.to_json().as_bytes()),
            Some(Duration::from_secs(10)),
        );
    }
}
