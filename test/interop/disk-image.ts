/**
 * Test disk images with a known layout: random data, a constant pattern, zeroes and holes, so that
 * copies are checked for data, zero detection and sparseness at once.
 */
import { randomBytes } from "node:crypto";
import { open } from "node:fs/promises";

const MiB = 2 ** 20;

/**
 * A sparse raw image of `sizeMiB` MiB: 1 MiB of random bytes every 4 MiB, a 0x5a-filled MiB every
 * 4 MiB offset by 2 MiB, and holes in between.
 */
export async function writeTestImage(path: string, sizeMiB: number): Promise<void> {
  const file = await open(path, "w");
  try {
    await file.truncate(sizeMiB * MiB);
    for (let mib = 0; mib < sizeMiB; mib += 4) {
      await file.write(randomBytes(MiB), 0, MiB, mib * MiB);
      if (mib + 2 < sizeMiB) await file.write(Buffer.alloc(MiB, 0x5a), 0, MiB, (mib + 2) * MiB);
    }
  } finally {
    await file.close();
  }
}
