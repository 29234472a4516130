/**
 * What a handler is given besides its event: typed access to the input, row and event
 * emission, task-scoped queries and heartbeats.
 *
 * Rows passed to `emit` are held until the handler returns; then the runtime publishes them to
 * their buffered datasets in batches with keys that depend only on the dataset and the batch's
 * position (`rows:<dataset>:<n>`), and completes the attempt. A retry of the task that emits
 * the same rows publishes the same keys, which the Dispatcher records once; a handler that
 * fails publishes nothing. `publish` is the explicit form: one batch, now, under your key.
 */

import type { TaskSurface } from "./client.js";
import type { EventIn, Fence, InvokeEvent, Json, JsonObject, QueryResult, Scope } from "./types.js";

/** Most rows in one buffer batch (the Dispatcher's inline limit). */
export const MAX_BATCH_ROWS = 1000;
/** Most bytes of JSON lines in one inline batch (the Dispatcher allows 240 KiB; margin kept). */
export const MAX_BATCH_BYTES = 200 * 1024;

const NAME = /^[a-z][a-z0-9_.\-]{0,127}$/;
const KEY = /^[A-Za-z0-9][A-Za-z0-9._:\-/]{0,199}$/;

export class UdfContext {
  /** The attempt's fence, sent with every `/v1/task/*` call. */
  readonly fence: Fence;
  /** The task's input (`work_payload`). */
  readonly payload: JsonObject;
  /** Dataset names this attempt may read through `query` (from its capability token). */
  readonly grantedDatasets: readonly string[];
  /** Aborted when the attempt's lease is lost or its task canceled: stop working. */
  readonly signal: AbortSignal;
  /** Rows held for publication, by dataset, in emission order. */
  readonly rows = new Map<string, JsonObject[]>();
  /** Events completed with the attempt (`final_events`), in emission order. */
  readonly events: EventIn[] = [];

  private readonly abort = new AbortController();

  constructor(
    readonly event: InvokeEvent,
    readonly surface: TaskSurface,
    /** Epoch milliseconds after which the runner ends this invocation. */
    readonly deadlineMs: number = Date.now() + event.timeout_s * 1000,
  ) {
    this.fence = { task_id: event.task_id, attempt: event.attempt, lease_token: event.lease_token };
    this.payload = event.payload ?? {};
    this.grantedDatasets = grantedDatasets(event.capability_token);
    this.signal = this.abort.signal;
  }

  /** Milliseconds left before the runner ends this invocation. */
  remainingMs(): number {
    return Math.max(0, this.deadlineMs - Date.now());
  }

  /** Hold rows for `dataset`, published when the handler returns successfully. */
  emit(dataset: string, rows: JsonObject | JsonObject[]): void {
    if (!NAME.test(dataset)) throw new TypeError(`emit: invalid dataset name ${JSON.stringify(dataset)}`);
    const list = Array.isArray(rows) ? rows : [rows];
    for (const [i, row] of list.entries()) {
      if (!isPlainObject(row)) throw new TypeError(`emit: row ${i} for ${dataset} is not a JSON object`);
    }
    const held = this.rows.get(dataset) ?? [];
    held.push(...list);
    this.rows.set(dataset, held);
  }

  /** Record an event, sent with the completion (deduplicated per task by `key`). */
  emitEvent(key: string, type: string, payload: JsonObject = {}): void {
    if (!KEY.test(key)) throw new TypeError(`emitEvent: invalid key ${JSON.stringify(key)}`);
    if (!NAME.test(type)) throw new TypeError(`emitEvent: invalid type ${JSON.stringify(type)}`);
    this.events.push({ key, type, payload });
  }

  /** Publish one batch now, under `key` (unique per task); returns whether it was a duplicate. */
  async publish(dataset: string, key: string, rows: JsonObject[], scope?: Scope): Promise<boolean> {
    const answer = await this.surface.bufferPublish(this.fence, {
      key,
      dataset,
      rows,
      ...(scope ? { scope } : {}),
    });
    return answer.duplicate;
  }

  /** Run SQL over the datasets this attempt was granted (`POST /v1/task/query`). */
  async query(sql: string, options: { maxRows?: number } = {}): Promise<QueryResult> {
    return this.surface.query(sql, options.maxRows);
  }

  /** `query`, its rows as objects keyed by column name. */
  async queryObjects(sql: string, options: { maxRows?: number } = {}): Promise<JsonObject[]> {
    const result = await this.query(sql, options);
    const names = result.columns.map((c) => c.name);
    return result.rows.map((row) => Object.fromEntries(names.map((n, i) => [n, row[i] ?? null])));
  }

  /** Extend the lease now (the runtime also heartbeats on its own while the handler runs). */
  async heartbeat(): Promise<void> {
    await this.surface.heartbeat(this.fence);
  }

  /** Mark the attempt as lost (called by the runtime when a heartbeat is refused). */
  cancel(reason: string): void {
    if (!this.abort.signal.aborted) this.abort.abort(new Error(reason));
  }
}

/** The `grants.datasets.read` claim of a compact JWS (not verified: the Dispatcher does that). */
export function grantedDatasets(token: string): string[] {
  const part = token.split(".")[1];
  if (!part) return [];
  try {
    const claims = JSON.parse(Buffer.from(part, "base64url").toString("utf8")) as {
      grants?: { datasets?: { read?: unknown } };
    };
    const read = claims.grants?.datasets?.read;
    return Array.isArray(read) ? read.filter((d): d is string => typeof d === "string") : [];
  } catch {
    return [];
  }
}

/** True for a plain JSON object (not an array, null, a class instance or a Map). */
export function isPlainObject(value: unknown): value is JsonObject {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return false;
  const proto = Object.getPrototypeOf(value) as unknown;
  return proto === Object.prototype || proto === null;
}

/** Split rows into batches of at most `MAX_BATCH_ROWS` rows and `MAX_BATCH_BYTES` of JSON. */
export function batches(rows: JsonObject[]): JsonObject[][] {
  const out: JsonObject[][] = [];
  let current: JsonObject[] = [];
  let size = 0;
  for (const row of rows) {
    const bytes = Buffer.byteLength(JSON.stringify(row)) + 1;
    if (current.length > 0 && (current.length >= MAX_BATCH_ROWS || size + bytes > MAX_BATCH_BYTES)) {
      out.push(current);
      current = [];
      size = 0;
    }
    current.push(row);
    size += bytes;
  }
  if (current.length > 0) out.push(current);
  return out;
}

export type { Json };
