//! Debian cloud kernels, fetched with apt against a private sources list and
//! package lists kept in the cache (the machine's own apt configuration is
//! left alone), unpacked once per package version.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};

use super::Kernel;
use crate::exec;

/// Where each series comes from: bullseye has 5.10, bookworm 6.1 and
/// bookworm-backports 6.12.
const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
";

/// Package lists younger than this are not refreshed.
const LISTS_MAX_AGE: Duration = Duration::from_secs(12 * 3600);

/// The private apt setup: configuration file and the directories it names.
struct Apt {
    dir: PathBuf,
}

impl Apt {
    fn prepare(cache: &Path) -> anyhow::Result<Self> {
        let dir = cache.join("apt");
        for sub in ["lists/partial", "cache/archives/partial"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        fs::write(dir.join("sources.list"), SOURCES)?;
        // The system's apt.conf.d still applies (proxies, for one), except the
        // hooks that would act on the machine's own caches, and the AppStream
        // metadata nobody here needs.
        let conf = format!(
            "Dir::Etc::SourceList \"{dir}/sources.list\";\n\
             Dir::Etc::SourceParts \"/dev/null\";\n\
             Dir::State::Lists \"{dir}/lists\";\n\
             Dir::Cache \"{dir}/cache\";\n\
             Acquire::Languages \"none\";\n\
             APT::Sandbox::User \"root\";\n\
             #clear APT::Update::Post-Invoke;\n\
             #clear APT::Update::Post-Invoke-Success;\n\
             #clear DPkg::Post-Invoke;\n\
             #clear Acquire::IndexTargets::deb::DEP-11;\n\
             #clear Acquire::IndexTargets::deb::DEP-11-icons;\n\
             #clear Acquire::IndexTargets::deb::DEP-11-icons-small;\n\
             #clear Acquire::IndexTargets::deb::DEP-11-icons-hidpi;\n",
            dir = dir.display()
        );
        fs::write(dir.join("apt.conf"), conf)?;
        Ok(Self { dir })
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.arg("-c").arg(self.dir.join("apt.conf"));
        cmd
    }

    fn lists_fresh(&self) -> bool {
        let stamp = self.dir.join("lists/updated");
        fs::metadata(stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < LISTS_MAX_AGE)
    }

    fn update(&self) -> anyhow::Result<()> {
        if self.lists_fresh() {
            return Ok(());
        }
        println!(
            "kernels: apt-get update (private lists in {})",
            self.dir.display()
        );
        let mut update = self.command("apt-get");
        update.args(["-q", "update"]);
        exec::run(&mut update)?;
        fs::write(self.dir.join("lists/updated"), "")?;
        Ok(())
    }

    /// The newest `linux-image-<series>.*-cloud-amd64-unsigned` package and its
    /// version.
    fn newest(&self, series: &str) -> anyhow::Result<(String, String)> {
        let out = exec::output(self.command("apt-cache").args(["pkgnames", "linux-image-"]))?;
        let prefix = format!("{series}.");
        let mut candidates: Vec<(String, String)> = Vec::new();
        for name in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(abi) = name
                .strip_prefix("linux-image-")
                .and_then(|rest| rest.strip_suffix("-cloud-amd64-unsigned"))
            else {
                continue;
            };
            if !abi.starts_with(&prefix) {
                continue;
            }
            let show =
                exec::output(
                    self.command("apt-cache")
                        .args(["show", "--no-all-versions", name]),
                )?;
            let version = String::from_utf8_lossy(&show.stdout)
                .lines()
                .find_map(|line| line.strip_prefix("Version: "))
                .map(str::to_string);
            if let Some(version) = version {
                candidates.push((name.to_string(), version));
            }
        }
        let mut newest: Option<(String, String)> = None;
        for candidate in candidates {
            let newer = match &newest {
                None => true,
                Some((_, best)) => Command::new("dpkg")
                    .args(["--compare-versions", &candidate.1, "gt", best])
                    .status()
                    .is_ok_and(|s| s.success()),
            };
            if newer {
                newest = Some(candidate);
            }
        }
        newest.with_context(|| {
            format!(
                "no linux-image-{series}.*-cloud-amd64-unsigned package in bullseye, bookworm \
                 or bookworm-backports"
            )
        })
    }

    fn download(&self, package: &str, into: &Path) -> anyhow::Result<PathBuf> {
        println!("kernels: apt-get download {package}");
        let mut download = self.command("apt-get");
        download.args(["-q", "download", package]).current_dir(into);
        exec::run(&mut download)?;
        let deb = fs::read_dir(into)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
            .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
        Ok(deb)
    }
}

/// What the cache of one series holds: `kernel.txt` (package, version,
/// release), `vmlinuz`, `config`, the `.deb`, and `root/lib/modules/<release>`
/// with modules decompressed and indexed by busybox's depmod.
fn read_stamp(dir: &Path) -> Option<(String, String, String)> {
    let text = fs::read_to_string(dir.join("kernel.txt")).ok()?;
    let mut fields = text.split_whitespace().map(str::to_string);
    Some((fields.next()?, fields.next()?, fields.next()?))
}

