/**
 * Events: CloudEvents-style JSON published on `ferry.events.<site>.<type>` through JetStream, so
 * each site's `FERRY_EVENTS` stream keeps them and any NATS subscriber can follow them live.
 * Publications are serialized: events of one site are stored and delivered in the order emitted.
 */
import { randomUUID } from "node:crypto";
import { type JetStreamClient, type JetStreamManager, jetstream, jetstreamManager } from "@nats-io/jetstream";
import type { NatsConnection } from "@nats-io/transport-node";

export const EVENTS_STREAM = "FERRY_EVENTS";

export interface FerryEvent {
  specversion: "1.0";
  id: string;
  /** `ferry/<site>`: the ferryd that emitted it. */
  source: string;
  /** `io.ferry.<type>`, e.g. `io.ferry.rpo.breached`. */
  type: string;
  /** The application it concerns, when there is one. */
  subject: string | null;
  time: string;
  datacontenttype: "application/json";
  data: Record<string, unknown>;
}

export const eventSubject = (site: string, type: string) => `ferry.events.${site}.${type}`;

export class EventLog {
  private tail: Promise<unknown> = Promise.resolve();

  private constructor(
    private readonly site: string,
    private readonly js: JetStreamClient,
    private readonly jsm: JetStreamManager,
    private readonly onPublished: (event: FerryEvent) => void,
  ) {}

  /** Create (or update) the site's event stream and return a publisher for it. */
  static async open(nc: NatsConnection, site: string, onPublished: (event: FerryEvent) => void = () => {}) {
    const jsm = await jetstreamManager(nc);
    const config = {
      name: EVENTS_STREAM,
      subjects: [`ferry.events.${site}.>`],
      max_msgs: 100_000,
      max_age: 30 * 24 * 3600 * 1e9,
    };
    try {
      await jsm.streams.info(EVENTS_STREAM);
      await jsm.streams.update(EVENTS_STREAM, config);
    } catch {
      await jsm.streams.add(config);
    }
    return new EventLog(site, jetstream(nc), jsm, onPublished);
  }

  /** Publish one event; resolves once the stream stored it. Never rejects: a lost event is logged. */
  emit(type: string, app: string | null, data: Record<string, unknown>): Promise<void> {
    const event: FerryEvent = {
      specversion: "1.0",
      id: randomUUID(),
      source: `ferry/${this.site}`,
      type: `io.ferry.${type}`,
      subject: app,
      time: new Date().toISOString(),
      datacontenttype: "application/json",
      data,
    };
    const next = this.tail.then(async () => {
      try {
        await this.js.publish(eventSubject(this.site, type), JSON.stringify(event));
        this.onPublished(event);
      } catch (error) {
        process.stderr.write(`ferryd: event ${event.type} not stored: ${(error as Error).message}\n`);
      }
    });
    this.tail = next;
    return next;
  }

  /** The newest events (oldest first), at most `limit`, of one application when given. */
  async recent(limit: number, app: string | null): Promise<FerryEvent[]> {
    const info = await this.jsm.streams.info(EVENTS_STREAM);
    const found: FerryEvent[] = [];
    const scanLimit = Math.max(limit * 20, 2_000);
    for (let seq = info.state.last_seq, scanned = 0; seq >= info.state.first_seq && seq > 0; seq--, scanned++) {
      if (found.length >= limit || scanned >= scanLimit) break;
      const message = await this.jsm.streams.getMessage(EVENTS_STREAM, { seq }).catch(() => null);
      if (message === null) continue;
      const event = message.json<FerryEvent>();
      if (app === null || event.subject === app) found.push(event);
    }
    return found.reverse();
  }

  /** Wait until every event emitted so far is stored. */
  flush(): Promise<unknown> {
    return this.tail;
  }
}
