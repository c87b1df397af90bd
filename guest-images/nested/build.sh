#!/usr/bin/env bash
# Builds the L1 appliance of the nested harness (tests/nested, NESTED-HARNESS.md): a Linux
# that QEMU (TCG, emulated AMD CPU with SVM) boots, that loads kvm_amd and runs amsvm,
# which boots L2 Linux guests.
#   out/vmlinuz   Debian bookworm-backports' cloud kernel (6.8 or newer: amsvm's pool
#                 needs UFFDIO_MOVE and /dev/userfaultfd)
#   out/l1.cpio   an uncompressed newc initramfs: busybox, the kernel's irqbypass, kvm
#                 and kvm_amd modules, amsvm (stripped) with the shared libraries ldd
#                 names and the loader, the L2 guest (/l2/vmlinuz, /l2/initramfs.cpio.gz,
#                 /bin/memverify) and an /init that checks KVM and runs
#                 /scenario/run.sh, which a second archive appended to this one provides
#   out/VERSION   the L1 kernel package
# Uncompressed on purpose: the emulated CPU inflates gzip slowly, and most of the bytes
# (two kernels, an initramfs) are compressed already.
#
# Downloads are kept in cache/ (gitignored) and reused; the backports package lists live
# there too (a private sources list: the system's apt configuration is not touched).
#
# Environment:
#   AMSVM_BIN              the amsvm binary (default: target/release/amsvm)
#   AMSVM_L2               the L2 guest image (default: guest-images/linux/out, built by
#                          guest-images/linux/build.sh)
#   AMSVM_NESTED_OUT       output directory (default: out/ next to this script)
#   AMSVM_L1_KERNEL_PACKAGE  L1 kernel package (default: what bookworm-backports'
#                          linux-image-cloud-amd64 depends on)
#
# Needs: apt-get, apt-cache, dpkg-deb, xz, strip, ldd, cpio-capable busybox (downloaded).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=$here/cache
out=${AMSVM_NESTED_OUT:-$here/out}
amsvm=${AMSVM_BIN:-$root/target/release/amsvm}
l2=${AMSVM_L2:-$root/guest-images/linux/out}

die() { echo "nested/build.sh: $*" >&2; exit 1; }
for tool in apt-get apt-cache dpkg-deb xz strip ldd find; do
    command -v "$tool" >/dev/null || die "$tool not found (this script needs a Debian-based host)"
done
[ -x "$amsvm" ] || die "no amsvm binary at $amsvm (cargo build --release -p vmm, or set AMSVM_BIN)"
for f in vmlinuz initramfs.cpio.gz memverify; do
    [ -f "$l2/$f" ] || die "the L2 guest image lacks $l2/$f: run guest-images/linux/build.sh"
done

mkdir -p "$cache" "$out"

# --- the L1 kernel: bookworm-backports, through a private sources list --------------------
echo "deb http://deb.debian.org/debian bookworm-backports main" >"$cache/sources.list"
mkdir -p "$cache/lists/partial" "$cache/apt/archives/partial"
apt_opts=(
    -o "Dir::Etc::sourcelist=$cache/sources.list" -o Dir::Etc::sourceparts=-
    -o "Dir::State::Lists=$cache/lists" -o "Dir::Cache=$cache/apt" -o APT::Get::List-Cleanup=0
    -o APT::Sandbox::User=root
)
pkg=${AMSVM_L1_KERNEL_PACKAGE:-}
if [ -z "$pkg" ]; then
    if ! apt-cache "${apt_opts[@]}" show linux-image-cloud-amd64 >/dev/null 2>&1; then
        echo "nested/build.sh: fetching the bookworm-backports package lists into $cache/lists" >&2
        apt-get "${apt_opts[@]}" -qq update || die "apt-get update of bookworm-backports failed (network?)"
    fi
    pkg=$(apt-cache "${apt_opts[@]}" depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n1)
    [ -n "$pkg" ] || die "cannot tell which kernel bookworm-backports' linux-image-cloud-amd64 depends on"
fi
kver=${pkg#linux-image-}
kver=${kver%-unsigned}
case "$kver" in
    [0-5].* | 6.[0-7].*) die "L1 kernel $kver is older than 6.8: amsvm's pool needs UFFDIO_MOVE" ;;
esac
echo "nested/build.sh: L1 kernel package $pkg"

fetch() { # package [apt options...] -> path of its .deb in the cache
    local p=$1 deb
    shift
    deb=$(find "$cache/" -maxdepth 1 -name "${p}_*.deb" | sort | tail -n1)
    if [ -z "$deb" ]; then
        (cd "$cache" && apt-get "$@" download -q -o APT::Sandbox::User=root "$p" >&2) ||
            die "apt-get download $p failed (network? apt-get update?)"
        deb=$(find "$cache/" -maxdepth 1 -name "${p}_*.deb" | sort | tail -n1)
        [ -n "$deb" ] || die "apt-get download $p left no .deb in $cache"
    fi
    echo "$deb"
}
kdeb=$(fetch "$pkg" "${apt_opts[@]}")
# busybox-static from the system's own lists (bookworm), as guest-images/linux does.
if ! apt-cache show busybox-static >/dev/null 2>&1 && [ -z "$(find "$cache/" -maxdepth 1 -name 'busybox-static_*.deb')" ]; then
    [ "$(id -u)" = 0 ] || die "apt does not know busybox-static: run 'apt-get update' as root"
    apt-get update -qq
fi
bdeb=$(fetch busybox-static)

