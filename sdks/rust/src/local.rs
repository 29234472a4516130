//! The local harness: run a handler against an input without a platform. The task surface is
//! in memory: it records heartbeats, published batches and queries, and answers `query` from a
//! function you give.
//!
//! ```no_run
//! use trace_udf::{local, Value};
//! let run = local::run(&my_handler, Value::object([("n", Value::from(3))]), local::Options::default());
//! # fn my_handler(_: &mut trace_udf::Context) -> trace_udf::HandlerResult { Ok(Value::Null) }
//! assert!(run.succeeded());
//! ```

use std::sync::{Arc, Mutex};

use crate::client::{TaskApiError, TaskSurface};
use crate::context::Context;
use crate::json::Value;
use crate::runtime::{invoke, HandlerResult, Outcome};

type QueryFn = dyn Fn(&str) -> Result<Value, TaskApiError> + Send + Sync;

/// Options of a local run.
#[derive(Default)]
pub struct Options {
    /// Answers `ctx.query(sql)` (`{columns, rows, ...}`); without it every query is `not_found`.
    pub query: Option<Box<QueryFn>>,
    /// Datasets the attempt is granted.
    pub grants: Vec<String>,
}

/// The in-memory `TaskSurface`.
#[derive(Default)]
pub struct LocalTaskSurface {
    query: Option<Box<QueryFn>>,
    /// Every call, as (route, body).
    pub calls: Mutex<Vec<(String, Value)>>,
}

impl LocalTaskSurface {
    fn record(&self, route: &str, body: &Value) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push((route.to_string(), body.clone()));
        }
    }

    fn bodies(&self, route: &str) -> Vec<Value> {
        self.calls
            .lock()
            .map(|c| c.iter().filter(|(r, _)| r == route).map(|(_, b)| b.clone()).collect())
            .unwrap_or_default()
    }
}

impl TaskSurface for LocalTaskSurface {
    fn heartbeat(&self, fence: &Value) -> Result<Value, TaskApiError> {
        self.record("heartbeat", fence);
        Ok(Value::object([("capability_token", Value::from("local"))]))
    }
    fn buffer_publish(&self, body: &Value) -> Result<Value, TaskApiError> {
        self.record("buffer-publish", body);
        Ok(Value::object([("accepted", Value::from(true)), ("duplicate", Value::from(false))]))
    }
    fn query(&self, body: &Value) -> Result<Value, TaskApiError> {
        self.record("query", body);
        let sql = body.get("sql").and_then(Value::as_str).unwrap_or("");
        match &self.query {
            Some(answer) => answer(sql),
            None => {
                Err(TaskApiError::new(404, "not_found", &format!("the harness has no answer for: {sql}")))
            }
        }
    }
}

/// What a local run produced.
pub struct LocalRun {
    /// The response (`{result, final_events}`) or the error body the runtime would post.
    pub outcome: Outcome,
    /// Published rows by dataset, in order.
    pub rows: Vec<(String, Vec<Value>)>,
    pub queries: Vec<String>,
}

impl LocalRun {
    pub fn succeeded(&self) -> bool {
        matches!(self.outcome, Outcome::Response(_))
    }

    /// The handler's result, when it succeeded.
    pub fn result(&self) -> Option<&Value> {
        match &self.outcome {
            Outcome::Response(body) => body.get("result"),
            Outcome::Error(_) => None,
        }
    }

    /// The rows published to `dataset`.
    pub fn rows_of(&self, dataset: &str) -> Vec<Value> {
        self.rows.iter().find(|(d, _)| d == dataset).map(|(_, r)| r.clone()).unwrap_or_default()
    }
}

