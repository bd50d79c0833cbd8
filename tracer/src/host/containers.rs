//! Which container (and Kubernetes pod) a process runs in, from its cgroup path
//! — the only place the kernel records it. Used to label metrics.

use std::{fs, num::NonZeroUsize};

use lru::LruCache;

/// A process's container, as far as its cgroup path shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ContainerInfo {
    /// The first 12 hex digits of the container id (what `docker ps` shows);
    /// empty for processes outside containers.
    pub container: String,
    /// The Kubernetes pod UID; empty outside pods.
    pub pod_uid: String,
}

/// Parses `/proc/<pid>/cgroup` (v1: `N:controllers:/path` lines, v2: `0::/path`).
/// Container runtimes name the leaf cgroup after the container id, either as
/// the bare 64-digit id (cgroupfs driver: `/docker/<id>`,
/// `/kubepods/burstable/pod<uid>/<id>`) or wrapped by systemd
/// (`docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
/// `libpod-<id>.scope`); pods appear as `pod<uid>` or `…-pod<uid_with_underscores>.slice`.
pub fn parse_cgroup(text: &str) -> ContainerInfo {
    let mut info = ContainerInfo::default();
    for line in text.lines() {
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        for segment in path.split('/') {
            if let Some(id) = container_id(segment) {
                info.container = id[..12].to_string();
            }
            if let Some(uid) = pod_uid(segment) {
                info.pod_uid = uid;
            }
        }
        if !info.container.is_empty() {
            break;
        }
    }
    info
}

fn container_id(segment: &str) -> Option<&str> {
    let inner = segment.strip_suffix(".scope").unwrap_or(segment);
    let inner = [
        "docker-",
        "cri-containerd-",
        "crio-",
        "libpod-",
        "containerd-",
    ]
    .iter()
    .find_map(|prefix| inner.strip_prefix(prefix))
    .unwrap_or(inner);
    (inner.len() == 64 && inner.bytes().all(|b| b.is_ascii_hexdigit())).then_some(inner)
}

fn pod_uid(segment: &str) -> Option<String> {
    let start = segment.rfind("pod")?;
    let rest = &segment[start + 3..];
    let uid = rest.strip_suffix(".slice").unwrap_or(rest);
    // A UID: 32 hex digits in five groups, separated by '-' (or '_' under systemd).
    let hex = uid.chars().filter(|c| c.is_ascii_hexdigit()).count();
    let separators = uid.chars().filter(|c| *c == '-' || *c == '_').count();
    (uid.len() == 36 && hex == 32 && separators == 4).then(|| uid.replace('_', "-"))
}

/// Container info per process, cached (processes do not change container).
pub struct Containers {
    cache: LruCache<u32, ContainerInfo>,
}

impl Default for Containers {
    fn default() -> Self {
        Self {
            cache: LruCache::new(NonZeroUsize::new(4096).expect("non-zero")),
        }
    }
}

impl Containers {
    pub fn of(&mut self, pid: u32) -> ContainerInfo {
        if let Some(info) = self.cache.get(&pid) {
            return info.clone();
        }
        let info = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map(|text| parse_cgroup(&text))
            .unwrap_or_default();
        self.cache.put(pid, info.clone());
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4a5b6c7d8e9f00112233445566778899aabbccddeeff001122334455667788";

    #[test]
    fn host_processes_have_no_container() {
        assert_eq!(
            parse_cgroup("0::/user.slice/user-0.slice/session-1.scope\n"),
            ContainerInfo::default()
        );
        assert_eq!(parse_cgroup("0::/init.scope\n"), ContainerInfo::default());
    }

    #[test]
    fn docker_with_systemd_and_cgroupfs() {
        let systemd = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(parse_cgroup(&systemd).container, "3f4a5b6c7d8e");
        let cgroupfs = format!("12:memory:/docker/{ID}\n11:cpu:/docker/{ID}\n");
        assert_eq!(parse_cgroup(&cgroupfs).container, "3f4a5b6c7d8e");
    }

    #[test]
    fn kubernetes_pods_under_systemd_and_cgroupfs() {
        let systemd = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_5f60_7182_93a4_b5c6d7e8f901.slice/cri-containerd-{ID}.scope\n"
        );
        let info = parse_cgroup(&systemd);
        assert_eq!(info.container, "3f4a5b6c7d8e");
        assert_eq!(info.pod_uid, "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901");
        let cgroupfs =
            format!("0::/kubepods/besteffort/pod1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901/{ID}\n");
        let info = parse_cgroup(&cgroupfs);
        assert_eq!(info.container, "3f4a5b6c7d8e");
        assert_eq!(info.pod_uid, "1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901");
    }

    #[test]
    fn crio_and_podman() {
        for wrapped in [format!("crio-{ID}.scope"), format!("libpod-{ID}.scope")] {
            let info = parse_cgroup(&format!("0::/machine.slice/{wrapped}\n"));
            assert_eq!(info.container, "3f4a5b6c7d8e", "{wrapped}");
        }
    }

    #[test]
    fn processes_that_are_gone_have_no_container() {
        assert_eq!(Containers::default().of(u32::MAX), ContainerInfo::default());
    }
}
