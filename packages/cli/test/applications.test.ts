/**
 * Applications end to end over two real sites: two nats-servers linked by a leafnode, one ferryd
 * (`ferry daemon`) per site, and the `ferry` CLI talking to them over NATS as the sites' `cli`
 * user. One application of two volumes is protected from A to B, failed over (unplanned), failed
 * back, migrated (planned) and drilled; bytes are checked with sha256 of the NBD exports after
 * every step, and bad input is checked as a user sees it: exit status and one `ferry:` line.
 */
import { randomBytes } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type {
  Application,
  FerryEvent,
  Operation,
  PointMetadata,
  ProtectionStatus,
  RecoveryPoint,
} from "@ferry/orchestrator";
import {
  FerryCli,
  type FerryServe,
  qemuIo,
  Sandbox,
  exportSha256 as sha256Of,
  startTwoSites,
  type TwoSites,
  waitFor,
} from "@ferry/testkit";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { atSite, daemonSite, pointAfter, waitForSites } from "./site-service.js";

const BIN = fileURLToPath(new URL("../bin/ferry.js", import.meta.url));

let sites: TwoSites;
let sandbox: Sandbox;
let ferry: FerryCli;
const ferryd: Record<"a" | "b", { data: string; serve: FerryServe; metrics: string }> = {} as never;

async function startFerryd(site: "a" | "b", data?: string): Promise<void> {
  const started = await daemonSite(ferry, sandbox, sites[site], { data, extra: ["--metrics", "127.0.0.1:0"] });
  const metrics = /metrics on (http:\/\/\S+)\/metrics/.exec(started.serve.servingLine)?.[1];
  if (metrics === undefined) throw new Error(`ferryd did not say where its metrics are: ${started.serve.servingLine}`);
  ferryd[site] = { ...started, metrics };
}

function at(site: "a" | "b", args: readonly string[]) {
  return atSite(sites[site], args);
}

function exportSha256(uri: string): Promise<string> {
  return sha256Of(sandbox, uri);
}

async function digests(site: "a" | "b", volumes: readonly string[]): Promise<string[]> {
  return Promise.all(volumes.map((v) => exportSha256(ferryd[site].serve.uri(v))));
}

beforeAll(async () => {
  sites = await startTwoSites();
  sandbox = new Sandbox();
  ferry = new FerryCli(sandbox, BIN);
  await startFerryd("a");
  await startFerryd("b");
  await waitForSites(ferry, sites.a, 2);
});

afterAll(async () => {
  await sandbox?.cleanup();
  await sites?.stop();
});

const VOLUMES = ["shop-db", "shop-logs"];

