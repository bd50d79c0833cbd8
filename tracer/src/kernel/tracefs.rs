//! tracefs: where it is mounted (mounting it when it is not), and the field
//! offsets of classic tracepoint records from their `format` files.

use std::{
    fs,
    path::{Path, PathBuf},
};

use tracer_common::config::TracepointOffsets;

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it at {TRACEFS} failed ({source}); \
         mount it with `mount -t tracefs nodev {TRACEFS}` (in a container, mount the \
         host's {TRACEFS})"
    )]
    Mount {
        #[source]
        source: nix::Error,
    },
    #[error("tracepoint {0} does not exist on this kernel")]
    NoTracepoint(String),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tracepoint {tracepoint} has no field {field}")]
    NoField { tracepoint: String, field: String },
}

/// A mounted tracefs.
#[derive(Clone, Debug)]
pub struct Tracefs {
    root: PathBuf,
}

impl Tracefs {
    /// Finds tracefs, or mounts it at /sys/kernel/tracing.
    pub fn find_or_mount() -> Result<Self, TracefsError> {
        if let Some(found) = Self::find() {
            return Ok(found);
        }
        nix::mount::mount(
            Some("nodev"),
            TRACEFS,
            Some("tracefs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| TracefsError::Mount { source })?;
        log::info!("mounted tracefs at {TRACEFS}");
        Ok(Self {
            root: TRACEFS.into(),
        })
    }

    /// Finds a mounted tracefs without changing anything.
    pub fn find() -> Option<Self> {
        [TRACEFS, DEBUGFS_TRACING]
            .into_iter()
            .map(PathBuf::from)
            .find(|root| root.join("events").is_dir())
            .map(|root| Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn has_tracepoint(&self, category: &str, name: &str) -> bool {
        self.root.join("events").join(category).join(name).is_dir()
    }

    /// Whether the kernel can attach kprobes (it lists them in tracefs).
    pub fn has_kprobes(&self) -> bool {
        self.root.join("kprobe_events").exists()
    }

    /// The parsed `format` file of `category:name`.
    pub fn format(&self, category: &str, name: &str) -> Result<Format, TracefsError> {
        let path = self
            .root
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        if !path.exists() {
            return Err(TracefsError::NoTracepoint(format!("{category}:{name}")));
        }
        let text = fs::read_to_string(&path).map_err(|source| TracefsError::Read {
            path: path.clone(),
            source,
        })?;
        Ok(Format {
            tracepoint: format!("{category}:{name}"),
            fields: parse_format(&text),
        })
    }

    /// Offsets of every classic tracepoint field the programs read. A tracepoint
    /// that is missing leaves its offsets at 0; its program is then not attached.
    pub fn tracepoint_offsets(&self) -> Result<TracepointOffsets, TracefsError> {
        let mut offsets = TracepointOffsets::default();
        let wanted = [
            (
                &mut offsets.set_state_skaddr,
                "sock",
                "inet_sock_set_state",
                "skaddr",
            ),
            (
                &mut offsets.set_state_oldstate,
                "sock",
                "inet_sock_set_state",
                "oldstate",
            ),
            (
                &mut offsets.set_state_newstate,
                "sock",
                "inet_sock_set_state",
                "newstate",
            ),
            (
                &mut offsets.receive_reset_skaddr,
                "tcp",
                "tcp_receive_reset",
                "skaddr",
            ),
            (
                &mut offsets.send_reset_skaddr,
                "tcp",
                "tcp_send_reset",
                "skaddr",
            ),
            (
                &mut offsets.retransmit_skaddr,
                "tcp",
                "tcp_retransmit_skb",
                "skaddr",
            ),
            (
                &mut offsets.connect_fd,
                "syscalls",
                "sys_enter_connect",
                "fd",
            ),
            (
                &mut offsets.connect_uservaddr,
                "syscalls",
                "sys_enter_connect",
                "uservaddr",
            ),
            (
                &mut offsets.sys_exit_ret,
                "syscalls",
                "sys_exit_connect",
                "ret",
            ),
        ];
        for (slot, category, name, field) in wanted {
            match self.format(category, name) {
                Ok(format) => *slot = format.offset(field)?,
                Err(TracefsError::NoTracepoint(_)) => {}
                Err(e) => return Err(e),
            }
        }
        // Newer kernels also trace retransmissions that failed to go out, with
        // their error; those are not retransmissions on the wire.
        if let Ok(format) = self.format("tcp", "tcp_retransmit_skb")
            && let Ok(offset) = format.offset("err")
        {
            offsets.retransmit_err = offset;
        }
        // 6.10 made the tracepoint report every reset sent, with its reason;
        // before, resets answering a segment need kprobes (see the field).
        if let Ok(format) = self.format("tcp", "tcp_send_reset")
            && format.offset("reason").is_err()
            && let Ok(offset) = format.offset("skbaddr")
        {
            offsets.send_reset_skbaddr = offset;
        }
        Ok(offsets)
    }
}

/// The fields of one tracepoint record.
#[derive(Debug)]
pub struct Format {
    tracepoint: String,
    fields: Vec<(String, u32)>,
}

impl Format {
    pub fn offset(&self, field: &str) -> Result<u32, TracefsError> {
        self.fields
            .iter()
            .find(|(name, _)| name == field)
            .map(|(_, offset)| *offset)
            .ok_or_else(|| TracefsError::NoField {
                tracepoint: self.tracepoint.clone(),
                field: field.to_string(),
            })
    }
}

/// Parses lines like `field:const void * skaddr; offset:8; size:8; signed:0;`
/// (tab-separated) into (name, offset). The name is the declaration's last
/// identifier, without an array suffix.
fn parse_format(text: &str) -> Vec<(String, u32)> {
    text.lines()
        .filter_map(|line| {
            let mut declaration = None;
            let mut offset = None;
            for part in line.trim().split(';') {
                let part = part.trim();
                if let Some(decl) = part.strip_prefix("field:") {
                    declaration = Some(decl);
                } else if let Some(value) = part.strip_prefix("offset:") {
                    offset = value.parse().ok();
                }
            }
            let name = declaration?
                .rsplit(|c: char| c.is_whitespace() || c == '*')
                .next()?
                .split('[')
                .next()?;
            Some((name.to_string(), offset?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE: &str = "name: inet_sock_set_state
ID: 1530
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:struct sockaddr * uservaddr;\toffset:24;\tsize:8;\tsigned:0;

print fmt: \"family=%s\", REC->family
";

    #[test]
    fn parses_pointer_array_and_plain_fields() {
        let fields = parse_format(SET_STATE);
        assert_eq!(
            fields,
            [
                ("common_type".to_string(), 0),
                ("common_pid".to_string(), 4),
                ("skaddr".to_string(), 8),
                ("oldstate".to_string(), 16),
                ("saddr_v6".to_string(), 40),
                ("uservaddr".to_string(), 24),
            ]
        );
    }

    #[test]
    fn missing_field_is_named() {
        let format = Format {
            tracepoint: "sock:inet_sock_set_state".into(),
            fields: parse_format(SET_STATE),
        };
        assert_eq!(format.offset("skaddr").unwrap(), 8);
        let err = format.offset("newstate").unwrap_err();
        assert_eq!(
            err.to_string(),
            "tracepoint sock:inet_sock_set_state has no field newstate"
        );
    }
}
