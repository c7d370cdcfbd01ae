/**
 * The application commands: sites, applications, policies, protection, status, recovery points,
 * recovery operations and events. Each talks to one site's ferryd over NATS request/reply
 * (`--nats URL` / $FERRY_NATS as the site's `cli` user, `--site NAME` / $FERRY_SITE for which
 * ferryd); this file owns arguments and presentation only.
 */
import {
  type Application,
  call,
  connectNats,
  type FerryEvent,
  formatDuration,
  type Operation,
  type PointMetadata,
  type PolicySpec,
  type Protection,
  type ProtectionPolicy,
  type ProtectionStatus,
  type RecoveryPoint,
  type RestoreSettings,
  type Site,
} from "@ferry/orchestrator";
import { type Command, InvalidArgumentError, Option } from "commander";
import { formatBytes } from "../bytes.js";
import { dataplane } from "../dataplane.js";
import { OperationFailed } from "../errors.js";
import type { ProgramIo } from "../program.js";
import { formatTable } from "../table.js";
import { type JsonOption, jsonOption } from "./volume.js";
import { NATS_ENV, SITE_ENV } from "./volume-serve.js";

type Conn = Awaited<ReturnType<typeof connectNats>>;

interface Globals {
  nats?: string;
  site?: string;
}

/** Connect as the CLI and run `fn` against the chosen site's ferryd; always closes the connection. */
async function withFerryd<T>(command: Command, fn: (nc: Conn, site: string) => Promise<T>): Promise<T> {
  const { nats, site } = command.optsWithGlobals<Globals>();
  if (!nats) {
    command.error(`give the site's NATS server with --nats nats://cli:PASSWORD@HOST:PORT or $${NATS_ENV}`, {
      code: "ferry.noNats",
    });
  }
  if (!site) {
    command.error(`say which site's ferryd to ask with --site NAME or $${SITE_ENV}`, { code: "ferry.noSite" });
  }
  const nc = await connectNats(nats, "ferry cli");
  try {
    return await fn(nc, site);
  } finally {
    await nc.close();
  }
}

const printJson = (io: ProgramIo, value: unknown) => io.writeOut(`${JSON.stringify(value, null, 2)}\n`);

function ago(ms: number | null | undefined): string {
  if (ms === null || ms === undefined) return "-";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 60 ? `${s.toFixed(0)}s ago` : s < 3600 ? `${Math.floor(s / 60)}m ago` : `${Math.floor(s / 3600)}h ago`;
}

function seconds(value: number | null): string {
  if (value === null) return "-";
  return value < 60 ? `${value.toFixed(1)}s` : formatDuration(Math.round(value) * 1000);
}

const repeatable = (value: string, all: string[]) => [...all, value];

function positiveInt(what: string) {
  return (text: string) => {
    const n = Number(text);
    if (!/^\d+$/.test(text) || n < 1)
      throw new InvalidArgumentError(`'${text}' is not ${what}: use a whole number ≥ 1`);
    return n;
  };
}

