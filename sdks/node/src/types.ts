/**
 * The wire shapes a UDF sees: the invoke event (the same object the Lite runner and the AWS
 * launcher hand to an attempt) and the `/v1/task/*` bodies the runtime sends on its behalf.
 */

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A JSON object: a row, an event payload, a handler's result. */
export type JsonObject = { [key: string]: Json };

/** The worker-pool slot an attempt holds (null when its job uses no pool). */
export interface Slot {
  pool: string;
  index: number;
  env: Record<string, string>;
  secret_env: string[];
}

/**
 * The invoke event: `/internal/task-fetch`'s task payload plus what the attempt needs to act
 * as itself (its capability token, lease token and the bundle's URL).
 */
export interface InvokeEvent {
  task_id: string;
  org_id: string;
  job_id: string | null;
  operator: string;
  /** The task's own input (`work_payload`). */
  payload: JsonObject;
  status: string;
  attempt: number;
  max_attempts: number;
  timeout_s: number;
  /** Where this attempt may stage objects. */
  staging_prefix: string;
  slot?: Slot | null;
  capability_token: string;
  lease_token: string;
  lease_expires_at: string;
  bundle_url: string;
  [extra: string]: unknown;
}

/** A batch scope: exactly one kind. */
export type Scope =
  | { cursor: string }
  | { partition_key: string }
  | { range: { start: number; end: number } };

/** One event of `final_events` (committed with the completion). */
export interface EventIn {
  key: string;
  type: string;
  payload: JsonObject;
}

/** A fence: which attempt a call is for. */
export interface Fence {
  task_id: string;
  attempt: number;
  lease_token: string;
}

export interface HeartbeatResponse {
  lease_expires_at: string;
  capability_token: string;
}

export interface BufferPublishResponse {
  accepted: boolean;
  duplicate: boolean;
}

/** The body a runtime posts to `/invocation/{id}/response`: the runner completes with it. */
export interface UdfResponse {
  result: JsonObject | null;
  final_events: EventIn[];
}

/** The answer of `POST /v1/task/query` (format json). */
export interface QueryResult {
  columns: { name: string; type: string }[];
  rows: Json[][];
  truncated: boolean;
  versions: Record<string, string>;
}

/** An inline buffer batch for `POST /v1/task/buffer-publish`. */
export interface InlineBatch {
  key: string;
  dataset: string;
  rows: JsonObject[];
  scope?: Scope;
}
