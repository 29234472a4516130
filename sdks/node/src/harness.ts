/**
 * The local harness: run a handler against an input without a platform. The task surface is
 * in memory: it records heartbeats, published batches and queries, and answers
 * `ctx.query` from the answers you give (SQL text → rows) or a function of your own.
 *
 *     import { runLocal } from "@trace/udf/harness";
 *     const out = await runLocal(handler, { payload: { n: 3 } }, { query: { "SELECT ...": [...] } });
 *     out.rows.squares  // the rows the handler emitted, as they would be published
 */

import { randomUUID } from "node:crypto";

import type { TaskSurface } from "./client.js";
import { TaskApiError } from "./errors.js";
import { invoke, type Handler, type Outcome } from "./runtime.js";
import type {
  EventIn,
  Fence,
  InlineBatch,
  InvokeEvent,
  JsonObject,
  QueryResult,
} from "./types.js";

export interface LocalOptions {
  /** Answers for `ctx.query`: a function of the SQL, or a map from SQL text to rows. */
  query?: ((sql: string) => JsonObject[] | QueryResult) | Record<string, JsonObject[]>;
  /** Datasets the attempt is granted (default: none). */
  grants?: string[];
}

/** What a local run produced. */
export interface LocalRun {
  /** The response (`{result, final_events}`) or the error body the runtime would post. */
  outcome: Outcome;
  /** Published rows by dataset, in order (none when the handler failed). */
  rows: Record<string, JsonObject[]>;
  batches: InlineBatch[];
  /** The events the completion would commit. */
  events: EventIn[];
  queries: string[];
  heartbeats: number;
}

/** The in-memory `TaskSurface` the harness runs against. */
export class LocalTaskSurface implements TaskSurface {
  readonly batches: InlineBatch[] = [];
  readonly queries: string[] = [];
  heartbeats = 0;

  constructor(private readonly options: LocalOptions = {}) {}

  async heartbeat(_fence: Fence): Promise<{ lease_expires_at: string; capability_token: string }> {
    this.heartbeats += 1;
    return { lease_expires_at: new Date(Date.now() + 60_000).toISOString(), capability_token: "local" };
  }

  async bufferPublish(_fence: Fence, batch: InlineBatch): Promise<{ accepted: boolean; duplicate: boolean }> {
    if (this.batches.some((b) => b.key === batch.key)) return { accepted: true, duplicate: true };
    this.batches.push(batch);
    return { accepted: true, duplicate: false };
  }

  async query(_fence: Fence, sql: string, _maxRows?: number): Promise<QueryResult> {
    this.queries.push(sql);
    const source = this.options.query;
    const answer = typeof source === "function" ? source(sql) : source?.[sql];
    if (answer === undefined) throw new TaskApiError(404, "not_found", `the harness has no answer for: ${sql}`);
    if (!Array.isArray(answer)) return answer;
    const names = answer.length > 0 ? Object.keys(answer[0] ?? {}) : [];
    return {
      columns: names.map((name) => ({ name, type: "JSON" })),
      rows: answer.map((row) => names.map((n) => row[n] ?? null)),
      truncated: false,
      versions: {},
    };
  }
}

/** An invoke event for a local run: `input`'s fields over harmless defaults. */
export function localEvent(input: Partial<InvokeEvent> = {}, grants: string[] = []): InvokeEvent {
  const claims = Buffer.from(JSON.stringify({ grants: { datasets: { read: grants } } })).toString("base64url");
  return {
    task_id: randomUUID(),
    org_id: "00000000-0000-0000-0000-000000000000",
    job_id: null,
    operator: "udf.local",
    payload: {},
    status: "running",
    attempt: 1,
    max_attempts: 1,
    timeout_s: 60,
    staging_prefix: "local/",
    slot: null,
    capability_token: `e30.${claims}.local`,
    lease_token: randomUUID(),
    lease_expires_at: new Date(Date.now() + 60_000).toISOString(),
    bundle_url: "file:///dev/null",
    ...input,
  };
}

/** Run `handler` once against `input` with the in-memory surface. */
export async function runLocal(
  handler: Handler,
  input: Partial<InvokeEvent> = {},
  options: LocalOptions = {},
): Promise<LocalRun> {
  const surface = new LocalTaskSurface(options);
  const outcome = await invoke(localEvent(input, options.grants), handler, surface);
  const rows: Record<string, JsonObject[]> = {};
  for (const batch of surface.batches) (rows[batch.dataset] ??= []).push(...batch.rows);
  return {
    outcome,
    rows,
    batches: surface.batches,
    events: outcome.ok ? outcome.response.final_events : [],
    queries: surface.queries,
    heartbeats: surface.heartbeats,
  };
}
