/**
 * Finds a target by name. Built-in targets are listed here; anything else is taken as a module specifier
 * (`./my-target.ts`, an absolute path or a package name) whose default export (or `target` export) is a Target.
 */
import { lstatSync, realpathSync } from "node:fs";
import { dirname, isAbsolute, resolve } from "node:path";
import type { Target } from "./types.ts";

const BUILT_IN: Record<string, string> = {
  null: new URL("./null.ts", import.meta.url).href,
  memory: new URL("./memory.ts", import.meta.url).href,
  file: new URL("./file.ts", import.meta.url).href,
  fault: new URL("./fault.ts", import.meta.url).href,
  nbd: new URL("./nbd.ts", import.meta.url).href,
};
/** Names accepted as aliases (ublksrv calls the file target "loop"). */
const ALIASES: Record<string, string> = { loop: "file" };

export function builtInTypes(): string[] {
  return Object.keys(BUILT_IN);
}

export function isBuiltIn(type: string): boolean {
  return type in BUILT_IN || type in ALIASES;
}

/**
 * The record `type` for what the user typed: a built-in name, or the absolute path of a module file so
 * that Workers and a later `recover` (from another directory) load the same code.
 */
export function canonicalType(type: string, cwd = process.cwd()): string {
  if (type in ALIASES) return ALIASES[type]!;
  if (type in BUILT_IN) return type;
  if (type.startsWith(".") || isAbsolute(type)) return resolve(cwd, type);
  return type; // a package name, resolved by import()
}

/** Loads a target; throws an Error with a one-line message when it cannot. */
/** Targets this thread was handed as objects (see registerTarget). */
const registered = new Map<string, Target>();

/**
 * Makes loadTarget(type) return `target` in this thread without importing its module: createDevice() is given the
 * object, and its module may be the program itself, still inside its top-level await (importing it again would
 * wait for that forever). Queue Workers still import the module.
 */
export function registerTarget(type: string, target: Target): void {
  registered.set(type, target);
}

export async function loadTarget(type: string): Promise<Target> {
  const given = registered.get(type);
  if (given) return given;
  let specifier = BUILT_IN[type] ?? type;
  let module: Record<string, unknown>;
  try {
    // Root runs a user-written module only from a file no other user can change; it then imports the very file
    // it checked (symlinks resolved), so a path swapped after the check is not what runs.
    if (!(type in BUILT_IN) && (process.geteuid?.() ?? 0) === 0) {
      specifier = realpathSync(Bun.resolveSync(specifier, import.meta.dir));
      refuseUntrusted(type, specifier);
    }
    module = (await import(specifier)) as Record<string, unknown>;
  } catch (error) {
    if (error instanceof UntrustedModule) throw error;
    const known = Object.keys(BUILT_IN).join(", ");
    if (!isBuiltIn(type) && !type.startsWith("/") && !type.includes("/")) {
      throw new Error(`unknown target type "${type}" (built-in: ${known}; or give a path to a target module)`);
    }
    throw new Error(`cannot load target module ${type}: ${(error as Error).message.split("\n")[0]}`);
  }
  const target = (module.default ?? module.target) as Target | undefined;
  if (!target || typeof target.prepare !== "function" || typeof target.openQueue !== "function") {
    throw new Error(`${type} does not export a target (default export with name, prepare() and openQueue())`);
  }
  return target;
}

class UntrustedModule extends Error {}

/**
 * Refuses a module file root would run that another user could have written: the file and every directory above
 * it must be owned by root and writable by no group or other user — except a sticky directory owned by root
 * (/tmp), where no one can replace a root-owned entry. `path` has no symlinks left (realpath).
 */
function refuseUntrusted(type: string, path: string): void {
  for (let current = path; ; current = dirname(current)) {
    const stat = lstatSync(current);
    const what = current === path ? "the file" : `directory ${current}`;
    const writableBy = stat.mode & 0o002 ? "other users" : stat.mode & 0o020 ? `group ${stat.gid}` : "";
    const stickyRootDirectory = stat.isDirectory() && (stat.mode & 0o1000) !== 0 && stat.uid === 0;
    let reason = "";
    if (stat.uid !== 0) reason = `${what} is owned by uid ${stat.uid}`;
    else if (writableBy !== "" && !stickyRootDirectory) reason = `${what} is writable by ${writableBy}`;
    if (reason !== "") {
      throw new UntrustedModule(`refusing target module ${type} as root: ${reason}; root runs only modules no other user can change`);
    }
    if (current === "/") return;
  }
}