kroot=$cache/root-$kver
if [ ! -e "$kroot/.complete" ]; then
    rm -rf "$kroot"
    mkdir -p "$kroot"
    dpkg-deb -x "$kdeb" "$kroot"
    touch "$kroot/.complete"
fi
bbroot=$cache/root-busybox
if [ ! -x "$bbroot/bin/busybox" ]; then
    rm -rf "$bbroot"
    dpkg-deb -x "$bdeb" "$bbroot"
fi
busybox=$bbroot/bin/busybox
[ -x "$busybox" ] || die "busybox-static did not provide bin/busybox"
vmlinuz=$kroot/boot/vmlinuz-$kver
[ -f "$vmlinuz" ] || die "$kdeb has no boot/vmlinuz-$kver"
moddir=""
for d in "$kroot/lib/modules/$kver" "$kroot/usr/lib/modules/$kver"; do
    [ -d "$d" ] && moddir=$d && break
done
[ -n "$moddir" ] || die "$kdeb has no lib/modules/$kver"

# --- initramfs tree -------------------------------------------------------------------------
stage=$(mktemp -d "${TMPDIR:-/tmp}/amsvm-l1.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc,lib/modules,l2,scenario}
cp "$busybox" "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"

order=""
add_module() { # name: stage it and its dependencies, dependencies first
    local name=${1//-/_} file dep deps
    case " $order " in *" $name "*) return 0 ;; esac
    file=$(find "$moddir/kernel" \( -name "$name.ko*" -o -name "${name//_/-}.ko*" \) | head -n1)
    [ -n "$file" ] || die "module $name not found in $pkg"
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
add_module kvm_amd
echo "$order" | tr ' ' '\n' | sed '/^$/d' >"$stage/etc/l1-modules"
echo "nested/build.sh: L1 modules (load order):$order"

# amsvm, stripped, with the shared libraries and the loader it names.
strip -o "$stage/bin/amsvm" "$amsvm"
ldd "$amsvm" | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }' | while read -r lib; do
    mkdir -p "$stage$(dirname "$lib")"
    cp -L "$lib" "$stage$lib"
done
[ -n "$(find "$stage" -name 'ld-linux*')" ] || die "ldd $amsvm named no loader"

# The L2 guest, and memverify for L1's own checks of disk images.
cp "$l2/vmlinuz" "$l2/initramfs.cpio.gz" "$stage/l2/"
cp "$l2/memverify" "$stage/bin/memverify"

cat >"$stage/init" <<'EOF'
#!/bin/busybox sh
# L1 init of the nested harness: mount, load kvm_amd, check that KVM works with nested
# paging and that userfaultfd exists, run /scenario/run.sh, power off. Lines starting
# with "amsvm-l1:" are read by tests/nested; "amsvm-l1: FAIL: why" ends the run.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
fail() {
    echo "amsvm-l1: FAIL: $*"
    poweroff -f
    sleep 60
}
echo "amsvm-l1: init, kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime) s"
for m in $(cat /etc/l1-modules); do
    out=$(insmod "/lib/modules/$m.ko" 2>&1) || fail "insmod $m: $out; dmesg: $(dmesg | tail -n 3 | tr '\n' '|')"
done
grep -q '^flags.* svm' /proc/cpuinfo || fail "the L1 CPU has no svm flag (QEMU needs -cpu EPYC,+svm,+npt)"
dmesg | grep -q 'Nested Paging enabled' ||
    fail "kvm_amd loaded without nested paging (QEMU needs -cpu ...,+npt); kvm dmesg: $(dmesg | grep -iE 'kvm|svm' | tail -n 4 | tr '\n' '|')"
[ -c /dev/kvm ] || fail "/dev/kvm does not exist after loading kvm_amd; dmesg: $(dmesg | tail -n 4 | tr '\n' '|')"
[ -c /dev/userfaultfd ] || fail "/dev/userfaultfd does not exist: kernel $(uname -r) lacks CONFIG_USERFAULTFD (amsvm's pool needs it, and 6.8+ for UFFDIO_MOVE)"
echo "amsvm-l1: kvm ready: $(dmesg | grep -o 'Nested Paging enabled' | head -n1), /dev/kvm, /dev/userfaultfd, $(grep MemTotal /proc/meminfo | tr -s ' '), uptime $(cut -d' ' -f1 /proc/uptime) s"
if [ -f /scenario/run.sh ]; then
    cd /scenario
    echo "amsvm-l1: scenario start"
    sh /scenario/run.sh
    echo "amsvm-l1: scenario exit status $?"
else
    echo "amsvm-l1: no /scenario/run.sh, starting a shell (exit powers off)"
    setsid cttyhack sh
fi
echo "amsvm-l1: powering off"
sync
poweroff -f
sleep 60
EOF
chmod 755 "$stage/init"

# --- outputs --------------------------------------------------------------------------------
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | "$busybox" cpio -o -H newc -R 0:0 2>/dev/null) >"$out/l1.cpio.tmp"
mv "$out/l1.cpio.tmp" "$out/l1.cpio"
cp "$vmlinuz" "$out/vmlinuz"
echo "$pkg" >"$out/VERSION"
"$busybox" cpio -t <"$out/l1.cpio" 2>/dev/null | grep -qx init || die "l1.cpio lacks /init"
echo "nested/build.sh: wrote $out/vmlinuz ($(stat -c %s "$out/vmlinuz") bytes, $pkg)"
echo "nested/build.sh: wrote $out/l1.cpio ($(stat -c %s "$out/l1.cpio") bytes)"
