#!/usr/bin/env bash
# Builds a Linux guest for amsvm from Debian packages:
#   out/vmlinuz            Debian's cloud kernel (bzImage)
#   out/initramfs.cpio.gz  busybox + virtio_mmio, virtio_blk, virtio_balloon (and their
#                          dependencies) + an /init that reports what it finds and powers off
#   out/memverify          the page-verifying memory program (static; also in the initramfs)
#   out/config, out/VERSION  the kernel's config and package name, for reference
# Downloads are kept in cache/ (gitignored); out/ is gitignored too.
#
# Environment:
#   AMSVM_KERNEL_PACKAGE  kernel package to use (default: what linux-image-cloud-amd64
#                         depends on, e.g. linux-image-6.1.0-48-cloud-amd64)
#   AMSVM_MODULES         modules to put in the initramfs (default below)
#   AMSVM_OUT             output directory (default: out/ next to this script); the
#                         nested harness builds deliberately broken variants this way
#
# Needs: apt-get, apt-cache, dpkg-deb, gzip, find, gcc with a static libc (Debian: gcc,
# libc6-dev); xz/zstd only if the kernel's modules are compressed. Runs as any user if
# the package lists are current (apt-get update).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=$here/cache
out=${AMSVM_OUT:-$here/out}
modules=${AMSVM_MODULES:-virtio_mmio virtio_blk virtio_balloon}

die() { echo "build.sh: $*" >&2; exit 1; }
for tool in apt-get apt-cache dpkg-deb gzip find gcc; do
    command -v "$tool" >/dev/null || die "$tool not found (this script needs a Debian-based host)"
done

mkdir -p "$cache" "$out"

# --- which kernel package ---------------------------------------------------------
pkg=${AMSVM_KERNEL_PACKAGE:-}
if [ -z "$pkg" ]; then
    if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ]; then
            echo "build.sh: package lists lack linux-image-cloud-amd64, running apt-get update" >&2
            apt-get update -qq
        else
            die "apt does not know linux-image-cloud-amd64: run 'apt-get update' as root"
        fi
    fi
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1)
    [ -n "$pkg" ] || die "cannot tell which kernel linux-image-cloud-amd64 depends on (apt-cache depends linux-image-cloud-amd64)"
fi
kver=${pkg#linux-image-}
kver=${kver%-unsigned}
echo "build.sh: kernel package $pkg (version $kver)"

# --- download (cached) ------------------------------------------------------------
fetch() { # package -> path of its .deb in the cache
    local p=$1 deb
    deb=$(find "$cache/" -maxdepth 1 -name "${p}_*.deb" | sort | tail -n1)
    if [ -z "$deb" ]; then
        (cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "$p" >&2) ||
            die "apt-get download $p failed (network? apt-get update?)"
        deb=$(find "$cache/" -maxdepth 1 -name "${p}_*.deb" | sort | tail -n1)
        [ -n "$deb" ] || die "apt-get download $p left no .deb in $cache"
    fi
    echo "$deb"
}
kdeb=$(fetch "$pkg")
bdeb=$(fetch busybox-static)

root=$cache/root-$kver
if [ ! -e "$root/.complete" ]; then
    rm -rf "$root"
    mkdir -p "$root"
    dpkg-deb -x "$kdeb" "$root"
    touch "$root/.complete"
fi
bbroot=$cache/root-busybox
if [ ! -x "$bbroot/bin/busybox" ]; then
    rm -rf "$bbroot"
    dpkg-deb -x "$bdeb" "$bbroot"
fi
busybox=$bbroot/bin/busybox
[ -x "$busybox" ] || die "busybox-static did not provide bin/busybox"
vmlinuz=$root/boot/vmlinuz-$kver
[ -f "$vmlinuz" ] || die "$kdeb has no boot/vmlinuz-$kver"
moddir=""
for d in "$root/lib/modules/$kver" "$root/usr/lib/modules/$kver"; do
    [ -d "$d" ] && moddir=$d && break
done
[ -n "$moddir" ] || die "$kdeb has no lib/modules/$kver"

# --- initramfs tree -----------------------------------------------------------------
stage=$(mktemp -d "${TMPDIR:-/tmp}/amsvm-initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc,lib/modules}
# memverify: static, so that it runs in the busybox initramfs (and in the nested
# harness's L1, which checks disk images with it).
gcc -O2 -static -Wall -Wextra -Werror -o "$stage/bin/memverify" "$here/memverify.c" ||
    die "gcc -O2 -static memverify.c failed (needs gcc and a static libc: apt-get install gcc libc6-dev)"
cp "$busybox" "$stage/bin/busybox"
chmod 755 "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
# The kernel's built-in initramfs already has /dev/console; add ours when we may.
mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true

order=""
add_module() { # name: stage it and its dependencies, dependencies first
    local name=${1//-/_} file dep deps
    case " $order " in *" $name "*) return 0 ;; esac
    file=$(find "$moddir/kernel" \( -name "$name.ko*" -o -name "${name//_/-}.ko*" \) | head -n1)
    if [ -z "$file" ]; then
        if grep -qE "/(${name}|${name//_/-})\.ko$" "$moddir/modules.builtin" 2>/dev/null; then
            echo "build.sh: $name is built into the kernel"
            return 0
        fi
        die "module $name not found in $pkg"
    fi
    case "$file" in
        *.ko) cp "$file" "$stage/lib/modules/$name.ko" ;;
        *.ko.xz) xz -dc "$file" >"$stage/lib/modules/$name.ko" ;;
        *.ko.zst) zstd -qdc "$file" >"$stage/lib/modules/$name.ko" ;;
        *.ko.gz) gzip -dc "$file" >"$stage/lib/modules/$name.ko" ;;
        *) die "unknown module format: $file" ;;
    esac
    deps=$(tr '\0' '\n' <"$stage/lib/modules/$name.ko" | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do
        add_module "$dep"
    done
    order="$order $name"
}
for m in $modules; do
    add_module "$m"
