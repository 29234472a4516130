/**
 * `@trace/udf`: what a Trace UDF written for Node.js imports.
 *
 *     import type { Handler } from "@trace/udf";
 *     export const handler: Handler = async (event, ctx) => { ... };
 *
 * The runtime (`@trace/udf/runtime`) and the local harness (`@trace/udf/harness`) are
 * separate entry points; `build.mjs` packages a handler and the runtime into a bundle.
 */

export { CAPABILITY_HEADER, HttpTaskSurface, type TaskSurface } from "./client.js";
export { MAX_BATCH_BYTES, MAX_BATCH_ROWS, UdfContext } from "./context.js";
export { ErrorTypes, NonRetryableError, TaskApiError } from "./errors.js";
export type { Handler, Outcome, RuntimeErrorBody } from "./runtime.js";
export type * from "./types.js";
