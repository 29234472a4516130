/**
 * An example UDF: sums a granted dataset through the Query Service (when `payload.input` names
 * one), emits `payload.n` rows to the buffered dataset `payload.output` and returns a summary.
 */
import { NonRetryableError, type Handler, type JsonObject } from "@trace/udf";

export const handler: Handler = async (ctx) => {
  const n = ctx.payload.n ?? 3;
  if (typeof n !== "number" || !Number.isInteger(n) || n < 0) {
    throw new NonRetryableError("payload.n must be a non-negative integer");
  }
  let base = 0;
  const input = ctx.payload.input;
  if (typeof input === "string") {
    const [row] = await ctx.query(`SELECT count(*) AS total FROM ${input}`);
    base = Number(row?.total ?? 0);
  }
  const rows: JsonObject[] = [];
  for (let i = 0; i < n; i++) rows.push({ i, sq: i * i, base });
  const output = typeof ctx.payload.output === "string" ? ctx.payload.output : "squares";
  ctx.emitRows(output, rows);
  ctx.emitEvent("squares.done", { rows: n }, { key: "done" });
  return { emitted: n, base, attempt: ctx.event.attempt };
};
