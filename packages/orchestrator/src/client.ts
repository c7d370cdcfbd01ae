/**
 * Talking to ferryd over NATS request/reply: `ferry.api.<site>.<op>` with a JSON body, answered by
 * `{ok: true, result}` or `{ok: false, error: {code, message}}`. The CLI uses this, and so does
 * one site's ferryd reaching another's (a recovery operation runs steps at both sites).
 */
import {
  connect,
  type Msg,
  type NatsConnection,
  type NodeConnectionOptions,
  RequestError,
  TimeoutError,
} from "@nats-io/transport-node";
import { ErrorCode, errorBody, FerryError, invalid } from "./errors.js";

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

/** Why a request got no answer: nobody listens on its subject, or nobody answered in time. */
export type Silence = "no-responders" | "timeout";

/**
 * One request in the `Reply` envelope: a refusal or failure comes back as a FerryError with its
 * code, no answer as an `unreachable` one saying what `silent` says.
 */
export async function request<T>(
  nc: NatsConnection,
  subject: string,
  body: unknown,
  timeoutMs: number,
  silent: (why: Silence) => string,
): Promise<T> {
  let reply: Reply<T>;
  try {
    reply = (await nc.request(subject, JSON.stringify(body), { timeout: timeoutMs })).json<Reply<T>>();
  } catch (error) {
    const why: Silence | null =
      error instanceof RequestError && error.isNoResponders()
        ? "no-responders"
        : error instanceof TimeoutError || (error instanceof RequestError && error.cause instanceof TimeoutError)
          ? "timeout"
          : null;
    if (why === null) throw error;
    throw new FerryError(ErrorCode.unreachable, silent(why), { cause: error });
  }
  if (!reply.ok) throw new FerryError(reply.error.code, reply.error.message);
  return reply.result;
}

/** Answer request `m` with what `work` returns — or the error it throws — in the `Reply` envelope. */
export async function answer(m: Msg, work: () => Promise<unknown>): Promise<void> {
  let reply: Reply<unknown>;
  try {
    reply = { ok: true, result: (await work()) ?? null };
  } catch (error) {
    reply = { ok: false, error: errorBody(error) };
  }
  m.respond(JSON.stringify(reply));
}

/** One request to a site's ferryd; a refusal or failure comes back as a FerryError with its code. */
export function call<T>(
  nc: NatsConnection,
  site: string,
  op: string,
  body: unknown = {},
  timeoutMs = DEFAULT_TIMEOUT_MS,
): Promise<T> {
  return request<T>(nc, apiSubject(site, op), body, timeoutMs, (why) =>
    why === "no-responders"
      ? `no ferryd answers for site ${site}: start \`ferry daemon --site ${site} …\` there, or check the site name ` +
        "(`ferry site list`) and the link between the sites"
      : `site ${site}'s ferryd did not answer ${op} within ${timeoutMs / 1000}s; it may be busy or cut off`,
  );
}
