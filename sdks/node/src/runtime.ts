/**
 * The Node runtime: runs one invocation of a handler (`invoke`) and serves the AWS Lambda
 * Runtime API in a loop (`serve`) — under Trace Lite's runner, which implements that API, or on
 * Lambda. The contract is `docs/architecture/udf.md` (ADR 0028), the same as the Python and
 * Rust runtimes':
 *
 *   1. `GET /2018-06-01/runtime/invocation/next`: the event is the invoke payload;
 *   2. the handler runs with a `UdfContext`: `handler(ctx)`;
 *   3. on success the collected rows are published (`/v1/task/buffer-publish`), then
 *      `POST .../invocation/{id}/response` with exactly `{"result", "final_events"}` — the
 *      runner completes the attempt with it;
 *   4. on failure `POST .../invocation/{id}/error` with `errorType` (the error's `name`, so
 *      `NonRetryableError` fails the task for good) and `errorMessage`; nothing is published.
 *      A result that is not a JSON object, null or undefined is `Runtime.InvalidResult`; an
 *      event that is not an invoke event is `Runtime.InvalidEvent`; a throw from a timer or an
 *      unhandled rejection while the handler runs fails that invocation, and the loop goes on.
 *
 * The runtime holds nothing but the event's capability token and never completes the attempt
 * itself: the runner does, with the same token.
 */

import { HttpTaskSurface, type TaskSurface } from "./client.js";
import { isPlainObject, UdfContext } from "./context.js";
import { RuntimeErrorTypes } from "./errors.js";
import { httpRequest } from "./http.js";
import type { InvokeEvent, JsonObject, UdfResponse } from "./types.js";

/** A UDF: its context in, a JSON object (or nothing) out. */
export type Handler = (
  ctx: UdfContext,
) => Promise<JsonObject | null | undefined | void> | JsonObject | null | undefined | void;

/** The Runtime API's error body. */
export interface RuntimeErrorBody {
  errorType: string;
  errorMessage: string;
  stackTrace: string[];
}

/** What one invocation ended with: a `/response` body, or an `/error` body. */
export type Outcome = { ok: true; response: UdfResponse } | { ok: false; error: RuntimeErrorBody };

/** Run `handler` for one event (see the module comment). Never throws. */
export async function invoke(
  event: unknown,
  handler: Handler,
  surface: TaskSurface | ((event: InvokeEvent) => TaskSurface),
  options: { deadlineMs?: number } = {},
): Promise<Outcome> {
  const problem = eventProblem(event);
  if (problem) return failure(RuntimeErrorTypes.invalidEvent, problem);
  const ev = event as InvokeEvent;
  const ctx = new UdfContext(ev, typeof surface === "function" ? surface(ev) : surface, options.deadlineMs);
  let result: unknown;
  try {
    result = await runGuarded(() => handler(ctx));
  } catch (exc) {
    const err = exc instanceof Error ? exc : new Error(String(exc));
    return failure(errorTypeOf(err), err.message, err.stack);
  }
  const shape = resultProblem(result);
  if (shape) return failure(RuntimeErrorTypes.invalidResult, shape);
  try {
    await ctx.publishRows();
  } catch (exc) {
    const err = exc instanceof Error ? exc : new Error(String(exc));
    return failure(RuntimeErrorTypes.publishFailed, err.message, err.stack);
  }
  return { ok: true, response: { result: (result ?? null) as JsonObject | null, final_events: ctx.finalEvents } };
}

