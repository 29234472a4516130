/**
 * What a handler receives: the invocation, its work payload, the datasets it was granted, and
 * calls scoped to its own attempt (the handler contract of `docs/architecture/udf.md`, the same
 * in the Python and Rust SDKs).
 *
 * Rows (`emitRows`) and events (`emitEvent`) are collected while the handler runs. After it
 * returns, the runtime publishes the rows as inline buffer batches keyed `{key}.{i}` (the
 * default key is `{dataset}.{n}`, `n` counting this handler's `emitRows` calls for the
 * dataset, so a retry of the same input publishes the same keys and the Dispatcher skips
 * them), and the events travel in the response, committed with the completion. A handler that
 * fails publishes nothing.
 */

import type { TaskSurface } from "./client.js";
import type { EventIn, Fence, InvokeEvent, JsonObject, QueryResult, Scope } from "./types.js";

/** Most rows in one inline batch. */
export const MAX_BATCH_ROWS = 1000;
/** Most bytes of canonical JSON lines (sorted keys, ASCII) in one inline batch. */
export const MAX_BATCH_BYTES = 240 * 1024;

const NAME = /^[a-z][a-z0-9_.\-]{0,127}$/;
const KEY = /^[A-Za-z0-9][A-Za-z0-9._:\-/]{0,190}$/;

/** Rows collected under one key. */
export interface CollectedBatch {
  dataset: string;
  key: string;
  rows: JsonObject[];
  scope?: Scope;
}

export class UdfContext {
  /** The attempt's fence, sent with every `/v1/task/*` call. */
  readonly fence: Fence;
  /** Batches collected so far, in call order. */
  readonly batches: CollectedBatch[] = [];
  /** Events committed with the completion, in call order. */
  readonly finalEvents: EventIn[] = [];
  private readonly calls = new Map<string, number>();

  constructor(
    /** The invoke event. */
    readonly event: InvokeEvent,
    readonly surface: TaskSurface,
    /** Epoch milliseconds by which the handler must answer (`Lambda-Runtime-Deadline-Ms`). */
    readonly deadlineMs?: number,
  ) {
    this.fence = { task_id: event.task_id, attempt: event.attempt, lease_token: event.lease_token };
  }

  /** The work payload (the task payload). */
  get payload(): JsonObject {
    return this.event.payload ?? {};
  }

  /** Dataset names this attempt may read (its token's `grants.datasets.read`). */
  get datasets(): string[] {
    return grantedDatasets(this.event.capability_token);
  }

  /** Milliseconds until the deadline, or null without one. */
  remainingMs(): number | null {
    return this.deadlineMs === undefined ? null : Math.max(0, this.deadlineMs - Date.now());
  }

  /**
   * Collect rows for the buffered `dataset`, published after the handler returns. Returns the
   * batch key. Throws `TypeError` for a bad name or key, a reused key, or a row that is not a
   * JSON object.
   */
  emitRows(dataset: string, rows: JsonObject[], options: { key?: string; scope?: Scope } = {}): string {
    if (!NAME.test(dataset)) throw new TypeError(`invalid dataset name ${JSON.stringify(dataset)}`);
    const n = this.calls.get(dataset) ?? 0;
    this.calls.set(dataset, n + 1);
    const key = options.key ?? `${dataset}.${n}`;
    if (!KEY.test(key)) throw new TypeError(`key ${JSON.stringify(key)} must match ${KEY.source}`);
    if (this.batches.some((b) => b.key === key)) throw new TypeError(`key ${JSON.stringify(key)} was already used`);
    for (const [i, row] of rows.entries()) {
      if (!isPlainObject(row)) throw new TypeError(`row ${i} for ${dataset} is not a JSON object`);
      JSON.stringify(row); // throws now for a BigInt or a cycle
    }
    this.batches.push({ dataset, key, rows: [...rows], ...(options.scope ? { scope: options.scope } : {}) });
    return key;
  }

  /** Collect an event, committed with the completion (deduplicated per task by `key`). */
  emitEvent(type: string, payload: JsonObject = {}, options: { key: string }): void {
    if (!NAME.test(type)) throw new TypeError(`invalid event type ${JSON.stringify(type)}`);
    if (!KEY.test(options.key)) throw new TypeError(`invalid event key ${JSON.stringify(options.key)}`);
    this.finalEvents.push({ key: options.key, type, payload });
  }

  /** Rows of `sql` over the granted datasets (`POST /v1/task/query`), as objects. */
  async query(sql: string, options: { maxRows?: number } = {}): Promise<JsonObject[]> {
    const result = await this.queryResult(sql, options);
    const names = result.columns.map((c) => c.name);
    return result.rows.map((row) => Object.fromEntries(names.map((n, i) => [n, row[i] ?? null])));
  }

  /** `query`'s whole answer: columns with their types, rows as arrays, truncated, versions. */
  async queryResult(sql: string, options: { maxRows?: number } = {}): Promise<QueryResult> {
    return this.surface.query(this.fence, sql, options.maxRows);
  }

  /** Tell the Dispatcher the attempt is alive and keep the renewed token. Throws `TaskApiError`
   * (409 `lease_lost` / `task_canceled`: stop). The Lite runner heartbeats on its own too. */
  async heartbeat(): Promise<void> {
    await this.surface.heartbeat(this.fence);
  }

  /** The collected rows by dataset. */
  get pendingRows(): Record<string, JsonObject[]> {
    const out: Record<string, JsonObject[]> = {};
    for (const b of this.batches) (out[b.dataset] ??= []).push(...b.rows);
    return out;
  }

  /** Publish every collected batch (inline, `{key}.{i}`); returns the number of calls. */
  async publishRows(): Promise<number> {
    let calls = 0;
    for (const batch of this.batches) {
      for (const [i, rows] of chunkRows(batch.rows).entries()) {
        await this.surface.bufferPublish(this.fence, {
          key: `${batch.key}.${i}`,
          dataset: batch.dataset,
          rows,
          ...(batch.scope ? { scope: batch.scope } : {}),
        });
        calls += 1;
      }
    }
    return calls;
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

/** Bytes of a row as a canonical JSON line (ASCII: each non-ASCII UTF-16 unit is `\uXXXX`). */
export function lineBytes(row: JsonObject): number {
  const text = JSON.stringify(row);
  let extra = 0;
  for (let i = 0; i < text.length; i++) if (text.charCodeAt(i) > 0x7f) extra += 5;
  return text.length + extra + 1;
}

/** Split rows into batches of at most `MAX_BATCH_ROWS` rows and `MAX_BATCH_BYTES` bytes.
 * Throws `RangeError` for a single row over the byte limit. */
export function chunkRows(rows: JsonObject[]): JsonObject[][] {
  const out: JsonObject[][] = [];
  let current: JsonObject[] = [];
  let size = 0;
  for (const row of rows) {
    const bytes = lineBytes(row);
    if (bytes > MAX_BATCH_BYTES) throw new RangeError(`a row of ${bytes} bytes exceeds ${MAX_BATCH_BYTES}`);
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
