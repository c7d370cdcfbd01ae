/**
 * Talking to ferryd over NATS request/reply: `ferry.api.<site>.<op>` with a JSON body, answered by
 * `{ok: true, result}` or `{ok: false, error: {code, message}}`. The CLI uses this, and so does
 * one site's ferryd reaching another's (a recovery operation runs steps at both sites).
 */
import {
  connect,
  type NatsConnection,
  type NodeConnectionOptions,
  RequestError,
  TimeoutError,
} from "@nats-io/transport-node";
import { ErrorCode, FerryError, invalid } from "./errors.js";

export const apiSubject = (site: string, op: string) => `ferry.api.${site}.${op}`;

export type Reply<T> = { ok: true; result: T } | { ok: false; error: { code: string; message: string } };

/** `nats://user:password@host:port[,host:port…]` → connection options, credentials separate. */
export function natsOptions(url: string): NodeConnectionOptions {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw invalid(`'${url}' is not a NATS URL: use nats://user:password@host:port`);
  }
  if (parsed.protocol !== "nats:" && parsed.protocol !== "tls:") {
    throw invalid(`'${url}' is not a NATS URL: use nats://user:password@host:port`);
  }
  const options: NodeConnectionOptions = { servers: parsed.host };
  if (parsed.username !== "") {
    options.user = decodeURIComponent(parsed.username);
    options.pass = decodeURIComponent(parsed.password);
  }
  return options;
}

/** Host and port of a NATS URL, never its password (for messages). */
export function natsHost(url: string): string {
  try {
    return new URL(url).host || url;
  } catch {
    return "(unparsable URL)";
  }
}

export async function connectNats(url: string, name: string, extra: NodeConnectionOptions = {}) {
  const options = { ...natsOptions(url), name, ...extra };
  try {
    return await connect(options);
  } catch (error) {
    throw new FerryError(
      ErrorCode.unreachable,
      `cannot connect to NATS at ${natsHost(url)}: ${(error as Error).message}; is the site's nats-server running, ` +
        "and are the user and password in the URL right?",
      { cause: error },
    );
  }
}

export const DEFAULT_TIMEOUT_MS = 15_000;

/** One request to a site's ferryd; a refusal or failure comes back as a FerryError with its code. */
export async function call<T>(
  nc: NatsConnection,
  site: string,
  op: string,
  body: unknown = {},
  timeoutMs = DEFAULT_TIMEOUT_MS,
): Promise<T> {
  let reply: Reply<T>;
  try {
    const message = await nc.request(apiSubject(site, op), JSON.stringify(body), { timeout: timeoutMs });
    reply = message.json<Reply<T>>();
  } catch (error) {
    if (error instanceof RequestError && error.isNoResponders()) {
      throw new FerryError(
        ErrorCode.unreachable,
        `no ferryd answers for site ${site}: start \`ferry daemon --site ${site} …\` there, or check the site name ` +
          "(`ferry site list`) and the link between the sites",
        { cause: error },
      );
    }
    if (error instanceof TimeoutError || (error instanceof RequestError && error.cause instanceof TimeoutError)) {
      throw new FerryError(
        ErrorCode.unreachable,
        `site ${site}'s ferryd did not answer ${op} within ${timeoutMs / 1000}s; it may be busy or cut off`,
        { cause: error },
      );
    }
    throw error;
  }
  if (!reply.ok) throw new FerryError(reply.error.code, reply.error.message);
  return reply.result;
}
