/**
 * `ferry volume serve`: run the volume service in the foreground until SIGTERM or SIGINT, then stop
 * it cleanly (in-flight requests finish, bitmaps are persisted) and return. The service runs on the
 * data plane's own threads; this function only starts it, reports where it listens and waits.
 */
import { dataplane } from "../dataplane.js";
import type { ProgramIo } from "../program.js";

export const DEFAULT_LISTEN = "127.0.0.1:10809";

export interface ServeRequest {
  dataDir: string;
  listen?: string | undefined;
  socket?: string | undefined;
}

const STOP_SIGNALS = ["SIGTERM", "SIGINT"] as const;
type StopSignal = (typeof STOP_SIGNALS)[number];

export async function serveVolumes(request: ServeRequest, io: ProgramIo): Promise<void> {
  const { startVolumeService } = await dataplane();
  const listen = request.listen ?? (request.socket === undefined ? DEFAULT_LISTEN : undefined);
  const service = await startVolumeService({ dataDir: request.dataDir, listen, socket: request.socket });

  const names = service.volumeNames;
  const where: string[] = [];
  if (service.tcpAddress) where.push(`nbd://${service.tcpAddress}/`);
  if (service.socketPath)
    where.push(where.length > 0 ? `(unix socket ${service.socketPath})` : `nbd+unix:///?socket=${service.socketPath}`);
  const list = names.length > 0 ? ` (${names.join(", ")})` : "";
  io.writeOut(`ferry: serving ${names.length} volume${names.length === 1 ? "" : "s"}${list} on ${where.join(" ")}\n`);

  const signal = await nextStopSignal();
  io.writeErr(`ferry: ${signal} received, stopping the volume service\n`);
  // A second signal while stopping means "now": leave with failure rather than hang.
  const force = (again: StopSignal) => {
    io.writeErr(`ferry: ${again} received again, exiting without a clean stop\n`);
    process.exit(1);
  };
  for (const s of STOP_SIGNALS) process.once(s, force);
  try {
    await service.stop();
  } finally {
    for (const s of STOP_SIGNALS) process.off(s, force);
  }
}

function nextStopSignal(): Promise<StopSignal> {
  return new Promise((resolve) => {
    // Signal listeners do not keep Node's event loop alive by themselves, and the service runs on
    // native threads; this timer is what keeps the process waiting.
    const keepAlive = setInterval(() => {}, 2 ** 30);
    const handlers = STOP_SIGNALS.map((signal) => {
      const handler = () => {
        clearInterval(keepAlive);
        for (const [s, h] of handlers) process.off(s, h);
        resolve(signal);
      };
      return [signal, handler] as const;
    });
    for (const [s, h] of handlers) process.once(s, h);
  });
}
