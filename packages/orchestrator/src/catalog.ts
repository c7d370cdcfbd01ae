/**
 * The catalog: JetStream KV buckets in the site's own domain (sites, applications, policies,
 * protections, operations, per-application operation locks). The site's leading ferryd is the only
 * writer, so each table keeps the values in memory for reads and writes every change through to
 * the bucket before it is visible; a ferryd that becomes leader loads the buckets first.
 */

import { type KV, Kvm } from "@nats-io/kv";
import type { NatsConnection } from "@nats-io/transport-node";
import { conflict } from "./errors.js";
import type { Application, Operation, Protection, ProtectionPolicy, Site } from "./model.js";

const enc = new TextEncoder();

/** One bucket of JSON values, cached in memory. */
export class Table<T> {
  private readonly values = new Map<string, { value: T; revision: number }>();

  constructor(
    readonly kv: KV,
    /** What a value is, for messages: "application", "policy", … */
    readonly what: string,
  ) {}

  /**
   * Read every key of the bucket (replacing what was cached): one watcher streams the last value
   * of each key, instead of a request per key (a leader taking over 1,000 applications).
   */
  async load(): Promise<void> {
    this.values.clear();
    if ((await this.kv.status()).values === 0) return;
    const watcher = await this.kv.watch();
    try {
      for await (const entry of watcher) {
        if (entry.operation === "PUT") {
          this.values.set(entry.key, { value: entry.json<T>(), revision: entry.revision });
        } else {
          this.values.delete(entry.key);
        }
        // `delta`: entries still to come of what the bucket held when the watch began.
        if (entry.delta === 0 || entry.isUpdate) break;
      }
    } finally {
      watcher.stop();
    }
  }

  get(key: string): T | undefined {
    return this.values.get(key)?.value;
  }

  list(): T[] {
    return [...this.values.values()].map((v) => v.value);
  }

  entries(): [string, T][] {
    return [...this.values.entries()].map(([k, v]) => [k, v.value]);
  }

  async put(key: string, value: T): Promise<void> {
    const revision = await this.kv.put(key, enc.encode(JSON.stringify(value)));
    this.values.set(key, { value, revision });
  }

  /** Store a new key; a key that exists already is a conflict (the bucket decides, atomically). */
  async create(key: string, value: T): Promise<void> {
    let revision: number;
    try {
      revision = await this.kv.create(key, enc.encode(JSON.stringify(value)));
    } catch (error) {
      if (/wrong last sequence|key exists/i.test(String((error as Error).message))) {
        throw conflict(`${this.what} ${key} exists already`);
      }
      throw error;
    }
    this.values.set(key, { value, revision });
  }

  async delete(key: string): Promise<void> {
    await this.kv.delete(key);
    this.values.delete(key);
  }
}

export const BUCKETS = {
  sites: "ferry-sites",
  apps: "ferry-apps",
  policies: "ferry-policies",
  protections: "ferry-protections",
  operations: "ferry-operations",
  locks: "ferry-locks",
} as const;

export class Catalog {
  private constructor(
    readonly sites: Table<Site>,
    readonly apps: Table<Application>,
    readonly policies: Table<ProtectionPolicy>,
    /** Key `<app>.<target>`. */
    readonly protections: Table<Protection>,
    readonly operations: Table<Operation>,
    /** Key: application name; value: the id of the operation that holds it. */
    readonly locks: Table<string>,
  ) {}

  /** Open (creating when missing) the buckets in the domain of the server `nc` is connected to. */
  static async open(nc: NatsConnection): Promise<Catalog> {
    const kvm = new Kvm(nc);
    const open = async <T>(bucket: string, what: string) =>
      new Table<T>(await kvm.create(bucket, { history: 1 }), what);
    return new Catalog(
      await open<Site>(BUCKETS.sites, "site"),
      await open<Application>(BUCKETS.apps, "application"),
      await open<ProtectionPolicy>(BUCKETS.policies, "policy"),
      await open<Protection>(BUCKETS.protections, "protection"),
      await open<Operation>(BUCKETS.operations, "operation"),
      await open<string>(BUCKETS.locks, "operation lock"),
    );
  }

  async load(): Promise<void> {
    for (const table of [this.sites, this.apps, this.policies, this.protections, this.operations, this.locks]) {
      await (table as Table<unknown>).load();
    }
  }

  protectionsOf(app: string): Protection[] {
    return this.protections.list().filter((p) => p.app === app);
  }
}

export const protectionKey = (app: string, target: string) => `${app}.${target}`;
