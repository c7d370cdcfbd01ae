/**
 * The statistics document of `volumeStats()` ({volumes: {name: {bytesRead, …, readLatency: {p50Us,
 * p99Us, …}}}}) and its table. Fields beyond the ones shown pass through untouched to `--json`.
 */
import { formatBytes } from "../bytes.js";
import { UnexpectedStats } from "../errors.js";
import { formatTable } from "../table.js";

interface Latency {
  p50Us?: number;
  p99Us?: number;
}

interface VolumeCounters {
  bytesRead?: number;
  bytesWritten?: number;
  reads?: number;
  writes?: number;
  readLatency?: Latency;
  writeLatency?: Latency;
}

export class VolumeStatsDocument {
  private constructor(
    readonly raw: unknown,
    private readonly volumes: Record<string, VolumeCounters>,
  ) {}

  static parse(text: string): VolumeStatsDocument {
    let raw: unknown;
    try {
      raw = JSON.parse(text);
    } catch (cause) {
      throw new UnexpectedStats(`the volume service returned statistics that are not JSON: ${text.slice(0, 80)}`, {
        cause,
      });
    }
    const volumes = (raw as { volumes?: unknown } | null)?.volumes;
    if (typeof volumes !== "object" || volumes === null) {
      throw new UnexpectedStats(
        `the volume service returned statistics without a "volumes" object: ${text.slice(0, 80)}`,
      );
    }
    return new VolumeStatsDocument(raw, volumes as Record<string, VolumeCounters>);
  }

  toTable(): string {
    const names = Object.keys(this.volumes).sort();
    if (names.length === 0) return "no volumes are being served";
    const rows = names.map((name) => {
      const v = this.volumes[name] ?? {};
      return [
        name,
        v.reads ?? 0,
        formatBytes(v.bytesRead ?? 0),
        latency(v.readLatency),
        v.writes ?? 0,
        formatBytes(v.bytesWritten ?? 0),
        latency(v.writeLatency),
      ];
    });
    return formatTable(["VOLUME", "READS", "READ", "READ p50/p99", "WRITES", "WRITTEN", "WRITE p50/p99"], rows);
  }
}

function latency(l: Latency | undefined): string {
  if (l?.p50Us === undefined || l.p99Us === undefined) return "-";
  return `${l.p50Us}/${l.p99Us} µs`;
}
