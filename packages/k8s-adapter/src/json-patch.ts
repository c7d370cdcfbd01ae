/**
 * RFC 6902 JSON Patch, the operations a restore transform uses (add, remove, replace, test), on a
 * copy: the input is never changed. A path that does not resolve, or a failed test, throws naming
 * the operation — a transform that no longer fits its object must not be half applied.
 */

export type JsonPatchOperation =
  | { op: "add" | "replace" | "test"; path: string; value: unknown }
  | { op: "remove"; path: string };

type Container = Record<string, unknown> | unknown[];

function tokens(path: string): string[] {
  if (path === "") return [];
  if (!path.startsWith("/")) throw new Error(`JSON pointer ${path} must start with /`);
  return path
    .slice(1)
    .split("/")
    .map((t) => t.replaceAll("~1", "/").replaceAll("~0", "~"));
}

function child(container: unknown, token: string, path: string): unknown {
  if (Array.isArray(container)) return container[Number(token)];
  if (typeof container === "object" && container !== null) return (container as Record<string, unknown>)[token];
  throw new Error(`JSON pointer ${path}: ${token} is below a value that is not an object or array`);
}

export function applyJsonPatch<T>(document: T, operations: readonly JsonPatchOperation[]): T {
  let result: unknown = structuredClone(document);
  for (const operation of operations) {
    const path = tokens(operation.path);
    const last = path.at(-1);
    if (last === undefined) {
      if (operation.op === "remove") throw new Error("JSON patch: cannot remove the whole document");
      if (operation.op === "test") {
        if (JSON.stringify(result) !== JSON.stringify(operation.value)) throw new Error("JSON patch test / failed");
      } else result = structuredClone(operation.value);
      continue;
    }
    let parent: unknown = result;
    for (const token of path.slice(0, -1)) parent = child(parent, token, operation.path);
    if (typeof parent !== "object" || parent === null) {
      throw new Error(`JSON patch ${operation.op} ${operation.path}: the parent does not exist`);
    }
    const container = parent as Container;
    const exists = Array.isArray(container) ? Number(last) < container.length : last in container;
    switch (operation.op) {
      case "test":
        if (JSON.stringify(child(container, last, operation.path)) !== JSON.stringify(operation.value)) {
          throw new Error(`JSON patch test ${operation.path} failed: the value differs`);
        }
        break;
      case "remove":
      case "replace":
        if (!exists) throw new Error(`JSON patch ${operation.op} ${operation.path}: no such value`);
        if (Array.isArray(container)) {
          if (operation.op === "remove") container.splice(Number(last), 1);
          else container[Number(last)] = structuredClone(operation.value);
        } else if (operation.op === "remove") delete container[last];
        else container[last] = structuredClone(operation.value);
        break;
      case "add":
        if (Array.isArray(container)) {
          container.splice(last === "-" ? container.length : Number(last), 0, structuredClone(operation.value));
        } else container[last] = structuredClone(operation.value);
        break;
    }
  }
  return result as T;
}
