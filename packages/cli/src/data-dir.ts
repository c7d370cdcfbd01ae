/** Where a command keeps its volumes: `--data`, else `$FERRY_DATA`, else `./.ferry`. */
import { resolve } from "node:path";

export const DEFAULT_DATA_DIR = "./.ferry";
export const DATA_DIR_ENV = "FERRY_DATA";

/** The data directory as the absolute path the data plane gets (it runs with its own cwd-free view). */
export function resolveDataDir(option: string | undefined): string {
  return resolve(option ?? process.env[DATA_DIR_ENV] ?? DEFAULT_DATA_DIR);
}