export function registerControlCommands(program: Command, io: ProgramIo): void {
  // ---- site -------------------------------------------------------------------------------------
  const site = program.command("site").description("the sites Ferry knows: each runs a ferryd and its NATS server");
  site
    .command("list")
    .description("list the sites this site's ferryd has heard of (sites announce themselves over the link)")
    .addOption(jsonOption())
    .action(async (options: JsonOption, command: Command) => {
      const sites = await withFerryd(command, (nc, s) =>
        call<(Site & { reachable: boolean; self: boolean; nodes?: { name: string; live: boolean }[] })[]>(
          nc,
          s,
          "siteList",
        ),
      );
      if (options.json) return printJson(io, sites);
      io.writeOut(
        `${formatTable(
          ["SITE", "REGION", "REACHABLE", "LAST SEEN", "VERSION", "NODES"],
          sites.map((x) => [
            `${x.name}${x.self ? " (this)" : ""}`,
            x.region,
            x.reachable ? "yes" : "no",
            ago(x.lastSeenMs),
            x.version,
            x.nodes === undefined ? "-" : x.nodes.map((n) => `${n.name}${n.live ? "" : " (gone)"}`).join(", "),
          ]),
        )}\n`,
      );
    });

  // ---- app --------------------------------------------------------------------------------------
  const app = program
    .command("app")
    .description("applications: sets of volumes (and VMs, Kubernetes objects) protected as one entity");
  app
    .command("create")
    .description(
      "create an application at this site from its volumes, libvirt VMs (their disks, once adopted with " +
        "`ferry vm adopt`, join as volumes) and Kubernetes objects (--namespace, --selector: the PVCs on Ferry " +
        "volumes join as volumes); --size creates the volumes that are missing",
    )
    .argument("<name>", "application name (lower-case letters, digits, '-')")
    .option("--volume <name>", "a member volume (repeat for several)", repeatable, [])
    .option(
      "--vm <domain>",
      "a member libvirt VM, on Ferry volumes (repeat for several; ferryd needs --libvirt)",
      repeatable,
      [],
    )
    .option(
      "--namespace <name>",
      "a Kubernetes namespace whose objects belong to the application (repeat for several; ferryd needs --kubeconfig)",
      repeatable,
      [],
    )
    .option("--selector <labels>", "only the Kubernetes objects with these labels, e.g. app=shop,tier in (db)")
    .option("--size <size>", "size of volumes to create when missing, e.g. 1G")
    .addOption(jsonOption())
    .action(
      async (
        name: string,
        options: JsonOption & { volume: string[]; vm: string[]; namespace: string[]; selector?: string; size?: string },
        command: Command,
      ) => {
        if (options.volume.length + options.vm.length + options.namespace.length === 0) {
          command.error("give the application's members: --volume NAME, --vm DOMAIN and/or --namespace NAME", {
            code: "ferry.usage",
          });
        }
        if (options.selector !== undefined && options.namespace.length === 0) {
          command.error("--selector picks Kubernetes objects: give the --namespace they live in too", {
            code: "ferry.usage",
          });
        }
        const sizeBytes = options.size === undefined ? null : await parseSize(command, "--size", options.size);
        const kubernetes =
          options.namespace.length === 0
            ? null
            : { namespaces: options.namespace, labelSelector: options.selector ?? null };
        const created = await withFerryd(command, (nc, s) =>
          call<Application>(nc, s, "appCreate", {
            name,
            volumes: options.volume,
            vms: options.vm,
            kubernetes,
            sizeBytes,
          }),
        );
        if (options.json) return printJson(io, created);
        const others = otherMembers(created);
        io.writeOut(
          `application ${created.name} at site ${created.active}: volumes ${created.volumes.join(", ")}` +
            `${others === "" ? "" : `; ${others}`}\n`,
        );
      },
    );
  app
    .command("list")
    .description("list applications in this site's catalog (its own and the ones it holds replicas of)")
    .addOption(jsonOption())
    .action(async (options: JsonOption, command: Command) => {
      const apps = await withFerryd(command, (nc, s) => call<Application[]>(nc, s, "appList"));
      if (options.json) return printJson(io, apps);
      if (apps.length === 0) return io.writeOut("no applications\n");
      io.writeOut(
        `${formatTable(
          ["APP", "ACTIVE AT", "ORIGIN", "VOLUMES", "VMS / KUBERNETES"],
          apps.map((a) => [a.name, a.active, a.origin, a.volumes.join(","), otherMembers(a) || "-"]),
        )}\n`,
      );
    });
  app
    .command("show")
    .description("show one application: members, protections and its latest operations")
    .argument("<name>", "application name")
    .addOption(jsonOption())
    .action(async (name: string, options: JsonOption, command: Command) => {
      const shown = await withFerryd(command, (nc, s) =>
        call<{ app: Application; protections: Protection[]; operations: Operation[]; node?: string }>(
          nc,
          s,
          "appShow",
          { name },
        ),
      );
      if (options.json) return printJson(io, shown);
      const a = shown.app;
      const node = shown.node === undefined ? "" : ` (node ${shown.node})`;
      io.writeOut(
        `application ${a.name}: active at ${a.active} (origin ${a.origin})\nvolumes: ${a.volumes.join(", ")}${node}\n`,
      );
      const others = otherMembers(a);
      if (others !== "") io.writeOut(`${others}\n`);
      if (shown.protections.length > 0) {
        io.writeOut(
          `${formatTable(
            ["FROM", "TO", "POLICY", "MODE", "STATE"],
            shown.protections.map((p) => [p.source, p.target, p.policy, p.settings.mode, p.state]),
          )}\n`,
        );
      }
      for (const op of shown.operations) io.writeOut(`${operationLine(op)}\n`);
    });

  // ---- policy -----------------------------------------------------------------------------------
  const policy = program.command("policy").description("protection policies: how an application is protected");
  policy
    .command("create")
    .description("create a protection policy (idempotent for the same settings)")
    .argument("<name>", "policy name")
    .addOption(
      new Option("--mode <mode>", "async (generations) or sync (zero data loss)")
        .choices(["async", "sync"])
        .makeOptionMandatory(),
    )
    .option("--rpo <duration>", "recovery point objective, e.g. 10s (default: two intervals; sync: 0)")
    .option("--interval <duration>", "time between generations, e.g. 5s (default 5s)")
    .option("--continuous", "cut a new generation as soon as the previous one is in (at most every second)")
    .addOption(
      new Option("--retain <n>", "recovery points kept at the target (default 3)").argParser(positiveInt("a count")),
    )
    .option("--retain-age <duration>", "also drop recovery points older than this, e.g. 7d (the latest stays)")
    .option("--allowed-regions <regions>", "comma-separated regions allowed to hold a copy (default: any)")
    .option("--rate <size>", "bandwidth limit per target in bytes/s, e.g. 100M (default: none)")
    .addOption(
      new Option(
        "--consistency <kind>",
        "crash, or application: quiesce the VMs (guest agent) and run the hooks around every cut",
      ).choices(["crash", "application"]),
    )
    .option(
      "--pre-hook <command>",
      "shell command run at the active site just before each cut ($FERRY_APP, $FERRY_SITE, $FERRY_TARGET set); " +
        "non-zero exit makes the point crash-consistent",
    )
    .option("--post-hook <command>", "shell command run right after each cut (also when the cut failed)")
    .option(
      "--namespace-map <from=to>",
      "restore the Kubernetes objects of namespace FROM into TO at the target (repeat for several; coming " +
        "home maps back)",
      repeatable,
      [],
    )
    .option("--storage-class-map <from=to>", "restored PVCs of storage class FROM get TO (repeat)", repeatable, [])
    .addOption(
      new Option("--on-conflict <policy>", "an object that exists at the target: overwrite Ferry's fields, or skip it")
        .choices(["overwrite", "skip"])
        .default("overwrite"),
    )
    .option(
      "--transform <json>",
      'a JSON patch for restored objects at the target, e.g. \'{"kind":"StatefulSet","patch":[{"op":"replace",' +
        '"path":"/spec/replicas","value":1}]}\' (repeat for several)',
      repeatable,
      [],
    )
    .addOption(jsonOption())
    .action(async (name: string, options: PolicyOptions, command: Command) => {
      const pairs = (flag: string, values: string[]) =>
        Object.fromEntries(
          values.map((v) => {
            const [from, to, ...rest] = v.split("=");
            if (from === undefined || to === undefined || rest.length > 0 || from === "" || to === "") {
              command.error(`${flag} '${v}' is not FROM=TO, e.g. ${flag} shop=shop-dr`, { code: "ferry.usage" });
            }
            return [from, to];
          }),
        );
      const transforms = options.transform.map((t) => {
        try {
          return JSON.parse(t) as RestoreSettings["transforms"][number];
        } catch (error) {
          return command.error(`--transform '${t}' is not JSON: ${(error as Error).message}`, { code: "ferry.usage" });
        }
      });
      const spec: PolicySpec = {
        name,
        mode: options.mode,
        rpo: options.rpo ?? null,
        interval: options.interval ?? null,
        continuous: options.continuous ?? null,
        retain: options.retain ?? null,
        retainAge: options.retainAge ?? null,
        allowedRegions:
          options.allowedRegions
            ?.split(",")
            .map((r) => r.trim())
            .filter((r) => r !== "") ?? null,
        rateBytes: options.rate === undefined ? null : await parseSize(command, "--rate", options.rate),
        consistency: options.consistency ?? null,
        hooks: { pre: options.preHook ?? null, post: options.postHook ?? null },
        restore: {
          namespaceMapping: pairs("--namespace-map", options.namespaceMap),
          storageClassMapping: pairs("--storage-class-map", options.storageClassMap),
          onConflict: options.onConflict as RestoreSettings["onConflict"],
          transforms,
        },
      };
      const created = await withFerryd(command, (nc, s) => call<ProtectionPolicy>(nc, s, "policyCreate", spec));
      if (options.json) return printJson(io, created);
      io.writeOut(`policy ${created.name}: ${policyLine(created)}\n`);
    });
  policy
    .command("list")
    .description("list protection policies")
    .addOption(jsonOption())
    .action(async (options: JsonOption, command: Command) => {
      const policies = await withFerryd(command, (nc, s) => call<ProtectionPolicy[]>(nc, s, "policyList"));
      if (options.json) return printJson(io, policies);
      io.writeOut(
        `${formatTable(
          ["POLICY", "SETTINGS"],
          policies.map((p) => [p.name, policyLine(p)]),
        )}\n`,
      );
    });

  // ---- protect, status, recovery points ---------------------------------------------------------
  program
    .command("protect")
    .description("protect an application to another site under a policy: replication starts at once")
    .argument("<app>", "application name")
    .requiredOption("--policy <name>", "protection policy")
    .requiredOption("--to <site>", "target site")
    .option("--wait", "wait for the first full copy (the first recovery point), showing its progress")
    .addOption(jsonOption())
    .action(async (appName: string, options: JsonOption & { policy: string; to: string; wait?: boolean }, command) => {
      await withFerryd(command, async (nc, s) => {
        const p = await call<Protection>(nc, s, "protect", { app: appName, policy: options.policy, to: options.to });
        if (!options.wait) {
          if (options.json) return printJson(io, p);
          io.writeOut(
            `protecting ${p.app} from ${p.source} to ${p.target} under ${p.policy} (${policyLine(p.settings)})\n`,
          );
          return;
        }
        const started = Date.now();
        const progress = new Progress(io, `initial copy of ${appName} to ${options.to}`);
        for (;;) {
          const rows = await call<ProtectionStatus[]>(nc, s, "status", { app: appName });
          const row = rows.find((r) => r.source === s && r.target === options.to);
          if (row?.lastRecoveryPoint) {
            progress.done();
            if (options.json) return printJson(io, row);
            io.writeOut(
              `protecting ${appName} to ${options.to}: first recovery point ${row.lastRecoveryPoint.generation} after ` +
                `${((Date.now() - started) / 1000).toFixed(1)}s (${formatBytes(row.bytesRaw)} copied, ${formatBytes(row.bytesWire)} on the wire)\n`,
            );
            return;
          }
          if (row?.initialCopy) progress.update(row.initialCopy.doneBytes, row.initialCopy.totalBytes);
          if (row?.lastError) progress.note(row.lastError);
          await new Promise((r) => setTimeout(r, 500));
        }
      });
    });

  program
    .command("unprotect")
    .description(
      "stop protecting an application: replication stops and the protection is forgotten at both sites; the " +
        "replicas stay at the target, read-only (delete them there with `ferry volume delete` when no longer wanted)",
    )
    .argument("<app>", "application name")
    .addOption(jsonOption())
    .action(async (appName: string, options: JsonOption, command: Command) => {
      const stopped = await withFerryd(command, (nc, s) => call<Protection[]>(nc, s, "unprotect", { app: appName }));
      if (options.json) return printJson(io, stopped);
      for (const p of stopped) io.writeOut(`no longer protecting ${p.app} to ${p.target}\n`);
    });

  program
    .command("status")
    .description("per application and target: mode, state, lag, whether the RPO is met, the last recovery point")
    .argument("[app]", "one application (default: all)")
    .addOption(jsonOption())
    .action(async (appName: string | undefined, options: JsonOption, command: Command) => {
      const rows = await withFerryd(command, (nc, s) =>
        call<ProtectionStatus[]>(nc, s, "status", { app: appName ?? null }),
      );
      if (options.json) return printJson(io, rows);
      if (rows.length === 0) return io.writeOut("no protected applications\n");
      io.writeOut(
        `${formatTable(
          ["APP", "FROM", "TO", "MODE", "STATE", "LAG", "RPO", "RPO MET", "LAST POINT", "WIRE"],
          rows.map((r) => [
            r.app,
            r.source,
            r.target,
            r.syncState ? `${r.mode} (${r.syncState})` : r.mode,
            r.initialCopy ? `copying ${percent(r.initialCopy.doneBytes, r.initialCopy.totalBytes)}` : r.state,
            seconds(r.lagSeconds),
            seconds(r.rpoSeconds),
            r.rpoMet ? "yes" : "NO",
            r.lastRecoveryPoint === null ? "-" : `${r.lastRecoveryPoint.generation} (${ago(r.lastRecoveryPoint.atMs)})`,
            formatBytes(r.bytesWire),
          ]),
        )}\n`,
      );
      for (const r of rows) if (r.lastError) io.writeOut(`${r.app} → ${r.target}: ${r.lastError}\n`);
    });

  program
    .command("recovery-points")
    .description(
      "list an application's recovery points at its target sites (newest first); with --point, show what was " +
        "captured with one (members' metadata, hook output)",
    )
    .argument("<app>", "application name")
    .option("--point <id>", "show the metadata stored with this recovery point")
    .addOption(jsonOption())
    .action(async (appName: string, options: JsonOption & { point?: string }, command: Command) => {
      if (options.point !== undefined) {
        const point = options.point;
        const meta = await withFerryd(command, (nc, s) =>
          call<PointMetadata | null>(nc, s, "recoveryPointShow", { app: appName, point }),
        );
        if (options.json) return printJson(io, meta);
        if (meta === null) {
          return io.writeOut(`recovery point ${point} of ${appName} holds volume data only (crash-consistent)\n`);
        }
        return io.writeOut(pointReport(meta));
      }
      const points = await withFerryd(command, (nc, s) =>
        call<RecoveryPoint[]>(nc, s, "recoveryPoints", { app: appName }),
      );
      if (options.json) return printJson(io, points);
      if (points.length === 0) return io.writeOut(`no recovery points of ${appName} yet\n`);
      io.writeOut(
        `${formatTable(
          ["ID", "SITE", "FROM", "TAKEN", "CONSISTENCY", "MEMBERS", "METADATA"],
          points.map((p) => [
            p.id,
            p.site,
            p.source,
            `${new Date(p.atMs).toISOString()} (${ago(p.atMs)})`,
            p.reason ? `${p.consistency} (${p.reason})` : p.consistency,
            String(p.members ?? 0),
            p.metadataBytes == null ? "-" : formatBytes(p.metadataBytes),
          ]),
        )}\n`,
      );
    });

  // ---- recovery operations ----------------------------------------------------------------------
  const waitOption = () => new Option("--no-wait", "return once the operation started, with its id");
  program
    .command("failover")
    .description(
      "recover an application at a site: unplanned (promote the latest recovery point, or --point), --planned " +
        "(final sync, stop at the source, promote, replicate back: zero data loss) or --test (a drill: an isolated " +
        "copy beside running replication; remove it with `ferry drill cleanup`)",
    )
    .argument("<app>", "application name")
    .requiredOption("--to <site>", "the site to recover at")
    .option("--planned", "planned migration: no data loss, needs the source site")
    .option("--test", "DR drill: replication keeps running")
    .option("--point <id>", "recover to this recovery point (see `ferry recovery-points`)")
    .addOption(waitOption())
    .addOption(jsonOption())
    .action(async (appName: string, options: FailoverOptions, command: Command) => {
      if (options.planned && options.test) {
        command.error("give either --planned or --test, not both", { code: "ferry.usage" });
      }
      await runOperation(io, command, options, (nc, s) =>
        call<Operation>(nc, s, "failover", {
          app: appName,
          to: options.to,
          planned: options.planned === true,
          test: options.test === true,
          point: options.point ?? null,
        }),
      );
    });
  program
    .command("failback")
    .description(
      "after a failover: replicate the changes made at the recovery site back to the application's origin " +
        "(only what changed), then migrate it back there without data loss",
    )
    .argument("<app>", "application name")
    .addOption(waitOption())
    .addOption(jsonOption())
    .action(async (appName: string, options: OperationOptions, command: Command) => {
      await runOperation(io, command, options, (nc, s) => call<Operation>(nc, s, "failback", { app: appName }));
    });
  const drill = program.command("drill").description("DR drills (`ferry failover --test` starts one)");
  drill
    .command("cleanup")
    .description("remove the isolated copy of the application's last drill")
    .argument("<app>", "application name")
    .addOption(waitOption())
    .addOption(jsonOption())
    .action(async (appName: string, options: OperationOptions, command: Command) => {
      await runOperation(io, command, options, (nc, s) => call<Operation>(nc, s, "drillCleanup", { app: appName }));
    });
  program
    .command("operation")
    .description("show a recovery operation and its steps, or list them")
    .argument("[id]", "operation id (default: list all)")
    .option("--app <name>", "only this application's operations")
    .addOption(jsonOption())
    .action(async (id: string | undefined, options: JsonOption & { app?: string }, command: Command) => {
      if (id === undefined) {
        const ops = await withFerryd(command, (nc, s) =>
          call<Operation[]>(nc, s, "operationList", { app: options.app ?? null }),
        );
        if (options.json) return printJson(io, ops);
        for (const op of ops) io.writeOut(`${operationLine(op)}\n`);
        return;
      }
      const op = await withFerryd(command, (nc, s) => call<Operation>(nc, s, "operationGet", { id }));
      if (options.json) return printJson(io, op);
      io.writeOut(`${operationReport(op)}\n`);
    });

  // ---- events -----------------------------------------------------------------------------------
  program
    .command("events")
    .description("print the site's events (protection, RPO, operations); --follow keeps printing new ones")
    .option("--follow", "keep printing events as they happen (Ctrl-C to stop)")
    .option("--app <name>", "only events of this application")
    .addOption(
      new Option("--limit <n>", "how many past events (default 50)").argParser(positiveInt("a count")).default(50),
    )
    .addOption(new Option("--json", "one JSON event per line"))
    .action(async (options: { follow?: boolean; app?: string; limit: number; json?: boolean }, command: Command) => {
      const print = (e: FerryEvent) =>
        io.writeOut(
          options.json
            ? `${JSON.stringify(e)}\n`
            : `${e.time}  ${e.type.replace(/^io\.ferry\./, "").padEnd(20)} ${e.subject ?? "-"}  ${JSON.stringify(e.data)}\n`,
        );
      await withFerryd(command, async (nc, s) => {
        const past = await call<FerryEvent[]>(nc, s, "events", { app: options.app ?? null, limit: options.limit });
        for (const e of past) print(e);
        if (!options.follow) return;
        const seen = new Set(past.map((e) => e.id));
        const sub = nc.subscribe(`ferry.events.${s}.>`);
        const stop = () => sub.unsubscribe();
        process.once("SIGINT", stop);
        process.once("SIGTERM", stop);
        for await (const m of sub) {
          const e = m.json<FerryEvent>();
          if (seen.has(e.id) || (options.app !== undefined && e.subject !== options.app)) continue;
          print(e);
        }
      });
    });
}

