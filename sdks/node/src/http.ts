/**
 * One HTTP/1.1 request over `node:http`, a new connection each (`agent: false`, no Nagle
 * delay): the Runtime API and the task API are on loopback or a private address, and Node's
 * `fetch` (undici) added tens of milliseconds per round trip there (measured with the
 * conformance handler: ~25 ms per invocation against ~1 ms for the Rust runtime).
 */

import { request } from "node:http";

export interface HttpAnswer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/** Send `body` (if any) to `url` and read the whole answer. `timeoutMs` 0: no timeout. */
export function httpRequest(
  method: string,
  url: string,
  body?: string,
  headers: Record<string, string> = {},
  timeoutMs = 0,
): Promise<HttpAnswer> {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : Buffer.from(body);
    const req = request(
      url,
      {
        method,
        agent: false,
        headers: { ...headers, ...(data ? { "Content-Length": String(data.length) } : {}) },
        ...(timeoutMs > 0 ? { timeout: timeoutMs } : {}),
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (chunk: Buffer) => chunks.push(chunk));
        res.on("end", () =>
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString("utf8") }),
        );
        res.on("error", reject);
      },
    );
    req.on("socket", (socket) => socket.setNoDelay(true));
    req.on("timeout", () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on("error", reject);
    req.end(data);
  });
}
