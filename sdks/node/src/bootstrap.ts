/**
 * The entry point of a Node bundle's `bootstrap`: load the handler named by `_HANDLER`
 * (`file.export`, default `handler.handler`, the file resolved as `file.mjs` or `file.js` in
 * `LAMBDA_TASK_ROOT`, default this file's directory) and serve the Runtime API. A handler that
 * cannot be loaded is reported on `/runtime/init/error` and the process exits 1.
 */

import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

import { RuntimeErrorTypes } from "./errors.js";
import { initError, serve, type Handler } from "./runtime.js";

/** Resolve and import the handler; throws an Error whose name is the init error type. */
export async function loadHandler(spec: string, root: string): Promise<Handler> {
  const dot = spec.lastIndexOf(".");
  const file = dot > 0 ? spec.slice(0, dot) : spec;
  const name = dot > 0 ? spec.slice(dot + 1) : "handler";
  const path = [".mjs", ".js", ".cjs"].map((ext) => join(root, file + ext)).find((p) => existsSync(p));
  if (!path) throw named(RuntimeErrorTypes.handlerNotFound, `no module ${file}.mjs or ${file}.js in ${root}`);
  let mod: Record<string, unknown>;
  try {
    mod = (await import(pathToFileURL(path).href)) as Record<string, unknown>;
  } catch (exc) {
    throw named(RuntimeErrorTypes.importModuleError, `${file}: ${exc instanceof Error ? `${exc.name}: ${exc.message}` : String(exc)}`);
  }
  const fn = mod[name] ?? (mod.default as Record<string, unknown> | undefined)?.[name];
  if (typeof fn !== "function") throw named(RuntimeErrorTypes.handlerNotFound, `${file} exports no function ${name}`);
  return fn as Handler;
}

function named(name: string, message: string): Error {
  const err = new Error(message);
  err.name = name;
  return err;
}

export async function main(): Promise<void> {
  const root = process.env.LAMBDA_TASK_ROOT ?? dirname(fileURLToPath(import.meta.url));
  let handler: Handler;
  try {
    handler = await loadHandler(process.env._HANDLER ?? "handler.handler", root);
  } catch (exc) {
    const err = exc instanceof Error ? exc : new Error(String(exc));
    process.stderr.write(`trace-udf: ${err.name}: ${err.message}\n`);
    await initError(err.name, err.message).catch(() => undefined);
    process.exit(1);
  }
  await serve(handler);
}
