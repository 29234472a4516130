/**
 * The runtime: runs one invocation of a handler (`invoke`) and serves the AWS Lambda Runtime
 * API in a loop (`serve`), so the same bundle runs on Lambda (custom runtime) and under Trace
 * Lite's runner, which implements that API.
 *
 * One invocation, in order (each step the only way forward):
 *   1. the event must be an invoke event (else `Runtime.InvalidEvent`, nothing sent anywhere);
 *   2. a canceled task is acknowledged (`outcome: canceled`) without running the handler;
 *   3. the handler runs with a `UdfContext`; meanwhile the runtime heartbeats every quarter of
 *      the lease, and aborts `ctx.signal` if a heartbeat is refused (lease lost, canceled);
 *   4. a throw, a rejection or an uncaught exception fails the attempt (`Handler.Error`,
 *      retried unless it is a `NonRetryableError`); a result that is not a JSON object, null
 *      or undefined fails it too (`Runtime.InvalidResult`, retried). Nothing emitted is
 *      published on failure;
 *   5. on success the emitted rows are published (`rows:<dataset>:<n>` keys, so a retry that
 *      emits the same rows lands them once), then the attempt is completed with the result and
 *      the emitted events in one call.
 * The runtime, not the runner, completes the attempt, with the capability token in the event:
 * on Lambda nothing else could. The runner learns the outcome from `/response` or `/error`
 * (whose body says `completed`) and completes only what the runtime could not.
 */

import { HttpTaskSurface, type TaskSurface } from "./client.js";
import { batches, isPlainObject, UdfContext } from "./context.js";
import { ErrorTypes, TaskApiError } from "./errors.js";
import type { InvokeEvent, JsonObject } from "./types.js";

/** A UDF: the event and its context in, a JSON object (or nothing) out. */
export type Handler = (
  event: InvokeEvent,
  ctx: UdfContext,
) => Promise<JsonObject | null | undefined | void> | JsonObject | null | undefined | void;

/** What one invocation ended with: a `/response` body, or an `/error` body. */
export type Outcome =
  | { ok: true; response: JsonObject }
  | { ok: false; error: RuntimeErrorBody };

/** The Runtime API's error body (`errorMessage`, `errorType`, `stackTrace`) plus `completed`. */
export interface RuntimeErrorBody {
  errorType: string;
  errorMessage: string;
  stackTrace: string[];
  /** True when the runtime already reported the failure to the Dispatcher. */
  completed: boolean;
  [extra: string]: unknown;
}

export interface InvokeOptions {
  /** Epoch ms when the runner ends the invocation (`Lambda-Runtime-Deadline-Ms`). */
  deadlineMs?: number;
  /** Heartbeat period; default a quarter of the lease left, between 1 s and 15 s. */
  heartbeatMs?: number;
}

/** Run `handler` for one event against `surface` (see the module comment). Never throws. */
export async function invoke(
  event: unknown,
  handler: Handler,
  surface: TaskSurface | ((event: InvokeEvent) => TaskSurface),
  options: InvokeOptions = {},
): Promise<Outcome> {
  const problem = eventProblem(event);
  if (problem) return failure(ErrorTypes.invalidEvent.errorType, problem, false);
  const ev = event as InvokeEvent;
  const tasks = typeof surface === "function" ? surface(ev) : surface;
  const fence = { task_id: ev.task_id, attempt: ev.attempt, lease_token: ev.lease_token };

  if (ev.status === "canceled") {
    const done = await tasks.complete({
      ...fence,
      outcome: "canceled",
      retryable: false,
      result: null,
      error: null,
      final_events: [],
    });
    return { ok: true, response: { ...done, canceled: true } };
  }

  const ctx = new UdfContext(ev, tasks, options.deadlineMs);
  const beat = setInterval(() => {
    tasks.heartbeat(fence).catch((exc: unknown) => {
      if (exc instanceof TaskApiError && !exc.transient) ctx.cancel(exc.message);
    });
  }, options.heartbeatMs ?? heartbeatPeriod(ev.lease_expires_at));

  let result: unknown;
  try {
    result = await runGuarded(() => handler(ev, ctx));
  } catch (exc) {
    clearInterval(beat);
    const err = exc instanceof Error ? exc : new Error(String(exc));
    const retryable = err.name !== "NonRetryableError";
    const message = `${err.name}: ${err.message}`;
    const completed = await failAttempt(tasks, fence, ErrorTypes.handler.code, message, retryable, err.name);
    return failure(ErrorTypes.handler.errorType, message, completed, err.stack);
  }
  clearInterval(beat);

  if (ctx.signal.aborted) {
    return failure(ErrorTypes.leaseLost.errorType, String(ctx.signal.reason), false);
  }
  const shape = resultProblem(result);
  if (shape) {
    const completed = await failAttempt(tasks, fence, ErrorTypes.invalidResult.code, shape, true);
    return failure(ErrorTypes.invalidResult.errorType, shape, completed);
  }

  const published: Record<string, number> = {};
  try {
    for (const [dataset, rows] of ctx.rows) {
      for (const [n, batch] of batches(rows).entries()) {
        await tasks.bufferPublish(fence, { key: `rows:${dataset}:${n}`, dataset, rows: batch });
      }
      published[dataset] = rows.length;
    }
    const done = await tasks.complete({
      ...fence,
      outcome: "succeeded",
      retryable: true,
      result: (result ?? null) as JsonObject | null,
      error: null,
      final_events: ctx.events,
    });
    return { ok: true, response: { ...done, rows: published, events: ctx.events.length } };
  } catch (exc) {
    return await dispatcherFailure(tasks, fence, exc);
  }
}