/** Serve the Lambda Runtime API at `api` (host:port) until it goes away. */
export async function serve(
  handler: Handler,
  options: { api?: string; taskApiUrl?: string; once?: boolean } = {},
): Promise<void> {
  const api = options.api ?? process.env.AWS_LAMBDA_RUNTIME_API;
  if (!api) throw new Error("AWS_LAMBDA_RUNTIME_API is not set");
  const taskApiUrl = options.taskApiUrl ?? process.env.TRACE_TASK_API_URL ?? "";
  const base = `http://${api}/2018-06-01/runtime`;
  for (;;) {
    const next = await httpRequest("GET", `${base}/invocation/next`);
    const requestId = header(next.headers["lambda-runtime-aws-request-id"]);
    const deadline = Number(header(next.headers["lambda-runtime-deadline-ms"])) || undefined;
    const text = next.body;
    let outcome: Outcome;
    let event: unknown;
    try {
      event = JSON.parse(text);
    } catch {
      event = undefined;
    }
    if (event === undefined) {
      outcome = failure(RuntimeErrorTypes.invalidEvent, "the event is not JSON");
    } else if (!taskApiUrl) {
      outcome = failure(RuntimeErrorTypes.invalidEvent, "TRACE_TASK_API_URL is not set");
    } else {
      outcome = await invoke(event, handler, (ev) => new HttpTaskSurface(taskApiUrl, ev.capability_token), {
        deadlineMs: deadline,
      });
    }
    const id = encodeURIComponent(requestId);
    if (outcome.ok) {
      await post(`${base}/invocation/${id}/response`, outcome.response);
    } else {
      await post(`${base}/invocation/${id}/error`, outcome.error, {
        "Lambda-Runtime-Function-Error-Type": outcome.error.errorType,
      });
    }
    if (options.once) return;
  }
}

/** Report an initialisation failure (`/runtime/init/error`), e.g. a handler that fails to load. */
export async function initError(errorType: string, message: string, api?: string): Promise<void> {
  const host = api ?? process.env.AWS_LAMBDA_RUNTIME_API;
  if (!host) return;
  const body = (failure(errorType, message) as { ok: false; error: RuntimeErrorBody }).error;
  await post(`http://${host}/2018-06-01/runtime/init/error`, body, {
    "Lambda-Runtime-Function-Error-Type": errorType,
  });
}

/** Why `event` is not an invoke event, or null. */
export function eventProblem(event: unknown): string | null {
  if (!isPlainObject(event)) return "the event is not a JSON object";
  const e = event as Record<string, unknown>;
  for (const field of ["task_id", "lease_token", "capability_token"]) {
    if (typeof e[field] !== "string" || e[field] === "") return `event.${field} must be a non-empty string`;
  }
  if (!Number.isInteger(e.attempt) || (e.attempt as number) < 1) return "event.attempt must be an integer >= 1";
  if (e.payload !== undefined && e.payload !== null && !isPlainObject(e.payload)) {
    return "event.payload must be a JSON object";
  }
  return null;
}

/** Why `result` cannot be a completion's result, or null. */
export function resultProblem(result: unknown): string | null {
  if (result === undefined || result === null) return null;
  if (!isPlainObject(result)) {
    const kind = Array.isArray(result) ? "an array" : typeof result === "object" ? "a non-plain object" : `a ${typeof result}`;
    return `the handler returned ${kind}; a handler returns a JSON object, null or nothing`;
  }
  try {
    JSON.stringify(result);
  } catch (exc) {
    return `the handler's result is not JSON: ${String(exc)}`;
  }
  return null;
}

/** The `errorType` of a handler's error: its `name`, except that a failed allocation (V8's
 * `RangeError: Array buffer allocation failed`) is `RangeError.OutOfMemory`, which the runner
 * reports as out of memory. */
export function errorTypeOf(err: Error): string {
  if (err.name === "RangeError" && /allocation failed|out of memory/i.test(err.message)) {
    return RuntimeErrorTypes.outOfMemory;
  }
  return err.name || "Error";
}

/** `fn()`, also rejected by an uncaught exception or unhandled rejection while it runs. */
async function runGuarded<T>(fn: () => T | Promise<T>): Promise<T> {
  let onCrash: (exc: unknown) => void = () => undefined;
  const crashed = new Promise<never>((_, reject) => {
    onCrash = reject;
  });
  process.on("uncaughtException", onCrash);
  process.on("unhandledRejection", onCrash);
  try {
    return await Promise.race([Promise.resolve().then(fn), crashed]);
  } finally {
    process.off("uncaughtException", onCrash);
    process.off("unhandledRejection", onCrash);
  }
}

function failure(errorType: string, errorMessage: string, stack?: string): Outcome {
  return {
    ok: false,
    error: { errorType, errorMessage: errorMessage.slice(0, 2000), stackTrace: stack ? stack.split("\n").slice(1, 20) : [] },
  };
}

async function post(url: string, body: unknown, headers: Record<string, string> = {}): Promise<void> {
  await httpRequest("POST", url, JSON.stringify(body), { "Content-Type": "application/json", ...headers }, 30_000);
}

function header(value: string | string[] | undefined): string {
  return (Array.isArray(value) ? value[0] : value) ?? "";
}