interface PolicyOptions extends JsonOption {
  mode: string;
  rpo?: string;
  interval?: string;
  continuous?: boolean;
  retain?: number;
  retainAge?: string;
  allowedRegions?: string;
  rate?: string;
  consistency?: string;
  preHook?: string;
  postHook?: string;
  namespaceMap: string[];
  storageClassMap: string[];
  onConflict: string;
  transform: string[];
}

interface OperationOptions extends JsonOption {
  wait: boolean;
}

interface FailoverOptions extends OperationOptions {
  to: string;
  planned?: boolean;
  test?: boolean;
  point?: string;
}

async function parseSize(command: Command, flag: string, text: string): Promise<number> {
  const native = await dataplane();
  try {
    return native.parseSize(text);
  } catch (error) {
    command.error(`option '${flag} <size>': ${(error as Error).message}`, { code: "commander.invalidArgument" });
  }
}

function policyLine(p: ProtectionPolicy): string {
  const parts = [
    p.mode,
    p.continuous ? "continuous" : `every ${formatDuration(p.intervalMs)}`,
    `RPO ${p.rpoMs === 0 ? "0" : formatDuration(p.rpoMs)}`,
    `keep ${p.retain}${p.retainAgeMs ? ` for up to ${formatDuration(p.retainAgeMs)}` : ""}`,
    p.allowedRegions.length > 0 ? `regions ${p.allowedRegions.join(",")}` : "any region",
    ...(p.rateBytes === null ? [] : [`at most ${formatBytes(p.rateBytes)}/s`]),
    `${p.consistency}-consistent`,
    ...(p.hooks.pre === null ? [] : ["pre-hook"]),
    ...(p.hooks.post === null ? [] : ["post-hook"]),
    ...restoreParts(p.restore),
  ];
  return parts.join(", ");
}

