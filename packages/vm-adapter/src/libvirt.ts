/**
 * The package's way into the native binding (`native/`, built by napi-rs from `src/lib.rs`):
 * a libvirt connection whose errors carry `error.code`. The Rust layer sends errors as
 * "ERR_CODE: message" because napi-rs can only set a fixed status as the code; here the prefix
 * moves into `error.code`, leaving a clean message.
 */
import * as native from "../native/index.js";

export type { BlockCopyOptions, NativeDomain } from "../native/index.js";

const CODED = /^(ERR_[A-Z0-9_]+): /;

function recode(err: unknown): unknown {
  if (err instanceof Error) {
    const m = CODED.exec(err.message);
    if (m) {
      err.message = err.message.slice(m[0].length);
      Object.defineProperty(err, "code", { value: m[1], enumerable: true, writable: true, configurable: true });
    }
  }
  return err;
}

async function coded<T>(call: Promise<T>): Promise<T> {
  try {
    return await call;
  } catch (err) {
    throw recode(err);
  }
}

/** One libvirt connection; every call runs off the JavaScript thread. */
export class Libvirt {
  private constructor(private readonly conn: native.Libvirt) {}

  /** `qemu:///system`, `qemu:///system?socket=PATH`, `test:///default`, … */
  static async connect(uri: string): Promise<Libvirt> {
    return new Libvirt(await coded(native.connect(uri)));
  }

  get uri(): string {
    return this.conn.uri;
  }

  listDomains(): Promise<native.NativeDomain[]> {
    return coded(this.conn.listDomains());
  }

  describe(name: string): Promise<native.NativeDomain> {
    return coded(this.conn.describe(name));
  }

  state(name: string): Promise<string> {
    return coded(this.conn.state(name));
  }

  /** `inactive`: the persistent definition, else the live XML while running. */
  xml(name: string, inactive: boolean): Promise<string> {
    return coded(this.conn.xml(name, inactive));
  }

  diskCapacity(name: string, disk: string): Promise<number> {
    return coded(this.conn.diskCapacity(name, disk));
  }

  define(xml: string): Promise<string> {
    return coded(this.conn.define(xml));
  }

  undefine(name: string): Promise<void> {
    return coded(this.conn.undefine(name));
  }

  start(name: string): Promise<void> {
    return coded(this.conn.start(name));
  }

  shutdown(name: string, timeoutMs: number): Promise<void> {
    return coded(this.conn.shutdown(name, timeoutMs));
  }

  destroy(name: string): Promise<void> {
    return coded(this.conn.destroy(name));
  }

  blockCopy(name: string, options: native.BlockCopyOptions): Promise<void> {
    return coded(this.conn.blockCopy(name, options));
  }

  /** Resume the domain if libvirt paused it on a disk's I/O error; whether it did. */
  resumeIfPausedOnIoError(name: string): Promise<boolean> {
    return coded(this.conn.resumeIfPausedOnIoError(name));
  }

  agentCommand(name: string, command: string, timeoutMs: number): Promise<string> {
    return coded(this.conn.agentCommand(name, command, timeoutMs));
  }
}
