//! The guest's initramfs: a static busybox as `/init`, the modules it needs
//! to reach the host's root through virtio-fs, written as a newc cpio archive.

use std::{fs, path::Path};

use anyhow::{Context as _, bail};

use super::{Kernel, fetch};

/// The modules the initramfs loads itself; the guest's modprobe finds the rest
/// (veth, nf_tables, ...) in the cached module tree when the kernel asks.
const BOOT_MODULES: &[&str] = &["virtio_pci", "virtiofs", "overlay"];

/// Busybox applets the initramfs links.
const APPLETS: &[&str] = &[
    "sh", "mount", "umount", "insmod", "modprobe", "mkdir", "cat", "echo", "cut", "ip", "chroot",
    "sync", "poweroff", "uname", "ls", "sleep", "dmesg",
];

/// The guest's `/init` (busybox sh): modules, the host's root as a read-only
/// overlay lower layer, the usual pseudo filesystems, then the generated
/// run script chrooted into that root. Markers on the console tell the host
/// how far it got.
const INIT: &str = r#"#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
release=$(uname -r)
echo "@@KM init $release"
for module in $(cat /modules.load); do
    insmod /lib/modules/$release/$module || echo "@@KM warn insmod $module failed"
done
mkdir -p /host /results /rw /newroot
mount -t virtiofs -o ro hostroot /host || echo "@@KM fatal cannot mount the host root"
mount -t virtiofs results /results || echo "@@KM fatal cannot mount the results share"
. /results/guest.env
# The kernel's modprobe (busybox, this initramfs) loads from the cached tree.
mount --bind /host$MODULES /lib/modules/$release
echo /sbin/modprobe > /proc/sys/kernel/modprobe
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || echo "@@KM fatal cannot mount the overlay root"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs shm $R/dev/shm
for dir in /tmp /run /var/tmp; do
    mkdir -p $R$dir
    # The workspace or target directory lives there (a clone in /tmp): keep
    # the overlaid host copy, writable all the same.
    case " $KEEP " in *" $dir/"*) continue ;; esac
    mount -t tmpfs -o mode=1777 tmp $R$dir
done
mount -t tracefs tracefs $R/sys/kernel/tracing
mount -t debugfs debugfs $R/sys/kernel/debug
mount -t bpf bpf $R/sys/fs/bpf
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup
mkdir -p $R$RESULTS
mount --bind /results $R$RESULTS
ip link set lo up
echo "@@KM ready"
chroot $R /bin/sh $RESULTS/run.sh
echo "@@KM done"
dmesg > /results/dmesg.log
sync
umount /results
poweroff -f
"#;

/// A minimal cpio (newc) archive writer: what the kernel unpacks as initramfs.
struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Self {
        Self {
            data: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            body.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn file(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.entry(name, 0o100000 | mode, body);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.data
    }
}

/// The busybox binary, which must be static: it runs before anything else.
fn static_busybox() -> anyhow::Result<Vec<u8>> {
    let path = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .context("busybox not found (apt-get install busybox-static)")?;
    let binary = fs::read(path)?;
    if binary.windows(14).any(|w| w == b"/lib64/ld-linu") {
        bail!("{path} is dynamically linked: install busybox-static");
    }
    Ok(binary)
}

pub fn initramfs(kernel: &Kernel) -> anyhow::Result<Vec<u8>> {
    let modules = fetch::load_order(kernel, BOOT_MODULES)?;
    let mut cpio = Cpio::new();
    for dir in [
        ".",
        "bin",
        "sbin",
        "proc",
        "sys",
        "dev",
        "host",
        "results",
        "rw",
        "newroot",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(dir);
    }
    cpio.file("bin/busybox", 0o755, &static_busybox()?);
    for applet in APPLETS {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    cpio.symlink("sbin/modprobe", "../bin/busybox");
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file(
        "modules.load",
        0o644,
        (modules.join("\n") + "\n").as_bytes(),
    );
    let base = format!("lib/modules/{}", kernel.release);
    let mut made: Vec<String> = vec![base.clone()];
    cpio.dir(&base);
    for module in &modules {
        // Parent directories first.
        let mut dir = base.clone();
        let parts: Vec<&str> = module.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            dir = format!("{dir}/{part}");
            if !made.contains(&dir) {
                cpio.dir(&dir);
                made.push(dir.clone());
            }
        }
        let body = fs::read(kernel.modules_dir().join(module))
            .with_context(|| format!("reading module {module}"))?;
        cpio.file(&format!("{base}/{module}"), 0o644, &body);
    }
    Ok(cpio.finish())
}