/** What a policy changes in a Kubernetes restore, for policyLine. */
function restoreParts(r: RestoreSettings | undefined): string[] {
  if (r === undefined) return [];
  const map = (m: Record<string, string>) =>
    Object.entries(m)
      .map(([from, to]) => `${from}→${to}`)
      .join(",");
  return [
    ...(Object.keys(r.namespaceMapping).length === 0 ? [] : [`namespaces ${map(r.namespaceMapping)}`]),
    ...(Object.keys(r.storageClassMapping).length === 0 ? [] : [`storage classes ${map(r.storageClassMapping)}`]),
    ...(r.onConflict === "skip" ? ["existing objects skipped"] : []),
    ...(r.transforms.length === 0 ? [] : [`${r.transforms.length} transform${r.transforms.length > 1 ? "s" : ""}`]),
  ];
}

function pointReport(m: PointMetadata): string {
  const lines = [
    `recovery point ${m.generation} of ${m.app}: cut at ${m.source} ${new Date(m.atMs).toISOString()}, kept at ${m.target}`,
    `  consistency: ${m.consistency}${m.reason ? ` (${m.reason})` : ""}; application held ${m.heldMs} ms`,
    `  volumes: ${Object.entries(m.generations)
      .map(([v, g]) => `${v}@${g}`)
      .join(", ")}`,
  ];
  for (const c of m.captures) {
    const unreadable = (c.metadata as { unreadable?: string[] } | null)?.unreadable ?? [];
    lines.push(
      `  ${c.kind} ${c.name}: captured${unreadable.length === 0 ? "" : ` (not readable: ${unreadable.join("; ")})`}`,
    );
  }
  for (const [which, run] of [
    ["pre-hook", m.hooks.pre],
    ["post-hook", m.hooks.post],
  ] as const) {
    if (run === null) continue;
    lines.push(`  ${which} \`${run.command}\`: exit ${run.exitCode ?? "-"} in ${run.ms} ms`);
    for (const l of run.output
      .trimEnd()
      .split("\n")
      .filter((x) => x !== ""))
      lines.push(`    | ${l}`);
  }
  return `${lines.join("\n")}\n`;
}

