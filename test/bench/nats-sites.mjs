/**
 * Two Ferry sites' nats-servers for a bench run, from the repository's templates (infra/nats/):
 * site A accepts the leafnode link, site B dials it — directly, with no test proxy in between, so
 * the link costs what it costs in production on one host. The same topology as testkit's
 * `startTwoSites`, reimplemented small because the bench is plain JavaScript and testkit keeps its
 * site class private. It starts the servers as children of the bench (processes.mjs) and stops
 * them by PID; it never touches any other nats-server.
 */
import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { freePort } from "./free-port.mjs";
import { hasExited, logTail, spawnLogged, stop } from "./processes.mjs";

const TEMPLATES = fileURLToPath(new URL("../../infra/nats/", import.meta.url));
const PLACEHOLDER = /\{\{([A-Z0-9_]+)\}\}/g;
const INCLUDE = /^\s*include\s+"([^"]+)"/gm;

/**
 * Render `template` and every file it includes into `outDir`. Fails on a placeholder without a
 * value, as the test harnesses do: a half-rendered config must never reach nats-server.
 */
export function renderConfig(templateDir, template, outDir, values) {
  const source = readFileSync(join(templateDir, template), "utf8");
  const rendered = source.replace(PLACEHOLDER, (_, name) => {
    if (values[name] === undefined) throw new Error(`${join(templateDir, template)}: no value for {{${name}}}`);
    return values[name];
  });
  writeFileSync(join(outDir, template.replace(/\.tmpl$/, "")), rendered);
  for (const [, included] of rendered.matchAll(INCLUDE)) renderConfig(templateDir, `${included}.tmpl`, outDir, values);
}

/**
 * Start site A (`site-a`, region eu-es) and site B (`site-b`, eu-de) under `dir` and wait until
 * both are healthy and linked. Resolves to `{ a, b, stop() }`; each site has `name`, `region`
 * and `url` (its ferryd user, credentials inside: pass it through `$FERRY_NATS`, not argv).
 */
export async function startNatsSites(dir, timeoutMs = 20_000) {
  const leafPassword = secret();
  const leafPort = await freePort();
  const sites = [];
  const stopAll = async () => {
    // B first, so that A does not log a dropped link for a site that is going away anyway.
    for (const site of [...sites].reverse()) await stop(site.child);
  };
  try {
    for (const [name, region, template, extra] of [
      ["site-a", "eu-es", "site-a.conf.tmpl", { LEAF_PORT: String(leafPort), LEAF_ADVERTISE: `127.0.0.1:${leafPort}` }],
      ["site-b", "eu-de", "site-b.conf.tmpl", { LEAF_REMOTE: `127.0.0.1:${leafPort}` }],
    ]) {
      const siteDir = join(dir, name);
      mkdirSync(join(siteDir, "store"), { recursive: true });
      const port = await freePort();
      const httpPort = await freePort();
      const ferrydPassword = secret();
      renderConfig(TEMPLATES, template, siteDir, {
        SITE: name,
        REGION: region,
        PORT: String(port),
        HTTP_PORT: String(httpPort),
        STORE: join(siteDir, "store"),
        FERRYD_PASSWORD: ferrydPassword,
        CLI_PASSWORD: secret(),
        PING_INTERVAL: "10s",
        LEAF_PASSWORD: leafPassword,
        ...extra,
      });
      const config = join(siteDir, template.replace(/\.tmpl$/, ""));
      const child = spawnLogged(
        `nats-server ${name}`,
        "nats-server",
        ["-c", config, "-P", join(siteDir, "nats-server.pid")],
        join(siteDir, "nats-server.log"),
      );
      sites.push({ name, region, httpPort, child, url: `nats://ferryd:${ferrydPassword}@127.0.0.1:${port}` });
    }
    for (const site of sites) await waitUntil(site, "healthz", (r) => r.status === "ok", timeoutMs);
    for (const site of sites) await waitUntil(site, "leafz", (r) => r.leafnodes === 1, timeoutMs);
  } catch (error) {
    await stopAll();
    throw error;
  }
  const [a, b] = sites;
  return { a, b, stop: stopAll };
}

/** Poll a monitoring endpoint of `site` until `ok(json)`, or fail: the server exited, or the deadline passed. */
async function waitUntil(site, endpoint, ok, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (hasExited(site.child)) throw new Error(`${site.child.label} exited:\n${logTail(site.child)}`);
    try {
      const response = await fetch(`http://127.0.0.1:${site.httpPort}/${endpoint}`, {
        signal: AbortSignal.timeout(2_000),
      });
      if (ok(await response.json())) return;
    } catch {
      // Not listening yet.
    }
    if (Date.now() > deadline)
      throw new Error(
        `${site.child.label}: /${endpoint} not ready within ${timeoutMs / 1000} s:\n${logTail(site.child)}`,
      );
    await sleep(25);
  }
}

function secret() {
  return randomBytes(12).toString("hex");
}
