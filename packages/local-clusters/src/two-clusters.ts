/**
 * Two real Kubernetes API servers on loopback, one per site, as envtest runs them: one etcd and two
 * kube-apiservers with distinct `--etcd-prefix` (two independent clusters sharing nothing but the
 * etcd process). Certificates, the service-account key and a kubeconfig per site (client-cert auth,
 * system:masters) are made at start with openssl. Everything runs inside the caller's Sandbox, so
 * `sandbox.cleanup()` ends the processes by PID and removes the directories, also on failure.
 *
 * The binaries come from `infra/setup-k8s.sh` (built once per machine into a cache); etcd is the
 * Debian package. This module never builds anything: it fails at once, saying what to run.
 */
import { type ChildProcess, execFileSync } from "node:child_process";
import { closeSync, existsSync, openSync, readFileSync } from "node:fs";
import { mkdtemp, readFile, writeFile } from "node:fs/promises";
import { request } from "node:https";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { freePort, waitFor } from "@ferry/nats-sites";
import type { RunOptions, RunResult, Sandbox } from "./sandbox.js";

const REPO_ROOT = fileURLToPath(new URL("../../../", import.meta.url));
const SETUP_K8S = join(REPO_ROOT, "infra", "setup-k8s.sh");

export interface Cluster {
  /** The site this cluster belongs to (`a`, `b`). */
  name: string;
  /** https://127.0.0.1:PORT */
  server: string;
  /** A kubeconfig file for a cluster admin (client certificate in system:masters). */
  kubeconfig: string;
  /** PEM: the CA that signed the server certificate and the admin's client certificate. */
  ca: string;
  clientCert: string;
  clientKey: string;
  /** Milliseconds from spawning kube-apiserver to /readyz answering ok. */
  startMs: number;
}

export interface K8sTools {
  binDir: string;
  kubeApiserver: string;
  kubectl: string;
  helm: string;
  etcd: string;
}

export interface TwoClusters {
  a: Cluster;
  b: Cluster;
  tools: K8sTools;
  /** Run kubectl against a cluster; fails the promise only if kubectl could not be run. */
  kubectl(cluster: Cluster, args: readonly string[], options?: RunOptions): Promise<RunResult>;
  /** Run helm (commands that need no cluster, or pass `--kubeconfig` yourself). */
  helm(args: readonly string[], options?: RunOptions): Promise<RunResult>;
}

/** Where setup-k8s.sh put the binaries; throws, naming the command to run, when they are missing. */
export function k8sTools(): K8sTools {
  const binDir = execFileSync("bash", [SETUP_K8S, "--bin-dir"], { encoding: "utf8" }).trim();
  const tool = (name: string) => join(binDir, name);
  const tools = { binDir, kubeApiserver: tool("kube-apiserver"), kubectl: tool("kubectl"), helm: tool("helm") };
  const missing = Object.values(tools)
    .slice(1)
    .filter((path) => !existsSync(path));
  if (missing.length > 0) {
    throw new Error(`missing ${missing.join(", ")}: run infra/setup-k8s.sh (or infra/setup.sh) once to build them`);
  }
  const etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"].find((path) => existsSync(path));
  if (etcd === undefined) throw new Error("etcd not found: run infra/setup-k8s.sh (installs Debian's etcd-server)");
  return { ...tools, etcd };
}

export interface TwoClustersOptions {
  /** How long each process may take to become ready; default 60 s (two cores, busy machine). */
  readyTimeoutMs?: number;
}