/// Run `handler` once with `payload` as the task's input.
pub fn run<H>(handler: &H, payload: Value, options: Options) -> LocalRun
where
    H: Fn(&mut Context) -> HandlerResult,
{
    let grants: Vec<Value> = options.grants.iter().map(|g| Value::from(g.as_str())).collect();
    let claims = Value::object([(
        "grants",
        Value::object([("datasets", Value::object([("read", Value::Array(grants))]))]),
    )]);
    let event = Value::object([
        ("task_id", Value::from("00000000-0000-4000-8000-000000000001")),
        ("org_id", Value::from("00000000-0000-0000-0000-000000000000")),
        ("operator", Value::from("udf.local")),
        ("payload", payload),
        ("status", Value::from("running")),
        ("attempt", Value::from(1)),
        ("max_attempts", Value::from(1)),
        ("timeout_s", Value::from(60)),
        ("staging_prefix", Value::from("local/")),
        ("capability_token", Value::from(format!("e30.{}.local", base64url(claims.to_json().as_bytes())))),
        ("lease_token", Value::from("00000000-0000-4000-8000-000000000002")),
        ("lease_expires_at", Value::from("2999-01-01T00:00:00Z")),
        ("bundle_url", Value::from("file:///dev/null")),
    ]);
    let surface = Arc::new(LocalTaskSurface { query: options.query, calls: Mutex::default() });
    let outcome = invoke(event, handler, surface.clone(), None);
    let mut rows: Vec<(String, Vec<Value>)> = Vec::new();
    for body in surface.bodies("buffer-publish") {
        let batch = body.get("batch").cloned().unwrap_or(Value::Null);
        let dataset = batch.get("dataset").and_then(Value::as_str).unwrap_or("").to_string();
        let new = batch.get("rows").and_then(Value::as_array).cloned().unwrap_or_default();
        match rows.iter_mut().find(|(d, _)| *d == dataset) {
            Some((_, held)) => held.extend(new),
            None => rows.push((dataset, new)),
        }
    }
    let queries = surface
        .bodies("query")
        .iter()
        .filter_map(|b| b.get("sql").and_then(Value::as_str).map(str::to_string))
        .collect();
    LocalRun { outcome, rows, queries }
}

fn base64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::non_retryable;

    fn squares(ctx: &mut Context) -> HandlerResult {
        let n = ctx.payload().get("n").and_then(Value::as_i64).unwrap_or(0);
        if n < 0 {
            return Err(non_retryable("n must be >= 0"));
        }
        let rows =
            (0..n).map(|i| Value::object([("i", Value::from(i)), ("sq", Value::from(i * i))])).collect();
        ctx.emit_rows("squares", rows)?;
        ctx.emit_event("udf.done", Value::object([("n", Value::from(n))]), "done")?;
        Ok(Value::object([("n", Value::from(n)), ("granted", Value::from(ctx.datasets().len()))]))
    }

    #[test]
    fn runs_a_handler_and_collects_its_rows() {
        let options = Options { grants: vec!["blocks".into()], ..Options::default() };
        let run = run(&squares, Value::object([("n", Value::from(3))]), options);
        assert!(run.succeeded());
        assert_eq!(run.rows_of("squares").len(), 3);
        assert_eq!(run.result().unwrap().to_json(), r#"{"n":3,"granted":1}"#);
        let Outcome::Response(body) = &run.outcome else { panic!("not a response") };
        assert_eq!(
            body.get("final_events").unwrap().to_json(),
            r#"[{"key":"done","type":"udf.done","payload":{"n":3}}]"#
        );
    }

    #[test]
    fn a_non_retryable_error_fails_without_retry_and_publishes_nothing() {
        let run = run(&squares, Value::object([("n", Value::from(-1))]), Options::default());
        assert_eq!(run.outcome.error_type(), Some("NonRetryableError"));
        assert!(run.rows.is_empty());
    }

    #[test]
    fn answers_queries_from_the_given_function() {
        let handler = |ctx: &mut Context| -> HandlerResult {
            let rows = ctx.query("SELECT n FROM blocks", None)?;
            Ok(Value::object([("rows", Value::Array(rows))]))
        };
        let options = Options {
            query: Some(Box::new(|_sql: &str| {
                Ok(Value::parse(r#"{"columns":[{"name":"n","type":"BIGINT"}],"rows":[[7]]}"#).unwrap())
            })),
            ..Options::default()
        };
        let run = run(&handler, Value::Null, options);
        assert_eq!(run.queries, vec!["SELECT n FROM blocks"]);
        assert_eq!(run.result().unwrap().to_json(), r#"{"rows":[{"n":7}]}"#);
    }

    #[test]
    fn base64url_matches_known_vectors() {
        assert_eq!(base64url(b"{}"), "e30");
        assert_eq!(base64url(b"abc"), "YWJj");
        assert_eq!(base64url(b"ab"), "YWI");
    }
}
