/**
 * The operator's control loop: informers on ProtectionPolicies, Applications and the recovery
 * operations (Failover, Migration, Failback, Drill), one work queue, one worker. Level-triggered: a key is reconciled when its object appears, when its spec changes
 * (metadata.generation) and on every resync, and a reconcile always starts from the object as it is
 * now, never from the event that woke it. The reconcilers (policy-, application-
 * and operation-reconciler.ts) talk to this site's ferryd over NATS and write only status.
 *
 * It owns the queue and the informers; it must never write a user's spec.
 */
import {
  ADD,
  CoreV1Api,
  CustomObjectsApi,
  ERROR,
  type Informer,
  type KubeConfig,
  type KubernetesObject,
  makeInformer,
  type ObjectCache,
  UPDATE,
} from "@kubernetes/client-node";
import type { NatsConnection } from "@nats-io/transport-node";
import { reconcileApplication } from "./application-reconciler.js";
import { conditionEvent, transitions } from "./condition-events.js";
import { GROUP, VERSION } from "./crds.js";
import {
  OPERATION_PLURALS,
  type OperationPlural,
  type OperationResource,
  reconcileOperation,
} from "./operation-reconciler.js";
import { reconcilePolicy } from "./policy-reconciler.js";
import type { Application, Condition, ProtectionPolicy } from "./resources.js";

export interface OperatorOptions {
  kubeConfig: KubeConfig;
  /** A connection to this site's NATS, as a user allowed to call ferryd's API. */
  nc: NatsConnection;
  /** This site's name: the ferryd the operator drives. */
  site: string;
  /** Watch these namespaces only (RBAC granted per namespace); all namespaces when left out or empty. */
  namespaces?: readonly string[];
  /** Reconcile everything this often, changed or not (level-triggered); default 30 s. */
  resyncMs?: number;
  now?: () => Date;
  log?: (line: string) => void;
}

/** What a reconciler needs: the site's ferryd, the status writer, the clock. */
export interface ReconcileContext {
  nc: NatsConnection;
  site: string;
  now: () => Date;
  /** Replace the object's status (optimistic concurrency on its resourceVersion). */
  writeStatus(plural: string, object: WithConditions, status: WithConditions["status"]): Promise<void>;
  /** Replace the object's finalizers; answers the object as stored. */
  setFinalizers<T extends KubernetesObject>(plural: string, object: T, finalizers: string[]): Promise<T>;
}

/** Every Ferry resource: its status has conditions. */
export type WithConditions = KubernetesObject & { status?: { conditions?: Condition[]; observedGeneration?: number } };

/**
 * How a reconcile ended: `retry` after a backoff (a transient failure), settled until the next
 * event or resync, or look again `after` this many ms (an operation in progress).
 */
export type Outcome = "settled" | "retry" | { after: number };

const KINDS = ["protectionpolicies", "applications", ...OPERATION_PLURALS] as const;
type Kind = (typeof KINDS)[number];

type Watched = Informer<KubernetesObject> & ObjectCache<KubernetesObject>;
type Informers = Record<Kind, Watched>;

const MAX_BACKOFF_MS = 30_000;
/** A queue of keys, so its size is bounded by the number of objects watched. */
type Key = `${Kind}/${string}/${string}`;

export class Operator {
  private readonly api: CustomObjectsApi;
  private readonly events: CoreV1Api;
  private readonly now: () => Date;
  private readonly log: (line: string) => void;
  private readonly queue = new Set<Key>();
  private readonly attempts = new Map<Key, number>();
  private readonly timers = new Set<NodeJS.Timeout>();
  /** Per watched namespace ("" for all namespaces), an informer per kind. */
  private readonly informers: Map<string, Informers>;
  private wake: (() => void) | undefined;
  private running = false;
  private worker: Promise<void> | undefined;
  private resync: NodeJS.Timeout | undefined;

  constructor(private readonly options: OperatorOptions) {
    this.api = options.kubeConfig.makeApiClient(CustomObjectsApi);
    this.events = options.kubeConfig.makeApiClient(CoreV1Api);
    this.now = options.now ?? (() => new Date());
    this.log = options.log ?? ((line) => process.stderr.write(`ferry-operator: ${line}\n`));
    const namespaces = options.namespaces?.length ? options.namespaces : [""];
    this.informers = new Map(
      namespaces.map((namespace) => [
        namespace,
        Object.fromEntries(KINDS.map((kind) => [kind, this.informer(kind, namespace)])) as Informers,
      ]),
    );
  }

  async start(): Promise<void> {
    this.running = true;
    for (const informers of this.informers.values()) {
      for (const kind of KINDS) await this.watch(kind, informers[kind]);
    }
    this.resync = setInterval(() => this.enqueueAll(), this.options.resyncMs ?? 30_000);
    this.worker = this.work();
  }

  async stop(): Promise<void> {
    this.running = false;
    if (this.resync !== undefined) clearInterval(this.resync);
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
    this.wake?.();
    await Promise.all([...this.informers.values()].flatMap((informers) => KINDS.map((kind) => informers[kind].stop())));
    await this.worker;
  }

