#!/bin/sh
# Builds the test guest: Debian's kernel and a busybox initramfs whose /init
# loads the virtio-blk modules, runs /test.sh (appended by each test as a
# second cpio archive) and powers off.
# Usage: build.sh OUTDIR   -> OUTDIR/vmlinuz, OUTDIR/base.cpio.gz
set -eu
out=$1
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
[ -s "$out/vmlinuz" ] && [ -s "$out/base.cpio.gz" ] && exit 0
for t in busybox cpio apt-get dpkg-deb; do
  command -v $t >/dev/null || { echo "build.sh: $t is missing: apt-get install -y busybox-static cpio" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image/{print $2; exit}')
[ -n "$pkg" ] || { echo "build.sh: cannot find the kernel package linux-image-amd64 depends on" >&2; exit 1; }
(cd "$work" && apt-get download "$pkg" >/dev/null)
dpkg-deb -x "$work"/linux-image-*.deb "$work/root"
mkdir -p "$work/rd/bin" "$work/rd/lib/modules" "$work/rd/proc" "$work/rd/sys" "$work/rd/dev" "$work/rd/tmp"
cp /bin/busybox "$work/rd/bin/busybox"
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  f=$(find "$work/root/lib/modules" -name "$m.ko*" | head -n1)
  [ -n "$f" ] || { echo "build.sh: module $m not found in $pkg" >&2; exit 1; }
  case "$f" in
    *.xz) xz -dc "$f" > "$work/rd/lib/modules/$m.ko" ;;
    *.zst) zstd -dqc "$f" > "$work/rd/lib/modules/$m.ko" ;;
    *) cp "$f" "$work/rd/lib/modules/$m.ko" ;;
  esac
done
cat > "$work/rd/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for pass in 1 2 3 4 5 6; do
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    grep -q "^$m " /proc/modules || insmod /lib/modules/$m.ko 2>/dev/null
  done
  grep -q "^virtio_blk " /proc/modules && break
done
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done
echo "GUEST-START"
sh /test.sh 2>&1
echo "GUEST-END rc=$?"
poweroff -f
INIT
chmod +x "$work/rd/init"
(cd "$work/rd" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$work/base.cpio.gz")
cp "$work"/root/boot/vmlinuz-* "$out/vmlinuz.tmp"
mv "$work/base.cpio.gz" "$out/base.cpio.gz"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
