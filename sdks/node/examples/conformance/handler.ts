/**
 * A UDF whose behaviour `payload.mode` chooses, for the runtime conformance tests shared with
 * the Rust SDK (tests/udf): ok, two_calls, big, error, non_retryable, crash, array, string,
 * garbage, heartbeat, query; and for the runner's failure tests: exit (the process exits
 * mid-invocation), hang, memory (allocates 1 GiB).
 */
import { NonRetryableError, type Handler, type JsonObject } from "@trace/udf";

export const handler: Handler = async (ctx) => {
  const mode = String(ctx.payload.mode ?? "ok");
  const n = Number(ctx.payload.n ?? 0);
  const squares = (from: number, count: number): JsonObject[] =>
    Array.from({ length: count }, (_, k) => ({ i: from + k, sq: (from + k) * (from + k) }));
  switch (mode) {
    case "ok":
      ctx.emitRows("squares", squares(0, n));
      ctx.emitEvent("udf.done", { n }, { key: "done" });
      return { n, granted: ctx.datasets.length };
    case "two_calls":
      ctx.emitRows("squares", squares(0, 1));
      ctx.emitRows("squares", squares(1, 1));
      ctx.emitRows("squares", squares(2, 1), { key: "mine" });
      return { n: 3 };
    case "big":
      ctx.emitRows("squares", squares(0, n));
      return { n };
    case "error":
      ctx.emitRows("squares", squares(0, 1));
      throw new TypeError("boom at row 3");
    case "non_retryable":
      throw new NonRetryableError("input is malformed");
    case "crash":
      ctx.emitRows("squares", squares(0, 1));
      setTimeout(() => {
        throw new RangeError("index out of bounds at row 7");
      }, 1);
      return await new Promise<never>(() => undefined);
    case "array":
      ctx.emitRows("squares", squares(0, 1));
      return [1, 2, 3] as unknown as JsonObject;
    case "string":
      return "not an object" as unknown as JsonObject;
    case "garbage":
      process.stdout.write(Buffer.from([0xff, 0xfe, 0x00, 0x1b, 0x5b, 0x32, 0x4a, 0x0a]));
      process.stdout.write("{not json at all\n");
      process.stderr.write("\u0000\u0007 garbage on stderr\n");
      return { fine: true };
    case "heartbeat":
      await ctx.heartbeat();
      ctx.emitRows("squares", squares(0, 1));
      return { beat: true };
    case "query": {
      const rows = await ctx.query("SELECT n FROM blocks", { maxRows: 10 });
      ctx.emitRows("copies", rows);
      return { read: rows.length };
    }
    case "exit":
      ctx.emitRows("squares", squares(0, 1));
      process.exit(3);
    case "hang":
      ctx.emitRows("squares", squares(0, 1));
      return await new Promise<never>(() => setInterval(() => undefined, 1000));
    case "memory": {
      ctx.emitRows("squares", squares(0, 1));
      const hog = Buffer.alloc(2 ** 30);
      return { n: hog.length };
    }
    default:
      throw new Error(`unknown mode ${mode}`);
  }
};