export async function startTwoClusters(sandbox: Sandbox, options: TwoClustersOptions = {}): Promise<TwoClusters> {
  const tools = k8sTools();
  const readyTimeoutMs = options.readyTimeoutMs ?? 60_000;
  const dir = await sandbox.dir("ferry-k8s-");
  const pki = await makePki(sandbox, dir);

  // etcd's data on tmpfs when there is one: fsync on a busy disk is what makes etcd slow, and the
  // data is thrown away after the test anyway.
  const etcdDir = existsSync("/dev/shm") ? sandbox.adopt(await mkdtemp("/dev/shm/ferry-etcd-")) : dir;
  const etcdUrl = await startEtcd(sandbox, tools.etcd, join(etcdDir, "etcd"), join(dir, "etcd.log"), readyTimeoutMs);
  const [a, b] = await Promise.all(
    ["a", "b"].map((name) => startApiserver(sandbox, tools, dir, pki, etcdUrl, name, readyTimeoutMs)),
  );
  if (a === undefined || b === undefined) throw new Error("unreachable: two clusters were started");

  const kubectl = (cluster: Cluster, args: readonly string[], runOptions: RunOptions = {}) =>
    sandbox.run(tools.kubectl, ["--kubeconfig", cluster.kubeconfig, ...args], runOptions);
  const helmHome = join(dir, "helm");
  const helm = (args: readonly string[], runOptions: RunOptions = {}) =>
    sandbox.run(tools.helm, args, {
      ...runOptions,
      // Keep helm's cache and config out of $HOME.
      env: {
        ...process.env,
        HELM_CACHE_HOME: join(helmHome, "cache"),
        HELM_CONFIG_HOME: join(helmHome, "config"),
        HELM_DATA_HOME: join(helmHome, "data"),
        ...runOptions.env,
      },
    });
  return { a, b, tools, kubectl, helm };
}

interface Pki {
  caCert: string;
  caKey: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  saPublic: string;
  saPrivate: string;
}

