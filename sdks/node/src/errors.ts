/**
 * The SDK's errors. A handler throws `NonRetryableError` to fail its task for good; any other
 * exception fails the attempt and the task is retried per its policy. The runtime reports a
 * failure to the runner as `errorType` = the error's `name` (`TypeError`, `NonRetryableError`,
 * ...) or one of `RuntimeErrorTypes`; the runner completes the attempt with `error.code`
 * `udf_error` and the message `errorType: errorMessage`.
 */

/** Thrown by a handler: the task fails without a retry. */
export class NonRetryableError extends Error {
  override name = "NonRetryableError";
}

/** A `/v1/task/*` call answered with an error body (`{error, message, field?}`). */
export class TaskApiError extends Error {
  override name = "TaskApiError";
  constructor(
    /** The HTTP status (0 when the Dispatcher could not be reached). */
    readonly status: number,
    /** The body's `error` code: `lease_lost`, `task_canceled`, `validation_failed`, ... */
    readonly code: string,
    message: string,
    /** The body's `field` path, when the error names one. */
    readonly field?: string,
  ) {
    super(`${code}: ${message}${field ? ` (${field})` : ""}`);
  }

  /** True for an answer worth retrying (unreachable, 5xx). */
  get transient(): boolean {
    return this.status === 0 || this.status >= 500;
  }
}

/** The `errorType`s the runtime itself reports (besides a handler's own error names). */
export const RuntimeErrorTypes = {
  /** The event is not an invoke event. */
  invalidEvent: "Runtime.InvalidEvent",
  /** The handler returned something other than a JSON object, null or undefined. */
  invalidResult: "Runtime.InvalidResult",
  /** Publishing the emitted rows failed (the Dispatcher refused or could not be reached). */
  publishFailed: "Runtime.PublishFailed",
  /** `_HANDLER` names no module or no exported function. */
  handlerNotFound: "Runtime.HandlerNotFound",
  /** The handler's module threw while loading. */
  importModuleError: "Runtime.ImportModuleError",
  /** An allocation failed (a `RangeError` such as "Array buffer allocation failed"). */
  outOfMemory: "RangeError.OutOfMemory",
} as const;
