#!/bin/sh
# Runs inside the test guest booted with a vhost-user-blk-pci disk (/dev/vda), a virtio-net-pci NIC on
# -netdev vhost-user and a vhost-user-fs-pci file system, both served by vduse on the host (see vhost-user.spec.ts). The stock guest drivers
# (virtio_blk, virtio_net over virtio-pci) talk to our devices exactly as a VM's would.
#   VDUSE_VU_MAC   the NIC's MAC (to find its interface)
#   VDUSE_VU_TAG   the virtio-fs tag
#   VDUSE_VU_SHARE_TAG the tag of a host directory shared natively (phase share)
#   VDUSE_VU_PHASE blk | net | switch | fs | share | restart (restart: fio verify across a restart of the host's
#   server; switch: two NICs, VDUSE_VU_MAC and VDUSE_VU_MAC2, on one switch)
#   VDUSE_VU_SYNC  a directory shared with the host, for the restart handshake
set -eu
dev=/dev/vda

blk() {
  [ -b $dev ] || { echo "no $dev: the vhost-user disk did not appear" >&2; exit 1; }
  echo "disk-bytes $(blockdev --getsize64 $dev) queues $(ls /sys/block/vda/mq | wc -l)"
  head -c 64M /dev/urandom >/tmp/pattern
  dd if=/tmp/pattern of=$dev bs=1M oflag=direct status=none
  dd if=$dev of=/tmp/back bs=1M count=64 iflag=direct status=none
  cmp /tmp/pattern /tmp/back
  rm -f /tmp/pattern /tmp/back
  fio --name=verify --filename=$dev --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 \
    --numjobs=2 --size=32M --offset_increment=32M --verify=crc32c --verify_state_save=0 --do_verify=1 \
    --verify_fatal=1 --group_reporting --output-format=terse >/dev/null
  mkfs.ext4 -q -F $dev
  mkdir -p /tmp/mnt
  mount $dev /tmp/mnt
  for i in 1 2 3; do head -c $((i * 700000)) /dev/urandom >/tmp/mnt/f$i; done
  (cd /tmp/mnt && sha256sum f* >/tmp/sums)
  umount /tmp/mnt
  fsck.ext4 -f -n $dev >/dev/null
  mount $dev /tmp/mnt
  (cd /tmp/mnt && sha256sum -c --quiet /tmp/sums)
  umount /tmp/mnt
  echo "blk-ok"
}

