/** `ferry volume import` from other NBD servers (qemu-nbd, nbdkit) over unix sockets and TCP. */
import { join } from "node:path";
import { freePort, waitFor } from "@ferry/testkit";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { writeTestImage } from "./disk-image.js";
import { FerryFixture } from "./ferry-fixture.js";

const MiB = 2 ** 20;

let fx: FerryFixture;
let work: string;

beforeEach(async () => {
  fx = new FerryFixture();
  await fx.setup();
  work = await fx.sandbox.dir("ferry-import-");
});

afterEach(async () => {
  await fx.cleanup();
});

/** Wait until an NBD server answers. */
function nbdReady(uri: string): Promise<true> {
  return waitFor(`an NBD server at ${uri}`, async () => (await fx.sandbox.run("nbdinfo", ["--size", uri])).code === 0);
}

describe("ferry volume import", () => {
  it("imports a qcow2 disk served by qemu-nbd on a unix socket", async () => {
    const raw = join(work, "source.raw");
    const qcow2 = join(work, "source.qcow2");
    await writeTestImage(raw, 24);
    await fx.tool("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, qcow2]);
    const socket = join(work, "qemu-nbd.sock");
    fx.sandbox.spawn("qemu-nbd", ["-f", "qcow2", "--read-only", "--persistent", "--shared=8", "-k", socket, qcow2]);
    const source = `nbd+unix:///?socket=${socket}`;
    await nbdReady(source);

    await fx.ferry.ok(["volume", "import", "from-qemu", "--from", source, "--data", fx.data]);
    const [volume] = await fx.ferry.json<Array<{ name: string; size: number }>>(["volume", "list", "--data", fx.data]);
    expect(volume).toMatchObject({ name: "from-qemu", size: 24 * MiB });

    await fx.startServe();
    await fx.tool("qemu-img", ["compare", "-f", "raw", "-F", "raw", raw, fx.uri("from-qemu")]);
  });

  it("imports from nbdkit over TCP into a larger volume", async () => {
    const port = await freePort();
    fx.sandbox.spawn("nbdkit", ["--foreground", "--ipaddr=127.0.0.1", `--port=${port}`, "memory", "8M"]);
    const source = `nbd://127.0.0.1:${port}/`;
    await nbdReady(source);
    await fx.tool("qemu-io", ["-f", "raw", source, "-c", "write -P 0x6b 1M 2M"]);

    await fx.ferry.ok(["volume", "import", "from-nbdkit", "--from", source, "--size", "16M", "--data", fx.data]);
    const [volume] = await fx.ferry.json<Array<{ size: number }>>(["volume", "list", "--data", fx.data]);
    expect(volume?.size).toBe(16 * MiB);

    await fx.startServe();
    await fx.tool("qemu-io", [
      "-f",
      "raw",
      fx.uri("from-nbdkit"),
      "-c",
      "read -P 0 0 1M",
      "-c",
      "read -P 0x6b 1M 2M",
      "-c",
      "read -P 0 3M 13M",
    ]);
  });

  it("fails with exit 1 and names the source when nothing listens there", async () => {
    const source = `nbd+unix:///?socket=${join(work, "nobody.sock")}`;
    const result = await fx.ferry.run(["volume", "import", "x", "--from", source, "--data", fx.data]);
    expect(result.code).toBe(1);
    expect(result.stderr).toMatch(/^ferry: .*nobody\.sock/);
    expect(await fx.ferry.json<unknown[]>(["volume", "list", "--data", fx.data])).toEqual([]);
  });
});
