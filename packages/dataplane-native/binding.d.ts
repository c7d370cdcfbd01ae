// Types come from the generated index.d.ts (produced from the Rust code); binding.js only
// re-exports with errors carrying `code`.
export * from "./index.js";