/// Resolves and caches each series. When the registry cannot be reached, a
/// series already in the cache is used as it is.
pub fn kernels(cache: &Path, series: &[String]) -> anyhow::Result<Vec<Kernel>> {
    let apt = Apt::prepare(cache)?;
    let update = apt.update();
    if let Err(e) = &update {
        println!("kernels: cannot refresh the package lists ({e:#}); using what is cached");
    }
    let mut kernels = Vec::new();
    for name in series {
        let dir = cache.join(name);
        fs::create_dir_all(&dir)?;
        let cached = read_stamp(&dir);
        let wanted = match apt.newest(name) {
            Ok(found) => found,
            Err(e) => match &cached {
                Some((package, version, _)) => {
                    println!("kernels: {name}: {e:#}; using the cached {package} {version}");
                    (package.clone(), version.clone())
                }
                None => return Err(e),
            },
        };
        let release = match cached {
            Some((package, version, release))
                if (package.as_str(), version.as_str())
                    == (wanted.0.as_str(), wanted.1.as_str())
                    && dir.join("vmlinuz").is_file() =>
            {
                release
            }
            _ => unpack(&apt, &dir, &wanted.0, &wanted.1)?,
        };
        kernels.push(Kernel {
            series: name.clone(),
            package: wanted.0,
            version: wanted.1,
            release,
            dir,
        });
    }
    Ok(kernels)
}

/// Downloads and unpacks one kernel package into `dir`; returns its release.
fn unpack(apt: &Apt, dir: &Path, package: &str, version: &str) -> anyhow::Result<String> {
    // Older downloads and trees of this series go first.
    for entry in fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".deb") || ["root", "unpack", "vmlinuz", "kernel.txt"].contains(&&*name) {
            if path.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
        }
    }
    let deb = apt.download(package, dir)?;
    let unpack = dir.join("unpack");
    println!("kernels: unpacking {}", deb.display());
    exec::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpack))?;
    let modules_root = unpack.join("lib/modules");
    let release = fs::read_dir(&modules_root)
        .with_context(|| format!("{package} has no lib/modules"))?
        .flatten()
        .find(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .with_context(|| format!("{package} has no lib/modules/<release>"))?;
    let boot = unpack.join("boot");
    fs::rename(boot.join(format!("vmlinuz-{release}")), dir.join("vmlinuz"))
        .with_context(|| format!("{package} has no boot/vmlinuz-{release}"))?;
    let _ = fs::rename(boot.join(format!("config-{release}")), dir.join("config"));
    let modules = dir.join("root/lib/modules");
    fs::create_dir_all(&modules)?;
    fs::rename(modules_root.join(&release), modules.join(&release))?;
    fs::remove_dir_all(&unpack)?;

    // busybox modprobe (the guest's) reads plain .ko files; 6.12 ships .ko.xz.
    let mut compressed = Vec::new();
    collect_files(&modules.join(&release), ".ko.xz", &mut compressed)?;
    for chunk in compressed.chunks(200) {
        exec::run(Command::new("busybox").args(["xz", "-d", "-f"]).args(chunk))?;
    }
    // Debian generates modules.dep at install time; busybox's depmod does it here.
    exec::run(
        Command::new("busybox")
            .arg("depmod")
            .arg("-b")
            .arg(dir.join("root"))
            .arg(&release),
    )?;
    fs::write(
        dir.join("kernel.txt"),
        format!("{package} {version} {release}\n"),
    )?;
    Ok(release)
}

fn collect_files(dir: &Path, suffix: &str, found: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, suffix, found)?;
        } else if path.to_string_lossy().ends_with(suffix) {
            found.push(path);
        }
    }
    Ok(())
}

/// Module names from `modules.dep` paths: `kernel/fs/fuse/virtiofs.ko` ->
/// `virtiofs`.
fn module_name(path: &str) -> &str {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.strip_suffix(".ko").unwrap_or(file)
}

/// The modules (paths relative to the modules directory) that `wanted` need, in
/// load order, dependencies first. Built-in modules are not in `modules.dep`
/// and need nothing.
pub fn load_order(kernel: &Kernel, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let dep_file = kernel.modules_dir().join("modules.dep");
    let text =
        fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    let deps: Vec<(String, Vec<String>)> = text
        .lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((
                module.trim().to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect();
    let find = |name: &str| deps.iter().find(|(path, _)| module_name(path) == name);
    let mut order: Vec<String> = Vec::new();
    fn visit(
        path: &str,
        deps: &[(String, Vec<String>)],
        order: &mut Vec<String>,
        depth: usize,
    ) -> anyhow::Result<()> {
        if depth > 64 {
            bail!("module dependency loop at {path}");
        }
        if order.iter().any(|p| p == path) {
            return Ok(());
        }
        if let Some((_, needs)) = deps.iter().find(|(p, _)| p == path) {
            for need in needs {
                visit(need, deps, order, depth + 1)?;
            }
        }
        order.push(path.to_string());
        Ok(())
    }
    for name in wanted {
        if let Some((path, _)) = find(name) {
            visit(path, &deps, &mut order, 0)?;
        } else if !builtin(kernel, name)? {
            bail!("kernel {} has no module {name}", kernel.release);
        }
    }
    Ok(order)
}

fn builtin(kernel: &Kernel, name: &str) -> anyhow::Result<bool> {
    let path = kernel.modules_dir().join("modules.builtin");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().any(|line| module_name(line) == name))
}
