# Shared helpers for the test-VM harness. Sourced, not executed.
# shellcheck shell=bash

VM_CACHE=${VDUSE_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vduse-vm}
# The guest kernel series: 6.12 (default; VDUSE, virtio-vdpa and vhost-vdpa as modules — Debian's 6.1 has
# no vDPA) or 7.3 (trixie-backports; VDUSE also allows virtio-fs from 6.15). VDUSE_VM_KERNEL picks one.
VM_KERNEL_SERIES=${VDUSE_VM_KERNEL:-${VDUSE_VM_KERNEL_SERIES:-6.12}}
case "$VM_KERNEL_SERIES" in
6.12 | 7.3) ;;
*)
  printf 'vm: error: VDUSE_VM_KERNEL=%s: the harness knows 6.12 and 7.3\n' "$VM_KERNEL_SERIES" >&2
  exit 125
  ;;
esac

vm_log() { printf 'vm: %s\n' "$*" >&2; }
vm_die() {
  printf 'vm: error: %s\n' "$*" >&2
  exit 125
}

# Host packages the harness needs: command -> Debian package.
VM_HOST_NEEDS=(
  "qemu-system-x86_64:qemu-system-x86"
  "busybox:busybox-static"
  "cpio:cpio"
  "depmod:kmod"
  "xz:xz-utils"
  "fio:fio"
  "vdpa:iproute2"
  "mkfs.ext4:e2fsprogs"
  "setpriv:util-linux"
  # Real NBD servers for the NBD backend's tests (host and guest).
  "qemu-nbd:qemu-utils"
  "nbdkit:nbdkit"
  # virtio-net tests: traffic between network namespaces inside the guest.
  "ping:iputils-ping"
  "iperf3:iperf3"
  "ethtool:ethtool"
  # Slow disks for the fail-closed tests (dm-delay).
  "dmsetup:dmsetup"
  # virtio-fs tests: a file-system benchmark and extended attributes.
  "dbench:dbench"
  "setfattr:attr"
)

# Installs missing host tools when root; otherwise names the exact apt command and fails.
vm_ensure_host_tools() {
  local missing=() entry cmd pkg
  for entry in "${VM_HOST_NEEDS[@]}"; do
    cmd=${entry%%:*} pkg=${entry#*:}
    if ! command -v "$cmd" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$cmd" ] && ! [ -x "/sbin/$cmd" ]; then
      missing+=("$pkg")
    fi
  done
  # busybox must be the static build: the initramfs has no libc.
  if command -v busybox >/dev/null 2>&1 && ldd "$(command -v busybox)" >/dev/null 2>&1; then
    missing+=(busybox-static)
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  local uniq
  uniq=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  if [ "$(id -u)" != 0 ]; then
    vm_die "missing host packages; run: sudo apt-get update && sudo apt-get install -y ${uniq}"
  fi
  vm_log "installing host packages: ${uniq}"
  # shellcheck disable=SC2086
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $uniq; } >&2 ||
    vm_die "apt-get install ${uniq} failed"
}

# The Debian mirror URI the machine already uses (never hard-coded in the repo).
vm_debian_uri() {
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v -- '-security' | grep -m1 debian)
  [ -n "$uri" ] || uri=$(grep -hsE '^deb +(\[[^]]*\] +)?[a-z]+://' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
    grep -v -- '-security' | grep -m1 debian | sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1}')
  [ -n "$uri" ] || vm_die "cannot find a Debian mirror in /etc/apt/sources.list*; add one or set VDUSE_VM_KERNEL_DEB"
  printf '%s\n' "$uri"
}

# apt-get against a private state dir holding only the given suite; the system's apt state is untouched.
vm_apt() {
  local state=$1
  shift
  apt-get -q -o Dir::Etc::sourcelist="$state/sources.list" -o Dir::Etc::sourceparts=- \
    -o Dir::State::Lists="$state/lists" -o Dir::Cache="$state/cache" \
    -o Dir::State::status=/dev/null -o Debug::NoLocking=1 -o APT::Sandbox::User=root "$@"
}
vm_apt_cache() {
  local state=$1
  shift
  apt-cache -o Dir::Etc::sourcelist="$state/sources.list" -o Dir::Etc::sourceparts=- \
    -o Dir::State::Lists="$state/lists" -o Dir::Cache="$state/cache" -o Dir::State::status=/dev/null "$@"
}
