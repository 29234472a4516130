/**
 * `@trace/udf`: what a Trace UDF written for Node.js imports.
 *
 *     import type { Handler } from "@trace/udf";
 *     export const handler: Handler = async (ctx) => { ... };
 *
 * The runtime (`@trace/udf/runtime`) and the local harness (`@trace/udf/harness`) are
 * separate entry points; `build.mjs` packages a handler and the runtime into a bundle.
 */

export { CAPABILITY_HEADER, HttpTaskSurface, type TaskSurface } from "./client.js";
export { chunkRows, MAX_BATCH_BYTES, MAX_BATCH_ROWS, UdfContext, type CollectedBatch } from "./context.js";
export { NonRetryableError, RuntimeErrorTypes, TaskApiError } from "./errors.js";
export type { Handler, Outcome, RuntimeErrorBody } from "./runtime.js";
export type * from "./types.js";