describe("applications across two sites", () => {
  it("refuses bad input with a clear message and exit status", async () => {
    const rpo = await ferry.run(
      at("a", ["policy", "create", "bad", "--mode", "async", "--interval", "5s", "--rpo", "1s"]),
    );
    expect(rpo.code).toBe(2);
    expect(rpo.stderr).toMatch(/^ferry: policy bad: --rpo 1s is shorter than the interval \(5s\)/);
    const mode = await ferry.run(at("a", ["policy", "create", "bad", "--mode", "fast"]));
    expect(mode.code).toBe(2);
    expect(mode.stderr).toContain("'fast' is invalid");
    const name = await ferry.run(at("a", ["policy", "create", "Bad_Name", "--mode", "async"]));
    expect(name.code).toBe(2);
    expect(name.stderr).toContain('policy name "Bad_Name" is not valid');
    const unknown = await ferry.run(at("a", ["app", "show", "nope"]));
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toBe("ferry: application nope does not exist at site site-a: see `ferry app list`\n");
    const noSite = await ferry.run(["status", "--nats", sites.a.cliUrl], { env: { ...process.env, FERRY_SITE: "" } });
    expect(noSite.code).toBe(2);
    const missing = await ferry.run(at("a", ["app", "create", "shop", "--volume", "shop-db"]));
    expect(missing.code).toBe(2);
    expect(missing.stderr).toContain("volume shop-db does not exist at this site: add --size");
    const noFerryd = await ferry.run(["status", "--nats", sites.a.cliUrl, "--site", "site-x"]);
    expect(noFerryd.code).toBe(1);
    expect(noFerryd.stderr).toContain("no ferryd answers for site site-x");
  });

  it("protects an application to B, refusing a region its policy does not allow", async () => {
    const app = await ferry.json<Application>(
      at("a", ["app", "create", "shop", "--volume", VOLUMES[0] ?? "", "--volume", VOLUMES[1] ?? "", "--size", "8M"]),
    );
    expect(app).toMatchObject({ name: "shop", volumes: VOLUMES, active: "site-a", origin: "site-a" });
    // Idempotent.
    await ferry.ok(at("a", ["app", "create", "shop", "--volume", "shop-db", "--volume", "shop-logs", "--size", "8M"]));

    await ferry.ok(at("a", ["policy", "create", "spain-only", "--mode", "async", "--allowed-regions", "eu-es"]));
    const refused = await ferry.run(at("a", ["protect", "shop", "--policy", "spain-only", "--to", "site-b"]));
    expect(refused.code).toBe(1);
    expect(refused.stderr).toBe(
      "ferry: residency: application shop may not be protected to site site-b: its region eu-de is not among the " +
        "regions policy spain-only allows (eu-es); nothing was changed\n",
    );
    expect(await ferry.json<ProtectionStatus[]>(at("a", ["status"]))).toEqual([]);

    await ferry.ok(
      at("a", ["policy", "create", "gold", "--mode", "async", "--interval", "500ms", "--rpo", "5s", "--retain", "200"]),
    );
    const out = await ferry.ok(at("a", ["protect", "shop", "--policy", "gold", "--to", "site-b"]));
    expect(out).toContain("protecting shop from site-a to site-b under gold");
    await ferry.ok(at("a", ["protect", "shop", "--policy", "gold", "--to", "site-b"])); // idempotent

    await qemuIo(sandbox, ferryd.a.serve.uri("shop-db"), ["write -P 0xa1 0 1M"]);
    await qemuIo(sandbox, ferryd.a.serve.uri("shop-logs"), ["write -P 0xa2 1M 512K"]);
    const wrote = Date.now();
    await pointAfter(ferry, sites.a, "shop", wrote);
    const [status] = await ferry.json<ProtectionStatus[]>(at("a", ["status", "shop"]));
    expect(status).toMatchObject({ app: "shop", source: "site-a", target: "site-b", mode: "async", rpoSeconds: 5 });
    expect(status?.rpoMet).toBe(true);
    expect(status?.lagSeconds).toBeLessThan(5);

    // The scheduler publishes a protection's series at its next tick (every second).
    const metrics = await waitFor(
      "shop's RPO in the metrics",
      async () => {
        const text = await (await fetch(`${ferryd.a.metrics}/metrics`)).text();
        return text.includes('ferry_rpo_met{app="shop",target="site-b"}') && text;
      },
      { timeoutMs: 10_000 },
    );
    expect(metrics).toContain('ferry_rpo_met{app="shop",target="site-b"} 1');
    expect(metrics).toContain("ferry_leader 1");
    expect(metrics).toMatch(/ferry_replication_lag_seconds\{app="shop",target="site-b"\} \d/);
    const health = await fetch(`${ferryd.a.metrics}/healthz`);
    expect(health.status).toBe(200);
    expect(await health.json()).toMatchObject({ status: "ok", site: "site-a", leader: true });

    const points = await ferry.json<RecoveryPoint[]>(at("a", ["recovery-points", "shop"]));
    expect(points.length).toBeGreaterThanOrEqual(1);
    expect(points[0]).toMatchObject({ app: "shop", site: "site-b", source: "site-a", back: 0 });
    // B knows the application as a replica.
    const atB = await ferry.json<Application[]>(at("b", ["app", "list"]));
    expect(atB.map((a) => [a.name, a.active])).toEqual([["shop", "site-a"]]);
  });

  it("refuses a failover before the first full copy completed: no recovery point yet", async () => {
    // 2 MiB of random bytes at 256 KiB/s: the first copy takes ~8 s.
    const data = await sandbox.dir("random-");
    const file = join(data, "random.bin");
    await writeFile(file, randomBytes(2 * 2 ** 20));
    await ferry.ok(at("a", ["app", "create", "slow", "--volume", "slow-data", "--size", "8M"]));
    await qemuIo(sandbox, ferryd.a.serve.uri("slow-data"), [`write -s ${file} 0 2M`]);
    await ferry.ok(at("a", ["policy", "create", "trickle", "--mode", "async", "--interval", "1h", "--rate", "256K"]));
    await ferry.ok(at("a", ["protect", "slow", "--policy", "trickle", "--to", "site-b"]));
    const early = await ferry.run(at("a", ["failover", "slow", "--to", "site-b"]));
    expect(early.code).toBe(1);
    expect(early.stderr).toBe(
      "ferry: application slow has no recovery point at site site-b yet: the first full copy has not completed " +
        "(see `ferry status`)\n",
    );
    const [status] = await ferry.json<ProtectionStatus[]>(at("a", ["status", "slow"]));
    expect(status).toMatchObject({ app: "slow", lastRecoveryPoint: null, rpoMet: false });
    expect(status?.initialCopy?.totalBytes).toBe(8 * 2 ** 20);

    // Protecting again is idempotent; --wait follows the first copy to its end.
    const waited = await ferry.run(at("a", ["protect", "slow", "--policy", "trickle", "--to", "site-b", "--wait"]));
    expect(waited.code, waited.stderr).toBe(0);
    expect(waited.stderr).toMatch(/^initial copy of slow to site-b: \d+% \([\d.]+\w? of 8M\)$/m);
    expect(waited.stdout).toMatch(/^protecting slow to site-b: first recovery point \d+ after [\d.]+s \(8M copied, /);
    const [point] = await ferry.json<RecoveryPoint[]>(at("a", ["recovery-points", "slow"]));
    expect(point?.generation).toBeGreaterThan(0);

    expect(await ferry.ok(at("a", ["unprotect", "slow"]))).toBe("no longer protecting slow to site-b\n");
    expect(await ferry.json<ProtectionStatus[]>(at("a", ["status", "slow"]))).toEqual([]);
    expect(await ferry.json<ProtectionStatus[]>(at("b", ["status", "slow"]))).toEqual([]);
    const again = await ferry.run(at("a", ["unprotect", "slow"]));
    expect(again.code).toBe(1);
    expect(again.stderr).toBe("ferry: application slow is not protected from site site-a\n");
  });

  it("follows events as they happen (ferry events --follow) until Ctrl-C", async () => {
    const child = sandbox.spawn(process.execPath, [BIN, ...at("a", ["events", "--follow", "--json", "--limit", "1"])]);
    let out = "";
    child.stdout?.setEncoding("utf8").on("data", (chunk: string) => {
      out += chunk;
    });
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    await waitFor("the last past event", () => out.split("\n").length >= 2);
    await ferry.ok(at("a", ["policy", "create", "silver", "--mode", "async", "--interval", "1m"]));
    await waitFor("the new event", () => out.includes('"io.ferry.policy.created"') && out.includes('"silver"'));
    const events = out
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as FerryEvent);
    expect(events.at(-1)).toMatchObject({ specversion: "1.0", source: "ferry/site-a", data: { policy: "silver" } });
    child.kill("SIGINT");
    expect(await exited).toBe(0);
  });

  it("fails over to B (unplanned) at a named recovery point, then fails back with the changes made at B", async () => {
    const before = await digests("a", VOLUMES);
    const [point] = await ferry.json<RecoveryPoint[]>(at("a", ["recovery-points", "shop"]));
    // Written after that point: a failover to the point must not have it.
    await qemuIo(sandbox, ferryd.a.serve.uri("shop-db"), ["write -P 0xa9 6M 64K"]);
    const wrote = Date.now();
    await pointAfter(ferry, sites.a, "shop", wrote);
    const unknown = await ferry.run(at("a", ["failover", "shop", "--to", "site-b", "--point", "999999"]));
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain("application shop has no recovery point 999999 at site site-b; it has");
    const failover = await ferry.json<Operation>(
      at("a", ["failover", "shop", "--to", "site-b", "--point", point?.id ?? "none"]),
    );
    expect(failover).toMatchObject({ kind: "failover", app: "shop", to: "site-b", from: "site-a", state: "succeeded" });
    expect(failover.steps.map((s) => s.name)).toEqual([
      "check",
      "stop-source",
      "promote",
      "recover-members",
      "activate",
    ]);
    // Volumes only: nothing to start besides them.
    expect(failover.steps.find((s) => s.name === "recover-members")?.state).toBe("skipped");
    expect(failover.result.point).toBe(point?.generation);
    expect(await digests("b", VOLUMES)).toEqual(before);
    expect(await digests("a", VOLUMES)).not.toEqual(before);
    const apps = await ferry.json<Application[]>(at("b", ["app", "list"]));
    expect(apps[0]?.active).toBe("site-b");

    // A second failover is refused: it runs at B already.
    const again = await ferry.run(at("a", ["failover", "shop", "--to", "site-b"]));
    expect(again.code).toBe(1);
    expect(again.stderr).toContain("application shop runs at site site-b already");

    // Work goes on at B; failback brings it home with only what changed.
    await qemuIo(sandbox, ferryd.b.serve.uri("shop-db"), ["write -P 0xb1 2M 256K"]);
    const atB = await digests("b", VOLUMES);
    const failback = await ferry.json<Operation>(at("a", ["failback", "shop"]));
    expect(failback.state, JSON.stringify(failback.error)).toBe("succeeded");
    expect(failback.to).toBe("site-a");
    expect(await digests("a", VOLUMES)).toEqual(atB);
    expect(Number(failback.result.bytesResynced)).toBeLessThan(2 * 8 * 2 ** 20);
    const [home] = await ferry.json<Application[]>(at("a", ["app", "list"]));
    expect(home?.active).toBe("site-a");
    const [s] = await ferry.json<ProtectionStatus[]>(at("a", ["status", "shop"]));
    expect(s).toMatchObject({ source: "site-a", target: "site-b" });
  });

  it("migrates to B with a planned failover: every write acknowledged at A is at B", async () => {
    await qemuIo(sandbox, ferryd.a.serve.uri("shop-logs"), ["write -P 0xc1 3M 64K"]);
    const atA = await digests("a", VOLUMES);
    const op = await ferry.json<Operation>(at("b", ["failover", "shop", "--to", "site-b", "--planned"]));
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
    expect(op.steps.map((s) => s.name)).toContain("fence");
    expect(await digests("b", VOLUMES)).toEqual(atA);
    // A's volumes are replicas of B's now: writes there are refused.
    const write = await sandbox.run("qemu-io", ["-f", "raw", ferryd.a.serve.uri("shop-db"), "-c", "write 0 4K"]);
    expect(write.code).not.toBe(0);

    const events = (await ferry.ok(at("b", ["events", "--app", "shop", "--json"])))
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as FerryEvent);
    const mine = events.filter((e) => e.data.operation === op.id).map((e) => e.type);
    expect(mine[0]).toBe("io.ferry.operation.started");
    expect(mine.at(-1)).toBe("io.ferry.operation.completed");
  });

  it("runs a drill beside running replication, and cleans it up", async () => {
    // The application runs at B now, protected to A.
    await qemuIo(sandbox, ferryd.b.serve.uri("shop-db"), ["write -P 0xd1 4M 128K"]);
    const wrote = Date.now();
    await pointAfter(ferry, sites.b, "shop", wrote);
    const [point] = await ferry.json<RecoveryPoint[]>(at("a", ["recovery-points", "shop"]));
    const atB = await digests("b", VOLUMES);

    const drill = await ferry.json<Operation>(at("a", ["failover", "shop", "--to", "site-a", "--test", "--no-wait"]));
    await waitFor("the drill to finish", async () => {
      const op = await ferry.json<Operation>(at("a", ["operation", drill.id]));
      return op.state !== "running" && op;
    });
    const done = await ferry.json<Operation>(at("a", ["operation", drill.id]));
    expect(done.state, JSON.stringify(done.error)).toBe("succeeded");
    expect(Number(done.result.point)).toBeGreaterThanOrEqual(Number(point?.id));
    // The drill copy holds the recovery point and is writable; the replicas are untouched.
    expect(
      await digests(
        "a",
        VOLUMES.map((v) => `${v}-drill`),
      ),
    ).toEqual(atB);
    await qemuIo(sandbox, ferryd.a.serve.uri("shop-db-drill"), ["write -P 0xee 0 64K"]);
    // Replication went on: a new write at B reaches A's replica.
    await qemuIo(sandbox, ferryd.b.serve.uri("shop-logs"), ["write -P 0xd2 5M 64K"]);
    const later = Date.now();
    await pointAfter(ferry, sites.b, "shop", later);
    const cleanup = await ferry.json<Operation>(at("a", ["drill", "cleanup", "shop"]));
    expect(cleanup.state, JSON.stringify(cleanup.error)).toBe("succeeded");
    const volumes = await ferry.json<{ name: string }[]>(["volume", "list", "--data", ferryd.a.data]);
    expect(
      volumes
        .map((v) => v.name)
        .filter((n) => n.startsWith("shop-"))
        .sort(),
    ).toEqual([...VOLUMES].sort());
  });

  it("cuts around hooks for application consistency, stores what they printed with each point, and says when a point is only crash-consistent", async () => {
    const blank = await ferry.run(at("a", ["policy", "create", "bad", "--mode", "async", "--pre-hook", " "]));
    expect(blank.code).toBe(2);
    expect(blank.stderr).toContain("policy bad: the pre-hook must be a shell command");
    const age = await ferry.run(at("a", ["policy", "create", "bad", "--mode", "async", "--retain-age", "soon"]));
    expect(age.code).toBe(2);
    expect(age.stderr).toContain("--retain-age");

    const marker = join(await sandbox.dir("hooks-"), "held");
    await ferry.ok(at("a", ["app", "create", "crm", "--volume", "crm-db", "--size", "4M"]));
    await ferry.ok(
      at("a", [
        "policy",
        "create",
        "consistent",
        "--mode",
        "async",
        "--interval",
        "1s",
        "--retain",
        "5",
        "--retain-age",
        "1h",
        "--consistency",
        "application",
        "--pre-hook",
        `echo "freeze $FERRY_APP for $FERRY_TARGET"; touch ${marker}`,
        "--post-hook",
        `rm ${marker}; echo thawed`,
      ]),
    );
    await ferry.ok(at("a", ["protect", "crm", "--policy", "consistent", "--to", "site-b", "--wait"]));
    await qemuIo(sandbox, ferryd.a.serve.uri("crm-db"), ["write -P 0x5a 1M 64K"]);
    const wrote = Date.now();
    const point = await waitFor(
      "an application-consistent recovery point of crm after the write",
      async () =>
        (await ferry.json<RecoveryPoint[]>(at("a", ["recovery-points", "crm"]))).find(
          (p) => p.consistency === "application" && p.atMs > wrote,
        ),
      { timeoutMs: 30_000 },
    );
    expect(point.metadataBytes).toBeGreaterThan(0);
    const meta = await ferry.json<PointMetadata>(at("b", ["recovery-points", "crm", "--point", point.id]));
    expect(meta).toMatchObject({ app: "crm", source: "site-a", target: "site-b", consistency: "application" });
    expect(meta.generation).toBe(point.generation);
    expect(meta.hooks.pre?.output).toBe("freeze crm for site-b\n");
    expect(meta.hooks.post).toMatchObject({ exitCode: 0, output: "thawed\n" });
    const shown = await ferry.ok(at("a", ["recovery-points", "crm", "--point", point.id]));
    expect(shown).toContain("consistency: application");
    expect(shown).toContain("| freeze crm for site-b");

    // A failing pre-hook: the cut still happens, as a crash-consistent point that says why.
    await ferry.ok(
      at("a", [
        "policy",
        "create",
        "flaky",
        "--mode",
        "async",
        "--interval",
        "1s",
        "--consistency",
        "application",
        "--pre-hook",
        "echo cannot flush; exit 3",
      ]),
    );
    await ferry.ok(at("a", ["app", "create", "crm-legacy", "--volume", "crm-old", "--size", "4M"]));
    await ferry.ok(at("a", ["protect", "crm-legacy", "--policy", "flaky", "--to", "site-b", "--wait"]));
    const degraded = await waitFor(
      "a crash-consistent point of crm-legacy with its reason",
      async () =>
        (await ferry.json<RecoveryPoint[]>(at("a", ["recovery-points", "crm-legacy"]))).find(
          (p) => p.metadataBytes !== null,
        ),
      { timeoutMs: 30_000 },
    );
    expect(degraded).toMatchObject({ consistency: "crash", reason: "pre-hook exited with 3" });
    const events = (await ferry.ok(at("a", ["events", "--app", "crm-legacy", "--json"])))
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as FerryEvent);
    expect(events.find((e) => e.type === "io.ferry.point.degraded")?.data).toMatchObject({
      consistency: "crash",
      wanted: "application",
      reason: "pre-hook exited with 3",
    });
    await ferry.ok(at("a", ["unprotect", "crm-legacy"]));
    await ferry.ok(at("a", ["unprotect", "crm"]));
  });

  it("holds an application at both sites while an operation runs: the other site refuses a conflicting request", async () => {
    await ferry.ok(at("a", ["app", "create", "ledger", "--volume", "ledger-db", "--size", "4M"]));
    // Slow on purpose: the migration's sync step then takes a few seconds.
    await ferry.ok(at("a", ["policy", "create", "slow", "--mode", "async", "--interval", "1s", "--rate", "512K"]));
    await ferry.ok(at("a", ["protect", "ledger", "--policy", "slow", "--to", "site-b", "--wait"]));
    const data = join(await sandbox.dir("ledger-"), "random.bin");
    await writeFile(data, randomBytes(4 * 2 ** 20));
    const copy = await sandbox.run("nbdcopy", [data, ferryd.a.serve.uri("ledger-db")]);
    expect(copy.code, copy.stderr).toBe(0);
    const atA = await digests("a", ["ledger-db"]);

    const op = await ferry.json<Operation>(at("b", ["failover", "ledger", "--to", "site-b", "--planned", "--no-wait"]));
    await waitFor("the migration to wait on its sync", async () => {
      const o = await ferry.json<Operation>(at("b", ["operation", op.id]));
      return o.steps.find((s) => s.name === "sync")?.state === "running";
    });
    // The transfer under way shows at the source, with its progress.
    const moving = await waitFor("the transfer's progress at site A", async () => {
      const rows = await ferry.json<ProtectionStatus[]>(at("a", ["status", "ledger"]));
      return rows.find((r) => r.source === "site-a")?.transfer ?? undefined;
    });
    expect(moving.totalBytes).toBeGreaterThan(0);
    expect(moving.totalBytes).toBeLessThanOrEqual(4 * 2 ** 20);
    expect(moving.doneBytes).toBeLessThanOrEqual(moving.totalBytes);
    const refused = await ferry.run(at("a", ["unprotect", "ledger"]));
    expect(refused.code).toBe(1);
    expect(refused.stderr).toBe(
      `ferry: application ledger is busy with operation ${op.id} run by site site-b; wait for it to finish ` +
        `(\`ferry operation ${op.id} --site site-b\`) and try again\n`,
    );
    const done = await waitFor(
      "the migration to finish",
      async () => {
        const o = await ferry.json<Operation>(at("b", ["operation", op.id]));
        return o.state !== "running" && o;
      },
      { timeoutMs: 60_000 },
    );
    expect(done.state, JSON.stringify(done.error)).toBe("succeeded");
    expect(await digests("b", ["ledger-db"])).toEqual(atA);
    // Released at both sites: the application can be worked on again.
    await ferry.ok(at("b", ["unprotect", "ledger"]));
  });

  it("runs one operation per application at a time, and resumes a failover after ferryd is killed mid-way (kill -9)", async () => {
    await qemuIo(sandbox, ferryd.b.serve.uri("shop-db"), ["write -P 0xf1 6M 64K"]);
    const wrote = Date.now();
    await pointAfter(ferry, sites.b, "shop", wrote);
    const atB = await digests("b", VOLUMES);
    // Site B hangs (its whole ferryd, volume service included): requests to it time out.
    process.kill(ferryd.b.serve.pid, "SIGSTOP");
    try {
      const op = await ferry.json<Operation>(at("a", ["failover", "shop", "--to", "site-a", "--no-wait"]));
      await waitFor("the failover to wait on the hung source", async () => {
        const o = await ferry.json<Operation>(at("a", ["operation", op.id]));
        return o.steps.find((s) => s.name === "stop-source")?.state === "running";
      });
      const second = await ferry.run(at("a", ["failover", "shop", "--to", "site-a", "--test"]));
      expect(second.code).toBe(1);
      expect(second.stderr).toMatch(
        new RegExp(`^ferry: application shop is busy with failover ${op.id} \\(step stop-source\\); wait for it`),
      );
      await ferryd.a.serve.kill9();
      await startFerryd("a", ferryd.a.data);
      await waitFor(
        "the resumed failover to finish",
        async () => {
          const o = await ferry.json<Operation>(at("a", ["operation", op.id]));
          return o.state !== "running";
        },
        { timeoutMs: 40_000 },
      );
      const done = await ferry.json<Operation>(at("a", ["operation", op.id]));
      expect(done.state, JSON.stringify(done.error)).toBe("succeeded");
      expect(done.steps.find((s) => s.name === "stop-source")).toMatchObject({ state: "skipped" });
      expect(await digests("a", VOLUMES)).toEqual(atB);
    } finally {
      process.kill(ferryd.b.serve.pid, "SIGCONT");
    }
  });
});
