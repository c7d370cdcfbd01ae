import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { freePort } from "./free-port.js";
import { NatsSite, renderConfig } from "./nats-site.js";

const TEMPLATES = fileURLToPath(new URL("../../../infra/nats/", import.meta.url));

describe("renderConfig", () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "ferry-render-"));
  });
  afterEach(() => rm(dir, { recursive: true, force: true }));

  it("fills every placeholder of a template and of the files it includes", async () => {
    await writeFile(join(dir, "main.conf.tmpl"), 'include "part.conf"\nport: {{PORT}}\n');
    await writeFile(join(dir, "part.conf.tmpl"), 'server_name: "{{NAME}}"\n');
    await renderConfig(dir, "main.conf.tmpl", dir, { PORT: "4222", NAME: "ferry-x" });
    expect(await readFile(join(dir, "main.conf"), "utf8")).toBe('include "part.conf"\nport: 4222\n');
    expect(await readFile(join(dir, "part.conf"), "utf8")).toBe('server_name: "ferry-x"\n');
  });

  it("refuses a placeholder it has no value for, naming the file", async () => {
    await writeFile(join(dir, "main.conf.tmpl"), "port: {{PORT}}\nhttp: {{HTTP_PORT}}\n");
    await expect(renderConfig(dir, "main.conf.tmpl", dir, { PORT: "1" })).rejects.toThrow(
      /main\.conf\.tmpl: no value for \{\{HTTP_PORT\}\}/,
    );
  });

  it("refuses a value that would break out of a quoted string", async () => {
    await writeFile(join(dir, "main.conf.tmpl"), 'password: "{{PASSWORD}}"\n');
    await expect(renderConfig(dir, "main.conf.tmpl", dir, { PASSWORD: 'x"\ny' })).rejects.toThrow(
      /value of \{\{PASSWORD\}\} has a quote/,
    );
  });

  it("leaves no placeholder of the site templates unfilled by the values the harness gives", async () => {
    const common = {
      SITE: "site-x",
      REGION: "eu-xx",
      PORT: "1",
      HTTP_PORT: "2",
      STORE: "/nonexistent",
      FERRYD_PASSWORD: "p1",
      CLI_PASSWORD: "p2",
      PEER_PASSWORD: "p4",
      PING_INTERVAL: "10s",
      LEAF_PASSWORD: "p3",
    };
    await renderConfig(TEMPLATES, "site-a.conf.tmpl", dir, {
      ...common,
      LEAF_PORT: "3",
      LEAF_ADVERTISE: "127.0.0.1:4",
    });
    await renderConfig(TEMPLATES, "site-b.conf.tmpl", dir, { ...common, LEAF_REMOTE: "127.0.0.1:3" });
    for (const file of ["site.conf", "site-a.conf", "site-b.conf"]) {
      expect(await readFile(join(dir, file), "utf8")).not.toMatch(/\{\{/);
    }
  });
});

describe("NatsSite", () => {
  it("says which binary it could not start and how to get it", async () => {
    const dir = await mkdtemp(join(tmpdir(), "ferry-site-"));
    try {
      const site = new NatsSite({
        name: "site-a",
        region: "eu-es",
        templateDir: TEMPLATES,
        template: "site-a.conf.tmpl",
        dir,
        clientPort: await freePort(),
        monitorPort: await freePort(),
        leafPort: await freePort(),
        users: {
          ferryd: { user: "ferryd", password: "a" },
          cli: { user: "cli", password: "b" },
          peer: { user: "peer", password: "c" },
        },
        values: { LEAF_PASSWORD: "c", LEAF_ADVERTISE: "127.0.0.1:1", PING_INTERVAL: "10s" },
        natsServer: join(dir, "no-such-nats-server"),
        timeoutMs: 5_000,
      });
      await expect(site.start()).rejects.toThrow(
        /cannot start .*no-such-nats-server for site site-a: .*ENOENT.*nats-server/,
      );
      expect(site.running).toBe(false);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
