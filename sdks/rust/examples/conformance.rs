//! A UDF whose behaviour `payload.mode` chooses, for the runtime conformance tests shared with
//! the Node SDK (tests/udf): ok, two_calls, big, error, non_retryable, crash (a panic), array,
//! string, garbage, heartbeat, query; `exit` (the process exits mid-invocation), `hang` and
//! `memory` (reserves 1 GiB) for the runner's failure tests; and `reader` for the end-to-end DAG test: sums
//! `payload.input`'s `i` and `sq` per row into `payload.output`, and on attempt 1 answers a
//! result nested too deep for the Dispatcher after its rows were published (so that attempt
//! fails and the retry re-publishes the same keys).

use std::io::Write;

use trace_udf::{non_retryable, serve, Context, HandlerResult, Value};

fn squares(from: i64, count: i64) -> Vec<Value> {
    (from..from + count).map(|i| Value::object([("i", Value::from(i)), ("sq", Value::from(i * i))])).collect()
}

fn handler(ctx: &mut Context) -> HandlerResult {
    let mode = ctx.payload().get("mode").and_then(Value::as_str).unwrap_or("ok").to_string();
    let n = ctx.payload().get("n").and_then(Value::as_i64).unwrap_or(0);
    match mode.as_str() {
        "ok" => {
            ctx.emit_rows("squares", squares(0, n))?;
            ctx.emit_event("udf.done", Value::object([("n", Value::from(n))]), "done")?;
            Ok(Value::object([("n", Value::from(n)), ("granted", Value::from(ctx.datasets().len()))]))
        }
        "two_calls" => {
            ctx.emit_rows("squares", squares(0, 1))?;
            ctx.emit_rows("squares", squares(1, 1))?;
            ctx.emit_rows_with("squares", squares(2, 1), Some("mine"), None)?;
            Ok(Value::object([("n", Value::from(3))]))
        }
        "big" => {
            ctx.emit_rows("squares", squares(0, n))?;
            Ok(Value::object([("n", Value::from(n))]))
        }
        "error" => {
            ctx.emit_rows("squares", squares(0, 1))?;
            Err("boom at row 3".into())
        }
        "non_retryable" => Err(non_retryable("input is malformed")),
        "crash" => {
            ctx.emit_rows("squares", squares(0, 1))?;
            let rows: Vec<i64> = Vec::new();
            let _ = rows[7];
            panic!("index out of bounds at row 7")
        }
        "array" => {
            ctx.emit_rows("squares", squares(0, 1))?;
            Ok(Value::Array(vec![Value::from(1), Value::from(2), Value::from(3)]))
        }
        "string" => Ok(Value::from("not an object")),
        "garbage" => {
            let mut out = std::io::stdout();
            out.write_all(&[0xff, 0xfe, 0x00, 0x1b, b'[', b'2', b'J', b'\n'])?;
            out.write_all(b"{not json at all\n")?;
            out.flush()?;
            eprintln!("\u{0}\u{7} garbage on stderr");
            Ok(Value::object([("fine", Value::from(true))]))
        }
        "heartbeat" => {
            ctx.heartbeat()?;
            ctx.emit_rows("squares", squares(0, 1))?;
            Ok(Value::object([("beat", Value::from(true))]))
        }
        "query" => {
            let rows = ctx.query("SELECT n FROM blocks", Some(10))?;
            let read = rows.len();
            ctx.emit_rows("copies", rows)?;
            Ok(Value::object([("read", Value::from(read))]))
        }
        "reader" => {
            let input = ctx.payload().get("input").and_then(Value::as_str).unwrap_or("squares").to_string();
            let output = ctx.payload().get("output").and_then(Value::as_str).unwrap_or("sums").to_string();
            let rows = ctx.query(&format!("SELECT i, sq FROM {input} ORDER BY i"), None)?;
            let sums = rows
                .iter()
                .map(|r| {
                    let i = r.get("i").and_then(Value::as_i64).unwrap_or(0);
                    let sq = r.get("sq").and_then(Value::as_i64).unwrap_or(0);
                    Value::object([("i", Value::from(i)), ("total", Value::from(i + sq))])
                })
                .collect();
            ctx.emit_rows(&output, sums)?;
            if ctx.event().attempt == 1 {
                let mut deep = Value::Null;
                for _ in 0..80 {
                    deep = Value::object([("d", deep)]);
                }
                return Ok(deep);
            }
            Ok(Value::object([("read", Value::from(rows.len())), ("granted", Value::from(ctx.datasets()))]))
        }
        "exit" => {
            ctx.emit_rows("squares", squares(0, 1))?;
            std::process::exit(3)
        }
        "hang" => {
            ctx.emit_rows("squares", squares(0, 1))?;
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        "memory" => {
            ctx.emit_rows("squares", squares(0, 1))?;
            let mut hog: Vec<u8> = Vec::new();
            hog.try_reserve_exact(1 << 30)?;
            hog.resize(1 << 30, 1);
            Ok(Value::object([("n", Value::from(hog.len()))]))
        }
        other => Err(format!("unknown mode {other}").into()),
    }
}

/// `conformance --direct N`: run the `ok` handler N times in this process through the local
/// harness and print the seconds each took as JSON (the floor of `bench/udf_langs.py`).
fn direct(n: usize) {
    let payload = Value::object([("mode", Value::from("ok")), ("n", Value::from(10))]);
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = std::time::Instant::now();
        let run = trace_udf::local::run(&handler, payload.clone(), trace_udf::local::Options::default());
        took.push(Value::from(t0.elapsed().as_secs_f64()));
        assert!(run.succeeded());
    }
    println!("{}", Value::Array(took));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--direct") {
        direct(args.get(2).and_then(|n| n.parse().ok()).unwrap_or(100));
        return;
    }
    if let Err(e) = serve(handler) {
        eprintln!("conformance: {e}");
        std::process::exit(1);
    }
}
