# The toolchain environment for Ferry's scripts; POSIX sh, meant to be sourced (`. infra/env.sh`)
# by infra/setup.sh and by the root package.json scripts, so that every step sees the same cargo.
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  . "$HOME/.cargo/env"
fi
# turbo would otherwise try to send telemetry and print a notice about it on first use.
export TURBO_TELEMETRY_DISABLED=1