  private async watch<T extends KubernetesObject>(kind: Kind, informer: Informer<T>): Promise<void> {
    informer.on(ADD, (object) => this.enqueue(kind, object));
    informer.on(UPDATE, (object) => {
      // A status write comes back as an update too; only a new generation (spec change) or a
      // deletion in progress is news. Everything else waits for the resync.
      if (object.metadata?.generation !== observedGeneration(object) || object.metadata?.deletionTimestamp) {
        this.enqueue(kind, object);
      }
    });
    informer.on(ERROR, (error) => {
      if (!this.running) return;
      this.log(`watch of ${kind} failed (${String(error)}); restarting it in 1 s`);
      this.later(1_000, () => void informer.start().catch((e: unknown) => this.log(String(e))));
    });
    await informer.start();
  }

  private informer(plural: Kind, namespace: string): Watched {
    const path =
      namespace === ""
        ? `/apis/${GROUP}/${VERSION}/${plural}`
        : `/apis/${GROUP}/${VERSION}/namespaces/${namespace}/${plural}`;
    const list = () =>
      namespace === ""
        ? this.api.listClusterCustomObject({ group: GROUP, version: VERSION, plural })
        : this.api.listNamespacedCustomObject({ group: GROUP, version: VERSION, namespace, plural });
    return makeInformer<KubernetesObject>(this.options.kubeConfig, path, list);
  }

  private enqueue(kind: Kind, object: KubernetesObject): void {
    const { name, namespace } = object.metadata ?? {};
    if (name === undefined || namespace === undefined) return;
    this.queue.add(`${kind}/${namespace}/${name}`);
    this.wake?.();
  }

  private enqueueAll(): void {
    for (const informers of this.informers.values()) {
      for (const kind of KINDS) for (const object of informers[kind].list()) this.enqueue(kind, object);
    }
  }

  private later(ms: number, fn: () => void): void {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      if (this.running) fn();
    }, ms);
    this.timers.add(timer);
  }

  private async work(): Promise<void> {
    const context: ReconcileContext = {
      nc: this.options.nc,
      site: this.options.site,
      now: this.now,
      writeStatus: (plural, object, status) => this.writeStatus(plural, object, status),
      setFinalizers: (plural, object, finalizers) => this.setFinalizers(plural, object, finalizers),
    };
    while (this.running) {
      const key = this.queue.values().next().value;
      if (key === undefined) {
        await new Promise<void>((resolve) => {
          this.wake = resolve;
        });
        this.wake = undefined;
        continue;
      }
      this.queue.delete(key);
      let outcome: Outcome;
      try {
        outcome = await this.reconcile(key, context);
      } catch (error) {
        this.log(`reconcile ${key} failed: ${error instanceof Error ? error.message : String(error)}`);
        outcome = "retry";
      }
      if (outcome === "settled") {
        this.attempts.delete(key);
      } else if (typeof outcome === "object") {
        this.attempts.delete(key);
        this.later(outcome.after, () => {
          this.queue.add(key);
          this.wake?.();
        });
      } else {
        const attempt = (this.attempts.get(key) ?? 0) + 1;
        this.attempts.set(key, attempt);
        this.later(Math.min(MAX_BACKOFF_MS, 250 * 2 ** attempt), () => {
          this.queue.add(key);
          this.wake?.();
        });
      }
    }
  }

  private reconcile(key: Key, context: ReconcileContext): Promise<Outcome> {
    const [kind, namespace, name] = key.split("/") as [Kind, string, string];
    const informers = this.informers.get(namespace) ?? this.informers.get("");
    if (informers === undefined) return Promise.resolve("settled");
    const object = informers[kind].get(name, namespace);
    if (object === undefined) return Promise.resolve("settled");
    if (kind === "protectionpolicies") return reconcilePolicy(object as ProtectionPolicy, context);
    if (kind === "applications") return reconcileApplication(object as Application, context);
    return reconcileOperation(kind as OperationPlural, object as OperationResource, context);
  }

  private async setFinalizers<T extends KubernetesObject>(plural: string, object: T, finalizers: string[]) {
    const { name, namespace } = object.metadata ?? {};
    if (name === undefined || namespace === undefined) throw new Error(`${plural}: an object without a name`);
    // The main resource ignores status and, for a custom resource, a finalizer change does not
    // bump the generation: this never counts as a spec change.
    return (await this.api.replaceNamespacedCustomObject({
      group: GROUP,
      version: VERSION,
      namespace,
      plural,
      name,
      body: { ...object, metadata: { ...object.metadata, finalizers } },
    })) as T;
  }

  private async writeStatus(plural: string, object: WithConditions, status: WithConditions["status"]) {
    if (JSON.stringify(object.status ?? null) === JSON.stringify(status)) return;
    const { name, namespace } = object.metadata ?? {};
    if (name === undefined || namespace === undefined) return;
    await this.api.replaceNamespacedCustomObjectStatus({
      group: GROUP,
      version: VERSION,
      namespace,
      plural,
      name,
      body: { ...object, status },
    });
    // Events only once the status they report is stored; a lost Event is logged, never retried.
    for (const condition of transitions(object.status?.conditions, status?.conditions)) {
      await this.events
        .createNamespacedEvent({ namespace, body: conditionEvent(object, condition, this.options.site, this.now()) })
        .catch((error: unknown) => this.log(`event for ${plural}/${namespace}/${name}: ${String(error)}`));
    }
  }
}

function observedGeneration(object: KubernetesObject & { status?: { observedGeneration?: number } }) {
  return object.status?.observedGeneration;
}