function operationLine(op: Operation): string {
  const took = op.endedAtMs === null ? "" : ` in ${((op.endedAtMs - op.startedAtMs) / 1000).toFixed(1)}s`;
  return `${op.id}  ${op.kind} of ${op.app} ${op.from} → ${op.to}: ${op.state}${took}${op.error ? ` (${op.error.message})` : ""}`;
}

function operationReport(op: Operation): string {
  const lines = [operationLine(op)];
  for (const s of op.steps) {
    const mark = { pending: " ", running: ">", done: "✓", skipped: "-" }[s.state];
    lines.push(`  [${mark}] ${s.name}${s.detail ? `: ${s.detail}` : ""}`);
  }
  return lines.join("\n");
}

/**
 * Start an operation and, unless --no-wait, follow it step by step until it ends; a failed
 * operation exits 1 with its error.
 */
/** Steps that wait for a generation to ship (a migration's syncs, a failback's resync). */
const TRANSFER_STEPS = new Set(["sync", "final-sync", "resync"]);
/** Transfers smaller than this finish before a bar would say anything. */
const PROGRESS_MIN_BYTES = 16 * 2 ** 20;

async function runOperation(
  io: ProgramIo,
  command: Command,
  options: OperationOptions,
  start: (nc: Conn, site: string) => Promise<Operation>,
): Promise<void> {
  const final = await withFerryd(command, async (nc, site) => {
    let op = await start(nc, site);
    // The operation runs at its destination; follow it there.
    const at = op.to;
    if (!options.wait) return op;
    if (!options.json) io.writeOut(`${op.kind} of ${op.app} to ${op.to}: operation ${op.id}\n`);
    const reported = new Set<string>();
    let progress = null as { step: string; bar: Progress } | null;
    for (;;) {
      for (const s of op.steps) {
        if ((s.state === "done" || s.state === "skipped") && !reported.has(s.name)) {
          reported.add(s.name);
          if (progress?.step === s.name) progress.bar.done();
          if (!options.json)
            io.writeOut(`  ${s.state === "done" ? "✓" : "-"} ${s.name}${s.detail ? `: ${s.detail}` : ""}\n`);
        }
      }
      if (op.state !== "running") return op;
      const running = op.steps.find((s) => s.state === "running")?.name;
      if (!options.json && running !== undefined && TRANSFER_STEPS.has(running)) {
        // The data moves from the site the application leaves: show that pair's transfer.
        const rows = await call<ProtectionStatus[]>(nc, op.from, "status", { app: op.app }).catch(() => []);
        const t = rows.find((r) => r.source === op.from && r.target === op.to)?.transfer;
        if (t != null && t.totalBytes >= PROGRESS_MIN_BYTES) {
          if (progress?.step !== running) progress = { step: running, bar: new Progress(io, `  ${running}`) };
          progress.bar.update(t.doneBytes, t.totalBytes);
        }
      }
      await new Promise((r) => setTimeout(r, 200));
      op = await call<Operation>(nc, at, "operationGet", { id: op.id });
    }
  });
  if (options.json) printJson(io, final);
  else if (final.state === "succeeded") {
    io.writeOut(`${final.kind} of ${final.app} succeeded in ${((final.endedAtMs ?? 0) - final.startedAtMs) / 1000}s\n`);
  } else if (final.state === "running") {
    io.writeOut(`follow it with: ferry operation ${final.id} --site ${final.to}\n`);
  }
  if (final.state === "failed") {
    throw new OperationFailed(`${final.kind} of ${final.app} failed: ${final.error?.message ?? "unknown error"}`);
  }
}