/** Serve the Lambda Runtime API at `api` (host:port) until it goes away. */
export async function serve(
  handler: Handler,
  options: { api?: string; dispatcherUrl?: string; once?: boolean } = {},
): Promise<void> {
  const api = options.api ?? process.env.AWS_LAMBDA_RUNTIME_API;
  if (!api) throw new Error("AWS_LAMBDA_RUNTIME_API is not set");
  const base = `http://${api}/2018-06-01/runtime`;
  for (;;) {
    const next = await fetch(`${base}/invocation/next`);
    const requestId = next.headers.get("lambda-runtime-aws-request-id") ?? "";
    const deadline = Number(next.headers.get("lambda-runtime-deadline-ms") ?? "") || undefined;
    const text = await next.text();
    let event: unknown;
    let outcome: Outcome;
    try {
      event = JSON.parse(text);
    } catch {
      event = undefined;
    }
    const dispatcherUrl =
      (isPlainObject(event) && typeof event.dispatcher_url === "string" ? event.dispatcher_url : undefined) ??
      options.dispatcherUrl ??
      process.env.TRACE_DISPATCHER_URL;
    if (event === undefined) {
      outcome = failure(ErrorTypes.invalidEvent.errorType, "the event is not JSON", false);
    } else if (!dispatcherUrl) {
      outcome = failure(ErrorTypes.invalidEvent.errorType, "no dispatcher URL (TRACE_DISPATCHER_URL)", false);
    } else {
      outcome = await invoke(event, handler, (ev) => new HttpTaskSurface(dispatcherUrl, ev.capability_token), {
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

/** Report an initialisation failure (`/runtime/init/error`), e.g. a handler module that fails to load. */
export async function initError(errorType: string, message: string, api?: string): Promise<void> {
  const host = api ?? process.env.AWS_LAMBDA_RUNTIME_API;
  if (!host) return;
  await post(`http://${host}/2018-06-01/runtime/init/error`, failure(errorType, message, false).error, {
    "Lambda-Runtime-Function-Error-Type": errorType,
  });
}

/** Why `event` is not an invoke event, or null. */
export function eventProblem(event: unknown): string | null {
  if (!isPlainObject(event)) return "the event is not a JSON object";
  const e = event as Record<string, unknown>;
  for (const field of ["task_id", "lease_token", "capability_token", "status"]) {
    if (typeof e[field] !== "string" || e[field] === "") return `event.${field} must be a non-empty string`;
  }
  if (!Number.isInteger(e.attempt) || (e.attempt as number) < 1) return "event.attempt must be an integer >= 1";
  if (typeof e.timeout_s !== "number") return "event.timeout_s must be a number";
  if (e.payload !== undefined && !isPlainObject(e.payload)) return "event.payload must be a JSON object";
  return null;
}

/** Why `result` cannot be a completion's result, or null. */
export function resultProblem(result: unknown): string | null {
  if (result === undefined || result === null) return null;
  if (!isPlainObject(result)) {
    const kind = Array.isArray(result) ? "an array" : typeof result;
    return `the handler returned ${kind}; expected a JSON object, null or nothing`;
  }
  try {
    JSON.stringify(result);
  } catch (exc) {
    return `the handler's result is not JSON: ${String(exc)}`;
  }
  return null;
}

function heartbeatPeriod(leaseExpiresAt: string): number {
  const left = Date.parse(leaseExpiresAt) - Date.now();
  return Number.isFinite(left) ? Math.min(15_000, Math.max(1_000, left / 4)) : 15_000;
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

/** Complete the attempt as failed; true when the Dispatcher took it. */
async function failAttempt(
  tasks: TaskSurface,
  fence: { task_id: string; attempt: number; lease_token: string },
  code: string,
  message: string,
  retryable: boolean,
  type?: string,
): Promise<boolean> {
  try {
    await tasks.complete({
      ...fence,
      outcome: "failed",
      retryable,
      result: null,
      error: { code, message: message.slice(0, 2000), ...(type ? { type } : {}) },
      final_events: [],
    });
    return true;
  } catch {
    return false;
  }
}

async function dispatcherFailure(
  tasks: TaskSurface,
  fence: { task_id: string; attempt: number; lease_token: string },
  exc: unknown,
): Promise<Outcome> {
  if (exc instanceof TaskApiError && (exc.code === "lease_lost" || exc.code === "task_canceled")) {
    return failure(ErrorTypes.leaseLost.errorType, exc.message, false);
  }
  if (exc instanceof TaskApiError && exc.status === 422) {
    // The Dispatcher refused what the handler produced (a row, an event, the result).
    const message = `the Dispatcher refused the handler's output: ${exc.message}${exc.field ? ` (${exc.field})` : ""}`;
    const completed = await failAttempt(tasks, fence, ErrorTypes.invalidResult.code, message, true);
    return failure(ErrorTypes.invalidResult.errorType, message, completed);
  }
  const message = exc instanceof Error ? exc.message : String(exc);
  const completed = await failAttempt(tasks, fence, ErrorTypes.dispatcher.code, message, true);
  return failure(ErrorTypes.dispatcher.errorType, message, completed);
}

function failure(errorType: string, errorMessage: string, completed: boolean, stack?: string): Outcome & { ok: false } {
  return {
    ok: false,
    error: { errorType, errorMessage, stackTrace: stack ? stack.split("\n").slice(1, 20) : [], completed },
  };
}

async function post(url: string, body: unknown, headers: Record<string, string> = {}): Promise<void> {
  const resp = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", ...headers },
    body: JSON.stringify(body),
  });
  await resp.arrayBuffer();
}