net() {
  ifc=
  for i in /sys/class/net/*; do
    [ "$(cat "$i/address")" = "$VDUSE_VU_MAC" ] && ifc=$(basename "$i")
  done
  [ -n "$ifc" ] || { echo "no interface with MAC $VDUSE_VU_MAC" >&2; exit 1; }
  ip link set "$ifc" up
  ip addr add 10.77.0.2/24 dev "$ifc"
  ping -c 3 -W 5 10.77.0.1 >/dev/null
  echo "ping-ok"
  iperf3 -c 10.77.0.1 -t 3 -J >/tmp/iperf.json
  echo "iperf-bps $(grep -m1 -A8 '"sum_received"' /tmp/iperf.json | grep -m1 bits_per_second | tr -dc 0-9.)"
}

# Two NICs of this VM on one native switch of the host's server: the second moved into a namespace, so
# traffic between them crosses the switch (and never this guest's own stack shortcut).
switch() {
  a=
  b=
  for i in /sys/class/net/*; do
    case "$(cat "$i/address")" in
    "$VDUSE_VU_MAC") a=$(basename "$i") ;;
    "$VDUSE_VU_MAC2") b=$(basename "$i") ;;
    esac
  done
  [ -n "$a" ] && [ -n "$b" ] || { echo "no interfaces with MACs $VDUSE_VU_MAC and $VDUSE_VU_MAC2" >&2; exit 1; }
  ip netns add peer
  ip link set "$b" netns peer
  ip addr add 10.78.0.1/24 dev "$a"
  ip link set "$a" up
  ip -n peer addr add 10.78.0.2/24 dev "$b"
  ip -n peer link set "$b" up
  ping -c 20 -i 0.05 -W 5 10.78.0.2 >/dev/null
  echo "switch-ping-ok"
  ip netns exec peer iperf3 -s -1 -D -B 10.78.0.2
  sleep 0.5
  iperf3 -c 10.78.0.2 -t 3 -J >/tmp/iperf.json
  echo "switch-iperf-bps $(grep -m1 -A8 '"sum_received"' /tmp/iperf.json | grep -m1 bits_per_second | tr -dc 0-9.)"
}

# A virtio-fs mount of a TypeScript MemoryFs over vhost-user-fs-pci (any guest kernel with virtiofs: no
# VDUSE, so no 6.15 needed): a tree in with tar and compared, fio verify on a file, unmount/remount.
fs() {
  modprobe -d "$VDUSE_VM_MODROOT" virtiofs 2>/dev/null || true
  mkdir -p /tmp/vufs
  mount -t virtiofs "$VDUSE_VU_TAG" /tmp/vufs
  mkdir /tmp/vufs/tree
  tar -C /usr/include/linux -cf - . | tar -C /tmp/vufs/tree -xf -
  diff -r /usr/include/linux /tmp/vufs/tree
  fio --name=fsverify --directory=/tmp/vufs --size=16M --rw=randwrite --bs=4k --ioengine=psync \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --output-format=terse >/dev/null
  umount /tmp/vufs
  mount -t virtiofs "$VDUSE_VU_TAG" /tmp/vufs
  diff -r /usr/include/linux /tmp/vufs/tree
  umount /tmp/vufs
  echo "fs-ok"
}

# A host directory shared natively (vduse fs --shared-dir) over vhost-user-fs-pci: a host file read, a
# tree in with tar and compared, fio verify, a file for the host to check, unmount/remount.
share() {
  mkdir -p /tmp/vushare
  mount -t virtiofs "$VDUSE_VU_SHARE_TAG" /tmp/vushare
  [ "$(cat /tmp/vushare/from-host)" = host-data ] || { echo "the host's file is not there" >&2; exit 1; }
  mkdir /tmp/vushare/tree
  tar -C /usr/include/linux -cf - . | tar -C /tmp/vushare/tree -xf -
  diff -r /usr/include/linux /tmp/vushare/tree
  fio --name=shareverify --directory=/tmp/vushare --size=16M --rw=randwrite --bs=4k --ioengine=psync \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --output-format=terse >/dev/null
  rm -f /tmp/vushare/shareverify*
  echo guest-data >/tmp/vushare/from-guest
  umount /tmp/vushare
  mount -t virtiofs "$VDUSE_VU_SHARE_TAG" /tmp/vushare
  diff -r /usr/include/linux /tmp/vushare/tree
  umount /tmp/vushare
  echo "share-ok"
}

# fio writes and verifies while the host kills its server and starts it again: the driver must see a pause,
# never an error (the restarted server serves again what was in flight, from the inflight region).
restart() {
  # Time-based, verifying as it goes (verify_backlog): it is surely writing when the server dies.
  fio --name=restart --filename=$dev --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 \
    --size=96M --time_based --runtime=12 --verify=crc32c --verify_backlog=256 --verify_state_save=0 \
    --verify_fatal=1 --output-format=terse >/tmp/fio.out 2>&1 &
  pid=$!
  sleep 2
  touch "$VDUSE_VU_SYNC/fio-running"
  i=0
  while [ ! -e "$VDUSE_VU_SYNC/restarted" ]; do
    i=$((i + 1))
    [ $i -lt 600 ] || { echo "the host never restarted its server" >&2; exit 1; }
    sleep 0.1
  done
  wait $pid || { cat /tmp/fio.out >&2; exit 1; }
  echo "restart-ok"
}

for phase in ${VDUSE_VU_PHASE:-blk net}; do
  $phase
done