function percent(done: number, total: number): string {
  return `${total === 0 ? 100 : Math.min(100, Math.floor((done / total) * 100))}%`;
}

/**
 * Progress of a long copy on stderr: a bar redrawn in place on a terminal; elsewhere a line at
 * every tenth (logs stay short).
 */
class Progress {
  private lastTenth = -1;
  private drawn = false;
  private readonly tty = process.stderr.isTTY === true;

  constructor(
    private readonly io: ProgramIo,
    private readonly what: string,
  ) {}

  update(done: number, total: number): void {
    const fraction = total === 0 ? 1 : Math.min(1, done / total);
    const text = `${this.what}: ${percent(done, total)} (${formatBytes(done)} of ${formatBytes(total)})`;
    if (this.tty) {
      const width = 30;
      const bar = "#".repeat(Math.round(fraction * width)).padEnd(width, ".");
      this.io.writeErr(`\r[${bar}] ${text}`);
      this.drawn = true;
      return;
    }
    const tenth = Math.floor(fraction * 10);
    if (tenth > this.lastTenth) {
      this.lastTenth = tenth;
      this.io.writeErr(`${text}\n`);
    }
  }

  private lastNote = "";

  note(text: string): void {
    if (text === this.lastNote) return;
    this.lastNote = text;
    this.done();
    this.io.writeErr(`${this.what}: ${text}\n`);
  }

  done(): void {
    if (this.drawn) this.io.writeErr("\n");
    this.drawn = false;
  }
}

/** An application's members besides its volumes: `VMs web; Kubernetes namespace shop (app=shop)`. */
function otherMembers(a: Application): string {
  const parts: string[] = [];
  if (a.vms.length > 0) parts.push(`VMs ${a.vms.join(", ")}`);
  const k = a.kubernetes;
  if (k !== null) {
    const selector = k.labelSelector === null ? "" : ` (${k.labelSelector})`;
    parts.push(`Kubernetes namespace${k.namespaces.length > 1 ? "s" : ""} ${k.namespaces.join(", ")}${selector}`);
  }
  return parts.join("; ");
}
