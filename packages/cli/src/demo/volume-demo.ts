/**
 * `ferry demo --single-site`: a narrated walk through the volume service with real NBD tools. It creates a
 * volume in a temporary data directory, serves it on a unix socket, writes with qemu-io, shows the
 * changed-block map (from the data plane and from nbdinfo over NBD), cuts a generation, writes
 * again and shows that only the new writes are dirty. Everything it starts or creates is removed
 * again, also on Ctrl-C.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Extent, VolumeService } from "@ferry/dataplane-native";
import { formatBytes } from "../bytes.js";
import { dataplane } from "../dataplane.js";
import type { ProgramIo } from "../program.js";
import { formatTable } from "../table.js";
import { runTool } from "./external-tool.js";
import { Interruption } from "./interruption.js";
import { Narrator } from "./narrator.js";

const VOLUME = "demo";
const SIZE = 64 * 2 ** 20;

export async function runVolumeDemo(io: ProgramIo): Promise<void> {
  const interruption = new Interruption();
  const { signal } = interruption;
  const step = <T>(work: Promise<T>) => interruption.step(work);
  const narrator = new Narrator(io);
  const say = (text: string) => narrator.step(text);
  const show = (text: string) => narrator.show(text);
  let dataDir: string | undefined;
  let service: VolumeService | undefined;
  try {
    const native = await step(dataplane());
    dataDir = await mkdtemp(join(tmpdir(), "ferry-demo-"));
    say(`Create a ${formatBytes(SIZE)} volume '${VOLUME}' in ${dataDir}`);
    const info = await step(native.createVolume(dataDir, VOLUME, SIZE, null));
    show(`size ${formatBytes(info.size)}, changed-block granularity ${formatBytes(info.granularity)}`);

    const socket = join(dataDir, "nbd.sock");
    say("Serve it over NBD on a unix socket (in this process, on the data plane's own threads)");
    service = await step(native.startVolumeService({ dataDir, socket }));
    const uri = `nbd+unix:///${VOLUME}?socket=${socket}`;
    show(uri);

    const qemuIo = (...commands: string[]) =>
      step(runTool("qemu-io", ["-f", "raw", uri, ...commands.flatMap((c) => ["-c", c])], { signal }));
    const volumeDir = dataDir;
    const dirtyMap = async (label: string) => {
      const extents = await step(native.dirtyExtents(volumeDir, VOLUME));
      show(`ferry volume dirty ${VOLUME}: ${describeExtents(extents)}`);
      const map = await step(runTool("nbdinfo", ["--map=qemu:dirty-bitmap:open", uri], { signal }));
      show(`nbdinfo --map=qemu:dirty-bitmap:open (${label}), read over NBD:\n${map.stdout.trimEnd()}`);
    };

    say("Write 1M of 0xab at offset 0 and 64K of 0xcd at 8M with qemu-io");
    show((await qemuIo("write -P 0xab 0 1M", "write -P 0xcd 8M 64K")).stdout);

    say("The dirty map: every write marked its extents as it happened");
    await dirtyMap("open generation");

    say(`Cut a generation: close what was written so far, start tracking afresh`);
    const [cut] = await step(native.cutVolumes(dataDir, [VOLUME]));
    show(`closed generation ${cut?.generation}`);

    say("Write 4K of 0x5a at 32M");
    show((await qemuIo("write -P 0x5a 32M 4K")).stdout);

    say("The new dirty map holds only the write after the cut (rounded to the granularity)");
    await dirtyMap("after the cut");

    say("Read back what was written before the cut: the data is all there");
    show((await qemuIo("read -P 0xab 0 1M", "read -P 0xcd 8M 64K")).stdout);

    say("Done; stopping the service and removing the data directory");
  } finally {
    await service?.stop();
    if (dataDir !== undefined) await rm(dataDir, { recursive: true, force: true });
    interruption.dispose();
  }
}

function describeExtents(extents: readonly Extent[]): string {
  if (extents.length === 0) return "nothing dirty";
  const total = extents.reduce((sum, e) => sum + e.length, 0);
  const rows = extents.map((e) => [formatBytes(e.offset), formatBytes(e.length)]);
  return `${formatBytes(total)} dirty in ${extents.length} extent(s)\n${formatTable(["AT", "LENGTH"], rows)}`;
}
