/** fio's nbd engine writing and verifying through a Ferry export at queue depth. */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { FerryFixture } from "./ferry-fixture.js";

const MiB = 2 ** 20;

let fx: FerryFixture;
let work: string;

beforeEach(async () => {
  fx = new FerryFixture();
  await fx.setup();
  work = await fx.sandbox.dir("ferry-fio-");
  await fx.create("disk", "64M");
  await fx.startServe({ tcp: true });
});

afterEach(async () => {
  await fx.cleanup();
});

interface FioJob {
  jobname: string;
  error: number;
  write: { io_bytes: number };
  read: { io_bytes: number };
}

/**
 * Run fio with JSON results in a file (the nbd engine prints to stdout) and return the jobs. No
 * verify state files: fio would otherwise leave them in the working directory.
 */
async function fio(args: string[]): Promise<FioJob[]> {
  const output = join(work, `fio-${Date.now()}.json`);
  await fx.tool("fio", [...args, "--verify_state_save=0", `--output=${output}`, "--output-format=json"], 300_000);
  const report = JSON.parse(await readFile(output, "utf8")) as { jobs: FioJob[] };
  return report.jobs;
}

describe("fio --ioengine=nbd", () => {
  it("writes 4K random blocks at queue depth 16 and verifies every one (unix socket)", async () => {
    const jobs = await fio([
      "--name=randwrite-verify",
      "--ioengine=nbd",
      `--uri=${fx.uri("disk")}`,
      "--rw=randwrite",
      "--bs=4k",
      "--size=32M",
      "--iodepth=16",
      "--verify=crc32c",
      "--do_verify=1",
      "--verify_fatal=1",
    ]);
    expect(jobs).toHaveLength(1);
    expect(jobs[0]?.error).toBe(0);
    expect(jobs[0]?.write.io_bytes).toBe(32 * MiB);
    expect(jobs[0]?.read.io_bytes).toBe(32 * MiB);
  });

  it("writes sequentially with 1M blocks from two jobs over TCP and verifies", async () => {
    const jobs = await fio([
      "--ioengine=nbd",
      `--uri=${fx.serve?.tcpUri("disk")}`,
      "--rw=write",
      "--bs=1M",
      "--size=16M",
      "--iodepth=4",
      "--numjobs=2",
      "--offset_increment=32M",
      "--verify=xxhash",
      "--do_verify=1",
      "--verify_fatal=1",
      "--name=seq-verify",
    ]);
    expect(jobs).toHaveLength(2);
    for (const job of jobs) {
      expect(job.error).toBe(0);
      expect(job.write.io_bytes).toBe(16 * MiB);
    }
    expect(await fx.dirty("disk")).toEqual([
      { offset: 0, length: 16 * MiB },
      { offset: 32 * MiB, length: 16 * MiB },
    ]);
  });
});
