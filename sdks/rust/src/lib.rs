//! `trace-udf`: what a Trace UDF written in Rust links against.
//!
//! A UDF is a `bootstrap` executable, as for AWS Lambda's custom runtime: its `main` calls
//! [`serve`] with a handler, and the runtime speaks the Lambda Runtime API
//! (`AWS_LAMBDA_RUNTIME_API`) — under Trace Lite's runner, which implements the same API, or
//! on Lambda. The handler gets a [`Context`]: the typed invoke [`Event`], the work payload, the
//! granted datasets, rows and events to emit, SQL over the granted datasets, heartbeats; it
//! returns a JSON object (the task's result) or an error. [`local::run`] runs a handler without
//! a platform.
//!
//! ```no_run
//! use trace_udf::{serve, Context, HandlerResult, Value};
//!
//! fn handler(ctx: &mut Context) -> HandlerResult {
//!     let n = ctx.payload().get("n").and_then(Value::as_i64).unwrap_or(0);
//!     let rows = (0..n).map(|i| Value::object([("i", Value::from(i)), ("sq", Value::from(i * i))]));
//!     ctx.emit_rows("squares", rows.collect())?;
//!     Ok(Value::object([("n", Value::from(n))]))
//! }
//!
//! fn main() -> std::io::Result<()> {
//!     serve(handler)
//! }
//! ```
//!
//! The crate uses std alone (no dependencies): it builds offline. It brings its own JSON
//! value ([`json`]) and a minimal HTTP/1.1 client ([`http`]).

pub mod client;
pub mod context;
pub mod http;
pub mod json;
pub mod local;
pub mod runtime;

pub use client::{HttpTaskSurface, TaskApiError, TaskSurface, CAPABILITY_HEADER};
pub use context::{Context, Event, MAX_BATCH_BYTES, MAX_BATCH_ROWS};
pub use json::Value;
pub use runtime::{init_error, invoke, non_retryable, serve, HandlerResult, NonRetryable, Outcome};
