#!/usr/bin/env bash
# The one entry point: installs what is missing, then runs `cargo xtask <command>`.
#   ./x.sh demo    build, start the namespace test bed, balance traffic, clean up
#   ./x.sh demo --stack   the same with nginx (HTTPS) and MariaDB, and a primary failover
#   ./x.sh demo --fleet   two balancers behind a BGP router, one of them dying
#   ./x.sh demo --nat     a nat VIP in front of untouched backends
#   ./x.sh test    every test (unit, data-plane fixtures, end to end); needs root
#   ./x.sh package the Debian package, target/package/lb_VERSION_ARCH.deb (release build)
#   ./x.sh bench   benchmarks in release mode (BENCHMARKS.md); --quick for a short run
#   ./x.sh setup   only install the prerequisites
set -euo pipefail
cd "$(dirname "$0")"

TOOLCHAIN=1.98.0            # aya 0.16 needs >= 1.98; pinned in rust-toolchain.toml too
BPF_LINKER_VERSION=0.13.0   # built against LLVM 22, rustc 1.98's LLVM
APT_PACKAGES=(iproute2 ethtool util-linux llvm-22-dev procps chromium hping3 openssl curl iputils-ping
  # tunnel mode's end-to-end test: long transfers through routed backends
  socat
  # database checks' tests: the real servers
  mariadb-server postgresql
  # the classic stack's web servers (HTTPS with persistence)
  nginx
  # packaging and the service tests: strip, lintian, a booted systemd in a container,
  # the real Prometheus
  binutils lintian systemd-container debootstrap prometheus
  # the fleet's tests: BGP with the real BIRD 2
  bird2
  # the fleet's VRRP pair: the real keepalived; FRR on one balancer of the BGP fleet
  keepalived frr)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "x.sh: this needs root (XDP, BPF maps and network namespaces): run it with sudo" >&2
    exit 1
  fi
}

install_apt() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

install_rust() {
  command -v rustup >/dev/null || { echo "x.sh: rustup not found; install Rust with rustup first" >&2; exit 1; }
  if ! rustup toolchain list | grep -q "^$TOOLCHAIN-"; then
    say "rustup toolchain install $TOOLCHAIN"
    rustup toolchain install "$TOOLCHAIN" --profile minimal --component rust-src,rustfmt,clippy
  fi
  if ! rustup component list --toolchain "$TOOLCHAIN" --installed | grep -q '^rust-src'; then
    rustup component add rust-src --toolchain "$TOOLCHAIN"
  fi
  if ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    say "cargo install bpf-linker $BPF_LINKER_VERSION (takes a few minutes, once)"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo "+$TOOLCHAIN" install bpf-linker --version "$BPF_LINKER_VERSION" \
      --locked --no-default-features --features llvm-22
  fi
}

export PATH="$HOME/.cargo/bin:$PATH"
cmd="${1:-}"
case "$cmd" in
  setup) need_root; install_apt; install_rust ;;
  demo|test|bench|package) need_root; install_apt; install_rust; shift; exec cargo xtask "$cmd" "$@" ;;
  *) echo "usage: ./x.sh demo|test|bench|package|setup [args]" >&2; exit 2 ;;
esac
