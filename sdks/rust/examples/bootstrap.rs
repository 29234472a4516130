//! An example UDF, the `bootstrap` of a Rust bundle: counts a granted dataset through the
//! Query Service (when `payload.input` names one), emits `payload.n` rows to the buffered
//! dataset `payload.output` (default `squares`), an event when `payload.done_event` names its
//! key, and returns a summary.
//!
//! Build: `cargo build --offline --release --example bootstrap`; the bundle is this
//! executable, named `bootstrap`, beside a `trace-udf.json` (see README.md).

use trace_udf::{non_retryable, serve, Context, HandlerResult, Value};

fn handler(ctx: &mut Context) -> HandlerResult {
    let payload = ctx.payload().clone();
    let n = match payload.get("n") {
        None => 3,
        Some(v) => v
            .as_i64()
            .filter(|n| (0..=1_000_000).contains(n))
            .ok_or_else(|| non_retryable("payload.n must be an integer 0..=1000000"))?,
    };
    let base = match payload.get("input").and_then(Value::as_str) {
        Some(input) => {
            let rows = ctx.query(&format!("SELECT count(*) AS total FROM {input}"), Some(1))?;
            rows.first().and_then(|r| r.get("total")).and_then(Value::as_i64).unwrap_or(0)
        }
        None => 0,
    };
    let output = payload.get("output").and_then(Value::as_str).unwrap_or("squares");
    let rows = (0..n)
        .map(|i| {
            Value::object([("i", Value::from(i)), ("sq", Value::from(i * i)), ("base", Value::from(base))])
        })
        .collect();
    ctx.emit_rows(output, rows)?;
    // An event fans out to the DAG's consuming jobs like the sink's rows_committed does: emit
    // one only when asked (`payload.done_event`: its key).
    if let Some(key) = payload.get("done_event").and_then(Value::as_str) {
        ctx.emit_event("squares.done", Value::object([("rows", Value::from(n))]), key)?;
    }
    Ok(Value::object([
        ("emitted", Value::from(n)),
        ("base", Value::from(base)),
        ("attempt", Value::from(ctx.event().attempt)),
    ]))
}

fn main() {
    if let Err(e) = serve(handler) {
        eprintln!("bootstrap: {e}");
        std::process::exit(1);
    }
}
