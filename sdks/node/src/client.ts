/**
 * The task surface a UDF reaches, as a port (`TaskSurface`) with two implementations: HTTP to
 * `/v1/task/*` with the attempt's capability token (`HttpTaskSurface`; the base URL is
 * `TRACE_TASK_API_URL`: the Dispatcher, or the Lite runner's relay), and an in-memory one for
 * the local harness (`harness.ts`).
 *
 * The HTTP client holds nothing but the capability token it is given (replaced by each
 * heartbeat's renewed token). Transient failures (unreachable, 5xx) are retried with capped,
 * jittered backoff until a deadline; every call is safe to repeat because the Dispatcher fences
 * it by `(task_id, attempt, lease_token)` and deduplicates buffer batches by key.
 */

import { TaskApiError } from "./errors.js";
import { httpRequest } from "./http.js";
import type { BufferPublishResponse, Fence, HeartbeatResponse, InlineBatch, QueryResult } from "./types.js";

/** The header that carries the attempt's capability token. */
export const CAPABILITY_HEADER = "X-Trace-Task-Capability";

/** What the runtime and a handler's context call. Every method throws `TaskApiError`. */
export interface TaskSurface {
  heartbeat(fence: Fence): Promise<HeartbeatResponse>;
  bufferPublish(fence: Fence, batch: InlineBatch): Promise<BufferPublishResponse>;
  query(fence: Fence, sql: string, maxRows?: number): Promise<QueryResult>;
}

export interface HttpTaskSurfaceOptions {
  /** Give up retrying a transient failure after this long (default 30 s). */
  deadlineMs?: number;
  /** Per-request timeout (default 60 s; a query may take 30 s). */
  requestTimeoutMs?: number;
}

/** `TaskSurface` over HTTP. `token` is replaced by each heartbeat's renewed token. */
export class HttpTaskSurface implements TaskSurface {
  readonly baseUrl: string;
  token: string;
  private readonly deadlineMs: number;
  private readonly requestTimeoutMs: number;

  constructor(baseUrl: string, capabilityToken: string, options: HttpTaskSurfaceOptions = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.token = capabilityToken;
    this.deadlineMs = options.deadlineMs ?? 30_000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 60_000;
  }

  async heartbeat(fence: Fence): Promise<HeartbeatResponse> {
    const answer = (await this.post("/v1/task/heartbeat", fence, 10_000)) as HeartbeatResponse;
    this.token = answer.capability_token;
    return answer;
  }

  async bufferPublish(fence: Fence, batch: InlineBatch): Promise<BufferPublishResponse> {
    return (await this.post("/v1/task/buffer-publish", { ...fence, batch })) as BufferPublishResponse;
  }

  async query(fence: Fence, sql: string, maxRows?: number): Promise<QueryResult> {
    const body: Record<string, unknown> = { ...fence, sql, format: "json" };
    if (maxRows !== undefined) body.max_rows = maxRows;
    return (await this.post("/v1/task/query", body)) as QueryResult;
  }

  /** One call, retried while transient until the deadline. Returns the decoded JSON body. */
  private async post(path: string, body: unknown, deadlineMs?: number): Promise<unknown> {
    const deadline = Date.now() + (deadlineMs ?? this.deadlineMs);
    const payload = JSON.stringify(body);
    for (let tries = 0; ; tries++) {
      let failure: TaskApiError;
      try {
        const resp = await httpRequest(
          "POST",
          this.baseUrl + path,
          payload,
          { "Content-Type": "application/json", [CAPABILITY_HEADER]: this.token },
          this.requestTimeoutMs,
        );
        let decoded: unknown = null;
        try {
          decoded = JSON.parse(resp.body);
        } catch {
          decoded = null;
        }
        if (resp.status < 400 && decoded !== null) return decoded;
        failure = errorFromBody(resp.status, decoded);
      } catch (exc) {
        failure = new TaskApiError(0, "unreachable", `task API unreachable: ${String(exc)}`);
      }
      if (!failure.transient || Date.now() >= deadline) throw failure;
      const backoff = Math.min(2000, 50 * 2 ** Math.min(tries, 6)) * (0.5 + Math.random());
      await new Promise((resolve) => setTimeout(resolve, backoff));
    }
  }
}

/** The `TaskApiError` an error body names. */
export function errorFromBody(status: number, body: unknown): TaskApiError {
  const obj = typeof body === "object" && body !== null ? (body as Record<string, unknown>) : {};
  const code = typeof obj.error === "string" ? obj.error : status >= 500 ? "unavailable" : "http_error";
  const message = typeof obj.message === "string" ? obj.message : `HTTP ${status}`;
  const field = typeof obj.field === "string" ? obj.field : undefined;
  return new TaskApiError(status, code, message, field);
}
