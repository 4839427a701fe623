#!/bin/bash
# Guest stage of `make test-kernels`, run as PID 1 inside the VM on the host's root (read-only,
# with a RAM overlay). Expects CHECKOUT, PYTHON, MODDIR and TESTS (file of pytest node ids) from
# the stage file that sources it. Ends the VM itself; the last line it prints is the result.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm /lib/modules
ln -sf /proc/self/fd /dev/fd; ln -sf fd/0 /dev/stdin; ln -sf fd/1 /dev/stdout; ln -sf fd/2 /dev/stderr
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
# the 6.1 kernel's own modules (veth, sch_ingress, ...): modprobe looks in /lib/modules/$(uname -r)
mount --bind "$MODDIR" /lib/modules
echo /sbin/modprobe > /proc/sys/kernel/modprobe
# /var/tmp on ext4 (a loop image in RAM): tmpfs takes user xattrs only from 6.6, checksum needs them
modprobe loop
truncate -s 1G /run/vartmp.img && mkfs.ext4 -q -F /run/vartmp.img && mount -o loop /run/vartmp.img /var/tmp \
  || mount -t tmpfs tmpfs /var/tmp
chmod 1777 /var/tmp
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up
hostname gridbpf-vm

echo "gridbpf-vm: uname -r: $(uname -r)"
cd "$CHECKOUT"
start=$(date +%s)
mapfile -t ids < <(grep -v -e '^#' -e '^$' "$TESTS")
PYTHONPATH="$CHECKOUT/src" "$PYTHON" -m pytest -p no:cacheprovider --color=no -rA -v --durations=12 "${ids[@]}"
rc=$?
echo "gridbpf-vm: pytest took $(( $(date +%s) - start )) s"
echo "gridbpf-vm: gridbpf doctor:"
COLUMNS=110 PYTHONPATH="$CHECKOUT/src" "$PYTHON" -m gridbpf doctor | cat    # not a tty: plain text
echo "gridbpf-vm: uname -r: $(uname -r)"
echo "gridbpf-vm: result rc=$rc"
sync
/bin/busybox poweroff -f
