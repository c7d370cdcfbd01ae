/** How the demos print: a `== step` heading per step, the commands they run, their output indented. */
import type { ProgramIo } from "../program.js";

export class Narrator {
  constructor(private readonly io: ProgramIo) {}

  /** A new step. */
  step(text: string): void {
    this.io.writeOut(`\n== ${text}\n`);
  }

  /** A command as the user would type it at `prompt`, e.g. `site-a$ ferry replicate status`. */
  command(prompt: string, text: string): void {
    this.io.writeOut(`   ${prompt}$ ${text}\n`);
  }

  /** Output or a fact, indented under the step. */
  show(text: string): void {
    const body = text.replace(/\n+$/, "");
    if (body === "") return;
    this.io.writeOut(`${indent(body)}\n`);
  }
}

/** A word of a shown command line, quoted when a shell would need it. */
export function shellWord(word: string): string {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word}'`;
}

function indent(text: string): string {
  return text
    .split("\n")
    .map((line) => `   ${line}`)
    .join("\n");
}