async function makePki(sandbox: Sandbox, dir: string): Promise<Pki> {
  const path = (name: string) => join(dir, name);
  const openssl = async (args: string[]) => {
    const result = await sandbox.run("openssl", args, { timeoutMs: 30_000 });
    if (result.code !== 0) throw new Error(`openssl ${args.join(" ")} failed: ${result.stderr}`);
  };
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  await openssl([
    "req",
    "-x509",
    ...ec,
    "-keyout",
    path("ca.key"),
    "-out",
    path("ca.crt"),
    "-days",
    "2",
    "-subj",
    "/CN=ferry-test-ca",
  ]);
  await writeFile(path("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
  await writeFile(path("client.ext"), "extendedKeyUsage=clientAuth\n");
  const signed = async (name: string, subject: string) => {
    await openssl([
      "req",
      "-new",
      ...ec,
      "-keyout",
      path(`${name}.key`),
      "-out",
      path(`${name}.csr`),
      "-subj",
      subject,
    ]);
    await openssl([
      "x509",
      "-req",
      "-in",
      path(`${name}.csr`),
      "-CA",
      path("ca.crt"),
      "-CAkey",
      path("ca.key"),
      "-CAcreateserial",
      "-days",
      "2",
      "-extfile",
      path(`${name}.ext`),
      "-out",
      path(`${name}.crt`),
    ]);
  };
  await signed("server", "/CN=kube-apiserver");
  await signed("client", "/O=system:masters/CN=ferry-test-admin");
  await openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", path("sa.key")]);
  await openssl(["pkey", "-in", path("sa.key"), "-pubout", "-out", path("sa.pub")]);
  return {
    caCert: path("ca.crt"),
    caKey: path("ca.key"),
    serverCert: path("server.crt"),
    serverKey: path("server.key"),
    clientCert: path("client.crt"),
    clientKey: path("client.key"),
    saPublic: path("sa.pub"),
    saPrivate: path("sa.key"),
  };
}

/** `ready`, or a rejection as soon as the process exits before it is ready. */
function untilExit<T>(child: ChildProcess, ready: Promise<T>): Promise<T> {
  let onExit: (code: number | null) => void = () => {};
  const exited = new Promise<never>((_, reject) => {
    onExit = (code) => reject(new Error(`exited with status ${code} before it was ready`));
    child.once("exit", onExit);
  });
  return Promise.race([ready, exited]).finally(() => child.off("exit", onExit));
}

function logTail(file: string): string {
  try {
    return readFileSync(file, "utf8").split("\n").slice(-30).join("\n");
  } catch {
    return "(no log)";
  }
}

async function startEtcd(
  sandbox: Sandbox,
  etcd: string,
  dataDir: string,
  logFile: string,
  timeoutMs: number,
): Promise<string> {
  const [clientPort, peerPort] = [await freePort(), await freePort()];
  const client = `http://127.0.0.1:${clientPort}`;
  const peer = `http://127.0.0.1:${peerPort}`;
  const log = openSync(logFile, "a");
  const child = sandbox.spawn(
    etcd,
    [
      "--name=ferry-test",
      `--data-dir=${dataDir}`,
      `--listen-client-urls=${client}`,
      `--advertise-client-urls=${client}`,
      `--listen-peer-urls=${peer}`,
      `--initial-advertise-peer-urls=${peer}`,
      `--initial-cluster=ferry-test=${peer}`,
      "--logger=zap",
      "--log-level=warn",
    ],
    { stdio: ["ignore", log, log] },
  );
  closeSync(log);
  await untilExit(
    child,
    waitFor("etcd /health", async () => (await fetch(`${client}/health`).catch(() => undefined))?.ok === true, {
      timeoutMs,
      intervalMs: 100,
    }),
  ).catch((error: unknown) => {
    throw new Error(`etcd did not become healthy: ${String(error)}\n${logTail(logFile)}`);
  });
  return client;
}

async function startApiserver(
  sandbox: Sandbox,
  tools: K8sTools,
  dir: string,
  pki: Pki,
  etcdUrl: string,
  name: string,
  timeoutMs: number,
): Promise<Cluster> {
  const port = await freePort();
  const server = `https://127.0.0.1:${port}`;
  const logFile = join(dir, `kube-apiserver-${name}.log`);
  const log = openSync(logFile, "a");
  const started = Date.now();
  const child = sandbox.spawn(
    tools.kubeApiserver,
    [
      `--etcd-servers=${etcdUrl}`,
      // Two clusters in one etcd: each keeps its keys under its own prefix.
      `--etcd-prefix=/ferry-test/${name}`,
      "--bind-address=127.0.0.1",
      "--advertise-address=127.0.0.1",
      // No Endpoints for the `kubernetes` Service: the reconciler refuses a loopback address.
      "--endpoint-reconciler-type=none",
      `--secure-port=${port}`,
      `--cert-dir=${join(dir, `certs-${name}`)}`,
      `--tls-cert-file=${pki.serverCert}`,
      `--tls-private-key-file=${pki.serverKey}`,
      `--client-ca-file=${pki.caCert}`,
      `--service-account-key-file=${pki.saPublic}`,
      `--service-account-signing-key-file=${pki.saPrivate}`,
      "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
      "--service-cluster-ip-range=10.96.0.0/24",
      "--authorization-mode=RBAC",
      "--allow-privileged=true",
      "--v=1",
    ],
    { stdio: ["ignore", log, log] },
  );
  closeSync(log);
  const [ca, clientCert, clientKey] = await Promise.all([
    readFile(pki.caCert, "utf8"),
    readFile(pki.clientCert, "utf8"),
    readFile(pki.clientKey, "utf8"),
  ]);
  await untilExit(
    child,
    waitFor(`kube-apiserver ${name} /readyz`, async () => (await readyz(port, ca, clientCert, clientKey)) === 200, {
      timeoutMs,
      intervalMs: 200,
    }),
  ).catch((error: unknown) => {
    throw new Error(`kube-apiserver ${name} did not become ready: ${String(error)}\n${logTail(logFile)}`);
  });
  const startMs = Date.now() - started;

  const b64 = (text: string) => Buffer.from(text).toString("base64");
  const kubeconfig = join(dir, `kubeconfig-${name}`);
  await writeFile(
    kubeconfig,
    [
      "apiVersion: v1",
      "kind: Config",
      "clusters:",
      `  - name: site-${name}`,
      "    cluster:",
      `      server: ${server}`,
      `      certificate-authority-data: ${b64(ca)}`,
      "users:",
      "  - name: admin",
      "    user:",
      `      client-certificate-data: ${b64(clientCert)}`,
      `      client-key-data: ${b64(clientKey)}`,
      "contexts:",
      `  - name: site-${name}`,
      "    context:",
      `      cluster: site-${name}`,
      "      user: admin",
      `current-context: site-${name}`,
      "",
    ].join("\n"),
    { mode: 0o600 },
  );
  return { name, server, kubeconfig, ca, clientCert, clientKey, startMs };
}

function readyz(port: number, ca: string, cert: string, key: string): Promise<number | undefined> {
  return new Promise((resolve) => {
    const req = request(
      { host: "127.0.0.1", port, path: "/readyz", method: "GET", ca, cert, key, timeout: 2_000 },
      (response) => {
        response.resume();
        resolve(response.statusCode);
      },
    );
    req.once("timeout", () => req.destroy());
    req.once("error", () => resolve(undefined));
    req.end();
  });
}
