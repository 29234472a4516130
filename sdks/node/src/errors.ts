/**
 * The SDK's errors. A handler throws `NonRetryableError` to fail its task for good; any other
 * exception fails the attempt and the task is retried per its policy.
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
    super(`${code}: ${message}`);
  }

  /** True for an answer worth retrying (unreachable, 5xx). */
  get transient(): boolean {
    return this.status === 0 || this.status >= 500;
  }
}

/**
 * Why an invocation failed, as the runtime reports it to the runner (`errorType` of the
 * Runtime API's `/error` body) and to the Dispatcher (`error.code` of the completion).
 */
export const ErrorTypes = {
  /** The handler threw (or rejected). */
  handler: { errorType: "Handler.Error", code: "handler_error" },
  /** The handler returned something that is not a JSON object, null or undefined. */
  invalidResult: { errorType: "Runtime.InvalidResult", code: "invalid_result" },
  /** The event is not an invoke event. */
  invalidEvent: { errorType: "Runtime.InvalidEvent", code: "invalid_event" },
  /** The Dispatcher refused or could not take a call the runtime had to make. */
  dispatcher: { errorType: "Runtime.DispatcherError", code: "dispatcher_error" },
  /** The attempt's lease was lost or its task canceled while the handler ran. */
  leaseLost: { errorType: "Runtime.LeaseLost", code: "lease_lost" },
} as const;