done
echo "$order" | tr ' ' '\n' | sed '/^$/d' >"$stage/etc/amsvm-modules"
echo "build.sh: modules (load order):$order"

cat >"$stage/init" <<'EOF'
#!/bin/busybox sh
# amsvm guest init: mount, load the virtio modules, report, run amsvm.run=... or a
# shell, power off.
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts 2>/dev/null

for m in $(cat /etc/amsvm-modules); do
    insmod "/lib/modules/$m.ko" || echo "amsvm-guest: insmod $m failed"
done

echo "amsvm-guest: kernel $(uname -r)"
echo "amsvm-guest: cpus $(nproc)"
echo "amsvm-guest: $(grep MemTotal /proc/meminfo | tr -s ' ')"
echo "amsvm-guest: acpi devices $(ls /sys/bus/acpi/devices 2>/dev/null | tr '\n' ' ')"
n=0
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d" ] || continue
    n=$((n + 1))
    drv=none
    [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    # The transport the device hangs off: LNRO0005:NN when the ACPI DSDT declared it.
    via=$(basename "$(dirname "$(readlink -f "$d")")")
    echo "amsvm-guest: $(basename "$d") device $(cat "$d/device") vendor $(cat "$d/vendor") driver $drv via $via"
done
echo "amsvm-guest: virtio devices $n"
for b in /sys/block/vd*; do
    [ -e "$b" ] && echo "amsvm-guest: disk $(basename "$b") $(( $(cat "$b/size") / 2 )) KiB"
done

# amsvm.run="command with spaces" or amsvm.run=word
cmd=$(sed -n 's/.*amsvm\.run="\([^"]*\)".*/\1/p' /proc/cmdline)
[ -n "$cmd" ] || cmd=$(sed -n 's/.*amsvm\.run=\([^ "]*\).*/\1/p' /proc/cmdline)
if [ -n "$cmd" ]; then
    echo "amsvm-guest: run: $cmd"
    sh -c "$cmd"
    echo "amsvm-guest: exit status $?"
else
    echo "amsvm-guest: no amsvm.run= on the command line, starting a shell (exit powers off)"
    setsid cttyhack sh
fi
echo "amsvm-guest: powering off"
sync
poweroff -f
EOF
chmod 755 "$stage/init"

# --- outputs --------------------------------------------------------------------------
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | "$busybox" cpio -o -H newc -R 0:0 2>/dev/null) |
    gzip -9n >"$out/initramfs.cpio.gz.tmp"
mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
cp "$vmlinuz" "$out/vmlinuz"
cp "$stage/bin/memverify" "$out/memverify"
cp "$root/boot/config-$kver" "$out/config" 2>/dev/null || true
echo "$pkg" >"$out/VERSION"

# Sanity: a bzImage with the boot-protocol magic, an archive that lists /init.
[ "$(dd if="$out/vmlinuz" bs=1 skip=514 count=4 2>/dev/null)" = HdrS ] || die "$out/vmlinuz is not a bzImage"
gzip -dc "$out/initramfs.cpio.gz" | "$busybox" cpio -t 2>/dev/null | grep -qx init || die "initramfs lacks /init"
echo "build.sh: wrote $out/vmlinuz ($(stat -c %s "$out/vmlinuz") bytes)"
echo "build.sh: wrote $out/initramfs.cpio.gz ($(stat -c %s "$out/initramfs.cpio.gz") bytes)"
