/**
 * `ferry volume import`: copy an existing disk into a new volume. The copy runs in the data plane;
 * this file only renders its progress, on stderr and only for a terminal, so that piped output
 * stays clean.
 */
import type { ImportProgress, VolumeInfo } from "@ferry/dataplane-native";
import { formatBytes } from "../bytes.js";
import type { Dataplane } from "../dataplane.js";
import type { ProgramIo } from "../program.js";

export interface ImportRequest {
  dataDir: string;
  name: string;
  source: string;
  size: number | null;
}

/** Redraw at most this often; the data plane may report far more often. */
const REDRAW_MS = 100;

export async function importVolumeWithProgress(
  native: Dataplane,
  request: ImportRequest,
  io: ProgramIo,
  showProgress: boolean = process.stderr.isTTY === true,
): Promise<VolumeInfo> {
  let lastDraw = 0;
  let drawn = false;
  const onProgress = showProgress
    ? (p: ImportProgress) => {
        const now = Date.now();
        if (now - lastDraw < REDRAW_MS && p.done < p.total) return;
        lastDraw = now;
        drawn = true;
        const percent = p.total > 0 ? Math.floor((100 * p.done) / p.total) : 100;
        io.writeErr(
          `\r\x1b[Kimporting ${request.name}: ${percent}% (${formatBytes(p.done)} of ${formatBytes(p.total)})`,
        );
      }
    : null;
  try {
    return await native.importVolume(request.dataDir, request.name, request.source, request.size, onProgress);
  } finally {
    if (drawn) io.writeErr("\n");
  }
}
