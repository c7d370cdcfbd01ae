/**
 * Prometheus metrics of one ferryd (prom-client, a registry per instance so tests can run several
 * in one process). The daemon serves `registry.metrics()` on `/metrics`.
 */
import { Counter, Gauge, Histogram, Registry } from "prom-client";

type Series = ReturnType<Gauge<"app" | "target">["labels"]>;

export interface ProtectionSeries {
  lag: Series;
  rpoMet: Series;
  rpoSeconds: Series;
  bytesRaw: Series;
  bytesWire: Series;
}

export class Metrics {
  readonly registry = new Registry();
  readonly lag = this.perProtection(
    "ferry_replication_lag_seconds",
    "How far the newest complete recovery point at the target is behind the source, per application and target",
  );
  readonly rpoMet = this.perProtection(
    "ferry_rpo_met",
    "1 while the application's lag to the target is within its policy's RPO, else 0",
  );
  readonly rpoSeconds = this.perProtection("ferry_rpo_seconds", "The RPO of the policy protecting the application");
  readonly bytesRaw = this.perProtection(
    "ferry_replication_bytes_raw",
    "Bytes of volume data shipped to the target since the volume service started, before compression",
  );
  readonly bytesWire = this.perProtection(
    "ferry_replication_bytes_wire",
    "Bytes sent on the wire to the target since the volume service started",
  );
  readonly operations = new Counter({
    name: "ferry_operations_total",
    help: "Recovery operations finished, by kind and result",
    labelNames: ["kind", "result"] as const,
    registers: [this.registry],
  });
  readonly operationSeconds = new Histogram({
    name: "ferry_operation_duration_seconds",
    help: "Wall time of finished recovery operations",
    labelNames: ["kind"] as const,
    buckets: [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900],
    registers: [this.registry],
  });
  readonly tickSeconds = new Histogram({
    name: "ferry_scheduler_tick_seconds",
    help: "Time of one scheduler tick (status of every pair, RPO of every protection)",
    buckets: [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1],
    registers: [this.registry],
  });
  readonly captureSeconds = new Histogram({
    name: "ferry_capture_seconds",
    help: "Time of one orchestrated cut: quiesce, hooks, cut, thaw, member capture and storing the metadata",
    buckets: [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30],
    registers: [this.registry],
  });
  readonly leader = new Gauge({
    name: "ferry_leader",
    help: "1 while this ferryd leads its site (serves the API, runs the scheduler and operations)",
    registers: [this.registry],
  });
  readonly applications = new Gauge({
    name: "ferry_applications",
    help: "Applications in this site's catalog",
    registers: [this.registry],
  });

  private perProtection(name: string, help: string): Gauge<"app" | "target"> {
    return new Gauge({ name, help, labelNames: ["app", "target"] as const, registers: [this.registry] });
  }

  private readonly children = new Map<string, ProtectionSeries>();

  /**
   * The series of one protection, resolved once: a labelled `set` hashes its labels on every call,
   * which at a thousand protections per tick is most of the tick.
   */
  protection(app: string, target: string): ProtectionSeries {
    const key = `${app}\u0000${target}`;
    let series = this.children.get(key);
    if (series === undefined) {
      const labels = { app, target };
      series = {
        lag: this.lag.labels(labels),
        rpoMet: this.rpoMet.labels(labels),
        rpoSeconds: this.rpoSeconds.labels(labels),
        bytesRaw: this.bytesRaw.labels(labels),
        bytesWire: this.bytesWire.labels(labels),
      };
      this.children.set(key, series);
    }
    return series;
  }

  /** Forget the series of a protection that no longer exists here. */
  dropProtection(app: string, target: string): void {
    this.children.delete(`${app}\u0000${target}`);
    for (const g of [this.lag, this.rpoMet, this.rpoSeconds, this.bytesRaw, this.bytesWire]) {
      g.remove({ app, target });
    }
  }
}
